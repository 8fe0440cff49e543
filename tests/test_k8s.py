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
from helpers import closed

from trainer import errors
from trainer.train import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "k8s")
sys.path.insert(0, K8S)
import render  # noqa: E402 - k8s/render.py

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


# The JobSet CRD's own schema at a tagged release (tests/schemas/jobset/README.md: source, licence).
with open(os.path.join(ROOT, "tests", "schemas", "jobset", "jobset-v1alpha2-v0.12.0.json")) as _schema_file:
    JOBSET_SCHEMA = closed(json.load(_schema_file))
SHAPES = yaml.safe_load(open(os.path.join(K8S, "shapes.yaml")))  # noqa: SIM115 - read once at import


def validate(item, version):
    """Strict schema validation; a JobSet by its CRD's schema plus its Job templates as real Jobs."""
    if item["kind"] == "JobSet":
        assert item["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
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
    "overlays/multiworker-jobset": ["Job", "JobSet", "NetworkPolicy", "ServiceAccount"],
    "overlays/multiworker-indexed": ["Job", "Job", "NetworkPolicy", "Service", "ServiceAccount"],
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


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_gpu_node_benchmark_job_validates_and_submits_with_its_image_gpus_and_output(version):
    for item in rendered("bench"):
        validate(item, version)
    result = subprocess.run(["make", "-s", "submit-bench", "DRY_RUN=1", "IMAGE=r.example/t:1", "OUTPUT=gs://b/bench",
                             "GPUS=4", "ARGS=--budget_seconds=300"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    [job] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "r.example/t:1" and container["command"] == ["python3", "-m", "bench.gpu_node"]
    assert container["args"] == ["--output=gs://b/bench", "--budget_seconds=300"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert job["spec"]["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    # The image holds the module the Job runs.
    assert os.path.isfile(os.path.join(ROOT, "bench", "gpu_node.py"))


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
    template["spec"]["containers"][0]["resource"] = {}  # inside the pod template: the CRD schema has it too
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        validate(jobset, "1.32")
    del template["spec"]["containers"][0]["resource"]
    jobset["spec"]["failurePolicy"]["rules"][0]["action"] = "RestartForever"
    with pytest.raises(jsonschema.ValidationError, match="RestartForever"):
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
        # together; every failure the trainer explains fails it through podFailurePolicy, whose
        # message the JobSet rules read.
        assert job["backoffLimit"] == 0
        assert by_code[errors.EXIT_RETRYABLE] == "FailJob" and disruption == ["FailJob"]
        policy = workload["spec"]["failurePolicy"]
        assert policy["maxRestarts"] > 0
        assert jobset_decision(policy, "PodFailurePolicy", job_failure_message(rules, exit_code=75)) == \
            "RestartJobSetAndIgnoreMaxRestarts"
        assert jobset_decision(policy, "PodFailurePolicy", job_failure_message(rules, disrupted=True)) == \
            "RestartJobSetAndIgnoreMaxRestarts"
        for code in (errors.EXIT_BAD_INPUT, errors.EXIT_SOFTWARE):
            assert jobset_decision(policy, "PodFailurePolicy", job_failure_message(rules, exit_code=code)) == \
                "FailJobSet"
        # A crash (OOM kill: 137) exhausts backoffLimit 0: the default, counted restart.
        assert jobset_decision(policy, "BackoffLimitExceeded", "Job has reached the specified backoff limit") == \
            "RestartJobSet"
        assert jobset_decision(policy, "DeadlineExceeded", "Job was active longer than specified deadline") == \
            "FailJobSet"
        # One deadline for the whole run, however often it restarts: the trainer's own.
        (container,) = [c for c in all_containers(template) if c["args"][0] == "train"]
        assert float(flag_value(container["args"], "deadline_hours")) * 3600 <= job["activeDeadlineSeconds"]
    else:
        # Preempted after a committed backup, or a disruption: retry without using up backoffLimit.
        assert by_code[errors.EXIT_RETRYABLE] == "Ignore" and disruption == ["Ignore"]
    assert errors.EXIT_OK not in by_code


def job_failure_message(rules, exit_code=None, disrupted=False):
    """The Job controller's Failed-condition message when a pod matches a FailJob rule
    (kubernetes pkg/controller/job/pod_failure_policy.go), for the rule it matches first."""
    for index, rule in enumerate(rules):
        if disrupted and "onPodConditions" in rule:
            return (f"Pod default/train-x-0 has condition DisruptionTarget matching {rule['action']} rule "
                    f"at index {index}")
        if exit_code is not None and exit_code in rule.get("onExitCodes", {}).get("values", []):
            return (f"Container trainer for pod default/train-x-0 failed with exit code {exit_code} "
                    f"matching {rule['action']} rule at index {index}")
    raise AssertionError(f"no rule for exit code {exit_code} / disruption {disrupted}")


def jobset_decision(policy, reason, message):
    """What the JobSet controller does with a failed child Job: the first rule matching both the
    reason and (any of) the message patterns; RestartJobSet when none matches."""
    for rule in policy.get("rules", []):
        reasons, patterns = rule.get("onJobFailureReasons", []), rule.get("onJobFailureMessagePatterns", [])
        if (not reasons or reason in reasons) and (not patterns or any(re.search(p, message) for p in patterns)):
            return rule["action"]
    return "RestartJobSet"


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


# ---- Kubeflow Trainer v2 (k8s/trainer-v2) ----------------------------------------------------------

# Trainer v2's CRD schemas at a tagged release (tests/schemas/kubeflow-trainer/README.md: source, licence).
TRAINER_V2_SCHEMAS = {kind: closed(json.load(open(os.path.join(  # noqa: SIM115 - read once at import
    ROOT, "tests", "schemas", "kubeflow-trainer", f"{plural}-v1alpha1-v2.3.0.json"))))
    for kind, plural in (("ClusterTrainingRuntime", "clustertrainingruntimes"), ("TrainJob", "trainjobs"))}


def trainer_v2(name):
    return yaml.safe_load(open(os.path.join(K8S, "trainer-v2", name)))  # noqa: SIM115


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_trainer_v2_runtime_and_trainjob_validate_and_the_runtime_is_the_jobsets(version):
    import importlib.util

    runtime, trainjob = trainer_v2("runtime.yaml"), trainer_v2("trainjob.yaml")
    jsonschema.validate(runtime, TRAINER_V2_SCHEMAS["ClusterTrainingRuntime"])
    jsonschema.validate(trainjob, TRAINER_V2_SCHEMAS["TrainJob"])
    spec = runtime["spec"]["template"]["spec"]
    jsonschema.validate({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "x"},
                         "spec": spec}, JOBSET_SCHEMA)
    for rjob in spec["replicatedJobs"]:
        kubernetes_validate.validate(as_job(rjob["template"]), version, strict=True)
    # Generated from the JobSet overlay, and still the same: the exit-code policies, shapes, pods.
    loader = importlib.util.spec_from_file_location("generate", os.path.join(K8S, "trainer-v2", "generate.py"))
    generate = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(generate)
    assert runtime == generate.rendered_runtime(), "run python k8s/trainer-v2/generate.py"
    assert trainjob["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    # Trainer v2's conventions: the `node` replicated job of the trainer step, its `node` container.
    (rjob,) = spec["replicatedJobs"]
    assert rjob["name"] == "node" and rjob["template"]["metadata"]["labels"][
        "trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "node"
    codes = {code for rule in rjob["template"]["spec"]["podFailurePolicy"]["rules"] if "onExitCodes" in rule
             for code in rule["onExitCodes"]["values"]}
    assert codes == {errors.EXIT_BAD_INPUT, errors.EXIT_SOFTWARE, errors.EXIT_RETRYABLE}


def test_trainer_v2_nodes_find_each_other_from_what_trainer_v2_gives_their_pods():
    runtime, trainjob = trainer_v2("runtime.yaml"), trainer_v2("trainjob.yaml")
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    # Trainer v2 merges the TrainJob's env into the `node` container and names the JobSet after it.
    container = {**container, "env": [*container["env"], *trainjob["spec"]["trainer"]["env"]]}
    name, nodes = trainjob["metadata"]["name"], trainjob["spec"]["trainer"]["numNodes"]
    port = int(flag_value(trainjob["spec"]["trainer"]["args"], "worker_port"))
    labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
              "jobset.sigs.k8s.io/job-index": "0", "jobset.sigs.k8s.io/replicatedjob-replicas": "1"}
    expected = [f"{name}-node-0-{index}.{name}:{port}" for index in range(nodes)]
    for index in range(nodes):
        cluster = distribute.cluster_from_environment(pod_environment(container, labels, index))
        assert cluster["cluster"]["worker"] == expected and cluster["task"] == {"type": "worker", "index": index}
    # One node: no cluster, MirroredStrategy on its GPUs.
    single = {**container, "env": [e for e in container["env"] if e["name"] != "TRAINER_NUM_WORKERS"]
              + [{"name": "TRAINER_NUM_WORKERS", "value": "1"}]}
    assert distribute.cluster_from_environment(pod_environment(single, labels, 0)) is None
    # The TrainJob's args are a whole trainer command line.
    parse_with_trainer({"train": [trainjob["spec"]["trainer"]["args"][1:]]})


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
    assert sorted(i["kind"] for i in objects) == ["JobSet", "NetworkPolicy"]  # no eval Job, no ServiceAccount
    policy = next(i for i in objects if i["kind"] == "NetworkPolicy")
    assert policy["metadata"]["name"] == "train-x1-workers"
    objects = [i for i in objects if i["kind"] == "JobSet"]
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
    assert container["resources"]["limits"] == {"cpu": "46", "memory": "320Gi", "ephemeral-storage": "60Gi",
                                                "nvidia.com/gpu": 4}  # a2-highgpu-4g (k8s/shapes.yaml)
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert flag_value(container["args"], "num_workers") == "3"
    assert flag_value(container["args"], "data") == "gs://b/d/dataset.json"
    assert flag_value(container["args"], "job_dir") == "gs://b/runs/x1"
    assert flag_value(container["args"], "epochs") == "2"


def test_render_indexed_run_brings_its_headless_service():
    objects = render_run("k8s/overlays/multiworker-indexed", "--command=train", "--name=train-x2",
                         "--workers=2", "--service-account-email=ml@proj.iam.gserviceaccount.com")
    kinds = {i["kind"]: i for i in objects}
    assert sorted(kinds) == ["Job", "NetworkPolicy", "Service", "ServiceAccount"]
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


# ---- Pod shapes (k8s/shapes.yaml) ------------------------------------------------------------------

def quantity_gib(quantity):
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity).groups()
    return float(number) / (1024 if unit == "Mi" else 1)


def gke_allocatable(vcpus, memory_gib, boot_disk_gib):
    """GKE Standard's node allocatable (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes):
    what is left after the kubelet's and system's reservation and the eviction thresholds."""
    cpu_reserved = (0.06 * min(vcpus, 1) + 0.01 * max(0, min(vcpus, 2) - 1) + 0.005 * max(0, min(vcpus, 4) - 2)
                    + 0.0025 * max(0, vcpus - 4))
    tiers = [(4, 0.25), (8, 0.20), (16, 0.10), (128, 0.06), (float("inf"), 0.02)]
    memory_reserved, lower = 0.0, 0
    for upper, share in tiers:
        memory_reserved += share * max(0, min(memory_gib, upper) - lower)
        lower = upper
    disk_reserved = min(0.5 * boot_disk_gib, 6 + 0.35 * boot_disk_gib, 100) + 0.10 * boot_disk_gib
    return vcpus - cpu_reserved, memory_gib - memory_reserved - 100 / 1024, boot_disk_gib - disk_reserved


SHAPE_ROWS = [pytest.param(accelerator, gpus, row, id=f"{accelerator}x{gpus}")
              for accelerator, entry in SHAPES["accelerators"].items() for gpus, row in entry["gpus"].items()]


@pytest.mark.parametrize("accelerator,gpus,row", SHAPE_ROWS)
def test_every_shape_fits_its_machine(accelerator, gpus, row):
    cpu, memory, disk = gke_allocatable(row["vcpus"], row["memory_gib"], SHAPES["boot_disk_gb"] * 1e9 / 2**30)
    reserve = SHAPES["daemonsets"]
    assert float(row["cpu"]) <= cpu - reserve["cpu"], (row, cpu)
    assert quantity_gib(row["memory"]) <= memory - reserve["memory_gib"], (row, memory)
    assert quantity_gib(SHAPES["ephemeral_storage"]) <= disk
    # ... and uses most of it: a pod that owns the node should not leave a third of it idle.
    assert float(row["cpu"]) >= 0.9 * cpu - 1 and quantity_gib(row["memory"]) >= 0.9 * memory - 2


def test_the_usual_machines_are_the_ones_the_issue_names():
    machines = {(a, g): row["machine"] for a, e in SHAPES["accelerators"].items() for g, row in e["gpus"].items()}
    assert machines[("nvidia-l4", 1)] == "g2-standard-8"
    assert machines[("nvidia-tesla-t4", 1)] == "n1-standard-8"
    assert machines[("nvidia-tesla-t4", 4)] == "n1-standard-32"
    assert {"nvidia-l4", "nvidia-tesla-t4", "nvidia-tesla-a100", "nvidia-a100-80gb",
            "nvidia-h100-80gb"} <= set(SHAPES["accelerators"])


@pytest.mark.parametrize("workload,job,template", every_pod())
def test_manifests_request_the_default_shape_and_scratch_fits_it(workload, job, template):
    default = SHAPES["default"]
    row = SHAPES["accelerators"][default["accelerator"]]["gpus"][default["gpus"]]
    volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
    for container in all_containers(template):
        resources = container["resources"]
        if not resources["limits"].get("nvidia.com/gpu"):
            continue
        assert resources["requests"] == resources["limits"] == {
            "cpu": row["cpu"], "memory": row["memory"], "ephemeral-storage": SHAPES["ephemeral_storage"],
            "nvidia.com/gpu": default["gpus"]}
        disk = [quantity_gib(volumes[m["name"]]["emptyDir"]["sizeLimit"]) for m in container["volumeMounts"]
                if volumes[m["name"]]["emptyDir"].get("medium") != "Memory"]
        assert sum(disk) <= quantity_gib(SHAPES["ephemeral_storage"])


def test_submit_with_a_t4_renders_what_schedules_on_n1_standard_8():
    result = subprocess.run(["make", "-s", "submit-train", "DRY_RUN=1", "IMAGE=r.example/t:1", "DATA=gs://b/d.json",
                             "JOB_DIR=gs://b/r", "ACCELERATOR=nvidia-tesla-t4", "GPUS=1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    (job,) = [i for i in yaml.safe_load_all(result.stdout) if i and i["kind"] == "Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    cpu, memory, _ = gke_allocatable(8, 30, 200)
    assert float(container["resources"]["requests"]["cpu"]) < cpu
    assert quantity_gib(container["resources"]["requests"]["memory"]) < memory
    assert job["spec"]["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-tesla-t4"


def test_render_refuses_a_gpu_count_the_machine_family_does_not_have():
    result = subprocess.run([sys.executable, os.path.join(K8S, "render.py"), "k8s/overlays/gpu-spot",
                             "--command=train", "--accelerator=nvidia-tesla-t4", "--gpus=8"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "nvidia-tesla-t4 nodes come with 1, 2, 4 GPUs, not 8" in result.stderr


# ---- Kueue ------------------------------------------------------------------------------------------

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.mark.parametrize("overlay,command", [("k8s/overlays/gpu-spot", "train"), ("k8s/overlays/gpu-spot", "evaluate"),
                                             ("k8s/overlays/multiworker-jobset", "train"),
                                             ("k8s/overlays/multiworker-indexed", "train"),
                                             ("k8s/overlays/retrain-cron", "train")])
def test_queue_labels_the_workload_kueue_manages_and_creates_it_suspended(overlay, command):
    (workload,) = [i for i in render_run(overlay, f"--command={command}", "--name=run-q", "--queue=team-a")
                   if i["kind"] in WORKLOAD_KINDS]
    managed = workload["spec"]["jobTemplate"] if workload["kind"] == "CronJob" else workload
    assert managed["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert managed["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    validate(workload, "1.32")
    (plain,) = [i for i in render_run(overlay, f"--command={command}", "--name=run-q") if i["kind"] in WORKLOAD_KINDS]
    assert QUEUE_LABEL not in yaml.safe_dump(plain) and "suspend" not in json.dumps(plain)


# Kueue's CRD schemas at a tagged release (tests/schemas/kueue/README.md: source, licence).
KUEUE_SCHEMAS = {kind: closed(json.load(open(os.path.join(ROOT, "tests", "schemas", "kueue",  # noqa: SIM115
                                                          f"{plural}-v1beta2-v0.19.2.json"))))
                 for kind, plural in (("ResourceFlavor", "resourceflavors"), ("ClusterQueue", "clusterqueues"),
                                      ("LocalQueue", "localqueues"))}


def test_kueue_queues_validate_and_admit_every_shape_the_makefile_offers():
    objects = [doc for doc in yaml.safe_load_all(open(os.path.join(K8S, "kueue", "queues.yaml"))) if doc]
    for item in objects:  # the current API (v1beta1 is deprecated since Kueue v0.16), strictly
        assert item["apiVersion"] == "kueue.x-k8s.io/v1beta2", item["kind"]
        jsonschema.validate(item, KUEUE_SCHEMAS[item["kind"]])
    flavors = {item["metadata"]["name"]: item for item in objects if item["kind"] == "ResourceFlavor"}
    (cluster_queue,) = [item for item in objects if item["kind"] == "ClusterQueue"]
    (local_queue,) = [item for item in objects if item["kind"] == "LocalQueue"]
    assert local_queue["spec"]["clusterQueue"] == cluster_queue["metadata"]["name"]
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert {"cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"} == set(group["coveredResources"])
    # A flavor per accelerator of k8s/shapes.yaml, each with a quota of whole nodes of its largest shape.
    assert sorted(flavor["spec"]["nodeLabels"]["cloud.google.com/gke-accelerator"] for flavor in flavors.values()) \
        == sorted(SHAPES["accelerators"])
    assert {quota["name"] for quota in group["flavors"]} == set(flavors)
    # Every single-node shape is admitted, and 4 nodes of each; a fifth is warned about at render time.
    for accelerator, entry in SHAPES["accelerators"].items():
        for gpus in entry["gpus"]:
            assert render.queue_misfit(SHAPES, accelerator, gpus, 1) is None, (accelerator, gpus)
        assert render.queue_misfit(SHAPES, accelerator, max(entry["gpus"]), 4) is None, accelerator
        assert "needs more than the queue's quota" in render.queue_misfit(SHAPES, accelerator, max(entry["gpus"]), 5)
    result = subprocess.run([sys.executable, os.path.join(K8S, "render.py"), "k8s/overlays/multiworker-jobset",
                             "--command=train", "--queue=team-a", "--workers=5", "--gpus=4"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "can never admit this run: 5 x nvidia-l4 x 4" in result.stderr, result.stderr


def test_kueue_schemas_are_strict():
    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "x"},
              "spec": {"nodeLabel": {"a": "b"}}}
    with pytest.raises(jsonschema.ValidationError, match="nodeLabel"):
        jsonschema.validate(flavor, KUEUE_SCHEMAS["ResourceFlavor"])


# ---- NetworkPolicy -------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay,pod_label", [("k8s/overlays/multiworker-jobset", "jobset.sigs.k8s.io/jobset-name"),
                                               ("k8s/overlays/multiworker-indexed", "batch.kubernetes.io/job-name")])
def test_worker_port_admits_only_the_same_runs_pods(overlay, pod_label):
    objects = render_run(overlay, "--command=train", "--name=run-a", "--workers=2")
    (policy,) = [i for i in objects if i["kind"] == "NetworkPolicy"]
    validate(policy, "1.32")
    (workload,) = [i for i in objects if i["kind"] in WORKLOAD_KINDS]
    (_, template), = pod_templates(workload)
    container = template["spec"]["containers"][0]
    # The labels a pod of this run carries: its template's, plus the controller's with the run's name.
    ours = {**template["metadata"]["labels"], pod_label: "run-a"}
    other_run = {**ours, pod_label: "run-b"}
    elsewhere = {"app.kubernetes.io/name": "something-else"}

    def selects(selector, labels):
        return selector["matchLabels"].items() <= labels.items()

    assert selects(policy["spec"]["podSelector"], ours) and not selects(policy["spec"]["podSelector"], other_run)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [int(flag_value(container["args"], "worker_port"))]
    assert any(selects(peer["podSelector"], ours) for peer in rule["from"])
    assert not any(selects(peer["podSelector"], labels) for peer in rule["from"] for labels in (other_run, elsewhere))
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no namespace or IP block opens it wider


def test_single_node_runs_bring_no_network_policy():
    assert [i["kind"] for i in render_run("k8s/overlays/gpu-spot", "--command=train", "--name=one")] == ["Job"]


# ---- Vertex AI ----------------------------------------------------------------------------------

def vertex_spec(*args):
    result = subprocess.run([sys.executable, os.path.join(K8S, "vertex.py"), "--image=r.example/t:1",
                             "--set=data=gs://b/d/dataset.json", "--set=job_dir=gs://b/runs/v1", *args],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_vertex_spec_one_node():
    spec = vertex_spec("--accelerator=nvidia-tesla-t4", "--gpus=4")
    assert sorted(spec) == ["baseOutputDirectory", "scheduling", "workerPoolSpecs"]
    (pool,) = spec["workerPoolSpecs"]
    assert pool["machineSpec"] == {"machineType": "n1-standard-32", "acceleratorType": "NVIDIA_TESLA_T4",
                                   "acceleratorCount": 4}
    assert pool["replicaCount"] == 1 and pool["diskSpec"]["bootDiskSizeGb"] == SHAPES["boot_disk_gb"]
    args = pool["containerSpec"]["args"]
    assert args[0] == "train" and flag_value(args, "strategy") == "mirrored"
    assert flag_value(args, "job_dir") == "gs://b/runs/v1"
    assert spec["baseOutputDirectory"]["outputUriPrefix"] == "gs://b/runs/v1/vertex"
    assert spec["scheduling"]["strategy"] == "STANDARD"
    assert int(spec["scheduling"]["timeout"].rstrip("s")) > float(flag_value(args, "deadline_hours")) * 3600
    parse_with_trainer({"train": [args[1:]]})


def test_vertex_spec_several_workers_is_a_chief_pool_and_a_worker_pool():
    spec = vertex_spec("--workers=3", "--spot", "--set=epochs=2", "--service-account-email=t@p.iam.gserviceaccount.com")
    chief, workers = spec["workerPoolSpecs"]
    assert (chief["replicaCount"], workers["replicaCount"]) == (1, 2)
    assert chief["containerSpec"] == workers["containerSpec"] and chief["machineSpec"] == workers["machineSpec"]
    args = chief["containerSpec"]["args"]
    assert flag_value(args, "strategy") == "multi_worker" and flag_value(args, "epochs") == "2"
    assert not any(arg.startswith("--num_workers") for arg in args)  # Vertex's TF_CONFIG says
    assert spec["scheduling"] == {**spec["scheduling"], "restartJobOnWorkerRestart": True, "strategy": "SPOT"}
    assert spec["serviceAccount"] == "t@p.iam.gserviceaccount.com"
    parse_with_trainer({"train": [args[1:]]})


def test_vertex_specs_are_custom_job_specs_by_aiplatforms_own_proto_with_tensorboard_and_experiment():
    from google.cloud.aiplatform_v1.types import CustomJobSpec

    board = "projects/p/locations/us-central1/tensorboards/123"
    experiment = "projects/p/locations/us-central1/metadataStores/default/contexts/pets"
    result = subprocess.run(["make", "-s", "submit-vertex", "DRY_RUN=1", "IMAGE=r.example/t:1", "DATA=gs://b/d.json",
                             "JOB_DIR=gs://b/runs/Pets-2", "WORKERS=2", "GSA=t@p.iam.gserviceaccount.com",
                             f"TENSORBOARD={board}", f"EXPERIMENT={experiment}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    spec = CustomJobSpec.from_json(json.dumps(yaml.safe_load(result.stdout)))  # unknown fields refused
    assert spec.tensorboard == board and spec.experiment == experiment and spec.experiment_run == "run-pets-2"
    assert len(spec.worker_pool_specs) == 2
    for args in (["--workers=3", "--spot"], ["--accelerator=nvidia-h100-80gb", "--gpus=8"]):
        CustomJobSpec.from_json(json.dumps(vertex_spec(*args)))
    no_account = subprocess.run(["make", "-s", "submit-vertex", "DRY_RUN=1", "IMAGE=r.example/t:1",
                                 "DATA=gs://b/d.json", "JOB_DIR=gs://b/r", f"TENSORBOARD={board}"],
                                capture_output=True, text=True, cwd=ROOT)
    assert no_account.returncode != 0 and "TENSORBOARD needs GSA" in no_account.stderr


def test_make_submit_vertex_dry_run_prints_the_spec():
    result = subprocess.run(["make", "-s", "submit-vertex", "DRY_RUN=1", "IMAGE=r.example/t:1", "DATA=gs://b/d.json",
                             "JOB_DIR=gs://b/runs/v2", "WORKERS=2"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(result.stdout)
    assert [pool["replicaCount"] for pool in spec["workerPoolSpecs"]] == [1, 1]
    assert "--data=gs://b/d.json" in spec["workerPoolSpecs"][0]["containerSpec"]["args"]


@pytest.mark.parametrize("target, args, problem", [
    ("submit-train", "--epocs=2", "Unknown command line flag 'epocs'. Did you mean: epochs ?"),
    ("submit-eval", "--epochs=2", "Unknown command line flag 'epochs'"),  # a train flag
    ("submit-vertex", "--batch_size=many", "flag --batch_size=many: invalid literal for int()"),
])
def test_submissions_check_their_flags_with_the_trainer_parser_before_any_cluster(tmp_path, target, args, problem):
    applied = tmp_path / "applied"
    result = subprocess.run(["make", "-s", target, "IMAGE=r.example/t:1", "DATA=gs://b/d.json", "JOB_DIR=gs://b/r",
                             f"ARGS={args}", f"KUBECTL=touch {applied}", f"GCLOUD=touch {applied}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and not applied.exists(), result.stdout + result.stderr
    assert f"render: the {'evaluate' if target == 'submit-eval' else 'train'} arguments would fail on the cluster: " \
           f"trainer " in result.stderr and problem in result.stderr, result.stderr


@pytest.mark.parametrize("target", ["submit-train", "submit-eval", "submit-vertex"])
def test_the_placeholder_image_is_refused_unless_only_printing(tmp_path, target):
    applied = tmp_path / "applied"
    command = ["make", "-s", target, "DATA=gs://b/d.json", "JOB_DIR=gs://b/r", f"KUBECTL=touch {applied}",
               f"GCLOUD=touch {applied}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and not applied.exists(), result.stdout + result.stderr
    assert "IMAGE is the placeholder us-docker.pkg.dev/YOUR_PROJECT/" in result.stderr, result.stderr
    assert subprocess.run([*command, "DRY_RUN=1"], capture_output=True, text=True, cwd=ROOT).returncode == 0


@pytest.mark.parametrize("target", ["submit-train", "submit-eval", "submit-vertex"])
def test_make_variables_reach_the_shell_as_data_not_commands(tmp_path, target):
    marker = tmp_path / "ran"
    hostile = f"gs://b/d.json; touch {marker}; $(touch {marker}) $(shell touch {marker}) `touch {marker}` \"'"
    common = ["make", "-s", target, "DRY_RUN=1", "IMAGE=r.example/t:1"]
    result = subprocess.run([*common, "DATA=gs://b/d.json", "JOB_DIR=gs://b/r", f"RUN=r-1; touch {marker}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert not marker.exists(), result.stdout + result.stderr
    result = subprocess.run([*common, f"DATA={hostile}", f"JOB_DIR=gs://b/r$(touch {marker})",
                             f"ARGS=--batch_size=16 --data=gs://b/$$(touch${{IFS}}{marker})`touch${{IFS}}{marker}`"],
                            capture_output=True, text=True, cwd=ROOT)
    assert not marker.exists(), result.stdout + result.stderr
    # The value arrives whole, as data.
    assert result.returncode == 0, result.stderr

    def strings(node):
        if isinstance(node, dict):
            return [text for value in node.values() for text in strings(value)]
        if isinstance(node, list):
            return [text for value in node for text in strings(value)]
        return [node] if isinstance(node, str) else []

    texts = [text for document in yaml.safe_load_all(result.stdout) for text in strings(document)]
    assert f"--data={hostile}" in texts, texts
