"""The phases of a run: the head on the frozen base (on cached features when it can), then
fine-tuning from `--fine_tune_from`; each under BackupAndRestore, resumable, complete once its
weights are committed to job_dir."""

import hashlib
import math
import os

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.config import parse_profile_steps
from trainer.data import augment, pipeline
from trainer.errors import UserError, first_line
from trainer.formats import jobdir
from trainer.infra.kerasapi import keras
from trainer.train import featurecache, optimize
from trainer.train import model as model_lib
from trainer.train.callbacks import EarlyStopping, EpochRecorder, Profiler, Progress, SyncedBackupAndRestore


def make_datasets(run, validate=True):
    """The distributed training dataset (repeating, one pipeline per worker reading its own shards)
    and the validation dataset (finite, every example once across all workers).

    Validation goes to Keras as a plain dataset of global batches: Keras splits each batch over the
    replicas and keeps the last partial batch, and with several workers each one evaluates every
    N-th batch (DATA sharding), so no example is counted twice or missed however shards divide.
    """
    config = run.config

    def train_fn(context):
        dataset = pipeline.make_dataset(
            config.data, "train", config.image_size, context.get_per_replica_batch_size(config.batch_size),
            training=True, augment=config.augment, shuffle_buffer=config.shuffle_buffer, seed=config.seed,
            input_context=context, skip_corrupt_shards=config.skip_corrupt_shards, damage=run.damage)
        seed = config.seed + context.input_pipeline_id
        if config.randaugment:
            dataset = augment.with_randaugment(dataset, config.randaugment_magnitude, seed)
        if config.mixup_alpha or config.cutmix_alpha:
            dataset = augment.with_mixing(dataset, run.num_classes, config.mixup_alpha, config.cutmix_alpha, seed)
        return augment.with_class_weights(dataset, run.class_weights)

    train_data = run.strategy.distribute_datasets_from_function(train_fn)
    if not validate:
        return train_data, None
    val_data = pipeline.make_dataset(config.data, "val", config.image_size, config.batch_size, training=False,
                                 skip_corrupt_shards=config.skip_corrupt_shards, damage=run.damage)
    return train_data, augment.with_data_sharding(val_data)


def compile_phase(run, model, phase, num_classes, steps):
    """Compiles `model` for `phase` with the configured optimizer, schedule and loss (under the
    strategy's scope)."""
    config = run.config
    peak, epochs = ((config.learning_rate, config.epochs) if phase == "head"
                    else (config.fine_tune_learning_rate, config.fine_tune_epochs))
    rate = optimize.learning_rate_schedule(peak, config.lr_schedule, total_steps=epochs * steps,
                                            warmup_steps=round(config.warmup_epochs * steps))
    optimizer = optimize.make_optimizer(config.optimizer, rate, config.weight_decay, config.momentum)
    optimize.compile_model(model, num_classes, peak, jit_compile=config.jit_compile, optimizer=optimizer,
                            label_smoothing=config.label_smoothing,
                            soft_labels=bool(config.mixup_alpha or config.cutmix_alpha))


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
        Progress(phase, epochs, steps, run.config.batch_size, run.config.progress_seconds),
        *([Profiler(*parse_profile_steps(run.config.profile_steps), os.path.join(tensorboard_dir, phase, "profile"))]
          if run.config.profile_steps else []),
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


def check_checkpoint(local_dir, url, what="backup",
                     way_out="delete that folder to restart this phase from its start (finished phases are kept)"):
    """Reads every tensor of the checkpoint in `local_dir` (a copy of `url`) once.

    Raises:
      UserError: a file is truncated or damaged (named, with the way out), instead of a
        TensorFlow traceback from inside `fit` or `load_weights`.
    """
    try:
        reader = tf.train.load_checkpoint(local_dir)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001 - any failure to read it back: OpError, IndexError, ...
        raise UserError(f"the {what} in {url} is damaged ({first_line(error)}): {way_out}") from None


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
            return augment.with_class_weights(dataset, run.class_weights) if training else dataset

        return run.strategy.distribute_datasets_from_function(dataset_fn)

    train_paths = extract("train")
    val_paths = extract("val") if splits.get("val", {}).get("count") else None
    val_steps = None
    if workers > 1:
        train_data = per_worker(train_paths, training=True)
        val_data = per_worker(val_paths, training=False) if val_paths else None
        val_steps = validation_steps(run, workers) if val_paths else None
    else:
        train_data = run.strategy.experimental_distribute_dataset(augment.with_class_weights(
            featurecache.cached_dataset(train_paths, config.batch_size, training=True, seed=config.seed),
            run.class_weights))
        val_data = augment.with_data_sharding(featurecache.cached_dataset(
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
    counts = [pipeline.count_for_pipeline(run.config.data, "val", tf.distribute.InputContext(workers, worker))
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
    check_checkpoint(local, run.job.path(jobdir.CHECKPOINTS, phase), what="checkpoint of the finished phase",
                     way_out="delete that folder to train this phase again (its backup is gone once it is complete)")
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
        policy = optimize.mixed_precision_policy()
        keras.mixed_precision.set_global_policy(policy)
        logging.info("mixed precision: %s (the output layer stays float32)", policy)
    with strategy.scope():
        model = model_lib.build_model(config.backbone, num_classes, config.image_size,
                                      weights=config.weights, head=config.head,
                                      dense_units=config.dense_units, dropout=config.dropout)
        compile_phase(run, model, "head", num_classes, steps)
    if config.fine_tune_epochs:
        model_lib.check_fine_tune_from(model, config.fine_tune_from)
    if config.summary and run.is_chief:  # the layers, their shapes, and what the head phase trains
        model.summary(line_length=110, expand_nested=True, print_fn=lambda line, **_: print(line, flush=True))
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
