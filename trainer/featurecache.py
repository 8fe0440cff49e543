"""The frozen-feature cache: the frozen base's outputs computed once per split, for the head phase.

While the base is frozen and inputs are not augmented (the seed's first phase), the base maps each
image to the same features in every epoch, so computing them once is exact and the head trains on
them several times faster (docs/benchmarks.md). Features are written to local scratch as .npy
files (memory-mapped: no size limit), committed to job_dir/features/<split>/ so a restarted job
does not recompute them, and read back as (features, labels) batches.
"""

import os
import sys

import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from trainer import data
from trainer.errors import UserError

FILES = ("features.npy", "labels.npy")


def use_feature_cache(mode, augment, epochs, multi_worker):
    """Whether the head phase trains on cached base outputs (`--feature_cache=mode`).

    Multi-worker jobs stream images instead (each worker would cache only its shard).

    Raises:
      UserError: mode "on" for a run that is not eligible.
    """
    reasons = []
    if augment:
        reasons.append("--augment changes the images every epoch")
    if not epochs:
        reasons.append("there is no head phase (--epochs=0)")
    if multi_worker:
        reasons.append("multi-worker jobs stream images")
    if mode == "off":
        logging.info("feature cache: off (--feature_cache=off)")
        return False
    if reasons and mode == "on":
        raise UserError(f"--feature_cache=on is not possible here: {'; '.join(reasons)}")
    if reasons:
        logging.info("feature cache: off (%s)", "; ".join(reasons))
        return False
    logging.info("feature cache: on: the frozen base runs once per split, the head trains on its outputs "
                 "(--feature_cache=off to stream images every epoch)")
    return True


def extract_features(base, job, dataset_args, split, count, scratch, strategy=None, damage=None):
    """Runs the frozen base once over a split; returns local .npy paths (features, labels).

    Args:
      base: the frozen base model.
      job: the run's `JobDir`: committed features are reused from it, new ones committed to it.
      dataset_args: keyword arguments of `data.make_dataset` (manifest_url, image_size, batch_size,
        skip_corrupt_shards).
      split: the split to extract.
      count: its number of examples in the manifest.
      scratch: local folder for the .npy files.
      strategy: each batch is split over its replicas (default: the current strategy).
      damage: the run's `records.DamageReport`; records it skips are not expected.

    Raises:
      UserError: the split yielded a different number of examples than the manifest lists (and
        not because damaged records were skipped on request).
    """
    local = os.path.join(scratch, "features", split)
    os.makedirs(local, exist_ok=True)
    paths = tuple(os.path.join(local, name) for name in FILES)
    if job.restore_features(split, paths):
        logging.info("feature cache: reusing %s", job.features_url(split))
        return paths
    strategy = strategy or tf.distribute.get_strategy()
    skipped_before = _skipped_records(damage)
    replicas = strategy.num_replicas_in_sync

    def pad_to_replicas(images, labels):
        # A last batch smaller than the replicas would leave a replica an empty batch, which some
        # kernels reject: pad it to a multiple (label -1 marks the padding, dropped below).
        missing = (-tf.shape(labels)[0]) % replicas
        return (tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]]),
                tf.pad(labels, [[0, missing]], constant_values=-1))

    dataset = data.make_dataset(split=split, training=False, damage=damage, **dataset_args).map(pad_to_replicas)

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
        real = batch_labels.numpy() >= 0
        batch, batch_labels = batch.numpy()[real], batch_labels.numpy()[real]
        features[done:done + len(batch)] = batch
        labels[done:done + len(batch)] = batch_labels
        done += len(batch)
        progress.update(len(batch))
    progress.close()
    skipped = _skipped_records(damage) - skipped_before
    if done + skipped != count:
        raise UserError(f"split {split}: read {done} examples, the manifest says {count}")
    if skipped:  # only the rows that were filled: the cache holds every example that was read
        features.flush()
        del features
        trimmed = paths[0] + ".trimmed.npy"
        np.save(trimmed, np.load(paths[0], mmap_mode="r")[:done])
        os.replace(trimmed, paths[0])
        labels = labels[:done]
        logging.warning("feature cache: %s: %d damaged records skipped, %d examples cached", split, skipped, done)
    else:
        features.flush()
    np.save(paths[1], labels)
    job.commit_features(split, paths)
    logging.info("feature cache: %s: %d examples -> %s", split, done, job.features_url(split))
    return paths


def _skipped_records(damage):
    return sum(entry["records"] for entry in damage.skipped()) if damage else 0


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
