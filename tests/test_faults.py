"""Storage faults against real processes: the GCS server behind a proxy that stalls, cuts or refuses.

Every case ends in its documented exit code (docs/faults.md) with one line naming what failed, no
traceback, and a rerun after the fault completes. The storage deadlines are shortened for the
tests (TRAINER_STORAGE_TIMEOUT_SECONDS=2); the subprocess timeouts only catch a hang.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from faultproxy import FaultProxy
from helpers import TINY_JOB, run_trainer, write_stripes

from trainer.infra import folders

HANG = 600  # seconds: a command still running after this is hung (the documented bound is far less)
FAST_STORAGE = {"TRAINER_STORAGE_TIMEOUT_SECONDS": "2"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory, gcs_server):
    """Images, a dataset and a trained job in a bucket on the GCS server (reached directly)."""
    import fsspec

    local = tmp_path_factory.mktemp("faults")
    write_stripes(str(local / "images"), per_class=20)
    bucket = "gs://faults"
    fsspec.filesystem("gs", use_listings_cache=False).mkdir("faults")
    folders.copy_tree(str(local / "images"), f"{bucket}/images")
    run_trainer("prepare", f"--source={bucket}/images", f"--output={bucket}/data", "--num_shards=2",
                "--workers=1", check=True)
    run_trainer("train", f"--data={bucket}/data/dataset.json", f"--job_dir={bucket}/job", *TINY_JOB,
                "--batch_size=8", "--epochs=1", "--fine_tune_epochs=0", check=True)
    run_trainer("evaluate", f"--data={bucket}/data/dataset.json", f"--model={bucket}/job/model",
                f"--output={bucket}/job/eval", check=True)
    return {"local": local, "bucket": bucket}


@pytest.fixture
def proxy(gcs_server):
    proxy = FaultProxy(gcs_server)
    yield proxy
    proxy.close()


def start(proxy, *args, env=None):
    """Starts a `trainer` command whose storage goes through `proxy`."""
    environment = {**os.environ, **FAST_STORAGE, "STORAGE_EMULATOR_HOST": proxy.url, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment)


def finish(process, started=None):
    """(exit code, stderr) once `process` ends; fails the test if it hangs. Prints how long it took
    (`pytest -s`: the figures of docs/faults.md)."""
    started = started or time.monotonic()
    try:
        stderr = process.communicate(timeout=HANG)[1] or ""
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{process.args[3:]} still running after {HANG} s (hung)")
    print(f"{process.args[3]}: exit {process.returncode} after {time.monotonic() - started:.0f} s: "
          f"{stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    return process.returncode, stderr


def every_command(stored, tmp_path, name):
    """One invocation of each command that touches storage, all of it on the bucket."""
    bucket = stored["bucket"]
    data = f"{bucket}/data/dataset.json"
    return {
        "prepare": ["prepare", f"--source={bucket}/images", f"--output={bucket}/{name}/data", "--workers=1"],
        "train": ["train", f"--data={data}", f"--job_dir={bucket}/{name}/job", *TINY_JOB, "--batch_size=8",
                  "--epochs=1", "--fine_tune_epochs=0"],
        "evaluate": ["evaluate", f"--data={data}", f"--model={bucket}/job/model", f"--output={bucket}/{name}/eval"],
        "predict": ["predict", f"--model={bucket}/job/model", f"--input={bucket}/images",
                    f"--output={tmp_path / 'predictions.csv'}"],
        "promote": ["promote", f"--candidate={bucket}/job", f"--production={bucket}/{name}/production"],
    }


def assert_one_line(stderr, expected):
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(expected), stderr[-3000:]
    return last


def start_going_bad_mid_run(stored, gcs_server, tmp_path):
    """Every command against a store that goes bad once it has answered the command's first
    requests: connections reset (aiohttp's ServerDisconnectedError), every request answered 503
    (gcsfs's HttpError after its retries), or answers that trickle at 1 byte/s (only the
    whole-request deadline ends those). Returns ({(fault, command): process}, proxies)."""
    processes, proxies = {}, []
    for fault in ("cut", "503", "drip"):
        (tmp_path / fault).mkdir()
        for name, args in every_command(stored, tmp_path / fault, fault).items():
            proxy = FaultProxy(gcs_server)
            proxy.go_bad_after(2048, fault)  # after the first answers: the command is at work
            proxies.append(proxy)
            processes[(fault, name)] = start(proxy, *args)
    return processes, proxies


def test_a_store_that_stalls_refuses_or_goes_bad_mid_run_ends_every_command_in_exit_75(stored, gcs_server, tmp_path):
    """A store that stalls (accepts, never answers), one that refuses (nothing listens), and ones
    that go bad mid-run (`start_going_bad_mid_run`): every command ends in 75 with one line, never
    70, all of them at once (they wait on their deadlines side by side)."""
    proxies = {fault: FaultProxy(gcs_server) for fault in ("stall", "refuse")}
    mid_run, mid_run_proxies = start_going_bad_mid_run(stored, gcs_server, tmp_path)
    try:
        commands = {}
        for fault, proxy in proxies.items():
            proxy.mode = fault
            (tmp_path / fault).mkdir()
            commands.update({(fault, name): (proxy, args)
                             for name, args in every_command(stored, tmp_path / fault, fault).items()})
        started = time.monotonic()
        processes = {key: start(proxy, *args) for key, (proxy, args) in commands.items()}
        # Ctrl-C on a command stuck on the stalled store: one press, the same bounded exit as SIGTERM.
        interrupted = start(proxies["stall"], *every_command(stored, tmp_path / "stall", "sigint")["prepare"])
        time.sleep(3)
        interrupted.send_signal(signal.SIGINT)
        code, stderr = finish(interrupted)
        assert code == 75 and "Traceback" not in stderr, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == "interrupted (SIGINT); rerun to go on", stderr[-3000:]
        for key, process in {**processes, **mid_run}.items():
            code, stderr = finish(process, started)
            assert code == 75, (key, stderr[-3000:])
            last = assert_one_line(stderr, "retryable error: storage")
            assert "gs://faults" in last or "127.0.0.1" in last, (key, last)
        # Nothing half-written stands in the way of a rerun once the store is back (the stall is
        # the case that leaves requests half done).
        proxies["stall"].mode = "pass"
        reruns = {name: start(proxy, *args) for (fault, name), (proxy, args) in commands.items()
                  if fault == "stall" and name != "predict"}
        for name, process in reruns.items():
            code, stderr = finish(process)
            assert code == 0, (name, stderr[-3000:])
    finally:
        for proxy in [*proxies.values(), *mid_run_proxies]:
            proxy.close()


def test_a_missing_output_bucket_is_one_line_and_exit_1_before_any_work(stored, proxy, tmp_path):
    commands = every_command(stored, tmp_path, "x")
    outputs = {"prepare": "--output=gs://no-such-bucket/data", "train": "--job_dir=gs://no-such-bucket/job",
               "evaluate": "--output=gs://no-such-bucket/eval", "predict": "--output=gs://no-such-bucket/p.csv",
               "promote": "--production=gs://no-such-bucket/production"}
    processes = {}
    for name, args in commands.items():
        flag = outputs[name].split("=", 1)[0]
        processes[name] = start(proxy, *[arg for arg in args if not arg.startswith(flag + "=")], outputs[name])
    for name, process in processes.items():
        code, stderr = finish(process)
        assert code == 1, (name, stderr[-3000:])
        last = assert_one_line(stderr, "error: bucket gs://no-such-bucket does not exist")
        assert "gs://no-such-bucket" in last
        # Checked first: no image was read, no model was loaded, nothing was trained.
        assert "decod" not in stderr and "plan:" not in stderr and "loaded" not in stderr.lower(), (name, stderr)


def test_sigterm_during_a_stall_exits_75_within_the_grace_period_and_the_rerun_resumes(stored, proxy, tmp_path):
    bucket = stored["bucket"]
    args = ["train", f"--data={bucket}/data/dataset.json", f"--job_dir={bucket}/sigterm/job", *TINY_JOB,
            "--batch_size=8", "--epochs=40", "--fine_tune_epochs=0", "--backup_every_steps=2",
            "--feature_cache=off", "--preempt_exit_seconds=5"]
    log = tmp_path / "train.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], stdout=handle, stderr=handle,
                                   text=True, env={**os.environ, "STORAGE_EMULATOR_HOST": proxy.url})
    deadline = time.monotonic() + HANG
    while "epoch 2 done" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert process.poll() is None, log.read_text()[-3000:]
    proxy.mode = "stall"  # backups, history and shard reads now hang (deadlines at their default)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    code, _ = finish(process, time.monotonic())
    text = log.read_text()
    assert code == 75, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("retryable error: preempted (SIGTERM), and no step ended"), \
        text[-2000:]
    # Once the store is back, the same command resumes from the backup committed before the stall
    # (stopped there by another SIGTERM: the rest of its epochs would prove nothing more).
    proxy.mode = "pass"
    rerun_log = tmp_path / "rerun.log"
    with open(rerun_log, "w") as handle:
        rerun = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], stdout=handle, stderr=handle,
                                 text=True, env={**os.environ, "STORAGE_EMULATOR_HOST": proxy.url})
    while "resuming from the backup" not in rerun_log.read_text() and rerun.poll() is None and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    rerun.send_signal(signal.SIGTERM)
    code, _ = finish(rerun)
    text = rerun_log.read_text()
    assert "resuming from the backup" in text and code == 75, text[-3000:]
