"""The Kubernetes manifests, checked offline with the real tools.

Every overlay renders with `kubectl kustomize`; every object validates strictly against the
Kubernetes API schema (kubernetes-validate); the JobSet custom resource is checked against its
v1alpha2 fields, with its Job template validated as a real batch/v1 Job. Then assertions over every
rendered pod: Pod Security "restricted", resources, /dev/shm, the failure policy built on
trainer/errors.py, and every trainer argument parsed by the trainer's own flag parser.
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from trainer import distribute, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "k8s")
OVERLAYS = ["base"] + [f"overlays/{name}" for name in sorted(os.listdir(os.path.join(K8S, "overlays")))]
KUBERNETES_VERSIONS = ["1.32", kubernetes_validate.latest_version()]
WORKLOAD_KINDS = ("Job", "JobSet", "CronJob")
GPU_COMMANDS = ("train", "evaluate")

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")


@functools.cache
def rendered(overlay):
    result = subprocess.run(["kubectl", "kustomize", os.path.join(K8S, overlay)],
                            capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_run(*args):
    """Runs k8s/render.py like `make submit-*` does; returns its objects."""
    result = subprocess.run([sys.executable, os.path.join(K8S, "render.py"), *args],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_templates(workload):
    """(job spec, pod template) pairs of a Job, CronJob or JobSet."""
    if workload["kind"] == "Job":
        return [(workload["spec"], workload["spec"]["template"])]
    if workload["kind"] == "CronJob":
        job = workload["spec"]["jobTemplate"]["spec"]
        return [(job, job["template"])]
    return [(rjob["template"]["spec"], rjob["template"]["spec"]["template"])
            for rjob in workload["spec"]["replicatedJobs"]]


def all_containers(template):
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def every_pod():
    """(id, workload, job spec, pod template) of every pod of every overlay."""
    pods = []
    for overlay in OVERLAYS:
        for item in rendered(overlay):
            if item["kind"] in WORKLOAD_KINDS:
                for job, template in pod_templates(item):
                    pods.append(pytest.param(item, job, template,
                                             id=f"{overlay}:{item['kind']}/{item['metadata']['name']}"))
    return pods


def as_job(template, name="validated"):
    """A JobSet's Job template as a standalone batch/v1 Job, for the Kubernetes schema."""
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, **template.get("metadata", {})}, "spec": template["spec"]}


# The JobSet v1alpha2 fields (kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go), closed
# to unknown fields like the API server's structural schema. Job templates are checked separately.
_JOB_FAILURE_REASONS = ["BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes",
                        "MaxFailedIndexesExceeded", "PodFailurePolicy"]
JOBSET_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"},
        "kind": {"const": "JobSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["replicatedJobs"],
            "properties": {
                "replicatedJobs": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["name", "template"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                        "groupName": {"type": "string"},
                        "replicas": {"type": "integer", "minimum": 0},
                        "template": {"type": "object", "required": ["spec"]},
                        "dependsOn": {"type": "array"}}}},
                "network": {"type": "object", "additionalProperties": False, "properties": {
                    "enableDNSHostnames": {"type": "boolean"}, "subdomain": {"type": "string"},
                    "publishNotReadyAddresses": {"type": "boolean"}}},
                "successPolicy": {"type": "object", "additionalProperties": False,
                                  "required": ["operator"], "properties": {
                                      "operator": {"enum": ["All", "Any"]},
                                      "targetReplicatedJobs": {"type": "array"}}},
                "failurePolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "maxRestarts": {"type": "integer", "minimum": 0},
                    "restartStrategy": {"enum": ["Recreate", "BlockingRecreate", "InPlaceRestart"]},
                    "rules": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False,
                        "required": ["name", "action"], "properties": {
                            "name": {"type": "string",
                                     "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
                            "action": {"enum": ["FailJobSet", "RestartJobSet",
                                                "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
                                                "RestartJobAndIgnoreMaxRestarts"]},
                            "onJobFailureReasons": {"type": "array",
                                                    "items": {"enum": _JOB_FAILURE_REASONS}},
                            "onJobFailureMessagePatterns": {"type": "array"},
                            "targetReplicatedJobs": {"type": "array"}}}}}},
                "startupPolicy": {"type": "object"},
                "suspend": {"type": "boolean"},
                "coordinator": {"type": "object"},
                "managedBy": {"type": "string"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "volumeClaimPolicies": {"type": "array"}}}}}


def validate(item, version):
    """Strict schema validation; a JobSet by its own fields plus its Job templates."""
    if item["kind"] == "JobSet":
        jsonschema.validate(item, JOBSET_SCHEMA)
        for rjob in item["spec"]["replicatedJobs"]:
            kubernetes_validate.validate(as_job(rjob["template"]), version, strict=True)
        return
    kubernetes_validate.validate(item, version, strict=True)


def flag_value(args, flag):
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{flag}=")]
    assert len(values) == 1, (flag, args)
    return values[0]


def env_of(container):
    return {entry["name"]: entry for entry in container.get("env", [])}


# ---- Render and validate -------------------------------------------------------------------------

EXPECTED_KINDS = {
    "base": ["Job", "Job", "ServiceAccount"],
    "overlays/gpu-spot": ["Job", "Job", "ServiceAccount"],
    "overlays/multiworker-jobset": ["Job", "JobSet", "ServiceAccount"],
    "overlays/multiworker-indexed": ["Job", "Job", "Service", "ServiceAccount"],
    "overlays/retrain-cron": ["CronJob", "ServiceAccount"],
}


def test_every_overlay_is_known_and_renders():
    assert sorted(EXPECTED_KINDS) == sorted(OVERLAYS)
    for overlay, kinds in EXPECTED_KINDS.items():
        assert sorted(item["kind"] for item in rendered(overlay)) == kinds, overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly(overlay, version):
    for item in rendered(overlay):
        validate(item, version)


def test_validation_is_strict():
    """The checks above would catch a misspelt field, in a Job and in the JobSet alike."""
    job = json.loads(json.dumps(next(i for i in rendered("base") if i["kind"] == "Job")))
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job, "1.32")
    jobset = json.loads(json.dumps(next(
        i for i in rendered("overlays/multiworker-jobset") if i["kind"] == "JobSet")))
    jobset["spec"]["failurePolicy"]["maxRestart"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate(jobset, "1.32")
    template = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    del jobset["spec"]["failurePolicy"]["maxRestart"]
    template["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(jobset, "1.32")


def test_service_account_uses_workload_identity_without_keys():
    for overlay in OVERLAYS:
        accounts = [i for i in rendered(overlay) if i["kind"] == "ServiceAccount"]
        assert len(accounts) == 1
        annotations = accounts[0]["metadata"]["annotations"]
        assert annotations["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
        assert "secrets" not in accounts[0]
    for overlay in OVERLAYS:  # no key file mounted or referenced anywhere
        text = yaml.safe_dump_all(rendered(overlay))
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in text and "secretName" not in text


def test_every_container_runs_the_trainer_image():
    images = set()
    for overlay in OVERLAYS:
        for item in rendered(overlay):
            if item["kind"] in WORKLOAD_KINDS:
                images |= {c["image"] for _, t in pod_templates(item) for c in all_containers(t)}
    (image,) = images  # kustomize's image setting reached every workload, JobSet and CronJob too
    assert image.endswith("/image-transfer-trainer:latest")


# ---- Every pod -----------------------------------------------------------------------------------

@pytest.mark.parametrize("workload,job,template", every_pod())
def test_pod_security_is_restricted(workload, job, template):
    spec = template["spec"]
    pod_security = spec["securityContext"]
    assert spec["serviceAccountName"] == "trainer"
    assert spec["automountServiceAccountToken"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for container in all_containers(template):
        security = container["securityContext"]
        effective = {**pod_security, **security}
        assert effective["runAsNonRoot"] is True
        assert isinstance(effective["runAsUser"], int) and effective["runAsUser"] > 0
        assert effective["seccompProfile"]["type"] == "RuntimeDefault"
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert not security.get("privileged")
        assert security["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("workload,job,template", every_pod())
def test_pod_resources_and_writable_scratch(workload, job, template):
    volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
    for container in all_containers(template):
        resources = container["resources"]
        for name in ("cpu", "memory"):
            assert resources["requests"][name] == resources["limits"][name], name  # Guaranteed QoS
        mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
        command = container["args"][0]
        if command in GPU_COMMANDS:
            gpus = resources["limits"]["nvidia.com/gpu"]
            assert isinstance(gpus, int) and gpus >= 1
            assert resources["requests"]["nvidia.com/gpu"] == gpus
            shm = mounts["/dev/shm"]["emptyDir"]
            assert shm["medium"] == "Memory" and shm["sizeLimit"]
        # With a read-only root filesystem, TMPDIR and HOME must be writable emptyDirs.
        env = env_of(container)
        for variable in ("TMPDIR", "HOME"):
            path = env[variable]["value"]
            assert "emptyDir" in mounts[path], (variable, path)
            assert mounts[path]["emptyDir"].get("medium") != "Memory"


@pytest.mark.parametrize("workload,job,template", every_pod())
def test_failure_policy_follows_the_trainer_exit_codes(workload, job, template):
    assert template["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert isinstance(job["backoffLimit"], int)
    assert job["activeDeadlineSeconds"] > 0
    ttl = workload["spec"] if workload["kind"] == "JobSet" else job
    assert ttl["ttlSecondsAfterFinished"] > 0
    assert job.get("podReplacementPolicy") == "Failed"

    rules = job["podFailurePolicy"]["rules"]
    names = {container["name"] for container in all_containers(template)}
    by_code, disruption = {}, []
    for rule in rules:
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["operator"] == "In"
            assert codes.get("containerName", next(iter(names))) in names
            for code in codes["values"]:
                by_code[code] = rule["action"]
        else:
            assert rule["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
            disruption.append(rule["action"])
    # A retry cannot fix bad input or a bug: fail at once.
    assert by_code[errors.EXIT_BAD_INPUT] == "FailJob"
    assert by_code[errors.EXIT_SOFTWARE] == "FailJob"
    if workload["kind"] == "JobSet":
        # The child Job fails at once (backoffLimit 0) so that the JobSet restarts ALL workers
        # together; only bad input or a bug (the FailJob above) fails the whole JobSet.
        assert job["backoffLimit"] == 0
        assert by_code[errors.EXIT_RETRYABLE] == "Count" and disruption == ["Count"]
        policy = workload["spec"]["failurePolicy"]
        assert policy["maxRestarts"] > 0
        assert [(r["action"], r["onJobFailureReasons"]) for r in policy["rules"]] == [
            ("FailJobSet", ["PodFailurePolicy"])]
    else:
        # Preempted after a committed backup, or a disruption: retry without using up backoffLimit.
        assert by_code[errors.EXIT_RETRYABLE] == "Ignore" and disruption == ["Ignore"]
    assert errors.EXIT_OK not in by_code


# ---- Trainer arguments ---------------------------------------------------------------------------

_PARSE = """
import json, sys
from absl import flags
from trainer import cli

command, arg_lists = sys.argv[1], json.loads(sys.argv[2])
cli.COMMANDS[command][0]()
for args in arg_lists:
    try:
        remaining = flags.FLAGS([f"trainer {command}", *args])
    except flags.Error as error:
        sys.exit(f"{args}: {error}")
    if remaining != [f"trainer {command}"]:
        sys.exit(f"{args}: unexpected arguments {remaining[1:]}")
    flags.FLAGS.unparse_flags()
print(f"parsed {len(arg_lists)}")
"""


def expand(arg, container):
    """Kubernetes' $(VAR) expansion, with fieldRef variables as a pod would see them."""
    env = {}
    for name, entry in env_of(container).items():
        value = entry.get("value", f"<{name}>")
        env[name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def parse_with_trainer(arg_lists_by_command):
    for command, arg_lists in arg_lists_by_command.items():
        # cwd=ROOT: --flagfile=configs/... resolves as in the image's workdir.
        result = subprocess.run([sys.executable, "-c", _PARSE, command, json.dumps(arg_lists)],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0, f"trainer {command}: {result.stderr[-3000:]}"
        assert result.stdout.strip() == f"parsed {len(arg_lists)}"


def collect_args(objects, into):
    for item in objects:
        if item["kind"] not in WORKLOAD_KINDS:
            continue
        for _, template in pod_templates(item):
            for container in all_containers(template):
                assert "command" not in container  # the image's ENTRYPOINT (trainer) runs
                command, *args = container["args"]
                assert all(arg.startswith("--") for arg in args), args
                into.setdefault(command, []).append([expand(arg, container) for arg in args])
    return into


def test_every_argument_is_a_trainer_flag():
    arg_lists = {}
    for overlay in OVERLAYS:
        collect_args(rendered(overlay), arg_lists)
    # Submissions: render.py's flag edits (values, a bare boolean, the worker count) parse too.
    extra = ["--set=data=gs://b/d.json", "--set=epochs=2", "--set=augment", "--set=backbone=resnet50"]
    collect_args(render_run("k8s/overlays/gpu-spot", "--command=train", *extra), arg_lists)
    collect_args(render_run("k8s/overlays/gpu-spot", "--command=evaluate", "--set=split=val"),
                 arg_lists)
    for overlay in ("k8s/overlays/multiworker-jobset", "k8s/overlays/multiworker-indexed"):
        collect_args(render_run(overlay, "--command=train", "--workers=3", *extra), arg_lists)
    assert set(arg_lists) == {"train", "evaluate", "promote"}
    parse_with_trainer(arg_lists)


def test_a_misspelt_flag_would_be_caught():
    with pytest.raises(AssertionError, match="stratgy"):
        parse_with_trainer({"train": [["--data=gs://b/d.json", "--job_dir=gs://b/j",
                                       "--stratgy=mirrored"]]})


def test_single_node_training_uses_all_gpus_of_one_node_with_mirrored_strategy():
    train = next(i for i in rendered("overlays/gpu-spot") if i["metadata"]["name"] == "train")
    assert "completionMode" not in train["spec"] and train["spec"].get("parallelism", 1) == 1
    container = train["spec"]["template"]["spec"]["containers"][0]
    assert flag_value(container["args"], "strategy") == "mirrored"
    spec = train["spec"]["template"]["spec"]
    assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"]
    assert spec["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    tolerations = {t["key"] for t in spec["tolerations"]}
    assert tolerations == {"nvidia.com/gpu", "cloud.google.com/gke-spot"}


def test_retrain_cronjob_runs_train_evaluate_promote_in_order():
    cron = next(i for i in rendered("overlays/retrain-cron") if i["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    spec = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    steps = [c["args"][0] for c in spec["initContainers"]] + [c["args"][0] for c in spec["containers"]]
    assert steps == ["train", "evaluate", "promote"]
    train, evaluate, promote = spec["initContainers"] + spec["containers"]
    job_dir = expand(flag_value(train["args"], "job_dir"), train)
    # One run folder across the steps, stable across retries of the Job (its name, not the pod's).
    assert env_of(train)["RUN_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']")
    assert expand(flag_value(evaluate["args"], "model"), evaluate) == f"{job_dir}/model"
    assert expand(flag_value(evaluate["args"], "output"), evaluate) == f"{job_dir}/eval"
    assert expand(flag_value(promote["args"], "candidate"), promote) == job_dir
    assert spec["nodeSelector"]  # GPU placement reaches the CronJob's pods too


# ---- Multi-worker: the environment trainer/distribute.py reads -----------------------------------

def pod_environment(container, labels, completion_index):
    """The environment Kubernetes gives a container: literal values and label fieldRefs."""
    environ = {"JOB_COMPLETION_INDEX": str(completion_index)}
    for name, entry in env_of(container).items():
        if "value" in entry:
            environ[name] = entry["value"]
            continue
        path = entry["valueFrom"]["fieldRef"]["fieldPath"]
        key = re.fullmatch(r"metadata\.labels\['(.+)'\]", path).group(1)
        environ[name] = labels[key]
    return environ


def test_jobset_workers_find_each_other():
    jobset = next(i for i in rendered("overlays/multiworker-jobset") if i["kind"] == "JobSet")
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    assert "subdomain" not in jobset["spec"]["network"]  # defaults to the JobSet's name
    (rjob,) = jobset["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    workers = int(flag_value(container["args"], "num_workers"))
    port = int(flag_value(container["args"], "worker_port"))
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == workers
    assert rjob["replicas"] == 1 and flag_value(container["args"], "strategy") == "multi_worker"
    assert {p["containerPort"] for p in container["ports"]} == {port}

    # The labels the JobSet controller puts on pods (jobset.sigs.k8s.io/...).
    name = "train-20261128-070000"
    labels = {"jobset.sigs.k8s.io/jobset-name": name,
              "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
              "jobset.sigs.k8s.io/job-index": "0",
              "jobset.sigs.k8s.io/replicatedjob-replicas": str(rjob["replicas"])}
    expected = [f"{name}-{rjob['name']}-0-{i}.{name}:{port}" for i in range(workers)]
    for index in range(workers):
        cluster = distribute.cluster_from_environment(
            pod_environment(container, labels, index), num_workers=workers, port=port)
        assert cluster["cluster"]["worker"] == expected
        assert cluster["task"] == {"type": "worker", "index": index}


def test_indexed_job_workers_find_each_other():
    objects = rendered("overlays/multiworker-indexed")
    service = next(i for i in objects if i["kind"] == "Service")
    job = next(i for i in objects if i["kind"] == "Job" and i["spec"].get("completionMode"))
    spec = job["spec"]
    pod = spec["template"]
    container = pod["spec"]["containers"][0]
    workers = int(flag_value(container["args"], "num_workers"))
    port = int(flag_value(container["args"], "worker_port"))
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] == workers
    assert flag_value(container["args"], "strategy") == "multi_worker"
    # Stable DNS names: a headless Service named like the pods' subdomain, selecting them.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [p["port"] for p in service["spec"]["ports"]] == [port]

    name = "train-20261128-070000"
    labels = {"batch.kubernetes.io/job-name": name}  # set by the Job controller on its pods
    expected = [f"{name}-{i}.{service['metadata']['name']}:{port}" for i in range(workers)]
    for index in range(workers):
        cluster = distribute.cluster_from_environment(
            pod_environment(container, labels, index), num_workers=workers, port=port)
        assert cluster["cluster"]["worker"] == expected
        assert cluster["task"]["index"] == index


# ---- k8s/render.py (what `make submit-*` applies) ------------------------------------------------

def test_render_names_a_run_and_sets_image_gpus_workers_and_flags():
    objects = render_run("k8s/overlays/multiworker-jobset", "--command=train", "--name=train-x1",
                         "--image=registry.example/trainer:abc", "--gpus=4", "--workers=3",
                         "--accelerator=nvidia-tesla-a100", "--set=data=gs://b/d/dataset.json",
                         "--set=job_dir=gs://b/runs/x1", "--set=epochs=2")
    assert [i["kind"] for i in objects] == ["JobSet"]  # no eval Job, no ServiceAccount
    jobset = objects[0]
    validate(jobset, "1.32")
    assert jobset["metadata"]["name"] == "train-x1"
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 3
    pod = job["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == "train-x1"
    assert pod["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-tesla-a100"
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example/trainer:abc"
    assert container["resources"]["limits"] == {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": 4}
    assert flag_value(container["args"], "num_workers") == "3"
    assert flag_value(container["args"], "data") == "gs://b/d/dataset.json"
    assert flag_value(container["args"], "job_dir") == "gs://b/runs/x1"
    assert flag_value(container["args"], "epochs") == "2"


def test_render_indexed_run_brings_its_headless_service():
    objects = render_run("k8s/overlays/multiworker-indexed", "--command=train", "--name=train-x2",
                         "--workers=2", "--service-account-email=ml@proj.iam.gserviceaccount.com")
    kinds = {i["kind"]: i for i in objects}
    assert sorted(kinds) == ["Job", "Service", "ServiceAccount"]
    assert kinds["ServiceAccount"]["metadata"]["annotations"][
        "iam.gke.io/gcp-service-account"] == "ml@proj.iam.gserviceaccount.com"
    assert kinds["Job"]["metadata"]["name"] == "train-x2"
    for item in objects:
        validate(item, "1.32")


def test_render_refuses_what_cannot_work():
    def fails(*args):
        result = subprocess.run([sys.executable, os.path.join(K8S, "render.py"), *args],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode != 0
        return result.stderr

    assert "multi-worker overlay" in fails("k8s/overlays/gpu-spot", "--command=train", "--workers=2")
    assert "--name" in fails("k8s/base", "--command=train", "--name=Bad_Name")
    assert "--set needs --command" in fails("k8s/base", "--set=epochs=1")
