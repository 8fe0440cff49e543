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
  --gpus      nvidia.com/gpu of each GPU container; cpu and memory scale with it
  --workers   workers of a multi-node run: parallelism, completions and --num_workers
  --accelerator  the GKE GPU type (cloud.google.com/gke-accelerator node selector)
  --service-account-email  include the ServiceAccount, bound to this Google service account
    (left out otherwise, so a submission never resets the binding made at setup)

Needs PyYAML and `kubectl` on PATH.
"""

import argparse
import re
import subprocess
import sys
from fractions import Fraction

import yaml

WORKLOAD_KINDS = ("Job", "JobSet", "CronJob")
TRAINER_COMMANDS = ("prepare", "train", "evaluate", "predict", "promote")
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"


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
    """The trainer subcommand a container runs (the image's ENTRYPOINT is `trainer`), or None."""
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


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti)?$")


def scale_quantity(quantity, factor):
    """Multiplies a Kubernetes quantity such as "8", "500m" or "32Gi" by a (rational) factor."""
    match = _QUANTITY.match(str(quantity))
    if not match:
        raise SystemExit(f"render: cannot scale the quantity {quantity!r}")
    number = Fraction(match.group(1)) * factor
    unit = match.group(2) or ""
    if number.denominator != 1:  # e.g. 3 cpu * 1/2: go one unit down
        smaller = {"": ("m", 1000), "Gi": ("Mi", 1024), "Mi": ("Ki", 1024), "Ti": ("Gi", 1024)}
        if unit not in smaller:
            raise SystemExit(f"render: cannot scale the quantity {quantity!r} by {factor}")
        unit, multiplier = smaller[unit]
        number = Fraction(round(number * multiplier))
    return f"{int(number)}{unit}"


def set_gpus(container, gpus):
    """Sets nvidia.com/gpu of a GPU container; cpu and memory scale by the same factor."""
    resources = container.get("resources", {})
    current = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    if not current:
        return
    factor = Fraction(gpus, current)
    for section in ("requests", "limits"):
        values = resources.get(section, {})
        for name in ("cpu", "memory"):
            if name in values:
                values[name] = scale_quantity(values[name], factor)
        if "nvidia.com/gpu" in values:
            values["nvidia.com/gpu"] = gpus


def set_workers(job_spec, template, workers):
    """Sets the number of workers of an Indexed Job (also the child Job of a JobSet)."""
    if job_spec.get("completionMode") != "Indexed":
        raise SystemExit("render: --workers needs a multi-worker overlay "
                         "(k8s/overlays/multiworker-jobset or multiworker-indexed)")
    job_spec["parallelism"] = job_spec["completions"] = workers
    for container in containers(template):
        if trainer_command(container) == "train":
            set_flag(container["args"], "num_workers", workers)


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
        elif item in workloads:
            selected.append(item)
        elif item["kind"] not in WORKLOAD_KINDS:
            selected.append(item)
    return selected


def customize(objects, args):
    for workload in (o for o in objects if o["kind"] in WORKLOAD_KINDS):
        if args.name:
            set_name(workload, args.name)
        for job_spec, template in pod_templates(workload):
            for container in containers(template):
                command = trainer_command(container)
                if command is None:
                    continue
                if args.image:
                    container["image"] = args.image
                if args.gpus is not None:
                    set_gpus(container, args.gpus)
                if command == args.command:
                    for assignment in args.set:
                        flag, equals, value = assignment.partition("=")
                        set_flag(container["args"], flag.lstrip("-"), value if equals else None)
            if args.workers is not None and runs_command(workload, "train"):
                set_workers(job_spec, template, args.workers)
            selector = template["spec"].get("nodeSelector", {})
            if args.accelerator and ACCELERATOR_LABEL in selector:
                selector[ACCELERATOR_LABEL] = args.accelerator
    return objects


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overlay", help="a kustomize folder, e.g. k8s/overlays/gpu-spot")
    parser.add_argument("--command", choices=TRAINER_COMMANDS,
                        help="keep only the workload running this trainer command")
    parser.add_argument("--name", help="the run's name (must be a DNS label, <= 40 characters)")
    parser.add_argument("--image")
    parser.add_argument("--set", action="append", default=[], metavar="FLAG[=VALUE]")
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--accelerator")
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
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    objects = select(kustomize(args.overlay), args.command, args.service_account_email)
    if args.name and sum(o["kind"] in WORKLOAD_KINDS for o in objects) > 1:
        raise SystemExit("render: --name needs --command (one workload per run name)")
    objects = customize(objects, args)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False))


if __name__ == "__main__":
    main()
