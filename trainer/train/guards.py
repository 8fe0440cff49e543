"""What keeps a run honest: the same-run check of a restart, the deadline, and the stop handlers
(SIGTERM, the deadline's alarm) that back up before the process ends."""

import signal
import time

from absl import logging

from trainer import errors
from trainer.errors import UserError
from trainer.formats import jobdir, timestamps
from trainer.train.state import STOPS


def install_stop_handlers(run, deadline_seconds=None):
    """On SIGTERM or SIGINT (Ctrl-C), or when `deadline_seconds` from now have passed (SIGALRM), ask
    every active backup callback to save at the next batch end, then stop (at once when no phase is
    running)."""

    def handler(signum, frame):
        reason = "deadline" if signum == signal.SIGALRM else signal.Signals(signum).name
        logging.warning("%s: backing up at the next step, then exiting", reason)
        for backup in run.active_backups:
            backup.stop_requested = (time.time(), reason)
        if not run.active_backups:
            raise STOPS[reason](reason)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    # No step may end (the input or the backup stalled on storage): leave in time anyway, with the
    # last committed backup, before Kubernetes' SIGKILL.
    seconds = run.config.preempt_exit_seconds
    errors.exit_after_signal((signal.SIGTERM, signal.SIGINT), seconds, errors.EXIT_RETRYABLE,
                             "retryable error: preempted ({signal}), and no step ended within " + str(seconds) +
                             " s to back up (storage stalled?); rerun to resume from the last committed backup")
    if deadline_seconds is not None:
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, deadline_seconds)


def check_same_run(job, config, dataset):
    """Refuses a restart that asks for another run than the one job_dir holds.

    config.json records the first start's settings and dataset. A restart may change how the run
    goes (backup frequency, replicas, deadline: fields with `defines_run=False`), not what it
    computes: resuming a backup under another learning rate, batch size, backbone or dataset would
    silently mix two runs. A start that never trained (no epoch, backup, features or weights
    committed: `JobDir.has_trained`) holds nothing to mix, so a corrected command replaces it.

    Returns:
      True when job_dir holds a start that never trained with other settings or data: the caller
      (the chief) replaces its record (`JobDir.forget_start`).

    Raises:
      UserError: naming what differs, and what to do instead.
    """
    recorded = job.read_config()
    if recorded is None:
        return False
    before = recorded.get("dataset")
    changed = config.changed_settings(recorded)
    if before and before["digest"] != dataset["digest"]:
        changed = [f"dataset {before['url']} prepared at {before['created']}, now {dataset['url']} prepared at "
                   f"{dataset['created']}"] + changed
    if not changed:
        return False
    if not job.has_trained():
        logging.warning("%s holds a start that never trained (%s): starting over with this command's settings",
                        job.url, "; ".join(changed))
        return True
    if before and before["digest"] != dataset["digest"]:
        if job.is_done():
            raise UserError(
                f"{job.url} is complete: it was trained on {before['url']} as prepared at {before['created']} "
                f"({_counts(before)}); that dataset has changed since (now {dataset['url']}, prepared at "
                f"{dataset['created']}: {_counts(dataset)}). To train on the new data, use a new --job_dir")
        raise UserError(f"{job.url} was started on another dataset: {before['url']} prepared at {before['created']} "
                        f"({_counts(before)}), now {dataset['url']} prepared at {dataset['created']} "
                        f"({_counts(dataset)}); resume with the original dataset, or use a new --job_dir")
    raise UserError(f"{job.url} holds a run started with other settings: {'; '.join(changed)}. Rerun with the "
                    f"run's own flags (in {job.path(jobdir.CONFIG)}) to resume it, or use a new --job_dir "
                    "for a new run")


def _counts(dataset):
    return ", ".join(f"{split} {count}" for split, count in dataset["counts"].items())


def check_deadline(config, job):
    """Seconds left before the run's --deadline_hours (None: no deadline).

    Raises:
      UserError: the deadline has passed already (a restart after it).
    """
    if config.deadline_hours is None:
        return None
    started = job.first_started()
    elapsed = (timestamps.now() - started).total_seconds()
    left = config.deadline_hours * 3600 - elapsed
    if left <= 0:
        raise UserError(deadline_message(config, started))
    logging.info("deadline: %.1f of --deadline_hours=%g left (the run first started at %s)", left / 3600,
                 config.deadline_hours, started.isoformat())
    return left


def deadline_message(config, started):
    return (f"the run's deadline passed: --deadline_hours={config.deadline_hours:g} since it first started at "
            f"{started.isoformat()} ({jobdir.STARTED} in {config.job_dir}); rerun with a larger --deadline_hours "
            "to go on from the last backup")
