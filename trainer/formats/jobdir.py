"""The job_dir layout: every path of a training run, and the few operations that change it.

  STARTED              when the run first started (the first task to start writes it, only if absent)
  LEASE                which run is working here now (the chief holds it, renews it, removes it)
  config.json          the resolved configuration and dataset of the run's first start (chief);
                       a restart must ask for the same run (`check_same_run` in trainer.train.run)
  history.json         per-epoch metrics of each phase, and damaged data skipped (every epoch)
  tensorboard/         TensorBoard event files, synced after every epoch
  backup/<phase>/      preemption backups (BackupAndRestore); the `checkpoint` index file last
  features/<split>/part-<w>-of-<n>/  worker w's part of the frozen base's outputs (the feature
                       cache), COMPLETE last; written by each worker, removed after the head phase
  checkpoints/<phase>/ the weights at the end of each phase, and COMPLETE once they are whole
  model/               the exported SavedModel (trainer.train.export)
  eval/                `trainer evaluate --output=JOB_DIR/eval`: metrics.json, pictures, report.html last
  DONE                 written last: a rerun of a finished job exits 0 at once

Keras writes checkpoints and event files to local scratch; the operations here copy them to
job_dir (any store fsspec reaches) with the commit point last, so a crash mid-copy leaves the
previous state whole, and a pod rescheduled on an empty disk resumes from job_dir. Train, evaluate
and promote all name these paths through this module. Only the chief calls the writing operations.
"""

import json
import os
import uuid

from trainer.errors import UserError
from trainer.formats import modeldir, timestamps
from trainer.formats.lease import Lease
from trainer.infra import cas, folders, storage

STARTED = "STARTED"
LEASE = "LEASE"  # trainer.formats.lease
# The launcher's name for the run, the same for every restart of it: the manifests set it from the
# Job's name (TRAINER_RUN_ID; the Indexed Job's TRAINER_JOB_NAME) or the JobSet's; Vertex AI sets
# CLOUD_ML_JOB_ID. A restart of the same run is never blocked by the lease its dead predecessor left.
RUN_ID_VARIABLES = ("TRAINER_RUN_ID", "JOBSET_NAME", "TRAINER_JOB_NAME", "CLOUD_ML_JOB_ID")
CONFIG = "config.json"
HISTORY = "history.json"
TENSORBOARD = "tensorboard"
BACKUP = "backup"
BEST = "best"  # early stopping: the weights of each phase's best epoch so far
FEATURES = "features"
CHECKPOINTS = "checkpoints"
MODEL = "model"
EVAL = "eval"
METRICS = "metrics.json"
REPORT = "report.html"  # written last by `trainer evaluate`: the evaluation is complete once it is there
DONE = "DONE"
COMPLETE = "COMPLETE"  # the commit marker of a phase's weights and of a split's features
CHECKPOINT_INDEX = "checkpoint"  # TensorFlow's index of a checkpoint folder: its commit point


def history_next_to_model(model_url):
    """Where a job's history.json is when `model_url` is its JOB_DIR/model (or a copy of both)."""
    return storage.join(storage.dirname(model_url), HISTORY)


class JobDir:
    """One run's job_dir (local path or URL)."""

    def __init__(self, url):
        self.url = url.rstrip("/") if storage.is_url(url) else url

    def path(self, *parts):
        return storage.join(self.url, *parts)

    @property
    def model_url(self):
        return self.path(MODEL)

    @property
    def metrics_url(self):
        """The evaluation that `trainer promote` gates on (JOB_DIR/eval/metrics.json)."""
        return self.path(EVAL, METRICS)

    @property
    def report_url(self):
        """JOB_DIR/eval/report.html, the last file an evaluation writes."""
        return self.path(EVAL, REPORT)

    # --- the run as a whole

    def is_done(self):
        """DONE is there, and so is the model it vouches for. DONE without model/ (deleted by hand)
        is withdrawn, so that the run exports again from its phases' weights."""
        if not storage.exists(self.path(DONE)):
            return False
        if storage.exists(self.path(MODEL, modeldir.SAVED_MODEL_FILE)):
            return True
        from absl import logging

        logging.warning("%s says the run is complete, but %s is missing: exporting it again", self.path(DONE),
                        self.path(MODEL, modeldir.SAVED_MODEL_FILE))
        storage.remove(self.path(DONE))
        return False

    def mark_done(self):
        storage.write_text(self.path(DONE), timestamps.now_text())

    def first_started(self):
        """When the run first started (UTC, aware): STARTED, created now unless an attempt did before.

        Any task may create it: the write is create-if-absent, so the first one wins and every
        restart, on any machine, reads the same time.
        """
        cas.write_if_absent(self.path(STARTED), timestamps.now_text().encode())
        text = storage.read_text(self.path(STARTED)).strip()
        try:
            return timestamps.parse(text)
        except ValueError:
            raise UserError(f"{self.path(STARTED)} is damaged ({text[:40]!r}): delete it to restart the "
                            "run's deadline clock") from None

    def read_config(self):
        """The config.json of the run's first start, or None before it."""
        try:
            config = storage.read_json(self.path(CONFIG))
        except FileNotFoundError:
            return None
        except ValueError as error:
            raise UserError(f"{self.path(CONFIG)} is damaged ({error}): restore it, or use a new --job_dir") \
                from None
        # What a restart is checked against (train/guards.check_same_run): without it, the check
        # would pass anything.
        dataset = config.get("dataset") if isinstance(config, dict) else None
        if not (isinstance(dataset, dict) and isinstance(dataset.get("counts"), dict)
                and all(isinstance(dataset.get(key), str) for key in ("digest", "url")) and "data" in config):
            raise UserError(f"{self.path(CONFIG)} is damaged (not the record of a run's first start: no "
                            "dataset or settings): restore it, or use a new --job_dir")
        return config

    def has_trained(self):
        """Whether an attempt committed any work here: an epoch in history.json, a backup, best
        weights, cached features, a phase's weights or the model. Until then nothing in job_dir
        depends on the settings, and a corrected command may start over (`forget_start`)."""
        if any(storage.exists(self.path(name)) for name in (BACKUP, BEST, FEATURES, CHECKPOINTS, MODEL, DONE)):
            return True
        try:
            history = storage.read_json(self.path(HISTORY))
        except FileNotFoundError:
            return False
        except ValueError:
            return True  # damaged: keep the protection, load_history names the file
        phases = history.get("phases") if isinstance(history, dict) else None
        return not isinstance(phases, list) or any(
            not isinstance(phase, dict) or phase.get("epochs") for phase in phases)

    def forget_start(self):
        """Removes the record of a start that never trained (config.json, STARTED, its empty history
        and event files), so that the corrected command's start is the run's first."""
        for name in (CONFIG, STARTED, HISTORY):
            storage.remove(self.path(name))
        storage.remove(self.path(TENSORBOARD), recursive=True)

    def write_config(self, config):
        """Records the run's config once: a restart keeps the first start's record."""
        cas.write_if_absent(self.path(CONFIG), (json.dumps(config, indent=2) + "\n").encode())

    def take_lease(self, environ=os.environ):
        """Takes job_dir's LEASE for this run and keeps it renewed until `Lease.release()`.

        Raises:
          UserError: another run, alive, holds it (a second submission of the same job_dir).
        """
        run_id = next((environ[name] for name in RUN_ID_VARIABLES if environ.get(name)), None)
        lease = Lease(self.path(LEASE), run_id or f"pid-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        lease.take()
        return lease

    def load_history(self, phases):
        """history.json as {"phases": [{"name", "epochs": [...]}], ...}, with every phase listed."""
        url = self.path(HISTORY)
        try:
            history = storage.read_json(url) if storage.exists(url) else {"phases": []}
            _check_history(history)
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{url} is damaged ({type(error).__name__}: {error}): delete it to go on without "
                            "the earlier epochs' records (the weights are in the backups)") from None
        for name in phases:
            if not any(phase["name"] == name for phase in history["phases"]):
                history["phases"].append({"name": name, "epochs": []})
        return history

    def write_history(self, history):
        storage.write_json(self.path(HISTORY), history)

    def sync_tensorboard(self, local_dir):
        """Copies the local TensorBoard event files up (they only grow: a full copy each epoch)."""
        if os.path.isdir(local_dir):
            folders.copy_tree(local_dir, self.path(TENSORBOARD))

    # --- preemption backups (one per phase)

    def commit_backup(self, phase, local_dir):
        """Uploads a BackupAndRestore folder, its `checkpoint` index last (the commit point)."""
        _upload_checkpoint_dir(local_dir, self.path(BACKUP, phase))

    def restore_backup(self, phase, local_dir):
        """Downloads the committed backup of `phase` to `local_dir`; False when there is none."""
        return _download_checkpoint_dir(self.path(BACKUP, phase), local_dir)

    def backup_url(self, phase):
        return self.path(BACKUP, phase)

    # --- early stopping: the best epoch's weights of a phase

    def commit_best(self, phase, local_dir):
        _upload_checkpoint_dir(local_dir, self.path(BEST, phase))

    def restore_best(self, phase, local_dir):
        """Downloads the committed best weights of `phase`; False when there are none."""
        return _download_checkpoint_dir(self.path(BEST, phase), local_dir)

    # --- phases

    def is_phase_complete(self, phase):
        return storage.exists(self.path(CHECKPOINTS, phase, COMPLETE))

    def commit_phase(self, phase, local_dir):
        """Publishes a phase's final weights (a TF checkpoint folder), then its COMPLETE marker.

        The phase's preemption backup, and after the head phase the feature cache, are removed
        afterwards: they are the largest files of a job and a complete phase never reads them.
        """
        remote = self.path(CHECKPOINTS, phase)
        _upload_checkpoint_dir(local_dir, remote)
        storage.write_text(storage.join(remote, COMPLETE), timestamps.now_text())
        storage.remove(self.path(BACKUP, phase), recursive=True)
        if phase == "head":
            storage.remove(self.path(FEATURES), recursive=True)

    def restore_phase(self, phase, local_dir):
        """Downloads a complete phase's weights to `local_dir`."""
        _download_checkpoint_dir(self.path(CHECKPOINTS, phase), local_dir)

    # --- the feature cache (one folder per split and worker)

    def features_url(self, split, worker=0, workers=1):
        """Where worker `worker` of `workers` keeps its part of a split's cached features."""
        return self.path(FEATURES, split, f"part-{worker}-of-{workers}")

    def restore_features(self, url, local_paths):
        """Downloads a committed part of the feature cache to `local_paths`; False when not committed."""
        if not storage.exists(storage.join(url, COMPLETE)):
            return False
        for path in local_paths:
            storage.copy(storage.join(url, os.path.basename(path)), path)
        return True

    def commit_features(self, url, local_paths):
        """Uploads a part's feature files, then its COMPLETE marker."""
        for path in local_paths:
            storage.copy(path, storage.join(url, os.path.basename(path)))
        storage.write_text(storage.join(url, COMPLETE), timestamps.now_text())


def _check_history(history):
    """Raises TypeError or KeyError unless `history` has the shape the phases rely on:
    {"phases": [{"name": str, "epochs": [{"epoch": int, ...}, ...]}, ...], ...}."""
    if not isinstance(history, dict) or not isinstance(history["phases"], list):
        raise TypeError("expected {\"phases\": [...]}")
    for phase in history["phases"]:
        if not (isinstance(phase, dict) and isinstance(phase["name"], str) and isinstance(phase["epochs"], list)
                and all(isinstance(entry, dict) and isinstance(entry["epoch"], int) for entry in phase["epochs"])):
            raise TypeError(f"a phase that is not {{\"name\", \"epochs\": [{{\"epoch\", ...}}]}}: {str(phase)[:80]}")


def _upload_checkpoint_dir(local_dir, remote_dir):
    """Copies a TF checkpoint folder up, the `checkpoint` index file last (the commit point).

    A crash mid-copy leaves the previous `checkpoint` pointing at files that are all present.
    Files of checkpoints that the index no longer names are removed afterwards.
    """
    names = sorted(name for name in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, name)))
    for name in names:
        if name != CHECKPOINT_INDEX:
            storage.copy(os.path.join(local_dir, name), storage.join(remote_dir, name))
    if CHECKPOINT_INDEX in names:
        storage.copy(os.path.join(local_dir, CHECKPOINT_INDEX), storage.join(remote_dir, CHECKPOINT_INDEX))
    remote = set()
    if storage.isdir(remote_dir):
        remote = {relative for relative, _ in folders.list_files(remote_dir)}
    for stale in remote - set(names):
        storage.remove(storage.join(remote_dir, stale))


def _download_checkpoint_dir(remote_dir, local_dir):
    """Copies a committed checkpoint folder down; returns False when there is none."""
    if not storage.exists(storage.join(remote_dir, CHECKPOINT_INDEX)):
        if storage.isdir(remote_dir):
            from absl import logging

            logging.warning("%s holds files but no `%s` index (never committed, or damaged): not used",
                            remote_dir, CHECKPOINT_INDEX)
        return False
    os.makedirs(local_dir, exist_ok=True)
    folders.copy_tree(remote_dir, local_dir)
    return True
