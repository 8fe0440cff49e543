"""The frozen-feature cache: the frozen base's outputs computed once per example, for the head phase.

While the base is frozen and inputs are not augmented (the seed's first phase), the base maps each
image to the same features in every epoch, so computing them once is exact and the head trains on
them several times faster (docs/benchmarks.md).

With several workers, each computes its own part of every split: the evaluation-mode reader with
the worker as one input pipeline of many yields every example to exactly one worker. Each worker
writes its part to local scratch as .npy files (memory-mapped: no size limit) and commits it to
job_dir/features/<split>/part-<worker>-of-<workers>/ (files, then COMPLETE), so a restarted worker
reuses its committed part instead of recomputing it; these are the only files a non-chief worker
writes. The head then trains under the same strategy, every worker reading its own part.

The forward pass runs on this worker's own replicas only, in replica context (no collective ops):
workers extract at their own pace and meet again in the head phase's first step.
"""

import os
import sys

import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from trainer.data import pipeline
from trainer.errors import UserError

FILES = ("features.npy", "labels.npy")
# A worker's part of a split up to this size is held in memory for training (the seed's 17,500
# training images at 150 px are 573 MB); larger parts are read memory-mapped.
IN_MEMORY_BYTES = 4 * 2**30


def use_feature_cache(mode, augment, epochs):
    """Whether the head phase trains on cached base outputs (`--feature_cache=mode`).

    Raises:
      UserError: mode "on" for a run that is not eligible.
    """
    reasons = []
    if augment:  # True, or the names of the augmentation flags that are on
        names = " and ".join(augment) if isinstance(augment, (list, tuple)) else "--augment"
        reasons.append(f"{names} change{'' if ' and ' in names else 's'} the images every epoch: the cache "
                       "cannot hold augmented inputs")
    if not epochs:
        reasons.append("there is no head phase (--epochs=0)")
    if mode == "off":
        logging.info("feature cache: off (--feature_cache=off)")
        return False
    if reasons and mode == "on":
        raise UserError(f"--feature_cache=on is not possible here: {'; '.join(reasons)}")
    if reasons:
        logging.info("feature cache: off (%s)", "; ".join(reasons))
        return False
    logging.info("feature cache: on: the frozen base runs once per example, the head trains on its outputs "
                 "(--feature_cache=off to stream images every epoch)")
    return True


def make_forward(base, strategy):
    """A tf.function: a batch (its size a multiple of this worker's replicas) through the base,
    split over this worker's replicas and run in replica context, where every variable read is
    local: in cross-replica context, reading a BatchNorm statistic (a sync-on-read variable) would
    all-reduce it across workers, once per batch, and workers with different numbers of batches
    would mismatch. Outputs come back in the batch's order; no collective op runs."""
    try:
        local_replicas = len(strategy.extended.worker_devices)  # this worker's replicas
    except RuntimeError:  # the default (no) strategy: one replica, the current device
        local_replicas = 1

    @tf.function
    def forward(images):
        chunks = tf.split(images, local_replicas)
        values = strategy.experimental_distribute_values_from_function(
            lambda context: chunks[context.replica_id_in_sync_group % local_replicas])
        outputs = strategy.run(lambda chunk: base(chunk, training=False), args=(values,))
        return tf.concat(strategy.experimental_local_results(outputs), axis=0)

    return forward, local_replicas


def extract_features(base, job, dataset_args, split, scratch, strategy=None, worker=0, workers=1, damage=None):
    """Runs the frozen base once over this worker's part of a split; returns local .npy paths.

    Args:
      base: the frozen base model.
      job: the run's `JobDir`: a committed part is reused from it, a new one committed to it.
      dataset_args: keyword arguments of `pipeline.make_dataset` (manifest_url, image_size, batch_size,
        skip_corrupt_shards).
      split: the split to extract.
      scratch: local folder for the .npy files.
      strategy: the strategy the base was built under (default: the current one); each batch is
        split over this worker's replicas.
      worker, workers: this worker's index and the number of workers (each extracts its part).
      damage: the run's `records.DamageReport`; records it skips are not expected.

    Returns:
      (features path, labels path): float32 [n, ...] and int32 [n], n this part's examples.

    Raises:
      UserError: the part yielded a different number of examples than the manifest implies (and
        not because damaged records were skipped on request).
    """
    local = os.path.join(scratch, "features", split)
    os.makedirs(local, exist_ok=True)
    paths = tuple(os.path.join(local, name) for name in FILES)
    remote = job.features_url(split, worker, workers)
    if job.restore_features(remote, paths):
        logging.info("feature cache: worker %d of %d: %s: reusing %d examples in %s", worker, workers, split,
                     len(np.load(paths[1])), remote)
        return paths
    forward, local_replicas = make_forward(base, strategy or tf.distribute.get_strategy())
    skipped_before = _skipped_records(damage)
    context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker) if workers > 1 else None
    dataset = pipeline.make_dataset(split=split, training=False, input_context=context, damage=damage, **dataset_args)
    count = pipeline.count_for_pipeline(dataset_args["manifest_url"], split, context)
    features = np.lib.format.open_memmap(paths[0], mode="w+", dtype=np.float32,
                                         shape=(count, *base.output_shape[1:]))
    # Claim the disk space now: a sparse file on a full disk fails with SIGBUS at the first write
    # into a page that cannot be backed, where this fails at once with ENOSPC (a one-line error).
    with open(paths[0], "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.path.getsize(paths[0]))
        except OSError as error:
            raise OSError(error.errno, error.strerror, paths[0]) from None
    labels = np.zeros([count], np.int32)
    done = 0
    # In a pod's log (no terminal) a progress line every 30 s rather than a redrawn bar.
    progress = tqdm.tqdm(total=count, desc=f"features {split}", unit="img", file=sys.stderr,
                         mininterval=1 if sys.stderr.isatty() else 30)
    for images, batch_labels in dataset:
        size = len(batch_labels)
        # A batch not a multiple of the replicas would leave a replica an uneven or empty part
        # (some kernels reject empty batches): pad it, and drop the padding's outputs.
        missing = -size % local_replicas
        padded = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]]) if missing else images
        features[done:done + size] = forward(padded).numpy()[:size]
        labels[done:done + size] = batch_labels.numpy()
        done += size
        progress.update(size)
    progress.close()
    skipped = _skipped_records(damage) - skipped_before
    if done + skipped != count:
        raise UserError(f"split {split}: read {done} examples, the manifest says {count}")
    features.flush()
    del features
    if skipped:  # keep only the rows that were filled: the cache holds every example that was read
        trimmed = paths[0] + ".trimmed.npy"
        np.save(trimmed, np.load(paths[0], mmap_mode="r")[:done])
        os.replace(trimmed, paths[0])
        labels = labels[:done]
        logging.warning("feature cache: %s: %d damaged records skipped", split, skipped)
    np.save(paths[1], labels)
    job.commit_features(remote, paths)
    logging.info("feature cache: worker %d of %d: %s: %d examples -> %s", worker, workers, split, done, remote)
    return paths


def _skipped_records(damage):
    return sum(entry["records"] for entry in damage.skipped()) if damage else 0


def cached_dataset(paths, batch_size, training, seed, in_memory_bytes=IN_MEMORY_BYTES):
    """(features, labels) batches read from the cached .npy files.

    Every epoch is a fresh permutation of the whole part. A part of up to `in_memory_bytes` is held
    in memory and gathered by TensorFlow alone (no Python per batch); a larger one stays
    memory-mapped and is gathered in Python (no size limit).
    """
    features = np.load(paths[0], mmap_mode="r")
    labels = np.load(paths[1])
    dataset = tf.data.Dataset.range(len(labels))
    if training:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.batch(batch_size, drop_remainder=training)
    if features.nbytes <= in_memory_bytes:
        feature_table, label_table = tf.constant(np.asarray(features)), tf.constant(labels)

        def load(indices):
            return tf.gather(feature_table, indices), tf.gather(label_table, indices)
    else:
        def gather(indices):
            return np.asarray(features[indices], np.float32), labels[indices]

        def load(indices):
            batch, batch_labels = tf.numpy_function(gather, [indices], (tf.float32, tf.int32))
            batch.set_shape([None, *features.shape[1:]])
            batch_labels.set_shape([None])
            return batch, batch_labels

    return pipeline.without_autotune(dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
