"""Renders one run's manifests: `kubectl kustomize OVERLAY`, then this run's name, image and flags.

Used by `make submit-train` / `make submit-eval` (which pipe the output to `kubectl apply -f -`),
and runnable alone, without a cluster:

  python k8s/render.py k8s/overlays/gpu-spot --command=train --name=train-20261128-070000 \
      --image=us-docker.pkg.dev/my-project/trainer/image-transfer-trainer:abc123 \
      --set data=gs://my-bucket/datasets/cats-dogs/dataset.json --set job_dir=gs://my-bucket/runs/r1

Kustomize stays the source of the manifests; this script only sets what differs between runs:
  --command   keep only the workload whose containers run this trainer command (train, evaluate)
  --name      the workload's name and its `app.kubernetes.io/instance` label (make status/logs use it)
  --image     every trainer container's image
  --set F=V   the trainer flag --F=V (replaced, or appended) in the containers running --command;
              --set F alone writes the boolean --F
  --accelerator, --gpus  the GKE GPU type (node selector) and GPUs per pod; every GPU container
              gets the cpu, memory and ephemeral-storage of that row of k8s/shapes.yaml
  --workers   workers of a multi-node run: parallelism, completions and --num_workers
  --queue     the Kueue LocalQueue: the queue-name label on the workload Kueue manages, created
              suspended so that Kueue admits it by unsuspending
  --service-account-email  include the ServiceAccount, bound to this Google service account
    (left out otherwise, so a submission never resets the binding made at setup)

Needs PyYAML and `kubectl` on PATH.
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys

import yaml

WORKLOAD_KINDS = ("Job", "JobSet", "CronJob")
TRAINER_COMMANDS = ("prepare", "train", "evaluate", "predict", "promote")
# The GPU-node benchmark's container (k8s/bench): the trainer's image running `python3 -m bench.gpu_node`.
BENCH_COMMAND = ["python3", "-m", "bench.gpu_node"]
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The label each controller puts on a run's pods, with the run's name: what the NetworkPolicy selects.
RUN_POD_LABELS = {"JobSet": "jobset.sigs.k8s.io/jobset-name", "Job": "batch.kubernetes.io/job-name"}
SHAPES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.yaml")
QUEUES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kueue", "queues.yaml")


def load_shapes():
    with open(SHAPES_FILE) as handle:
        return yaml.safe_load(handle)


def shape_of(shapes, accelerator, gpus):
    """The row of k8s/shapes.yaml for a GPU type and count; SystemExit naming what exists."""
    if accelerator not in shapes["accelerators"]:
        raise SystemExit(f"render: unknown accelerator {accelerator!r}; k8s/shapes.yaml has "
                         f"{', '.join(shapes['accelerators'])}")
    rows = shapes["accelerators"][accelerator]["gpus"]
    if gpus not in rows:
        raise SystemExit(f"render: {accelerator} nodes come with {', '.join(map(str, rows))} GPUs, not {gpus} "
                         "(k8s/shapes.yaml)")
    return rows[gpus]


def _quantity(value):
    """A Kubernetes quantity as a number (GiB for memory and storage)."""
    text = str(value)
    for suffix, scale in (("Gi", 1.0), ("Mi", 1 / 1024), ("Ti", 1024.0)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    return float(text)


def queue_misfit(shapes, accelerator, gpus, workers):
    """Why a run of `workers` pods of the (accelerator, gpus) shape can never be admitted by the
    shipped k8s/kueue/queues.yaml, or None when it fits its flavor's quota."""
    with open(QUEUES_FILE) as handle:
        objects = [item for item in yaml.safe_load_all(handle) if item]
    flavors = {item["metadata"]["name"]: item["spec"]["nodeLabels"].get(ACCELERATOR_LABEL)
               for item in objects if item["kind"] == "ResourceFlavor"}
    quotas = {flavor["name"]: {item["name"]: _quantity(item["nominalQuota"]) for item in flavor["resources"]}
              for queue in objects if queue["kind"] == "ClusterQueue"
              for group in queue["spec"]["resourceGroups"] for flavor in group["flavors"]}
    quota = next((quotas[name] for name, label in flavors.items() if label == accelerator and name in quotas), None)
    if quota is None:
        return f"k8s/kueue/queues.yaml has no flavor for {accelerator}"
    row = shape_of(shapes, accelerator, gpus)
    needed = {"cpu": _quantity(row["cpu"]) * workers, "memory": _quantity(row["memory"]) * workers,
              "ephemeral-storage": _quantity(shapes["ephemeral_storage"]) * workers, "nvidia.com/gpu": gpus * workers}
    over = [f"{name} {needed[name]:g} > {quota[name]:g}" for name in needed if needed[name] > quota.get(name, 0)]
    return f"{workers} x {accelerator} x {gpus} needs more than the queue's quota ({', '.join(over)})" if over else None


def kustomize(overlay):
    """The overlay's objects, as `kubectl kustomize` renders them."""
    result = subprocess.run(["kubectl", "kustomize", overlay], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"render: kubectl kustomize {overlay} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_templates(workload):
    """The pod template(s) of a Job, JobSet or CronJob, with the Job spec around each."""
    kind = workload["kind"]
    if kind == "Job":
        return [(workload["spec"], workload["spec"]["template"])]
    if kind == "CronJob":
        job = workload["spec"]["jobTemplate"]["spec"]
        return [(job, job["template"])]
    if kind == "JobSet":
        return [(rjob["template"]["spec"], rjob["template"]["spec"]["template"])
                for rjob in workload["spec"]["replicatedJobs"]]
    return []


def containers(template):
    spec = template["spec"]
    return spec.get("initContainers", []) + spec.get("containers", [])


def trainer_command(container):
    """The trainer subcommand a container runs (the image's ENTRYPOINT is `trainer`), "bench" for
    the GPU-node benchmark, or None."""
    if container.get("command") == BENCH_COMMAND:
        return "bench"
    args = container.get("args") or []
    return args[0] if args and args[0] in TRAINER_COMMANDS and not container.get("command") else None


def runs_command(workload, command):
    return any(trainer_command(c) == command
               for _, template in pod_templates(workload) for c in containers(template))


def set_flag(args, flag, value=None):
    """Replaces `--flag=...` (or a boolean `--flag` / `--noflag`) in an argument list, or appends it.

    A value of None writes the bare boolean form `--flag`.
    """
    token = f"--{flag}" if value is None else f"--{flag}={value}"
    for index, arg in enumerate(args):
        if arg.startswith(f"--{flag}=") or arg in (f"--{flag}", f"--no{flag}"):
            args[index] = token
            return
    args.append(token)


def set_shape(container, shape, gpus, ephemeral_storage):
    """Gives a GPU container the requests (= limits) of its node shape; others are left alone."""
    resources = container.get("resources", {})
    if not resources.get("limits", {}).get("nvidia.com/gpu"):
        return
    values = {"cpu": shape["cpu"], "memory": shape["memory"], "ephemeral-storage": ephemeral_storage,
              "nvidia.com/gpu": gpus}
    resources["requests"] = dict(values)
    resources["limits"] = dict(values)


def set_workers(job_spec, template, workers):
    """Sets the number of workers of an Indexed Job (also the child Job of a JobSet)."""
    if job_spec.get("completionMode") != "Indexed":
        raise SystemExit("render: --workers needs a multi-worker overlay "
                         "(k8s/overlays/multiworker-jobset or multiworker-indexed)")
    job_spec["parallelism"] = job_spec["completions"] = workers
    for container in containers(template):
        if trainer_command(container) == "train":
            set_flag(container["args"], "num_workers", workers)


def set_queue(workload, queue):
    """Kueue: the queue-name label on what Kueue manages (a CronJob's Jobs), created suspended."""
    if workload["kind"] == "CronJob":
        job = workload["spec"]["jobTemplate"]
        job.setdefault("metadata", {}).setdefault("labels", {})[QUEUE_LABEL] = queue
        job["spec"]["suspend"] = True
        return
    workload["metadata"].setdefault("labels", {})[QUEUE_LABEL] = queue
    workload["spec"]["suspend"] = True


def set_policy_name(policy, name, kind):
    """The NetworkPolicy of one run: its name, and the run's pods on both sides of the rule."""
    policy["metadata"]["name"] = f"{name}-workers"
    policy["metadata"].setdefault("labels", {})["app.kubernetes.io/instance"] = name
    label = RUN_POD_LABELS[kind]
    selectors = [policy["spec"]["podSelector"]] + [peer["podSelector"] for rule in policy["spec"]["ingress"]
                                                   for peer in rule["from"]]
    for selector in selectors:
        selector["matchLabels"][label] = name


def set_name(workload, name):
    workload["metadata"]["name"] = name
    for metadata in [workload["metadata"]] + [template.setdefault("metadata", {})
                                              for _, template in pod_templates(workload)]:
        metadata.setdefault("labels", {})["app.kubernetes.io/instance"] = name
    if workload["kind"] == "JobSet":  # its child Jobs carry the label too (make status)
        for rjob in workload["spec"]["replicatedJobs"]:
            rjob["template"].setdefault("metadata", {}).setdefault("labels", {})[
                "app.kubernetes.io/instance"] = name
    if workload["kind"] == "CronJob":
        workload["spec"]["jobTemplate"].setdefault("metadata", {}).setdefault("labels", {})[
            "app.kubernetes.io/instance"] = name


def select(objects, command, service_account_email):
    """The objects a submission applies: the workload running `command` and what it needs."""
    workloads = [o for o in objects if o["kind"] in WORKLOAD_KINDS]
    if command:
        workloads = [w for w in workloads if runs_command(w, command)]
        if len(workloads) != 1:
            raise SystemExit(f"render: expected one workload running `trainer {command}`, "
                             f"found {len(workloads)}")
    subdomains = {template["spec"].get("subdomain")
                  for w in workloads for _, template in pod_templates(w)}
    selected = []
    for item in objects:
        if item["kind"] == "ServiceAccount":
            if service_account_email:
                item["metadata"].setdefault("annotations", {})[
                    WORKLOAD_IDENTITY_ANNOTATION] = service_account_email
                selected.append(item)
        elif item["kind"] == "Service":
            if item["metadata"]["name"] in subdomains:
                selected.append(item)
        elif item["kind"] == "NetworkPolicy":  # the workers' port: only with a multi-worker workload
            if any(runs_command(w, "train") and _multi_worker(w) for w in workloads):
                selected.append(item)
        elif item in workloads:
            selected.append(item)
        elif item["kind"] not in WORKLOAD_KINDS:
            selected.append(item)
    return selected


def _multi_worker(workload):
    return any(job.get("completionMode") == "Indexed" for job, _ in pod_templates(workload))


def customize(objects, args):
    shapes = load_shapes()
    accelerator = args.accelerator or shapes["default"]["accelerator"]
    gpus = args.gpus or shapes["default"]["gpus"]
    shape = shape_of(shapes, accelerator, gpus) if (args.accelerator or args.gpus) else None
    workloads = [o for o in objects if o["kind"] in WORKLOAD_KINDS]
    if args.queue and (misfit := queue_misfit(shapes, accelerator, gpus, args.workers or 1)):
        print(f"render: warning: queue {args.queue!r}, as k8s/kueue/queues.yaml ships it, can never admit this run: "
              f"{misfit}", file=sys.stderr)
    if args.name:
        trainers = [w for w in workloads if runs_command(w, "train") and _multi_worker(w)]
        for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
            set_policy_name(policy, args.name, trainers[0]["kind"] if trainers else "Job")
    for workload in workloads:
        if args.name:
            set_name(workload, args.name)
        if args.queue:
            set_queue(workload, args.queue)
        for job_spec, template in pod_templates(workload):
            for container in containers(template):
                command = trainer_command(container)
                if command is None:
                    continue
                if args.image:
                    container["image"] = args.image
                if shape:
                    set_shape(container, shape, gpus, shapes["ephemeral_storage"])
                if command == args.command:
                    for assignment in args.set:
                        flag, equals, value = assignment.partition("=")
                        set_flag(container["args"], flag.lstrip("-"), value if equals else None)
            if args.workers is not None and runs_command(workload, "train"):
                set_workers(job_spec, template, args.workers)
            selector = template["spec"].get("nodeSelector", {})
            if args.accelerator and ACCELERATOR_LABEL in selector:
                selector[ACCELERATOR_LABEL] = accelerator
    return objects


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overlay", help="a kustomize folder, e.g. k8s/overlays/gpu-spot")
    parser.add_argument("--command", choices=(*TRAINER_COMMANDS, "bench"),
                        help="keep only the workload running this trainer command")
    parser.add_argument("--name", help="the run's name (must be a DNS label, <= 40 characters)")
    parser.add_argument("--image")
    parser.add_argument("--set", action="append", default=[], metavar="FLAG[=VALUE]")
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--accelerator", help="GKE GPU type, a key of k8s/shapes.yaml (default: nvidia-l4)")
    parser.add_argument("--queue", help="Kueue LocalQueue name")
    parser.add_argument("--service-account-email")
    args = parser.parse_args(argv)
    if args.set and not args.command:
        parser.error("--set needs --command (which containers get the flags)")
    if args.name and not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", args.name):
        # Pod hostnames are <name>-<index> (JobSet: <name>-workers-<job>-<pod>): keep them short.
        parser.error(f"--name {args.name!r}: lower-case letters, digits and '-', at most 40")
    if args.gpus is not None and args.gpus < 1:
        parser.error("--gpus must be at least 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.queue is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?", args.queue):
        parser.error(f"--queue {args.queue!r}: a LocalQueue name (lower-case letters, digits, '-', '.')")
    return args


def check_trainer_args(args):
    """Parses one container's trainer arguments (`["train", "--epochs=2", ...]`) with the trainer's
    own flag parser (its flags load without TensorFlow), from the project's root, where the image
    keeps the same configs/: a misspelt `ARGS='--epocs=2'` fails here, not in a pod on the cluster.

    Raises:
      SystemExit: the trainer's one-line error.
    """
    if importlib.util.find_spec("absl") is None:
        print("render: warning: cannot check the trainer's flags with this Python (no absl-py: "
              "run `make install` first)", file=sys.stderr)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "TRAINER_CHECK_FLAGS_ONLY": "1",
                                 "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))})
    if result.returncode:
        problem = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise SystemExit(f"render: the {args[0]} arguments would fail on the cluster: {problem}")


def check_workload_args(objects, command):
    """`check_trainer_args` for every container that runs `command`."""
    for workload in (o for o in objects if o["kind"] in WORKLOAD_KINDS):
        for _, template in pod_templates(workload):
            for container in containers(template):
                if trainer_command(container) == command and command in TRAINER_COMMANDS:
                    check_trainer_args(container["args"])


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    objects = select(kustomize(args.overlay), args.command, args.service_account_email)
    if args.name and sum(o["kind"] in WORKLOAD_KINDS for o in objects) > 1:
        raise SystemExit("render: --name needs --command (one workload per run name)")
    objects = customize(objects, args)
    if args.command:
        check_workload_args(objects, args.command)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False))


if __name__ == "__main__":
    main()
