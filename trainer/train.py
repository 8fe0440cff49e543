"""`trainer train`: the transfer-learning job, from a dataset manifest to an exported model.

`run(config)` makes the strategy, builds the model under it, trains the head phase (on cached
features when it can, trainer.featurecache) and the fine-tune phase under BackupAndRestore, exports
the model and marks the job done. Everything it writes goes to job_dir through `trainer.jobdir`,
which documents the layout; a rerun resumes whatever a previous attempt left.
"""

import dataclasses
import datetime
import hashlib
import math
import os
import shutil
import signal
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import __version__, data, distribute, errors, export, featurecache, jobdir, manifest, records, storage
from trainer import model as model_lib
from trainer.config import VERTEX_MODEL_DIR, VERTEX_TENSORBOARD_DIR, TrainConfig, check_config, class_weights
from trainer.errors import RetryableError, UserError, first_line
from trainer.kerasapi import keras

__all__ = ["TrainConfig", "run"]


class Preempted(Exception):
    """Raised inside fit once a SIGTERM was received and the backup after it is committed."""


class DeadlinePassed(Exception):
    """Raised inside fit once --deadline_hours has passed and the backup after it is committed."""


STOPS = {"SIGTERM": Preempted, "deadline": DeadlinePassed}  # why a run stops early -> what fit raises


@dataclasses.dataclass
class Run:
    """The state of one training process that the phases share."""

    config: TrainConfig
    job: jobdir.JobDir
    strategy: tf.distribute.Strategy
    is_chief: bool
    scratch: str  # this process's local scratch folder (removed at the end)
    history: dict  # history.json, rewritten by the chief after every epoch
    damage: records.DamageReport  # damaged data skipped with --skip_corrupt_shards
    tensorboard_copy: str | None = None  # also sync event files here (Vertex AI's AIP_TENSORBOARD_LOG_DIR)
    worker: int = 0  # this task's index among the training tasks (distribute.worker_position)
    workers: int = 1
    active_backups: list = dataclasses.field(default_factory=list)  # what SIGTERM asks to back up
    class_weights: dict | None = None  # class index -> weight of its training examples (--class_weight)
    num_classes: int = 2


def derive_batches(global_batch, replicas, train_count, steps_cap=None):
    """The per-replica batch and steps per epoch for a global batch.

    Raises:
      UserError: the global batch does not divide over the replicas, or exceeds the train split.
    """
    if global_batch % replicas:
        raise UserError(f"--batch_size={global_batch} is not divisible by the {replicas} replicas in sync; "
                        f"use a multiple of {replicas}")
    steps = train_count // global_batch
    if steps == 0:
        raise UserError(f"--batch_size={global_batch} exceeds the {train_count} training examples")
    if steps_cap:
        steps = min(steps, steps_cap)
    return global_batch // replicas, steps


# ---------------------------------------------------------------- callbacks


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
            if reason == "SIGTERM":
                print(f"preemption backup committed {elapsed:.1f} s after SIGTERM", flush=True)
            raise STOPS[reason]()


    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self._batches_count = 0
        self._backup(epoch=epoch, batch=self.steps_per_epoch - 1)


class EpochRecorder(keras.callbacks.Callback):
    """Appends each epoch's metrics to history.json and syncs TensorBoard logs (chief only)."""

    def __init__(self, run, phase, tensorboard_dir):
        super().__init__()
        self.run, self.phase, self.tensorboard_dir = run, phase, tensorboard_dir

    def on_train_end(self, logs=None):
        logging.info("phase %s: training loop ended", self.phase)

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
        epochs.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
                       "learning_rate": float(keras.backend.get_value(optimizer.learning_rate)),
                       "step": int(optimizer.iterations.numpy())})
        record_skipped_data(self.run)
        self.run.job.write_history(history)
        self.run.job.sync_tensorboard(self.tensorboard_dir)
        if self.run.tensorboard_copy:
            storage.copy_tree(self.tensorboard_dir, self.run.tensorboard_copy)


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


# ---------------------------------------------------------------- phases


def make_datasets(run, validate=True):
    """The distributed training dataset (repeating, one pipeline per worker reading its own shards)
    and the validation dataset (finite, every example once across all workers).

    Validation goes to Keras as a plain dataset of global batches: Keras splits each batch over the
    replicas and keeps the last partial batch, and with several workers each one evaluates every
    N-th batch (DATA sharding), so no example is counted twice or missed however shards divide.
    """
    config = run.config

    def train_fn(context):
        dataset = data.make_dataset(
            config.data, "train", config.image_size, context.get_per_replica_batch_size(config.batch_size),
            training=True, augment=config.augment, shuffle_buffer=config.shuffle_buffer, seed=config.seed,
            input_context=context, skip_corrupt_shards=config.skip_corrupt_shards, damage=run.damage)
        seed = config.seed + context.input_pipeline_id
        if config.randaugment:
            dataset = with_randaugment(dataset, config.randaugment_magnitude, seed)
        if config.mixup_alpha or config.cutmix_alpha:
            dataset = with_mixing(dataset, run.num_classes, config.mixup_alpha, config.cutmix_alpha, seed)
        return with_class_weights(dataset, run.class_weights)

    train_data = run.strategy.distribute_datasets_from_function(train_fn)
    if not validate:
        return train_data, None
    val_data = data.make_dataset(config.data, "val", config.image_size, config.batch_size, training=False,
                                 skip_corrupt_shards=config.skip_corrupt_shards, damage=run.damage)
    return train_data, with_data_sharding(val_data)


def with_randaugment(dataset, magnitude, seed):
    """Batches of float 0-255 images through Keras 3's RandAugment (2 random operations per image).

    Keras 3's preprocessing layers run inside tf.data with the TensorFlow backend, next to the
    tf-keras model: the layer only ever sees tensors of the input pipeline, never the model.
    """
    import keras as keras3  # Keras 3, installed with TensorFlow; the model is tf-keras (trainer.kerasapi)

    layer = keras3.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=magnitude, seed=seed)
    return dataset.map(lambda images, labels: (layer(images, training=True), labels),
                       num_parallel_calls=tf.data.AUTOTUNE)


def with_mixing(dataset, num_classes, mixup_alpha, cutmix_alpha, seed):
    """Batches -> MixUp or CutMix batches (Keras 3's layers), with soft labels: P(class 1) [B] for
    two classes, [B, C] rows otherwise. With both, each batch gets one of the two at random."""
    import keras as keras3

    layers = ([keras3.layers.MixUp(alpha=mixup_alpha, seed=seed)] if mixup_alpha else []) + (
        [keras3.layers.CutMix(factor=cutmix_alpha, seed=seed)] if cutmix_alpha else [])

    def mix(images, labels):
        one_hot = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
        if len(layers) == 1:
            mixed = layers[0]({"images": images, "labels": one_hot}, training=True)
        else:
            mixed = tf.cond(tf.random.uniform([]) < 0.5,
                            lambda: layers[0]({"images": images, "labels": one_hot}, training=True),
                            lambda: layers[1]({"images": images, "labels": one_hot}, training=True))
        soft = tf.cast(mixed["labels"], tf.float32)
        return tf.cast(mixed["images"], tf.float32), soft[:, 1] if num_classes == 2 else soft

    return dataset.map(mix, num_parallel_calls=tf.data.AUTOTUNE)


def with_class_weights(dataset, weights):
    """(x, y) batches -> (x, y, the weight of each example's class); unchanged for no weights. Soft
    labels (MixUp, CutMix) weigh as their mixture of classes. Training only: validation loss and
    accuracy stay unweighted, comparable across runs."""
    if not weights:
        return dataset
    table = tf.constant([weights[index] for index in range(len(weights))], tf.float32)

    def weigh(x, y):
        if y.dtype.is_integer:
            return x, y, tf.gather(table, tf.cast(y, tf.int32))
        if y.shape.rank == 1:  # two classes: y is P(class 1)
            return x, y, (1.0 - y) * table[0] + y * table[1]
        return x, y, tf.linalg.matvec(y, table)

    return dataset.map(weigh)


def compile_phase(run, model, phase, num_classes, steps):
    """Compiles `model` for `phase` with the configured optimizer, schedule and loss (under the
    strategy's scope)."""
    config = run.config
    peak, epochs = ((config.learning_rate, config.epochs) if phase == "head"
                    else (config.fine_tune_learning_rate, config.fine_tune_epochs))
    rate = model_lib.learning_rate_schedule(peak, config.lr_schedule, total_steps=epochs * steps,
                                            warmup_steps=round(config.warmup_epochs * steps))
    optimizer = model_lib.make_optimizer(config.optimizer, rate, config.weight_decay, config.momentum)
    model_lib.compile_model(model, num_classes, peak, jit_compile=config.jit_compile, optimizer=optimizer,
                            label_smoothing=config.label_smoothing,
                            soft_labels=bool(config.mixup_alpha or config.cutmix_alpha))


def with_data_sharding(dataset):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def fit_phase(run, model, phase, epochs, train_data, val_data, steps, val_steps=None):
    """Runs one phase under BackupAndRestore; returns when its epochs are done."""
    local_backup = os.path.join(run.scratch, "backup", phase)
    if run.job.restore_backup(phase, os.path.join(local_backup, "chief")):
        check_checkpoint(os.path.join(local_backup, "chief"), run.job.backup_url(phase))
        logging.info("phase %s: resuming from the backup in %s", phase, run.job.backup_url(phase))
    backup = SyncedBackupAndRestore(local_backup, run.job, phase, run.config.backup_every_steps, run.is_chief,
                                    steps)
    run.active_backups.append(backup)
    tensorboard_dir = os.path.join(run.scratch, "tensorboard")
    # The epoch's history before its backup: a kill between the two then repeats the epoch (its
    # record is rewritten), where the other order would lose the epoch's record for good.
    early = EarlyStopping(run, phase, run.config.early_stopping_patience) if (
        run.config.early_stopping_patience and val_data is not None) else None
    callbacks = [
        EpochRecorder(run, phase, tensorboard_dir),
        *([early] if early else []),
        keras.callbacks.TensorBoard(os.path.join(tensorboard_dir, phase), update_freq="epoch"),
        backup,
    ]
    if early and early.stopped():  # an earlier attempt stopped early and was killed before the phase completed
        logging.info("phase %s: stopped early before this restart", phase)
    else:
        model.fit(train_data, epochs=epochs, steps_per_epoch=steps, validation_data=val_data,
                  validation_steps=val_steps, callbacks=callbacks, verbose=2)
    if early:
        early.restore_best(model)
    run.active_backups.remove(backup)
    # The optimizer's step count and a weights fingerprint: a resumed run must end where an
    # uninterrupted one does, and every worker of a multi-worker job must hold the same weights.
    logging.info("phase %s finished: optimizer step %d, weights fingerprint %s", phase,
                 int(model.optimizer.iterations.numpy()), weights_fingerprint(model))
    skipped = run.damage.skipped()
    if skipped:
        logging.warning("phase %s: skipped %d damaged records in %d places (listed in %s)", phase,
                        sum(entry["records"] for entry in skipped), len(skipped), run.job.path(jobdir.HISTORY))


def check_checkpoint(local_dir, url):
    """Reads every tensor of the checkpoint in `local_dir` (a copy of `url`) once.

    Raises:
      UserError: a file is truncated or damaged (named, with the way out), instead of a
        TensorFlow traceback from inside `fit`.
    """
    try:
        reader = tf.train.load_checkpoint(local_dir)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001 - any failure to read it back: OpError, IndexError, ...
        raise UserError(f"the backup in {url} is damaged ({first_line(error)}): delete that folder to restart "
                        "this phase from its start (finished phases are kept)") from None


def fit_head_on_cached_features(run, model, dataset_manifest, steps):
    """The head phase on cached base outputs; the full model shares the head's layers.

    One machine: the cached features of each split, as global batches split over the replicas.
    Several workers: each extracts and reads its own part of each split (featurecache), and
    tf.distribute takes one per-replica batch from each worker's part per replica and step; the
    steps per epoch are those of one machine, so both make the same number of optimizer steps.
    """
    config, splits = run.config, dataset_manifest["splits"]
    dataset_args = {"manifest_url": config.data, "image_size": config.image_size,
                    "batch_size": config.batch_size, "skip_corrupt_shards": config.skip_corrupt_shards}
    base = model.get_layer("base")
    worker, workers = run.worker, run.workers

    def extract(split):
        return featurecache.extract_features(base, run.job, dataset_args, split, run.scratch,
                                             strategy=run.strategy, worker=worker,
                                             workers=workers, damage=run.damage)

    def per_worker(paths, training):
        def dataset_fn(context):
            dataset = featurecache.cached_dataset(paths, context.get_per_replica_batch_size(config.batch_size),
                                                  training=training, seed=config.seed)
            return with_class_weights(dataset, run.class_weights) if training else dataset

        return run.strategy.distribute_datasets_from_function(dataset_fn)

    train_paths = extract("train")
    val_paths = extract("val") if splits.get("val", {}).get("count") else None
    val_steps = None
    if workers > 1:
        train_data = per_worker(train_paths, training=True)
        val_data = per_worker(val_paths, training=False) if val_paths else None
        val_steps = validation_steps(run, workers) if val_paths else None
    else:
        train_data = run.strategy.experimental_distribute_dataset(with_class_weights(
            featurecache.cached_dataset(train_paths, config.batch_size, training=True, seed=config.seed),
            run.class_weights))
        val_data = with_data_sharding(featurecache.cached_dataset(
            val_paths, config.batch_size, training=False, seed=config.seed)) if val_paths else None
    head = model.get_layer("head")
    with run.strategy.scope():
        compile_phase(run, head, "head", len(dataset_manifest["classes"]), steps)
    fit_phase(run, head, "head", config.epochs, train_data, val_data, steps, val_steps)


def validation_steps(run, workers):
    """Steps that take every worker through its whole part of the val split (Keras needs the count
    for a distributed dataset): the largest part's. Workers whose part ends sooner get empty
    batches for the last steps (tf.distribute's partial-batch handling), so nothing counts twice."""
    per_replica = run.config.batch_size // run.strategy.num_replicas_in_sync
    local_replicas = run.strategy.num_replicas_in_sync // workers
    counts = [data.count_for_pipeline(run.config.data, "val", tf.distribute.InputContext(workers, worker))
              for worker in range(workers)]
    return max(math.ceil(math.ceil(count / per_replica) / local_replicas) for count in counts)


def save_phase_weights(run, model, phase):
    """Saves the weights at the end of a phase to job_dir, then its COMPLETE marker."""
    local = os.path.join(run.scratch, "phase-weights", phase)
    os.makedirs(local, exist_ok=True)
    # Every worker saves (the save may read distributed variables); only the chief publishes.
    model.save_weights(os.path.join(local, "weights"))
    if run.is_chief:
        run.job.commit_phase(phase, local)


def load_phase_weights(run, model, phase):
    local = os.path.join(run.scratch, "phase-weights-restored", phase)
    run.job.restore_phase(phase, local)
    model.load_weights(os.path.join(local, "weights")).expect_partial()


def weights_fingerprint(model):
    """A short hash of every weight's bytes."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]


def random_frozen_base_warning(config):
    """What to tell a user who trains only a head on a frozen base of random weights, or None."""
    if str(config.weights).lower() != "none" or config.fine_tune_epochs or config.backbone == "tiny":
        return None
    return ("--weights=none without fine-tuning trains only a head on a frozen base of random weights: its outputs "
            "can be (nearly) the same for every image (seen with mobilenet_v2), so the head may learn nothing. Use "
            "--weights=imagenet (or a weights file), or add --fine_tune_epochs.")


def train_phases(run, dataset_manifest, steps, feature_cache):
    """Builds the model under the strategy and runs the head and fine-tune phases."""
    config, strategy = run.config, run.strategy
    num_classes = len(dataset_manifest["classes"])
    if config.mixed_precision:
        # float16 with loss scaling on GPUs; CPUs (tests) have no fast float16, bfloat16 works there.
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        keras.mixed_precision.set_global_policy(policy)
        logging.info("mixed precision: %s (the output layer stays float32)", policy)
    with strategy.scope():
        model = model_lib.build_model(config.backbone, num_classes, config.image_size,
                                      weights=config.weights, head=config.head,
                                      dense_units=config.dense_units, dropout=config.dropout)
        compile_phase(run, model, "head", num_classes, steps)
    if config.fine_tune_epochs:
        model_lib.check_fine_tune_from(model, config.fine_tune_from)
    if warning := random_frozen_base_warning(config):
        logging.warning("%s", warning)
    validate = bool(dataset_manifest["splits"].get("val", {}).get("count"))
    if not validate:
        logging.warning("the dataset has no validation examples: training without validation%s",
                        " (and without early stopping)" if config.early_stopping_patience else "")

    if config.epochs:
        if run.job.is_phase_complete("head"):
            logging.info("phase head: already complete, loading its weights")
            load_phase_weights(run, model, "head")
        elif feature_cache:
            fit_head_on_cached_features(run, model, dataset_manifest, steps)
            save_phase_weights(run, model, "head")
        else:
            fit_phase(run, model, "head", config.epochs, *make_datasets(run, validate), steps)
            save_phase_weights(run, model, "head")
    if config.fine_tune_epochs and run.job.is_phase_complete("fine_tune"):
        logging.info("phase fine_tune: already complete, loading its weights")
        model_lib.unfreeze_from(model, config.fine_tune_from)
        load_phase_weights(run, model, "fine_tune")
    elif config.fine_tune_epochs:
        with strategy.scope():
            model_lib.unfreeze_from(model, config.fine_tune_from)
            compile_phase(run, model, "fine_tune", num_classes, steps)
        fit_phase(run, model, "fine_tune", config.fine_tune_epochs, *make_datasets(run, validate), steps)
        save_phase_weights(run, model, "fine_tune")
    return model


# ---------------------------------------------------------------- the run


def install_stop_handlers(run, deadline_seconds=None):
    """On SIGTERM, or when `deadline_seconds` from now have passed (SIGALRM), ask every active
    backup callback to save at the next batch end, then stop (at once when no phase is running)."""

    def handler(signum, frame):
        reason = "SIGTERM" if signum == signal.SIGTERM else "deadline"
        logging.warning("%s: backing up at the next step, then exiting", reason)
        for backup in run.active_backups:
            backup.stop_requested = (time.time(), reason)
        if not run.active_backups:
            raise STOPS[reason]()

    signal.signal(signal.SIGTERM, handler)
    # No step may end (the input or the backup stalled on storage): leave in time anyway, with the
    # last committed backup, before Kubernetes' SIGKILL.
    seconds = run.config.preempt_exit_seconds
    errors.exit_after_signal(signal.SIGTERM, seconds, errors.EXIT_RETRYABLE,
                             f"retryable error: preempted (SIGTERM), and no step ended within {seconds} s to back "
                             "up (storage stalled?); rerun to resume from the last committed backup")
    if deadline_seconds is not None:
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, deadline_seconds)


def check_same_run(job, config, dataset):
    """Refuses a restart that asks for another run than the one job_dir holds.

    config.json records the first start's settings and dataset. A restart may change how the run
    goes (backup frequency, replicas, deadline: fields with `defines_run=False`), not what it
    computes: resuming a backup under another learning rate, batch size, backbone or dataset would
    silently mix two runs.

    Raises:
      UserError: naming what differs, and what to do instead.
    """
    recorded = job.read_config()
    if recorded is None:
        return
    before = recorded.get("dataset")
    if before and before["digest"] != dataset["digest"]:
        if job.is_done():
            raise UserError(
                f"{job.url} is complete: it was trained on {before['url']} as prepared at {before['created']} "
                f"({_counts(before)}); that dataset has changed since (now {dataset['url']}, prepared at "
                f"{dataset['created']}: {_counts(dataset)}). To train on the new data, use a new --job_dir")
        raise UserError(f"{job.url} was started on another dataset: {before['url']} prepared at {before['created']} "
                        f"({_counts(before)}), now {dataset['url']} prepared at {dataset['created']} "
                        f"({_counts(dataset)}); resume with the original dataset, or use a new --job_dir")
    changed = config.changed_settings(recorded)
    if changed:
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
    elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
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


def publish_for_vertex(job):
    """On Vertex AI, a copy of the export where AIP_MODEL_DIR says (its model upload reads it)."""
    target = os.environ.get(VERTEX_MODEL_DIR)
    if target and target.rstrip("/") != job.model_url.rstrip("/"):
        storage.copy_tree(job.model_url, target, progress="copy model")
        logging.info("model copied to %s (AIP_MODEL_DIR)", target)


def log_plan(config, strategy, cluster, dataset_manifest, per_replica, steps):
    workers = sum(len(cluster["cluster"].get(kind, [])) for kind in ("chief", "worker")) if cluster else 1
    splits = dataset_manifest["splits"]
    logging.info(
        "plan: %d worker(s), %d replicas in sync; global batch %d = %d per replica; %d steps per epoch "
        "(train %d, val %d examples); head: %d epochs at lr %g; fine-tune: %d epochs at lr %g from %s",
        workers, strategy.num_replicas_in_sync, config.batch_size, per_replica, steps,
        splits["train"]["count"], splits.get("val", {}).get("count", 0), config.epochs,
        config.learning_rate, config.fine_tune_epochs, config.fine_tune_learning_rate,
        config.fine_tune_from)


def run(config):
    """Trains, exports and marks a job complete; resumes whatever a previous attempt left.

    Raises:
      UserError: bad configuration, data or weights.
      RetryableError: preempted (a backup was committed first) or storage unreachable.
    """
    check_config(config)
    storage.check_writable(config.job_dir)
    job = jobdir.JobDir(config.job_dir)
    dataset_manifest = manifest.load_manifest(config.data)
    dataset = manifest.dataset_identity(config.data, dataset_manifest)
    check_same_run(job, config, dataset)
    if job.is_done():
        logging.info("job %s is already complete (%s exists); nothing to do", config.job_dir, job.path(jobdir.DONE))
        print(f"already complete: {config.job_dir}")
        return
    deadline_seconds = check_deadline(config, job)
    strategy, cluster = distribute.make_strategy(config.strategy, config.cpu_replicas, config.num_workers,
                                                 config.worker_port, config.peer_timeout_seconds)
    is_chief = distribute.is_chief(cluster)
    lease = job.take_lease() if is_chief else None  # one run at a time; the chief speaks for its workers
    try:
        train_and_export(config, job, dataset_manifest, dataset, deadline_seconds, strategy, cluster)
    finally:
        if lease:
            lease.release()


def train_and_export(config, job, dataset_manifest, dataset, deadline_seconds, strategy, cluster):
    """The run once it holds job_dir: both phases, the export, DONE (see `run`)."""
    is_chief = distribute.is_chief(cluster)
    classes = dataset_manifest["classes"]
    per_replica, steps = derive_batches(config.batch_size, strategy.num_replicas_in_sync,
                                        manifest.count_examples(dataset_manifest, "train"), config.steps_per_epoch)
    log_plan(config, strategy, cluster, dataset_manifest, per_replica, steps)
    keras.utils.set_random_seed(config.seed)

    phases = ["head"] * bool(config.epochs) + ["fine_tune"] * bool(config.fine_tune_epochs)
    scratch = tempfile.mkdtemp(prefix=f"trainer-{distribute.task_id(cluster)}-")
    state = Run(config=config, job=job, strategy=strategy, is_chief=is_chief, scratch=scratch,
                history=job.load_history(phases), damage=records.DamageReport(),
                tensorboard_copy=os.environ.get(VERTEX_TENSORBOARD_DIR))
    state.worker, state.workers = distribute.worker_position(cluster)
    state.num_classes = len(classes)
    state.class_weights = class_weights(config.class_weight, classes,
                                        dataset_manifest["splits"]["train"]["class_counts"])
    if state.class_weights:
        logging.info("class weights: %s", ", ".join(f"{classes[index]} {weight:.3g}"
                                                     for index, weight in state.class_weights.items()))
    switches = (("--augment", config.augment), ("--randaugment", config.randaugment),
                ("--mixup_alpha", config.mixup_alpha), ("--cutmix_alpha", config.cutmix_alpha))
    augmentation = [name for name, on in switches if on]
    feature_cache = featurecache.use_feature_cache(config.feature_cache, augmentation, config.epochs)
    if is_chief:
        job.write_config({**config.to_dict(), "tool_version": __version__, "dataset": dataset, "classes": classes,
                          "plan": {"replicas": strategy.num_replicas_in_sync, "per_replica_batch": per_replica,
                                   "steps_per_epoch": steps}})
    install_stop_handlers(state, deadline_seconds)
    try:
        model = train_phases(state, dataset_manifest, steps, feature_cache)
        # Every worker exports (saving can run collectives under MultiWorkerMirroredStrategy);
        # only the chief's copy goes to job_dir, the others' into scratch, which is removed.
        model_url = job.model_url if is_chief else os.path.join(scratch, "model")
        export.export_model(model, classes, config.image_size, model_url, backbone=config.backbone)
        if is_chief:
            publish_for_vertex(job)
            job.mark_done()
            logging.info("done: model exported to %s", model_url)
    except Preempted as error:
        raise RetryableError("preempted (SIGTERM); the backup is committed, rerun to resume") from error
    except DeadlinePassed as error:
        raise UserError(deadline_message(config, job.first_started())) from error
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError) as error:
        if not cluster:
            raise
        # A peer worker died or was preempted: the collectives time out. Restarting every worker
        # (the JobSet does) resumes from the last committed backup.
        raise RetryableError(f"lost contact with a peer worker ({type(error).__name__}: {first_line(error)})") \
            from error
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        shutil.rmtree(scratch, ignore_errors=True)
