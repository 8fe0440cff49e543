"""One job_dir, one run: restarts must ask for the same run, two runs at once are refused, and
damaged job_dir state gives a clear message (or is recovered) instead of a traceback.

The runs whose process is signalled, killed or given a small disk are real processes; the restarts
that follow them run in this process (`train_in_process`).
"""

import json
import logging
import os
import signal

import pytest
from helpers import (
    TINY_JOB,
    assert_fails_as,
    prepare_stripes,
    start_trainer,
    train_in_process,
    wait_until,
    write_stripes,
)

from trainer.errors import EXIT_RETRYABLE
from trainer.infra import storage
from trainer.prepare.run import prepare_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs-data")
    return {"folder": folder, "url": prepare_stripes(folder, per_class=24, num_shards=2)}


def train(dataset, job_dir, *extra, epochs=1):
    return ["train", f"--data={dataset['url']}", f"--job_dir={job_dir}", *TINY_JOB, "--batch_size=8",
            f"--epochs={epochs}", "--fine_tune_epochs=0", "--learning_rate=1e-3", *extra]


def restart(dataset, job_dir, *extra, epochs=1):
    """The same command again, in this process."""
    return lambda: train_in_process(*train(dataset, job_dir, *extra, epochs=epochs)[1:])


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    job_dir = str(tmp_path_factory.mktemp("runs-job") / "job")
    restart(dataset, job_dir)()
    return job_dir


def test_a_restart_with_other_run_settings_is_refused_naming_them(dataset, finished):
    last = assert_fails_as(restart(dataset, finished, "--learning_rate=0.01", "--dense_units=16"))
    assert "--learning_rate=0.001 (now: 0.01)" in last and "--dense_units=32 (now: 16)" in last, last
    assert "new --job_dir" in last


def test_settings_that_do_not_change_the_result_may_change(dataset, finished, capsys):
    restart(dataset, finished, "--backup_every_steps=7", "--cpu_replicas=2", "--feature_cache=off")()
    assert "already complete" in capsys.readouterr().out
    # config.json keeps the first start's record.
    assert storage.read_json(os.path.join(finished, "config.json"))["backup_every_steps"] == 100


def test_a_start_that_never_trained_accepts_a_corrected_command(dataset, tmp_path, caplog):
    job_dir = str(tmp_path / "job")
    # A typo in a layer name fails after the start recorded its settings, before any step.
    assert_fails_as(restart(dataset, job_dir, "--fine_tune_epochs=1", "--fine_tune_from=nope"),
                    "--fine_tune_from: no layer 'nope'")
    assert storage.read_json(os.path.join(job_dir, "config.json"))["fine_tune_from"] == "nope"
    with caplog.at_level(logging.WARNING):
        restart(dataset, job_dir, "--learning_rate=0.01")()
    assert "holds a start that never trained" in caplog.text and "--learning_rate=0.001 (now: 0.01)" in caplog.text
    # The corrected command is now the run's record; the trained run keeps today's protection.
    assert storage.read_json(os.path.join(job_dir, "config.json"))["learning_rate"] == 0.01
    assert os.path.exists(os.path.join(job_dir, "DONE"))
    assert_fails_as(restart(dataset, job_dir, "--learning_rate=0.1"), "holds a run started with other settings")


def test_a_finished_run_says_when_its_dataset_has_changed(tmp_path):
    own = {"folder": tmp_path, "url": prepare_stripes(tmp_path, per_class=24, num_shards=2)}
    job_dir = str(tmp_path / "job")
    restart(own, job_dir)()
    # The dataset is prepared again, in the same place, after more images arrived.
    write_stripes(str(tmp_path / "images"), per_class=30)
    prepare_dataset(str(tmp_path / "images"), str(tmp_path / "data"), workers=1, num_shards=2, overwrite=True)
    last = assert_fails_as(restart(own, job_dir))
    assert "is complete: it was trained on" in last and own["url"] in last, last
    assert "has changed since" in last and "new --job_dir" in last, last


def test_a_second_run_on_a_busy_job_dir_is_refused_and_the_first_goes_on(dataset, tmp_path):
    job_dir = str(tmp_path / "job")
    first = start_trainer(train(dataset, job_dir, epochs=30), log_path=tmp_path / "first.log")
    assert wait_until(lambda: os.path.exists(os.path.join(job_dir, "history.json")) or first.poll() is not None,
                      timeout=600)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
    assert_fails_as(restart(dataset, job_dir, epochs=30), "another run is using this job_dir")
    # The first run goes on undisturbed; stopped now (the rest of its epochs prove nothing more),
    # it releases the lease on its way out.
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == EXIT_RETRYABLE, (tmp_path / "first.log").read_text()[-3000:]
    assert not os.path.exists(os.path.join(job_dir, "LEASE"))


def test_a_killed_run_does_not_block_its_restart(dataset, tmp_path, capsys):
    job_dir = str(tmp_path / "job")
    first = start_trainer(train(dataset, job_dir, epochs=3), log_path=tmp_path / "first.log")
    assert wait_until(lambda: os.path.exists(os.path.join(job_dir, "LEASE")) or first.poll() is not None,
                      timeout=600)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    held = json.loads(open(os.path.join(job_dir, "LEASE")).read())
    assert held["pid"] == first.pid  # left behind by the dead run
    restart(dataset, job_dir, epochs=3)()
    assert "already complete" not in capsys.readouterr().out
    assert os.path.exists(os.path.join(job_dir, "DONE")) and not os.path.exists(os.path.join(job_dir, "LEASE"))


def test_damaged_history_is_named(dataset, tmp_path):
    job_dir = tmp_path / "job"
    restart(dataset, str(job_dir), "--steps_per_epoch=1", epochs=2)()
    (job_dir / "DONE").unlink()
    (job_dir / "history.json").write_text("{not json")
    assert_fails_as(restart(dataset, str(job_dir), "--steps_per_epoch=1", epochs=2), "history.json is damaged")


def test_a_truncated_backup_is_named_with_the_way_out(dataset, tmp_path):
    job_dir = tmp_path / "job"
    log = tmp_path / "first.log"
    first = start_trainer(train(dataset, str(job_dir), "--backup_every_steps=1", epochs=30), log_path=log)
    index = job_dir / "backup" / "head" / "checkpoint"
    assert wait_until(lambda: index.exists() or first.poll() is not None, timeout=600)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    data = next((job_dir / "backup" / "head").glob("*.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert_fails_as(restart(dataset, str(job_dir), "--backup_every_steps=1", epochs=30),
                    "backup", "is damaged", "delete that folder")


def test_a_deleted_model_of_a_finished_run_is_exported_again(dataset, finished, tmp_path, caplog):
    import shutil

    job_dir = tmp_path / "job"
    shutil.copytree(finished, job_dir)
    shutil.rmtree(job_dir / "model")
    with caplog.at_level(logging.INFO, logger="absl"):
        restart(dataset, str(job_dir))()
    assert "exporting it again" in caplog.text
    assert (job_dir / "model" / "saved_model.pb").exists() and (job_dir / "DONE").exists()


def test_a_full_disk_is_one_line_and_exit_1(dataset, tmp_path):
    """Files may not grow past 16 KB (RLIMIT_FSIZE: writes fail as on a full disk, EFBIG)."""
    import resource
    import subprocess
    import sys

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    result = subprocess.run([sys.executable, "-m", "trainer.cli", *train(dataset, str(tmp_path / "job"))],
                            capture_output=True, text=True, preexec_fn=small_disk, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: no space left"), result.stderr[-2000:]


def test_the_lease_admits_restarts_of_its_run_and_expired_holders_only(tmp_path):
    import time

    from trainer.errors import UserError
    from trainer.formats import jobdir

    job = jobdir.JobDir(str(tmp_path))
    lease_file = tmp_path / "LEASE"

    def held_by(run, expires_in):
        lease_file.write_text(json.dumps({"run": run, "host": "another-node", "pid": 1,
                                          "expires": time.time() + expires_in}))

    held_by("train-r1", 120)
    with pytest.raises(UserError, match="another run is using this job_dir: train-r1"):
        job.take_lease({"TRAINER_RUN_ID": "train-r2"})
    job.take_lease({"TRAINER_RUN_ID": "train-r1"}).release()  # the same Job, restarted on another node
    assert not lease_file.exists()
    held_by("train-r1", -1)  # its holder stopped renewing it: dead
    lease = job.take_lease({"JOBSET_NAME": "train-r3"})
    assert json.loads(lease_file.read_text())["run"] == "train-r3"
    lease.release()


@pytest.mark.parametrize("name, content, fragment", [
    ("config.json", "[]", "config.json is damaged"),
    ("config.json", "{}", "config.json is damaged"),  # would have let any restart through
    ("history.json", '{"phases": [1, 2]}', "history.json is damaged"),
    ("history.json", '{"phases": [{"name": "head", "epochs": [{"loss": 1}]}]}', "history.json is damaged"),
    ("STARTED", "2026-01-01T00:00:00", "STARTED is damaged"),  # no time zone: its moment is unknown
])
def test_wrong_shape_state_files_are_named_with_the_way_out(dataset, finished, tmp_path, name, content, fragment):
    import shutil

    job_dir = tmp_path / "job"
    shutil.copytree(finished, job_dir)
    (job_dir / "DONE").unlink()
    (job_dir / name).write_text(content)
    line = assert_fails_as(restart(dataset, str(job_dir), "--deadline_hours=24"), fragment)
    assert "delete it" in line or "restore it" in line, line


@pytest.mark.parametrize("held", ["[]", '{"expires": "soon"}', '{"run": "r", "host": "h", "expires": 1e12}',
                                  '{"run": "r", "host": "h", "pid": 1, "expires": 1e100}'])
def test_a_lease_of_the_wrong_shape_protects_nothing(tmp_path, held):
    from trainer.formats import jobdir

    (tmp_path / "LEASE").write_text(held)
    jobdir.JobDir(str(tmp_path)).take_lease({"TRAINER_RUN_ID": "train-r9"}).release()
    assert not (tmp_path / "LEASE").exists()


def test_a_damaged_checkpoint_of_a_finished_phase_is_named_with_the_way_out(dataset, finished, tmp_path):
    import shutil

    job_dir = tmp_path / "job"
    shutil.copytree(finished, job_dir)
    (job_dir / "DONE").unlink()  # the export is redone from the phase's weights
    data = next((job_dir / "checkpoints" / "head").glob("*.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert_fails_as(restart(dataset, str(job_dir)), "checkpoint of the finished phase in", "is damaged",
                    "delete that folder to train this phase again")
