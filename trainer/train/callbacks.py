"""The Keras callbacks of a phase: backups committed to job_dir (and the stop on SIGTERM or the
deadline), each epoch's record in history.json and TensorBoard, and early stopping."""

import os
import time

from absl import logging

from trainer.infra import folders
from trainer.infra.kerasapi import keras
from trainer.train.state import STOPS


class SyncedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose every backup is also committed to job_dir, plus SIGTERM handling.

    On SIGTERM (or when the run's deadline passes) the next batch end writes a backup, commits it,
    and raises `Preempted` (`DeadlinePassed`), so the process can exit with the retryable code (the
    bad-input code); a restart resumes at that exact step.
    """

    def __init__(self, local_dir, job, phase, save_freq, is_chief, steps_per_epoch):
        super().__init__(backup_dir=local_dir, save_freq=save_freq, delete_checkpoint=False)
        self.local_dir, self.job, self.phase, self.is_chief = local_dir, job, phase, is_chief
        self.steps_per_epoch = steps_per_epoch
        self.stop_requested = None  # (time.time() of the request, a key of STOPS)

    def _backup(self, epoch, batch=0):
        super()._backup(epoch=epoch, batch=batch)
        if self.is_chief:
            # BackupAndRestore's chief writes into backup_dir/chief (other workers into temp dirs).
            self.job.commit_backup(self.phase, os.path.join(self.local_dir, "chief"))

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.steps_per_epoch and self.stop_requested is None:
            # Not after the epoch's last step but at its end, once its history is written
            # (`on_epoch_end`): a backup of the last step resumes in the next epoch, so a kill
            # before the history was written would lose the epoch's record.
            save_freq, self.save_freq = self.save_freq, False
            try:
                super().on_train_batch_end(batch, logs)
            finally:
                self.save_freq = save_freq
            return
        super().on_train_batch_end(batch, logs)
        if self.stop_requested is not None:
            self._backup(epoch=self._current_epoch, batch=batch)
            requested, reason = self.stop_requested
            elapsed = time.time() - requested
            logging.warning("%s: backup committed to %s %.1f s after the signal", reason,
                            self.job.backup_url(self.phase), elapsed)
            if reason != "deadline":
                print(f"preemption backup committed {elapsed:.1f} s after {reason}", flush=True)
            raise STOPS[reason](reason)


    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self._batches_count = 0
        self._backup(epoch=epoch, batch=self.steps_per_epoch - 1)


class EpochRecorder(keras.callbacks.Callback):
    """Appends each epoch's metrics to history.json and to TensorBoard, then syncs the event files
    to job_dir (chief only).

    The scalars are written here, from the same record as history.json and flushed before the
    sync, so every epoch in history.json is in TensorBoard (Keras's own TensorBoard callback
    flushes only when training ends: the last epoch and the one before a SIGTERM were lost). The
    layout is Keras's: `<phase>/train` and `<phase>/validation`, tags `epoch_<metric>`, step =
    the epoch, plus `epoch_learning_rate`.
    """

    def __init__(self, run, phase, tensorboard_dir):
        super().__init__()
        self.run, self.phase, self.tensorboard_dir = run, phase, tensorboard_dir
        self.writers = {}

    def on_train_end(self, logs=None):
        logging.info("phase %s: training loop ended", self.phase)
        for writer in self.writers.values():
            writer.close()

    def on_epoch_begin(self, epoch, logs=None):
        if self.run.gpus:
            self.run.gpus.take()  # the epoch's own window

    def on_epoch_end(self, epoch, logs=None):
        logging.info("phase %s: epoch %d done", self.phase, epoch + 1)
        if not self.run.is_chief:
            return
        history = self.run.history
        epochs = next(p for p in history["phases"] if p["name"] == self.phase)["epochs"]
        epochs[:] = [e for e in epochs if e["epoch"] != epoch + 1]
        optimizer = self.model.optimizer
        # The learning rate of the epoch's last step, and the optimizer's step count after it: a
        # resumed run records the same values as an uninterrupted one.
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
                  "learning_rate": float(keras.backend.get_value(optimizer.learning_rate)),
                  "step": int(optimizer.iterations.numpy())}
        gpu = self.run.gpus.take() if self.run.gpus else None
        if gpu:  # absent on a machine without GPUs
            record.update(gpu)
            logging.info("phase %s epoch %d: %s", self.phase, epoch + 1,
                         ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in gpu.items()))
        epochs.append(record)
        record_skipped_data(self.run)
        self.run.job.write_history(history)
        if self.run.tracker:
            self.run.tracker.log_metrics({f"{self.phase}_{name}": value for name, value in record.items()
                                          if name not in ("epoch", "step")}, epoch + 1)
        self.write_scalars(record)
        self.run.job.sync_tensorboard(self.tensorboard_dir)
        if self.run.tensorboard_copy:
            folders.copy_tree(self.tensorboard_dir, self.run.tensorboard_copy)

    def write_scalars(self, record):
        import tensorflow as tf

        for name, value in record.items():
            if name in ("epoch", "step"):
                continue
            kind, metric = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
            if kind not in self.writers:
                self.writers[kind] = tf.summary.create_file_writer(
                    os.path.join(self.tensorboard_dir, self.phase, kind))
            with self.writers[kind].as_default():
                tf.summary.scalar(f"epoch_{metric}", value, step=record["epoch"])
        for writer in self.writers.values():
            writer.flush()


class Progress(keras.callbacks.Callback):
    """Progress within an epoch, one log line at most every `seconds` (0: every step): the step, the
    images per second since the epoch began, the time left in the epoch, and the running loss.

    A plain log line suits a terminal and a Kubernetes log alike (Keras's bar rewrites one line,
    which logs keep as thousands). The logs stay tensors until a line is due, so the steps between
    lines do not wait for the device.
    """

    _supports_tf_logs = True

    def __init__(self, phase, epochs, steps, global_batch, seconds):
        super().__init__()
        self.phase, self.epochs, self.steps, self.global_batch, self.seconds = (
            phase, epochs, steps, global_batch, seconds)
        self.epoch = 0
        self.started = self.last = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.started = self.last = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        done = batch + 1
        if now - self.last < self.seconds or done == self.steps:
            return  # the epoch's own line (Keras's) reports its end
        self.last = now
        elapsed = now - self.started
        loss = float((logs or {}).get("loss", float("nan")))
        logging.info("phase %s epoch %d/%d: step %d/%d, %.1f img/s, loss %.4f, epoch ETA %s", self.phase,
                     self.epoch + 1, self.epochs, done, self.steps, done * self.global_batch / elapsed, loss,
                     _duration(elapsed / done * (self.steps - done)))


class Profiler(keras.callbacks.Callback):
    """--profile_steps=A,B: a TensorFlow Profiler trace of steps A to B (counted from the start of
    each phase's fit) into `log_dir` (JOB_DIR/tensorboard/<phase>/profile after the epoch's sync;
    TensorBoard's Profile tab, with the tensorboard-plugin-profile package, shows it)."""

    def __init__(self, first, last, log_dir):
        super().__init__()
        self.first, self.last, self.log_dir = first, last, log_dir
        self.step, self.running = 0, False

    def on_train_batch_begin(self, batch, logs=None):
        import tensorflow as tf

        self.step += 1
        if self.step == self.first and not self.running:
            tf.profiler.experimental.start(self.log_dir)
            self.running = True

    def on_train_batch_end(self, batch, logs=None):
        if self.running and self.step >= self.last:
            self._stop()

    def on_train_end(self, logs=None):
        if self.running:
            self._stop()

    def _stop(self):
        import tensorflow as tf

        tf.profiler.experimental.stop()
        self.running = False
        logging.info("profiled steps %d-%d into %s", self.first, self.step, self.log_dir)


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def best_epoch(losses):
    """The epoch (1-based) of the lowest val loss in `{epoch: loss}` (the first of equals), or None."""
    return min(losses, key=lambda epoch: (losses[epoch], epoch)) if losses else None


class EarlyStopping(keras.callbacks.Callback):
    """Stops a phase once val_loss has not improved for `patience` epochs; keeps the best epoch's weights.

    The decision is a function of the val losses per epoch alone, seeded from history.json, so a
    resumed run decides as an uninterrupted one: each new best epoch's weights are saved locally
    (every worker: all hold the same weights) and committed to job_dir/best/<phase> by the chief,
    before the epoch's backup; the model ends the phase with them.
    """

    def __init__(self, run, phase, patience):
        super().__init__()
        self.run, self.phase, self.patience = run, phase, patience
        recorded = next(p for p in run.history["phases"] if p["name"] == phase)["epochs"]
        self.losses = {entry["epoch"]: entry["val_loss"] for entry in recorded if "val_loss" in entry}
        self.local = os.path.join(run.scratch, "best", phase)

    def stopped(self, epochs_done=None):
        """Whether the losses of the first `epochs_done` epochs (default: all) already say stop."""
        losses = {epoch: loss for epoch, loss in self.losses.items() if epochs_done is None or epoch <= epochs_done}
        best = best_epoch(losses)
        return best is not None and max(losses) - best >= self.patience

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        self.losses = {e: loss for e, loss in self.losses.items() if e < done}  # an epoch repeated after a kill
        self.losses[done] = float(logs["val_loss"])
        if best_epoch(self.losses) == done:
            os.makedirs(self.local, exist_ok=True)
            self.model.save_weights(os.path.join(self.local, "weights"))
            if self.run.is_chief:
                self.run.job.commit_best(self.phase, self.local)
        if self.stopped():
            logging.info("phase %s: early stop after epoch %d: val_loss has not improved for %d epochs since "
                         "epoch %d (%.4f)", self.phase, done, done - best_epoch(self.losses),
                         best_epoch(self.losses), self.losses[best_epoch(self.losses)])
            self.model.stop_training = True

    def restore_best(self, model):
        """Gives `model` the best epoch's weights, unless the last epoch was the best."""
        best = best_epoch(self.losses)
        if best is None or best == max(self.losses):
            return
        if not os.path.exists(os.path.join(self.local, "checkpoint")):
            self.run.job.restore_best(self.phase, self.local)  # saved by an earlier attempt
        model.load_weights(os.path.join(self.local, "weights")).expect_partial()
        logging.info("phase %s: keeping the weights of epoch %d (val_loss %.4f)", self.phase, best, self.losses[best])


def record_skipped_data(run):
    """Puts what --skip_corrupt_shards skipped so far into history.json (with earlier attempts')."""
    skipped = run.history.setdefault("skipped_data", [])
    for entry in run.damage.skipped():
        if entry not in skipped:
            skipped.append(entry)
