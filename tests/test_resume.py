"""Preemption safety: kill a run mid-epoch, restart it on an 'empty node', and it ends where an
uninterrupted run ends (the optimizer's step count), with job_dir on the GCS server."""

import logging
import os
import signal

import pytest
from helpers import (
    TINY_JOB,
    assert_fails_as,
    assert_tensorboard_matches_history,
    optimizer_steps,
    prepare_stripes,
    run_trainer,
    start_trainer,
    train_in_process,
    wait_until,
)

from trainer.errors import EXIT_RETRYABLE
from trainer.infra import storage
from trainer.train import optimize

EPOCHS, FINE_TUNE_EPOCHS, BATCH = 8, 3, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = prepare_stripes(tmp_path_factory.mktemp("resume-data"), per_class=50, num_shards=2)
    return {"url": url, "steps": storage.read_json(url)["splits"]["train"]["count"] // BATCH}


def train_args(dataset, job_dir, *extra):
    return ["train", f"--data={dataset['url']}", f"--job_dir={job_dir}", *TINY_JOB, f"--batch_size={BATCH}",
            f"--epochs={EPOCHS}", "--learning_rate=1e-3", f"--fine_tune_epochs={FINE_TUNE_EPOCHS}",
            "--fine_tune_from=block2_conv1", "--backup_every_steps=3", *extra]


def fresh_node(tmp_path, name):
    """A new TMPDIR: the restarted process sees none of the first one's local files."""
    folder = tmp_path / name
    folder.mkdir()
    return {"TMPDIR": str(folder)}


def kill_after_backup(process, job_dir, phase, sig):
    committed = storage.join(job_dir, "backup", phase, "checkpoint")
    assert wait_until(lambda: storage.exists(committed) or process.poll() is not None, timeout=600)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(sig)
    return process.wait(timeout=120)


def finish(dataset, job_dir, caplog, *extra):
    """The restart, in this process: none of the killed process's local files (its TMPDIR) are
    seen here, as on a new node. Returns its log."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
        train_in_process(*train_args(dataset, job_dir, *extra)[1:])
    return caplog.text


# The modern recipe's schedule on the cached head phase: resumed, it follows the same values.
RECIPE = ("--optimizer=adamw", "--weight_decay=0.05", "--lr_schedule=cosine", "--warmup_epochs=1",
          "--label_smoothing=0.1", "--class_weight=balanced")


@pytest.mark.parametrize("cache", ["off", "on"])
def test_sigkill_mid_epoch_resumes_at_the_exact_step(dataset, gcs_bucket, tmp_path, caplog, cache):
    job_dir = f"{gcs_bucket}/job"
    recipe = RECIPE if cache == "on" else ()
    first = start_trainer(train_args(dataset, job_dir, f"--feature_cache={cache}", *recipe),
                          env=fresh_node(tmp_path, "node1"), log_path=tmp_path / "first.log")
    kill_after_backup(first, job_dir, "head", signal.SIGKILL)
    log = finish(dataset, job_dir, caplog, f"--feature_cache={cache}", *recipe)
    assert "resuming from the backup" in log
    assert optimizer_steps(log) == {"head": EPOCHS * dataset["steps"],
                                    "fine_tune": FINE_TUNE_EPOCHS * dataset["steps"]}
    assert storage.exists(f"{job_dir}/DONE")
    history = storage.read_json(f"{job_dir}/history.json")
    assert [len(phase["epochs"]) for phase in history["phases"]] == [EPOCHS, FINE_TUNE_EPOCHS]
    steps = dataset["steps"]
    for phase, epochs, peak in (("head", EPOCHS, 1e-3), ("fine_tune", FINE_TUNE_EPOCHS, 1e-5)):
        schedule = optimize.learning_rate_schedule(peak, "cosine" if recipe else "constant", epochs * steps,
                                                warmup_steps=steps if recipe else 0)
        recorded = next(entry for entry in history["phases"] if entry["name"] == phase)["epochs"]
        assert [entry["step"] for entry in recorded] == [steps * (index + 1) for index in range(epochs)]
        for entry in recorded:  # the rate of each epoch's last step, killed or not
            expected = float(schedule(entry["step"] - 1)) if recipe else peak
            assert entry["learning_rate"] == pytest.approx(expected, rel=1e-4, abs=1e-12), (phase, entry)
    # TensorBoard has every epoch of both attempts, the learning rate too.
    assert_tensorboard_matches_history(job_dir, tmp_path / "events")


def test_sigterm_commits_a_backup_and_exits_retryable(dataset, gcs_bucket, tmp_path, caplog):
    job_dir = f"{gcs_bucket}/job"
    log = tmp_path / "first.log"
    first = start_trainer(train_args(dataset, job_dir), env=fresh_node(tmp_path, "node1"), log_path=log)
    code = kill_after_backup(first, job_dir, "fine_tune", signal.SIGTERM)
    text = log.read_text()
    assert code == EXIT_RETRYABLE, text[-3000:]
    assert "preemption backup committed" in text  # with the seconds from signal to commit
    seconds = float(text.split("preemption backup committed ", 1)[1].split(" s", 1)[0])
    print(f"SIGTERM -> backup committed in {seconds:.2f} s")
    restart_log = finish(dataset, job_dir, caplog)
    assert "phase head: already complete" in restart_log
    assert optimizer_steps(restart_log) == {"fine_tune": FINE_TUNE_EPOCHS * dataset["steps"]}
    # The epoch before the SIGTERM, and the last of the final phase, are in TensorBoard.
    assert_tensorboard_matches_history(job_dir, tmp_path / "events")


def test_a_run_past_its_deadline_stops_with_a_committed_backup_and_a_larger_deadline_resumes(dataset, tmp_path):
    """--deadline_hours bounds the whole run from its first start (job_dir/STARTED), across restarts."""
    job_dir = str(tmp_path / "job")
    # 11 epochs, a deadline of ~4 s from the first start: the run is certain to be cut off (slower
    # machines only more so).
    long_run = ["--feature_cache=off"]
    first = run_trainer(*train_args(dataset, job_dir, *long_run, "--deadline_hours=0.001"))
    assert first.returncode == 1, first.stderr[-3000:]
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run's deadline passed: --deadline_hours=0.001") and "STARTED" in last
    started = storage.read_text(os.path.join(job_dir, "STARTED"))
    # A restart after the deadline gives up at once, with the same first start.
    assert_fails_as(lambda: train_in_process(*train_args(dataset, job_dir, *long_run, "--deadline_hours=0.001")[1:]),
                    "deadline passed")
    assert storage.read_text(os.path.join(job_dir, "STARTED")) == started
    # With more time, the same command goes on (from the backup committed at the deadline, when
    # the deadline fell inside the training loop) and finishes.
    # (The same run: only the deadline may change on a restart.)
    short = ["--feature_cache=off", "--deadline_hours=24"]
    train_in_process(*train_args(dataset, job_dir, *short)[1:])
    assert storage.exists(os.path.join(job_dir, "DONE"))
