"""`trainer train`: the transfer-learning job, from a dataset manifest to an exported model.

One run, in job_dir (local or any URL, all through trainer.storage):
  config.json          the resolved configuration (chief only)
  history.json         per-epoch metrics of both phases, rewritten after every epoch
  tensorboard/         TensorBoard event files, synced after every epoch
  backup/<phase>/      preemption backups (BackupAndRestore), committed `checkpoint`-file last
  checkpoints/<phase>/ the weights at the end of each phase, and COMPLETE once they are whole
  model/               the exported SavedModel (serving signature on encoded image bytes)
  DONE                 written last: a rerun of a finished job exits 0 at once

Keras writes checkpoints and event files to local scratch (`TMPDIR`); they are copied to job_dir,
so every store fsspec reaches works, and a pod rescheduled on an empty disk resumes from job_dir.
"""

import dataclasses
import datetime
import hashlib
import os
import shutil
import signal
import sys
import tempfile

import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from trainer import __version__, data, distribute, export, storage
from trainer import model as model_lib
from trainer.errors import RetryableError, UserError
from trainer.kerasapi import keras


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; cli.py fills it from flags (same names, same defaults)."""

    data: str
    job_dir: str
    backbone: str = "vgg16"
    weights: str = "imagenet"
    image_size: int = 150
    batch_size: int = 64
    epochs: int = 10
    learning_rate: float = 1e-5
    augment: bool = False
    head: str = "flatten"
    dense_units: int = 256
    dropout: float = 0.5
    fine_tune_epochs: int = 0
    fine_tune_from: str = "block5_conv1"
    fine_tune_learning_rate: float = 1e-5
    strategy: str = "auto"
    cpu_replicas: int = 0
    num_workers: int | None = None
    worker_port: int = 12345
    backup_every_steps: int = 100
    peer_timeout_seconds: int = 300
    steps_per_epoch: int | None = None
    shuffle_buffer: int = 1000
    seed: int = 0
    skip_corrupt_shards: bool = False
    feature_cache: str = "auto"
    mixed_precision: bool = False
    jit_compile: bool = False

    @classmethod
    def field_names(cls):
        return [field.name for field in dataclasses.fields(cls)]


class Preempted(Exception):
    """Raised inside fit once a SIGTERM was received and the backup after it is committed."""


def check_config(config):
    """Raises UserError for values no run can use (before any expensive work)."""
    positive = {"image_size": config.image_size, "batch_size": config.batch_size,
                "backup_every_steps": config.backup_every_steps}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name} must be positive, got {value}")
    if config.epochs < 0 or config.fine_tune_epochs < 0:
        raise UserError("--epochs and --fine_tune_epochs must be >= 0")
    if config.epochs + config.fine_tune_epochs == 0:
        raise UserError("nothing to train: --epochs and --fine_tune_epochs are both 0")
    if not 0 <= config.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.learning_rate <= 0 or config.fine_tune_learning_rate <= 0:
        raise UserError("learning rates must be positive")


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


# ---------------------------------------------------------------- syncing scratch <-> job_dir


def upload_checkpoint_dir(local_dir, remote_dir):
    """Copies a TF checkpoint folder up, the `checkpoint` index file last (the commit point).

    A crash mid-copy leaves the previous `checkpoint` pointing at files that are all present.
    Files of checkpoints that the index no longer names are removed afterwards.
    """
    names = sorted(name for name in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, name)))
    for name in names:
        if name != "checkpoint":
            storage.copy(os.path.join(local_dir, name), storage.join(remote_dir, name))
    if "checkpoint" in names:
        storage.copy(os.path.join(local_dir, "checkpoint"), storage.join(remote_dir, "checkpoint"))
    remote = set()
    if storage.isdir(remote_dir):
        remote = {relative for relative, _ in storage.list_files(remote_dir)}
    for stale in remote - set(names):
        storage.remove(storage.join(remote_dir, stale))


def download_checkpoint_dir(remote_dir, local_dir):
    """Copies a committed backup down; returns False when job_dir holds none."""
    if not storage.exists(storage.join(remote_dir, "checkpoint")):
        return False
    os.makedirs(local_dir, exist_ok=True)
    storage.copy_tree(remote_dir, local_dir)
    return True


class SyncedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose every backup is also committed to job_dir, plus SIGTERM handling.

    On SIGTERM the next batch end writes a backup, commits it, and raises `Preempted`, so the
    process can exit with the retryable code; a restart resumes at that exact step.
    """

    def __init__(self, local_dir, remote_dir, save_freq, is_chief):
        super().__init__(backup_dir=local_dir, save_freq=save_freq, delete_checkpoint=False)
        self.local_dir, self.remote_dir, self.is_chief = local_dir, remote_dir, is_chief
        self.terminate_requested_at = None

    def _backup(self, epoch, batch=0):
        super()._backup(epoch=epoch, batch=batch)
        if self.is_chief:
            # BackupAndRestore's chief writes into backup_dir/chief (other workers into temp dirs).
            upload_checkpoint_dir(os.path.join(self.local_dir, "chief"), self.remote_dir)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.terminate_requested_at is not None:
            self._backup(epoch=self._current_epoch, batch=batch)
            elapsed = datetime.datetime.now().timestamp() - self.terminate_requested_at
            logging.warning("SIGTERM: backup committed to %s %.1f s after the signal", self.remote_dir,
                            elapsed)
            print(f"preemption backup committed {elapsed:.1f} s after SIGTERM", flush=True)
            raise Preempted()


class EpochRecorder(keras.callbacks.Callback):
    """Appends each epoch's metrics to history.json and syncs TensorBoard logs (chief only)."""

    def __init__(self, job_dir, phase, history, tensorboard_dir, is_chief):
        super().__init__()
        self.job_dir, self.phase, self.history = job_dir, phase, history
        self.tensorboard_dir, self.is_chief = tensorboard_dir, is_chief

    def on_epoch_end(self, epoch, logs=None):
        if not self.is_chief:
            return
        epochs = next(p for p in self.history["phases"] if p["name"] == self.phase)["epochs"]
        epochs[:] = [e for e in epochs if e["epoch"] != epoch + 1]
        epochs.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        storage.write_json(storage.join(self.job_dir, "history.json"), self.history)
        if os.path.isdir(self.tensorboard_dir):
            for folder, _, names in os.walk(self.tensorboard_dir):
                for name in names:
                    local = os.path.join(folder, name)
                    relative = os.path.relpath(local, self.tensorboard_dir).split(os.sep)
                    storage.copy(local, storage.join(self.job_dir, "tensorboard", *relative))


# ---------------------------------------------------------------- frozen-feature cache


def use_feature_cache(config, cluster):
    """Whether the head phase trains on cached base outputs (see --feature_cache).

    Eligible when the base is frozen and inputs are not augmented (the seed's first phase): the
    base then maps each image to the same features in every epoch, so computing them once is
    exact. Multi-worker jobs stream images instead (each worker would cache only its shard).

    Raises:
      UserError: --feature_cache=on for a run that is not eligible.
    """
    reasons = []
    if config.augment:
        reasons.append("--augment changes the images every epoch")
    if not config.epochs:
        reasons.append("there is no head phase (--epochs=0)")
    if cluster:
        reasons.append("multi-worker jobs stream images")
    if config.feature_cache == "off":
        logging.info("feature cache: off (--feature_cache=off)")
        return False
    if reasons and config.feature_cache == "on":
        raise UserError(f"--feature_cache=on is not possible here: {'; '.join(reasons)}")
    if reasons:
        logging.info("feature cache: off (%s)", "; ".join(reasons))
        return False
    logging.info("feature cache: on: the frozen base runs once per split, the head trains on its outputs "
                 "(--feature_cache=off to stream images every epoch)")
    return True


def extract_features(model, config, split, count, scratch, strategy=None):
    """Runs the frozen base once over a split; returns local .npy paths (features, labels).

    Each batch is split over the strategy's replicas (the default strategy: one). The result is
    committed to job_dir/features/ so a restarted job does not recompute it.
    """
    remote = storage.join(config.job_dir, "features", split)
    local = os.path.join(scratch, "features", split)
    os.makedirs(local, exist_ok=True)
    paths = os.path.join(local, "features.npy"), os.path.join(local, "labels.npy")
    if storage.exists(storage.join(remote, "COMPLETE")):
        logging.info("feature cache: reusing %s", remote)
        for path in paths:
            storage.copy(storage.join(remote, os.path.basename(path)), path)
        return paths
    base = model.get_layer("base")
    strategy = strategy or tf.distribute.get_strategy()
    dataset = data.make_dataset(config.data, split, config.image_size, config.batch_size, training=False,
                                skip_corrupt_shards=config.skip_corrupt_shards)

    # Not base.predict_on_batch: for a model built under MirroredStrategy it ran 2.4x slower on
    # CPU (0.80 against 0.33 s a batch, VGG16 at 64 px), on one core of two.
    @tf.function
    def forward(images, batch_labels):
        outputs = strategy.run(lambda batch: base(batch, training=False), args=(images,))
        return (tf.concat(strategy.experimental_local_results(outputs), axis=0),
                tf.concat(strategy.experimental_local_results(batch_labels), axis=0))

    shape = (count, *base.output_shape[1:])
    features = np.lib.format.open_memmap(paths[0], mode="w+", dtype=np.float32, shape=shape)
    labels = np.zeros([count], np.int32)
    done = 0
    # In a pod's log (no terminal) a progress line every 30 s rather than a redrawn bar.
    progress = tqdm.tqdm(total=count, desc=f"features {split}", unit="img", file=sys.stderr,
                         mininterval=1 if sys.stderr.isatty() else 30)
    for images, batch_labels in strategy.experimental_distribute_dataset(dataset):
        batch, batch_labels = forward(images, batch_labels)
        features[done:done + len(batch)] = batch.numpy()
        labels[done:done + len(batch)] = batch_labels.numpy()
        done += len(batch)
        progress.update(len(batch))
    progress.close()
    if done != count:
        raise UserError(f"split {split}: read {done} examples, the manifest says {count}")
    features.flush()
    np.save(paths[1], labels)
    for path in paths:
        storage.copy(path, storage.join(remote, os.path.basename(path)))
    storage.write_text(storage.join(remote, "COMPLETE"), now_iso())
    logging.info("feature cache: %s: %d examples -> %s", split, count, remote)
    return paths


def cached_dataset(paths, batch_size, training, seed):
    """(features, labels) batches read from the cached .npy files (memory-mapped, no size limit)."""
    features = np.load(paths[0], mmap_mode="r")
    labels = np.load(paths[1])
    dataset = tf.data.Dataset.range(len(labels))
    if training:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.batch(batch_size, drop_remainder=training)

    def gather(indices):
        return np.asarray(features[indices], np.float32), labels[indices]

    def load(indices):
        batch, batch_labels = tf.numpy_function(gather, [indices], (tf.float32, tf.int32))
        batch.set_shape([None, *features.shape[1:]])
        batch_labels.set_shape([None])
        return batch, batch_labels

    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def fit_head_on_cached_features(model, config, strategy, manifest, steps, context):
    """The head phase on cached base outputs; the full model shares the head's layers."""
    splits = manifest["splits"]
    train_paths = extract_features(model, config, "train", splits["train"]["count"], context["scratch"], strategy)
    val_data = None
    if splits.get("val", {}).get("count"):
        val_paths = extract_features(model, config, "val", splits["val"]["count"], context["scratch"], strategy)
        val_data = with_data_sharding(cached_dataset(val_paths, config.batch_size, training=False,
                                                     seed=config.seed))
    train_data = strategy.experimental_distribute_dataset(
        cached_dataset(train_paths, config.batch_size, training=True, seed=config.seed))
    head = model.get_layer("head")
    with strategy.scope():
        model_lib.compile_model(head, len(manifest["classes"]), config.learning_rate,
                                jit_compile=config.jit_compile)
    fit_phase(head, "head", config.epochs, train_data, val_data, steps, config, context)


# ---------------------------------------------------------------- the run


def load_history(job_dir, phases):
    url = storage.join(job_dir, "history.json")
    history = storage.read_json(url) if storage.exists(url) else {"phases": []}
    for name in phases:
        if not any(p["name"] == name for p in history["phases"]):
            history["phases"].append({"name": name, "epochs": []})
    return history


def make_datasets(strategy, config, global_batch, validate=True):
    """The distributed training dataset (repeating, one pipeline per worker reading its own shards)
    and the validation dataset (finite, every example once across all workers).

    Validation goes to Keras as a plain dataset of global batches: Keras splits each batch over the
    replicas and keeps the last partial batch, and with several workers each one evaluates every
    N-th batch (DATA sharding), so no example is counted twice or missed however shards divide.
    """

    def train_fn(context):
        return data.make_dataset(config.data, "train", config.image_size,
                                 context.get_per_replica_batch_size(global_batch), training=True,
                                 augment=config.augment, shuffle_buffer=config.shuffle_buffer,
                                 seed=config.seed, input_context=context,
                                 skip_corrupt_shards=config.skip_corrupt_shards)

    train_data = strategy.distribute_datasets_from_function(train_fn)
    if not validate:
        return train_data, None
    val_data = data.make_dataset(config.data, "val", config.image_size, global_batch, training=False,
                                 skip_corrupt_shards=config.skip_corrupt_shards)
    return train_data, with_data_sharding(val_data)


def with_data_sharding(dataset):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def phase_done(job_dir, phase):
    return storage.exists(storage.join(job_dir, "checkpoints", phase, "COMPLETE"))


def save_phase_weights(model, job_dir, phase, scratch, is_chief):
    """Saves the weights at the end of a phase to job_dir, then its COMPLETE marker."""
    local = os.path.join(scratch, "phase-weights", phase)
    os.makedirs(local, exist_ok=True)
    # Every worker saves (the save may read distributed variables); only the chief publishes.
    model.save_weights(os.path.join(local, "weights"))
    if is_chief:
        remote = storage.join(job_dir, "checkpoints", phase)
        upload_checkpoint_dir(local, remote)
        storage.write_text(storage.join(remote, "COMPLETE"), now_iso())
        # The phase's weights are committed: its preemption backup (and the feature cache of the
        # head phase) can go, they are the largest files of a job.
        storage.remove(storage.join(job_dir, "backup", phase), recursive=True)
        if phase == "head":
            storage.remove(storage.join(job_dir, "features"), recursive=True)


def load_phase_weights(model, job_dir, phase, scratch):
    local = os.path.join(scratch, "phase-weights-restored", phase)
    download_checkpoint_dir(storage.join(job_dir, "checkpoints", phase), local)
    model.load_weights(os.path.join(local, "weights")).expect_partial()


def fit_phase(model, phase, epochs, train_data, val_data, steps, config, context):
    """Runs one phase under BackupAndRestore; returns when its epochs are done."""
    local_backup = os.path.join(context["scratch"], "backup", phase)
    remote_backup = storage.join(config.job_dir, "backup", phase)
    if download_checkpoint_dir(remote_backup, os.path.join(local_backup, "chief")):
        logging.info("phase %s: resuming from the backup in %s", phase, remote_backup)
    backup = SyncedBackupAndRestore(local_backup, remote_backup, config.backup_every_steps,
                                    context["is_chief"])
    context["backups"].append(backup)
    tensorboard_dir = os.path.join(context["scratch"], "tensorboard")
    callbacks = [
        backup,
        keras.callbacks.TensorBoard(os.path.join(tensorboard_dir, phase), update_freq="epoch"),
        EpochRecorder(config.job_dir, phase, context["history"], tensorboard_dir, context["is_chief"]),
    ]
    model.fit(train_data, epochs=epochs, steps_per_epoch=steps, validation_data=val_data,
              callbacks=callbacks, verbose=2)
    context["backups"].remove(backup)
    # The optimizer's step count and a weights fingerprint: a resumed run must end where an
    # uninterrupted one does, and every worker of a multi-worker job must hold the same weights.
    logging.info("phase %s finished: optimizer step %d, weights fingerprint %s", phase,
                 int(model.optimizer.iterations.numpy()), weights_fingerprint(model))


def weights_fingerprint(model):
    """A short hash of every weight's bytes."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]


def install_sigterm_handler(context):
    """On SIGTERM, ask every active backup callback to save at the next batch end."""

    def handler(signum, frame):
        logging.warning("SIGTERM received: backing up at the next step, then exiting")
        now = datetime.datetime.now().timestamp()
        for backup in context["backups"]:
            backup.terminate_requested_at = now
        if not context["backups"]:
            raise Preempted()

    signal.signal(signal.SIGTERM, handler)


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def log_plan(config, strategy, cluster, manifest, per_replica, steps):
    workers = sum(len(cluster["cluster"].get(kind, [])) for kind in ("chief", "worker")) if cluster else 1
    splits = manifest["splits"]
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
    done_url = storage.join(config.job_dir, "DONE")
    if storage.exists(done_url):
        logging.info("job %s is already complete (%s exists); nothing to do", config.job_dir, done_url)
        print(f"already complete: {config.job_dir}")
        return
    strategy, cluster = distribute.make_strategy(config.strategy, config.cpu_replicas, config.num_workers,
                                                 config.worker_port, config.peer_timeout_seconds)
    is_chief = distribute.is_chief(cluster)
    manifest = data.load_manifest(config.data)
    classes = manifest["classes"]
    per_replica, steps = derive_batches(config.batch_size, strategy.num_replicas_in_sync,
                                        manifest["splits"]["train"]["count"], config.steps_per_epoch)
    log_plan(config, strategy, cluster, manifest, per_replica, steps)
    keras.utils.set_random_seed(config.seed)

    phases = ["head"] * bool(config.epochs) + ["fine_tune"] * bool(config.fine_tune_epochs)
    scratch = tempfile.mkdtemp(prefix=f"trainer-{distribute.task_id(cluster)}-")
    context = {"scratch": scratch, "is_chief": is_chief, "backups": [],
               "history": load_history(config.job_dir, phases),
               "feature_cache": use_feature_cache(config, cluster)}
    if is_chief:
        storage.write_json(storage.join(config.job_dir, "config.json"),
                           {**dataclasses.asdict(config), "tool_version": __version__,
                            "replicas": strategy.num_replicas_in_sync, "per_replica_batch": per_replica,
                            "steps_per_epoch": steps, "classes": classes})
    install_sigterm_handler(context)
    try:
        model = train_phases(config, strategy, manifest, steps, context)
        # Every worker exports (saving can run collectives under MultiWorkerMirroredStrategy);
        # only the chief's copy goes to job_dir, the others' into scratch, which is removed.
        model_url = storage.join(config.job_dir, "model") if is_chief else os.path.join(scratch, "model")
        export.export_model(model, classes, config.image_size, model_url, backbone=config.backbone)
        if is_chief:
            storage.write_text(done_url, now_iso())
            logging.info("done: model exported to %s", model_url)
    except Preempted as error:
        raise RetryableError("preempted (SIGTERM); the backup is committed, rerun to resume") from error
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError) as error:
        if not cluster:
            raise
        # A peer worker died or was preempted: the collectives time out. Restarting every worker
        # (the JobSet does) resumes from the last committed backup.
        message = str(error).strip().splitlines()[0][:200]
        raise RetryableError(f"lost contact with a peer worker ({type(error).__name__}: {message})") from error
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        shutil.rmtree(scratch, ignore_errors=True)


def train_phases(config, strategy, manifest, steps, context):
    """Builds the model under the strategy and runs the head and fine-tune phases."""
    num_classes = len(manifest["classes"])
    if config.mixed_precision:
        # float16 with loss scaling on GPUs; CPUs (tests) have no fast float16, bfloat16 works there.
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        keras.mixed_precision.set_global_policy(policy)
        logging.info("mixed precision: %s (the output layer stays float32)", policy)
    with strategy.scope():
        model = model_lib.build_model(config.backbone, num_classes, config.image_size,
                                      weights=config.weights, head=config.head,
                                      dense_units=config.dense_units, dropout=config.dropout)
        model_lib.compile_model(model, num_classes, config.learning_rate, jit_compile=config.jit_compile)
    validate = bool(manifest["splits"].get("val", {}).get("count"))
    if not validate:
        logging.warning("the dataset has no validation examples: training without validation")

    def image_data():  # built only for the phases that stream images (not a cached head phase)
        return make_datasets(strategy, config, config.batch_size, validate=validate)

    if config.epochs:
        if phase_done(config.job_dir, "head"):
            logging.info("phase head: already complete, loading its weights")
            load_phase_weights(model, config.job_dir, "head", context["scratch"])
        elif context["feature_cache"]:
            fit_head_on_cached_features(model, config, strategy, manifest, steps, context)
            save_phase_weights(model, config.job_dir, "head", context["scratch"], context["is_chief"])
        else:
            fit_phase(model, "head", config.epochs, *image_data(), steps, config, context)
            save_phase_weights(model, config.job_dir, "head", context["scratch"], context["is_chief"])
    if config.fine_tune_epochs and phase_done(config.job_dir, "fine_tune"):
        logging.info("phase fine_tune: already complete, loading its weights")
        model_lib.unfreeze_from(model, config.fine_tune_from)
        load_phase_weights(model, config.job_dir, "fine_tune", context["scratch"])
    elif config.fine_tune_epochs:
        with strategy.scope():
            model_lib.unfreeze_from(model, config.fine_tune_from)
            model_lib.compile_model(model, num_classes, config.fine_tune_learning_rate,
                                    jit_compile=config.jit_compile)
        fit_phase(model, "fine_tune", config.fine_tune_epochs, *image_data(), steps, config, context)
        save_phase_weights(model, config.job_dir, "fine_tune", context["scratch"], context["is_chief"])
    return model
