"""Renders a Vertex AI custom training job for `gcloud ai custom-jobs create --config=FILE`.

The second launcher, for teams without their own cluster: the same image and the same trainer
arguments as the Kubernetes train Job (taken from `kubectl kustomize k8s/base`, so the flags live in
one place), on Vertex AI machines picked from k8s/shapes.yaml. Used by `make submit-vertex`:

  python k8s/vertex.py --image=us-docker.pkg.dev/p/trainer/image-transfer-trainer:abc \
      --accelerator=nvidia-l4 --gpus=1 --workers=1 \
      --set data=gs://b/datasets/pets/dataset.json --set job_dir=gs://b/runs/pets-1

One worker: one node with all its GPUs (MirroredStrategy). Several: worker pool 0 is Vertex's
"chief" and pool 1 holds the other workers; Vertex writes TF_CONFIG (with that chief) on every
machine and MultiWorkerMirroredStrategy reads it. `restartJobOnWorkerRestart` restarts every
worker together when one is restarted, which the strategy needs, and each resumes from job_dir.
`baseOutputDirectory` is JOB_DIR/vertex, so Vertex sets AIP_MODEL_DIR (the trainer copies its
export there), AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR (the trainer syncs event files there).
"""

import argparse
import copy
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render  # noqa: E402 - k8s/render.py, next to this file

K8S = os.path.dirname(os.path.abspath(__file__))


def trainer_args(overrides, workers):
    """The train Job's trainer arguments with `--flag=value` overrides (as render's --set)."""
    train = next(item for item in render.kustomize(os.path.join(K8S, "base"))
                 if item["kind"] == "Job" and render.runs_command(item, "train"))
    container = next(c for _, t in render.pod_templates(train) for c in render.containers(t)
                     if render.trainer_command(c) == "train")
    args = list(container["args"])
    render.set_flag(args, "strategy", "multi_worker" if workers > 1 else "mirrored")
    for assignment in overrides:
        flag, equals, value = assignment.partition("=")
        render.set_flag(args, flag.lstrip("-"), value if equals else None)
    return args


def custom_job_spec(image, accelerator, gpus, workers, overrides, spot=False, service_account=None, tensorboard=None,
                    experiment=None):
    """The CustomJobSpec (as YAML-ready dicts) of one training run."""
    shapes = render.load_shapes()
    shape = render.shape_of(shapes, accelerator, gpus)
    args = trainer_args(overrides, workers)
    render.check_trainer_args(args)
    job_dir = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--job_dir=")), None)
    if not job_dir or not job_dir.startswith("gs://"):
        raise SystemExit("vertex: --set job_dir=gs://... is required (Vertex AI writes to Cloud Storage)")
    deadline_hours = float(next(arg.split("=", 1)[1] for arg in args if arg.startswith("--deadline_hours=")))
    pool = {
        "machineSpec": {"machineType": shape["machine"],
                        "acceleratorType": shapes["accelerators"][accelerator]["vertex"],
                        "acceleratorCount": gpus},
        "replicaCount": 1,
        "diskSpec": {"bootDiskType": "pd-ssd", "bootDiskSizeGb": shapes["boot_disk_gb"]},
        "containerSpec": {"imageUri": image, "args": args,
                          "env": [{"name": "TMPDIR", "value": "/tmp"}]},
    }
    pools = [pool] + ([{**copy.deepcopy(pool), "replicaCount": workers - 1}] if workers > 1 else [])
    spec = {
        "workerPoolSpecs": pools,
        "scheduling": {
            # The run's own --deadline_hours, plus an hour: Vertex's timeout is the backstop.
            "timeout": f"{int(deadline_hours * 3600) + 3600}s",
            "restartJobOnWorkerRestart": workers > 1,
            "strategy": "SPOT" if spot else "STANDARD",
        },
        "baseOutputDirectory": {"outputUriPrefix": f"{job_dir.rstrip('/')}/vertex"},
    }
    if service_account:
        spec["serviceAccount"] = service_account
    if tensorboard:  # Vertex AI TensorBoard: AIP_TENSORBOARD_LOG_DIR's event files are uploaded there
        if not tensorboard.startswith("projects/") or "/tensorboards/" not in tensorboard:
            raise SystemExit(f"vertex: TENSORBOARD={tensorboard!r}: expected projects/P/locations/R/tensorboards/ID")
        spec["tensorboard"] = tensorboard
        if not service_account:
            raise SystemExit("vertex: TENSORBOARD needs GSA (a service account: Vertex AI uploads event files as it)")
    if experiment:  # Vertex AI Experiments: the job is a run of this experiment
        spec["experiment"] = experiment
        spec["experimentRun"] = f"run-{job_dir.rstrip('/').rsplit('/', 1)[-1]}".lower()
    return spec


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--accelerator", default="nvidia-l4", help="a key of k8s/shapes.yaml")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FLAG[=VALUE]")
    parser.add_argument("--spot", action="store_true", help="Spot VMs (preemptible; the run resumes)")
    parser.add_argument("--service-account-email")
    parser.add_argument("--tensorboard", help="a Vertex AI TensorBoard: projects/P/locations/R/tensorboards/ID")
    parser.add_argument("--experiment", help="a Vertex AI Experiment: projects/P/locations/R/metadataStores/default/"
                                             "contexts/NAME")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.gpus < 1:
        parser.error("--workers and --gpus must be at least 1")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    spec = custom_job_spec(args.image, args.accelerator, args.gpus, args.workers, args.set, spot=args.spot,
                           service_account=args.service_account_email, tensorboard=args.tensorboard,
                           experiment=args.experiment)
    sys.stdout.write(yaml.safe_dump(spec, sort_keys=False, default_flow_style=False))


if __name__ == "__main__":
    main()
