"""The GitHub workflows (validated offline) and the Makefile's cluster targets (without a cluster)."""

import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, ".github", "workflows")


def check_jsonschema():
    local = os.path.join(os.path.dirname(sys.executable), "check-jsonschema")
    return local if os.path.exists(local) else shutil.which("check-jsonschema")


def load_workflow(name):
    with open(os.path.join(WORKFLOWS, name)) as handle:
        workflow = yaml.safe_load(handle)
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads `on:` as True
    return workflow


def steps(workflow):
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def make(*args, env=None):
    """Runs `make` in the repository; the .venv Python renders (it has PyYAML)."""
    return subprocess.run(["make", "--no-print-directory", "-s", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# ---- Workflows ---------------------------------------------------------------------------------

@pytest.mark.skipif(check_jsonschema() is None, reason="check-jsonschema is not installed")
def test_workflows_match_the_github_schema():
    files = sorted(os.path.join(WORKFLOWS, name) for name in os.listdir(WORKFLOWS))
    assert [os.path.basename(f) for f in files] == ["ci.yml", "retrain.yml"]
    # The schema ships inside check-jsonschema: nothing is downloaded.
    result = subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.github-workflows", *files],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(check_jsonschema() is None, reason="check-jsonschema is not installed")
def test_schema_check_would_catch_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(open(os.path.join(WORKFLOWS, "ci.yml")).read().replace("runs-on:", "run-on:"))
    result = subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.github-workflows",
                             str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_ci_runs_make_test():
    workflow = load_workflow("ci.yml")
    assert "push" in workflow["on"] and "pull_request" in workflow["on"]
    assert "make test" in [step.get("run") for step in steps(workflow)]


def test_retrain_authenticates_without_keys_and_runs_the_whole_loop():
    workflow = load_workflow("retrain.yml")
    assert workflow["on"]["schedule"][0]["cron"] and "workflow_dispatch" in workflow["on"]
    assert workflow["jobs"]["retrain"]["permissions"]["id-token"] == "write"
    assert workflow["concurrency"]["cancel-in-progress"] is False
    all_steps = steps(workflow)
    auth = next(s for s in all_steps if s.get("uses", "").startswith("google-github-actions/auth@"))
    assert set(auth["with"]) == {"workload_identity_provider", "service_account"}
    text = open(os.path.join(WORKFLOWS, "retrain.yml")).read()
    assert "credentials_json" not in text and "secrets." not in text
    uses = [s.get("uses", "").split("@")[0] for s in all_steps]
    assert "google-github-actions/get-gke-credentials" in uses
    script = "\n".join(s.get("run", "") for s in all_steps)
    order = ["make image push", "make submit-train", "make wait", "make submit-eval",
             "gcloud storage cp", "trainer promote"]
    positions = [script.index(command) for command in order]
    assert positions == sorted(positions), order
    upload = next(s for s in all_steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "report/"
    # Every make variable the workflow passes is one the Makefile reads.
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    for variable in set(re.findall(r"\b([A-Z_]+)=\"\$", script)):
        assert f"$({variable})" in makefile or f"$${variable}" in makefile or f"$${{{variable}" in makefile, variable


# ---- Makefile targets, without a cluster --------------------------------------------------------

@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")
def test_make_render_prints_every_overlay():
    result = make("render")
    assert result.returncode == 0, result.stderr
    headers = re.findall(r"^# (k8s/\S+)$", result.stdout, re.M)
    overlays = sorted(f"k8s/overlays/{name}" for name in os.listdir(os.path.join(ROOT, "k8s", "overlays")))
    assert headers == ["k8s/base", *overlays]
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {"Job", "JobSet", "CronJob", "NetworkPolicy", "Service", "ServiceAccount"} == set(kinds)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")
@pytest.mark.parametrize("extra,kind,workers", [
    ([], "Job", None),
    (["WORKERS=2"], "JobSet", 2),
    (["WORKERS=3", "MULTI=indexed"], "Job", 3),
])
def test_make_submit_train_dry_run_prints_one_named_run(extra, kind, workers):
    result = make("submit-train", "DRY_RUN=1", "DATA=gs://b/datasets/cats/dataset.json",
                  "JOB_DIR=gs://b/runs/r1", "GPUS=4", "IMAGE=registry.example/trainer:v1",
                  "ARGS=--epochs=3", *extra)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (workload,) = [o for o in objects if o["kind"] in ("Job", "JobSet")]
    assert workload["kind"] == kind
    assert re.fullmatch(r"train-\d{8}-\d{6}", workload["metadata"]["name"])  # unique per run
    text = yaml.safe_dump(workload)
    for expected in ("--data=gs://b/datasets/cats/dataset.json", "--job_dir=gs://b/runs/r1",
                     "--epochs=3", "image: registry.example/trainer:v1", "nvidia.com/gpu: 4"):
        assert expected in text
    if workers:
        assert f"--num_workers={workers}" in text
    for item in objects:
        if item["kind"] != "JobSet":  # the JobSet is validated in test_k8s.py
            kubernetes_validate.validate(item, "1.32", strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")
def test_make_submit_eval_dry_run_and_usage_errors():
    result = make("submit-eval", "DRY_RUN=1", "DATA=gs://b/d/dataset.json", "JOB_DIR=gs://b/runs/r1",
                  "RUN=eval-r1")
    assert result.returncode == 0, result.stderr
    (job,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert job["metadata"]["name"] == "eval-r1"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["evaluate", "--model=gs://b/runs/r1/model", "--data=gs://b/d/dataset.json",
                    "--output=gs://b/runs/r1/eval", "--split=test"]
    for target in ("submit-train", "submit-eval", "logs", "wait"):
        result = make(target, "DRY_RUN=1")
        assert result.returncode == 2 and "usage: make" in result.stderr, target
    result = make("submit-train", "DRY_RUN=1", "DATA=gs://b/d.json", "JOB_DIR=gs://b/r", "GPUS=0")
    assert result.returncode != 0 and not result.stdout.strip()  # nothing printed to apply


def test_make_image_push_status_logs_use_the_configured_tools():
    result = make("image", "push", "BUILDER=echo podman", "IMAGE=registry.example/trainer:v1")
    assert result.stdout.split("\n")[:2] == ["podman build --tag registry.example/trainer:v1 .",
                                             "podman push registry.example/trainer:v1"]
    assert make("push", "BUILDER=echo").returncode == 2  # the placeholder registry is refused
    result = make("status", "logs", "RUN=train-x", "FOLLOW=1", "KUBECTL=echo kubectl")
    assert result.returncode == 0, result.stderr
    assert ("kubectl get cronjobs,jobs,pods -l "
            "app.kubernetes.io/name=image-trainer,app.kubernetes.io/instance=train-x") in result.stdout
    assert ("kubectl logs -l app.kubernetes.io/instance=train-x --all-containers --prefix "
            "--tail=200 --max-log-requests=32 --follow") in result.stdout


@pytest.mark.parametrize("finishes,expected", [("Complete", 0), ("Failed", 1)])
def test_make_wait_returns_how_the_run_ended(tmp_path, finishes, expected):
    fake = tmp_path / "kubectl"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in
  get\\ jobset/*) exit 1 ;;                                 # not a JobSet: a Job
  get\\ *) echo "job/$2" ;;
  *--for=condition={finishes}*) exit 0 ;;                   # this condition arrives first
  *) exec sleep 60 ;;                                      # the other one never does
esac
""")
    fake.chmod(0o755)
    result = make("wait", "RUN=train-x", "TIMEOUT=1m", f"KUBECTL={fake}")
    assert result.returncode == (0 if expected == 0 else 2), result.stdout + result.stderr
    if expected:
        assert "did not complete" in result.stderr


def test_workflows_pass_zizmor_and_keep_inputs_out_of_scripts():
    """No zizmor finding at low severity or above; dispatch inputs never inside `run:`; every
    action pinned by a full commit SHA with its tag beside it."""
    zizmor = os.path.join(os.path.dirname(sys.executable), "zizmor")
    result = subprocess.run([zizmor, "--offline", "--min-severity=low", WORKFLOWS], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in os.listdir(WORKFLOWS):
        text = open(os.path.join(WORKFLOWS, name)).read()
        steps = [step for job in yaml.safe_load(text)["jobs"].values() for step in job["steps"]]
        assert not any("${{" in step.get("run", "") for step in steps), name
        for line in text.splitlines():
            if "uses:" in line:
                assert re.search(r"uses: [\w.-]+/[\w.-]+@[0-9a-f]{40}  # v\d+\.\d+\.\d+$", line), line


def test_retrain_waits_fit_its_timeout_and_a_cancel_cleans_up():
    workflow = yaml.safe_load(open(os.path.join(WORKFLOWS, "retrain.yml")))
    job = workflow["jobs"]["retrain"]
    script = "\n".join(step.get("run", "") for step in job["steps"])
    waits = [int(minutes) for minutes in re.findall(r"make wait .*TIMEOUT=(\d+)m", script)]
    assert len(waits) == 2 and sum(waits) + 30 <= job["timeout-minutes"], waits  # 30 min: build, copy, promote
    cleanup = [step for step in job["steps"] if step.get("if") == "cancelled()"]
    assert cleanup and '"app.kubernetes.io/instance=$RUN"' in cleanup[0]["run"]
    assert workflow["permissions"] == {} and job["permissions"] == {"contents": "read", "id-token": "write"}
    assert "--production=$PRODUCTION" in script  # production scored on the same examples


# The first major of each action whose action.yml says `runs.using: node24` (read at the tags
# pinned: GitHub's runners no longer provide Node 20).
NODE24_MAJORS = {"actions/checkout": 5, "actions/setup-python": 6, "actions/upload-artifact": 6,
                 "google-github-actions/auth": 3, "google-github-actions/setup-gcloud": 3,
                 "google-github-actions/get-gke-credentials": 3}


def test_every_action_is_pinned_to_a_release_that_runs_on_node24():
    import glob

    pinned = []
    for path in glob.glob(os.path.join(WORKFLOWS, "*.yml")):
        pinned += re.findall(r"uses: ([\w.-]+/[\w.-]+)@([0-9a-f]{40})  # v(\d+)\.\d+\.\d+", open(path).read())
    assert {name for name, _, _ in pinned} == set(NODE24_MAJORS)
    for name, _, major in pinned:
        assert int(major) >= NODE24_MAJORS[name], (name, major)
