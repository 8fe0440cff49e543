"""Renders one hyperparameter search (configs/search_space.yaml) for Vertex AI or Katib.

  python k8s/tune.py --target=vertex --image=IMAGE --set data=gs://b/d.json --set job_dir=gs://b/tune/pets
  python k8s/tune.py --target=katib  --image=IMAGE --set data=gs://b/d.json --set job_dir=gs://b/tune/pets

Vertex AI: a HyperparameterTuningJob whose trial job is `make submit-vertex`'s CustomJobSpec; each
trial's job_dir is Vertex's per-trial AIP_CHECKPOINT_DIR under job_dir, and Vertex appends the
trial's `--flag=value` to the trainer's arguments. Katib: an Experiment whose trial is the
single-node train Job of k8s/overlays/gpu-spot with `--flag=${trialParameters.flag}` and
`--job_dir=JOB_DIR/<trial name>`, read by Katib's StdOut metrics collector. Both trials run with
`--tuning_metric`, which reports the metric the way each service reads it.

A bad search space (an unknown flag, an empty range, a log scale on a non-positive range) is a
one-line error (exit 1). Needs PyYAML, and the trainer package (its flags load without TensorFlow).
"""

import argparse
import copy
import dataclasses
import math
import os
import sys

import yaml

K8S = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [K8S, os.path.dirname(K8S)]
import render  # noqa: E402 - k8s/render.py
import vertex  # noqa: E402 - k8s/vertex.py

from trainer.config import TrainConfig  # noqa: E402

SEARCH_SPACE = os.path.join(os.path.dirname(K8S), "configs", "search_space.yaml")
TYPES = ("double", "integer", "discrete", "categorical")
SCALES = {"linear": "UNIT_LINEAR_SCALE", "log": "UNIT_LOG_SCALE"}


def load_search_space(path):
    """The search space, checked; SystemExit with one line naming what is wrong."""
    try:
        with open(path) as handle:
            space = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"tune: cannot read the search space {path}: {error}") from None
    if not isinstance(space, dict) or not isinstance(space.get("parameters"), list) or not space["parameters"]:
        raise SystemExit(f"tune: {path}: expected `metric`, `parameters` (a list) and optional max_trials, "
                         "parallel_trials")
    metric = space.get("metric") or {}
    if not metric.get("name") or metric.get("goal") not in ("maximize", "minimize"):
        raise SystemExit(f"tune: {path}: metric needs a name and goal: maximize or minimize, got {metric}")
    flags = {field.name for field in dataclasses.fields(TrainConfig)}
    seen = set()
    for parameter in space["parameters"]:
        flag, kind = parameter.get("flag"), parameter.get("type")
        where = f"tune: {path}: parameter {flag!r}"
        if flag not in flags:
            raise SystemExit(f"{where} is not a `trainer train` flag")
        if flag in seen or flag in ("data", "job_dir"):
            raise SystemExit(f"{where} is given twice, or is not the search's to set")
        seen.add(flag)
        if kind not in TYPES:
            raise SystemExit(f"{where}: type {kind!r}, expected one of {', '.join(TYPES)}")
        if kind in ("double", "integer"):
            low, high = parameter.get("min"), parameter.get("max")
            if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in (low, high)) \
                    or not low < high:
                raise SystemExit(f"{where}: an empty range (min {low}, max {high}): min must be below max")
            scale = parameter.get("scale", "linear")
            if scale not in SCALES:
                raise SystemExit(f"{where}: scale {scale!r}, expected linear or log")
            if scale == "log" and low <= 0:
                raise SystemExit(f"{where}: a log scale needs a positive range, got min {low}")
        elif not parameter.get("values") or len(set(map(str, parameter["values"]))) != len(parameter["values"]):
            raise SystemExit(f"{where}: `values` must list distinct values")
    for key in ("max_trials", "parallel_trials"):
        if not isinstance(space.setdefault(key, {"max_trials": 12, "parallel_trials": 3}[key]), int) or space[key] < 1:
            raise SystemExit(f"tune: {path}: {key} must be a positive integer")
    return space


def overrides_of(sets):
    return {flag.lstrip("-"): value for flag, _, value in (item.partition("=") for item in sets)}


def vertex_tuning_job(space, image, accelerator, gpus, sets, spot=False, service_account=None):
    """The HyperparameterTuningJob (as YAML-ready dicts; `gcloud ai hp-tuning-jobs create
    --config=FILE --display-name=NAME` takes it)."""
    job_dir = overrides_of(sets).get("job_dir", "")
    trial = vertex.custom_job_spec(image, accelerator, gpus, 1, [*sets, f"tuning_metric={space['metric']['name']}"],
                                   spot=spot, service_account=service_account)
    # Each trial's job_dir: Vertex's AIP_CHECKPOINT_DIR (<base>/<trial id>/checkpoints), the default of --job_dir.
    for pool in trial["workerPoolSpecs"]:
        container = pool["containerSpec"]
        container["args"] = [arg for arg in container["args"] if not arg.startswith("--job_dir=")]
    trial["baseOutputDirectory"] = {"outputUriPrefix": job_dir.rstrip("/")}
    parameters = []
    for parameter in space["parameters"]:
        entry = {"parameterId": parameter["flag"]}
        if parameter["type"] == "double":
            entry["doubleValueSpec"] = {"minValue": float(parameter["min"]), "maxValue": float(parameter["max"])}
        elif parameter["type"] == "integer":
            entry["integerValueSpec"] = {"minValue": str(int(parameter["min"])), "maxValue": str(int(parameter["max"]))}
        elif parameter["type"] == "discrete" and not all(isinstance(value, int) for value in parameter["values"]):
            entry["discreteValueSpec"] = {"values": [float(value) for value in parameter["values"]]}
        else:  # (whole-number discrete values too: Vertex would pass 128 as `--dense_units=128.0`)
            entry["categoricalValueSpec"] = {"values": [str(value) for value in parameter["values"]]}
        if parameter["type"] in ("double", "integer"):
            entry["scaleType"] = SCALES[parameter.get("scale", "linear")]
        parameters.append(entry)
    return {"studySpec": {"metrics": [{"metricId": space["metric"]["name"], "goal": space["metric"]["goal"].upper()}],
                          "parameters": parameters},
            "maxTrialCount": space["max_trials"], "parallelTrialCount": space["parallel_trials"],
            "trialJobSpec": trial}


def _plain(number):
    """A number as Katib's string field wants it, never in exponent form (`1e-05` would reach the
    API server as a YAML 1.2 float, not the string the schema asks for)."""
    return f"{number:.12f}".rstrip("0").rstrip(".") if isinstance(number, float) else str(number)


def katib_experiment(space, image, accelerator, gpus, sets, name):
    """The Katib Experiment (as YAML-ready dicts)."""
    objects = render.kustomize(os.path.join(K8S, "overlays", "gpu-spot"))
    (job,) = [item for item in objects if item["kind"] == "Job" and render.runs_command(item, "train")]
    job = copy.deepcopy(job)
    job.pop("metadata", None)  # Katib names each trial's Job
    template = job["spec"]["template"]
    (container,) = [c for c in render.containers(template) if render.trainer_command(c) == "train"]
    render.set_shape(container, render.shape_of(render.load_shapes(), accelerator, gpus), gpus,
                     render.load_shapes()["ephemeral_storage"])
    template["spec"]["nodeSelector"][render.ACCELERATOR_LABEL] = accelerator
    container["image"] = image
    container["command"] = ["trainer"]  # Katib's StdOut collector wraps the command it is given
    overrides = overrides_of(sets)
    job_dir = overrides.pop("job_dir", "").rstrip("/")
    for flag, value in overrides.items():
        render.set_flag(container["args"], flag, value or None)
    render.set_flag(container["args"], "job_dir", f"{job_dir}/${{trialParameters.trialName}}")
    render.set_flag(container["args"], "tuning_metric", space["metric"]["name"])
    parameters, trial_parameters = [], [{"name": "trialName", "reference": "${trialSpec.Name}"}]
    for parameter in space["parameters"]:
        flag, kind = parameter["flag"], parameter["type"]
        if kind in ("double", "integer"):
            feasible = {"min": _plain(parameter["min"]), "max": _plain(parameter["max"]),
                        "distribution": "logUniform" if parameter.get("scale") == "log" else "uniform"}
        else:
            feasible = {"list": [str(value) for value in parameter["values"]]}
        parameters.append({"name": flag, "parameterType": {"integer": "int"}.get(kind, kind),
                           "feasibleSpace": feasible})
        trial_parameters.append({"name": flag, "reference": flag})
        render.set_flag(container["args"], flag, f"${{trialParameters.{flag}}}")
    return {"apiVersion": "kubeflow.org/v1beta1", "kind": "Experiment",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "image-trainer"}},
            "spec": {"objective": {"type": space["metric"]["goal"], "objectiveMetricName": space["metric"]["name"]},
                     "algorithm": {"algorithmName": "bayesianoptimization"},
                     "maxTrialCount": space["max_trials"], "parallelTrialCount": space["parallel_trials"],
                     "maxFailedTrialCount": space["max_trials"],
                     "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
                     "parameters": parameters,
                     "trialTemplate": {"primaryContainerName": container["name"], "trialParameters": trial_parameters,
                                       "trialSpec": job}}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=("vertex", "katib"), required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--name", default="tune-image-trainer", help="the tuning job's (Experiment's) name")
    parser.add_argument("--search_space", default=SEARCH_SPACE)
    parser.add_argument("--accelerator", default="nvidia-l4")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                        help="trainer flags of every trial (data= and job_dir= are required)")
    parser.add_argument("--spot", action="store_true")
    parser.add_argument("--service-account-email")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    space = load_search_space(args.search_space)
    overrides = overrides_of(args.set)
    if not overrides.get("data") or not overrides.get("job_dir", "").startswith("gs://"):
        raise SystemExit("tune: --set data=... and --set job_dir=gs://... are required (trials write to Cloud Storage)")
    if args.target == "vertex":
        spec = vertex_tuning_job(space, args.image, args.accelerator, args.gpus, args.set, args.spot,
                                 args.service_account_email)
    else:
        spec = katib_experiment(space, args.image, args.accelerator, args.gpus, args.set, args.name)
    sys.stdout.write(yaml.safe_dump(spec, sort_keys=False, default_flow_style=False))


if __name__ == "__main__":
    main()
