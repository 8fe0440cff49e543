"""dataset.json + split -> tf.data.Dataset of (images, labels) for training and evaluation.

Images are float32 RGB pixel values in 0-255 (the model does its own normalisation), shape
[batch, image_size, image_size, 3]; labels are int32 class indices, shape [batch].

Two read paths, chosen by `storage.tensorflow_can_read`:
  - local paths and `gs://`: TensorFlow's own TFRecordDataset (C++ reads, no Python per record);
  - any other fsspec URL, and `gs://` while STORAGE_EMULATOR_HOST is set (TensorFlow's gs:// has
    the real endpoint compiled in): a Python generator per shard reads 16 MiB blocks through
    fsspec and checks the TFRecord framing itself (`tfrecord.iterate_records`). Many shards are
    read at once, so the network waits overlap.
Both feed the same per-shard pipeline (parse, decode, integrity check) and the same
shuffle/batch/prefetch, so the two paths yield identical examples.

Damaged data is never silent. The shard sizes are checked against the manifest before anything is
read (a shard truncated at a record boundary is caught there). While reading, every record carries
its index within its shard; errors inside a shard's pipeline (a checksum mismatch, an image that
does not decode) drop the record, and the next record's index shows the gap. Only then does
Python re-read that one shard (`records.DamageReport`) to name what is wrong and raise it, or,
with `skip_corrupt_shards`, log and count it. The fast path stays pure TensorFlow; the cost is a
second read of one shard when something is wrong.

What travels through the pipeline, per example, until the batch check turns it into
(images, labels):
  {"position": n-th example out of its shard, "shard": the shard's number in the split,
   "record": {"index": the record's index in the shard, "image": pixels, "label": int64}}
An intact shard has `index == offset + stride * position` for every example.
"""

import contextlib
import dataclasses
import os

import tensorflow as tf
from absl import logging

from trainer import errors
from trainer.data import decode, records
from trainer.data.augment import augment_image
from trainer.errors import UserError, counted
from trainer.formats import manifest
from trainer.infra import storage

# TensorFlow's read buffer per open shard: its default, 256 KiB, is small for gs://; locally a
# bigger one only costs cache misses (8 MiB per open shard read ~5% slower than 1 MiB here).
TENSORFLOW_BUFFER_BYTES = {"remote": 8 * 2**20, "local": 2**20}
# Shards read at the same time by one input pipeline (at least one per core: see make_dataset).
MAX_PARALLEL_SHARDS = 16


@contextlib.contextmanager
def translate_errors():
    """Re-raises damaged-data errors from inside a tf.data pipeline as UserError/RetryableError.

    TensorFlow wraps an exception raised while iterating (e.g. inside `model.fit`) in an OpError
    carrying a traceback; this recovers the original one-line error (`errors.from_tensorflow`) so
    the command line can report it with the right exit code. Other errors pass through unchanged.
    """
    try:
        yield
    except tf.errors.OpError as error:
        translated = errors.from_tensorflow(error)
        if translated is None:
            raise
        raise translated from None


def _read_with_tensorflow(url, buffer_size):
    return tf.data.TFRecordDataset(url, buffer_size=buffer_size)


def _generate_records(url):
    yield from records.read_shard_records(url.decode())


def _read_with_fsspec(url):
    return tf.data.Dataset.from_generator(
        _generate_records, args=(url,), output_signature=tf.TensorSpec([], tf.string))


@dataclasses.dataclass(frozen=True)
class ShardReader:
    """How each shard of one split is read, decoded and checked (the same for every shard).

    `offset`/`stride`: with fewer shards than input pipelines, each pipeline reads every shard and
    keeps every stride-th record from `offset`. `skip`: log and count damaged records instead of
    failing. `parallel`: decode with a parallel map (fewer shards in flight than cores), else in
    the interleave's thread for this shard. `small`: no stored image exceeds 2 x image_size.
    """

    native: bool  # TensorFlow's own reader (else fsspec)
    buffer_size: int
    image_size: int
    small: bool
    num_classes: int
    offset: int
    stride: int
    skip: bool
    parallel: bool
    damage: records.DamageReport

    def read(self, number, url, record_count):
        """One shard -> its examples (see the module docstring), in record order.

        Any error inside (a checksum mismatch, a record that does not parse or decode, a read
        failure) drops records, and ignore_errors keeps the pipeline going; a sentinel after the
        last record (index `end`, label -1) stands in for a shard that ended early.

        By default the index comparison is made per batch (`check_batch`): per example, the shard
        only adds a native zip, not a traced function (a scan and a filter cost ~30 us an image,
        5-10% of the decode). The zip ends after the expected number of examples, before the
        sentinel, when nothing was lost; when something was, the sentinel or a shifted example
        reaches `check_batch`, which names the damage and raises.

        With `skip`, a scan compares each example with the index it expects instead, so it can log
        and count each gap once, keep going, and drop the sentinel (the slower path, on request).
        """
        raw = _read_with_tensorflow(url, self.buffer_size) if self.native else _read_with_fsspec(url)
        indexed = raw.enumerate()
        if self.stride > 1:
            indexed = indexed.shard(self.stride, self.offset)
        parallel = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True} if self.parallel else {}
        decoded = indexed.map(self._parse_and_decode, **parallel).ignore_errors()
        expected_count = (tf.maximum(record_count - self.offset, 0) + self.stride - 1) // self.stride
        end = self.offset + self.stride * expected_count
        # Label -1 marks the sentinel: real labels are checked to be in 0..num_classes-1.
        sentinel = tf.data.Dataset.from_tensors({
            "index": end, "image": tf.zeros([self.image_size, self.image_size, 3], tf.float32),
            "label": tf.constant(-1, tf.int64)})
        if not self.skip:
            # The zip ends with its shortest input, the positions: an intact shard's sentinel is never used.
            return tf.data.Dataset.zip({"position": tf.data.Dataset.range(expected_count),
                                        "record": decoded.concatenate(sentinel),
                                        "shard": tf.data.Dataset.from_tensors(number).repeat()})

        def check(expected, record):
            skipped = tf.cond(
                tf.equal(record["index"], expected), lambda: tf.constant(0, tf.int64),
                lambda: tf.py_function(
                    lambda *args: self.damage.missing(*(arg.numpy() for arg in args), stride=self.stride,
                                                      num_classes=self.num_classes, skip=True),
                    [url, expected, record["index"]], tf.int64))
            with tf.control_dependencies([skipped]):
                # The position an intact shard would give this index, so `check_batch` agrees.
                position = (record["index"] - self.offset) // self.stride
                return record["index"] + self.stride, {"position": position, "record": record, "shard": number}

        checked = decoded.concatenate(sentinel).scan(tf.constant(self.offset, tf.int64), check)
        return checked.filter(lambda example: example["record"]["label"] >= 0)  # drops the sentinel

    def _parse_and_decode(self, index, serialized):
        # One record at a time (not tf.io.parse_example on a batch): an error then drops exactly
        # one record, which the index check can name. Parsing costs microseconds; decoding, which
        # dominates, is per image either way.
        features = tf.io.parse_single_example(serialized, records.PARSE_SPEC)
        image = decode.decode_image(features[manifest.KEY_ENCODED], self.image_size, self.small)
        label = features[manifest.KEY_LABEL]
        if not self.skip:  # checked per batch, in `check_batch`
            return {"index": index, "image": image, "label": label}
        # With skip: a label out of range drops the record, as an image that does not decode does,
        # so the scan names and skips it.
        in_range = tf.debugging.Assert(tf.logical_and(label >= 0, label < self.num_classes), ["label", label])
        with tf.control_dependencies([in_range]):
            return {"index": index, "image": tf.identity(image), "label": tf.identity(label)}

    def check_batch(self, batch, urls):
        """A batch of examples -> (images, labels int32), after checking nothing went wrong.

        Two checks, vectorised over the batch: every example's index is the one its position in its
        shard implies (no record went missing), and every label is one of the classes (a label out
        of range would otherwise fail far from here, in the loss, or give NaNs on a GPU). On
        failure, `_report_batch` (Python) names the damage and raises.
        """
        record = batch["record"]
        indices, labels = record["index"], record["label"]
        intact = tf.equal(indices, self.offset + self.stride * batch["position"])
        known = tf.logical_and(labels >= 0, labels < self.num_classes)
        checked = tf.cond(
            tf.logical_and(tf.reduce_all(intact), tf.reduce_all(known)), lambda: tf.constant(0, tf.int64),
            lambda: tf.py_function(lambda *args: self._report_batch(*(arg.numpy() for arg in args)),
                                   [tf.gather(urls, batch["shard"]), indices, intact, known], tf.int64))
        with tf.control_dependencies([checked]):
            return tf.identity(record["image"]), tf.cast(labels, tf.int32)

    def _report_batch(self, urls, indices, intact, known):
        """Raises, naming the damage, for a batch that failed `check_batch`."""
        report = dict(stride=self.stride, num_classes=self.num_classes, skip=False)
        if not intact.all():
            first = intact.argmin()
            # Everything before the first shifted index is suspect: the diagnosis re-reads it all.
            self.damage.missing(urls[first], self.offset, indices[first], **report)
        first = known.argmin()
        # A label outside the classes: re-reading that one record names the file and the label.
        self.damage.missing(urls[first], indices[first], indices[first] + self.stride, **report)
        return 0


def without_autotune(dataset):
    """`dataset` with tf.data's model-based autotuning off (every pipeline here ends with this).

    With it on, each iterator runs an autotuning thread that sleeps between optimizations, for
    periods that double up to 60 s, and in TensorFlow 2.21 deleting the iterator waits out that
    sleep: a stall at the end of every `fit`, evaluation and extraction of up to its running time
    (measured: 2.1 s after a 3 s iteration, 25 s at the end of a 3-minute head phase on two
    workers). Off, AUTOTUNE parallelism is this machine's core count and prefetch buffers grow on
    demand, as fast here (docs/benchmarks.md §6) and with no stall.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def _check_arguments(image_size, batch_size, shuffle_buffer, repeat):
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image size must be a positive integer, not {image_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, not {batch_size!r}")
    if shuffle_buffer < 1:
        raise UserError(f"shuffle buffer must be at least 1, not {shuffle_buffer}")
    if repeat is not None and repeat < 1:
        raise UserError(f"repeat must be at least 1 (or None: forever), not {repeat}")


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS


def pipeline_share(shards, input_context=None):
    """What one input pipeline of several reads: `(shards, offset, stride)`.

    By file when there are at least as many shards as pipelines (`shards[pipeline::pipelines]`,
    every record); otherwise every shard, keeping every `stride`-th record from `offset`. Together
    the pipelines read every record exactly once.
    """
    if input_context is None or input_context.num_input_pipelines == 1:
        return shards, 0, 1
    pipelines, pipeline = input_context.num_input_pipelines, input_context.input_pipeline_id
    if len(shards) >= pipelines:
        return shards[pipeline::pipelines], 0, 1
    return shards, pipeline, pipelines


def count_for_pipeline(manifest_url, split, input_context=None):
    """How many examples one input pipeline reads from a split in evaluation mode (see `pipeline_share`)."""
    location = manifest.manifest_location(manifest_url)
    shards, offset, stride = pipeline_share(manifest.list_shards(manifest.load_manifest(location), split, location),
                                            input_context)
    return sum(max(records - offset + stride - 1, 0) // stride for _, records, _ in shards)


def make_dataset(manifest_url, split, image_size, batch_size, training, augment=False,
                 shuffle_buffer=1000, seed=None, input_context=None, skip_corrupt_shards=False,
                 repeat=None, damage=None):
    """The tf.data pipeline for one split of a prepared dataset.

    Across input pipelines (workers), shards are divided by file when there are at least as many
    shards as pipelines, otherwise every pipeline reads every shard and keeps every n-th record.
    In evaluation mode the pipelines together yield every example exactly once; by file they may
    yield different counts.

    Training: shuffled shard order, shards interleaved without a fixed order, a shuffle buffer (of
    decoded images: `shuffle_buffer` x S x S x 3 x 4 bytes, 270 MB at 1000 and 150 px), optional
    augmentation, repeated, full batches only. Evaluation: every example once, in a fixed order,
    the last partial batch kept.

    Args:
      manifest_url: the dataset.json (or its folder): local path or URL.
      split: "train", "val" or "test".
      image_size: images are resized to image_size x image_size.
      batch_size: the batch this pipeline emits (per replica, under a distribution strategy).
      training: training (shuffled, repeated) or evaluation (once, in order) mode.
      augment: random flips, crops and brightness (training only).
      shuffle_buffer: examples in the shuffle buffer (training only).
      seed: seeds the shard order, the shuffle buffer and augmentation.
      input_context: a tf.distribute.InputContext (from distribute_datasets_from_function), or None.
      skip_corrupt_shards: skip (log and count in `damage`) damaged records and shards instead of
        failing.
      repeat: passes over the data in training (None: forever); in evaluation, None means once.
      damage: the `records.DamageReport` that names damage and keeps what was skipped (default: a
        new one); pass one to read what `skip_corrupt_shards` skipped.

    Returns:
      A tf.data.Dataset of (images float32 [b, S, S, 3] 0-255, labels int32 [b]).

    Raises:
      UserError: a bad argument or manifest, an absent or empty split, a missing shard or one
        whose size differs from the manifest. Damaged records found while iterating raise an
        OpError carrying a UserError message that names the shard or image; wrap the iteration
        in `translate_errors()` to get the UserError itself.
    """
    _check_arguments(image_size, batch_size, shuffle_buffer, repeat)
    location = manifest.manifest_location(manifest_url)
    dataset_manifest = manifest.load_manifest(location)
    all_shards = manifest.list_shards(dataset_manifest, split, location)
    total = len(all_shards)
    shards, offset, stride = pipeline_share(all_shards, input_context)
    manifest.check_shards(shards, location)
    native = storage.tensorflow_can_read(location)
    logging.info("reading split %s of %s: %d of %s, %s%s, %s mode, via %s",
                 split, location, len(shards), counted(total, "shard"),
                 counted(sum(count for _, count, _ in shards), "record"),
                 f" (every {stride}th from record {offset})" if stride > 1 else "",
                 "training" if training else "evaluation", "TensorFlow" if native else "fsspec")

    urls = [url for url, _, _ in shards]
    files = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(shards), dtype=tf.int64), urls, tf.constant([count for _, count, _ in shards], tf.int64)))
    if training:
        files = files.shuffle(len(shards), seed=seed, reshuffle_each_iteration=True).repeat(repeat)
    elif repeat is not None:
        files = files.repeat(repeat)

    # Each shard decodes its own records, in the interleave's thread for that shard: with at least
    # one shard per core that is all the parallelism there is to have, and every stage after the
    # interleave costs a hand-over between threads per image (~20 us, 4% of a decode). With fewer
    # shards than cores, each shard decodes with a parallel map instead.
    cycle_length = min(len(shards), max(MAX_PARALLEL_SHARDS, _cores()))
    max_side = dataset_manifest.get("max_side")
    reader = ShardReader(
        native=native, buffer_size=TENSORFLOW_BUFFER_BYTES["remote" if storage.is_url(location) else "local"],
        image_size=image_size,
        # Shards prepared with --max_side under 2 x image_size hold no JPEG that decodes scaled.
        small=bool(max_side) and max_side < 2 * image_size,
        num_classes=len(dataset_manifest["classes"]), offset=offset, stride=stride, skip=skip_corrupt_shards,
        parallel=cycle_length < _cores(), damage=damage or records.DamageReport())

    examples = files.interleave(reader.read, cycle_length=cycle_length, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=not training)
    if training:
        examples = examples.shuffle(shuffle_buffer, seed=seed)
        if augment:
            # After the interleave: one stream of random draws for the whole run, not one per
            # opening of a shard (whose seeding would depend on how TensorFlow seeds functions
            # instantiated per interleave input).
            examples = examples.map(
                lambda example: {**example, "record": {
                    **example["record"], "image": augment_image(example["record"]["image"], seed)}},
                num_parallel_calls=tf.data.AUTOTUNE)
    url_table = tf.constant(urls)
    batches = examples.batch(batch_size).map(lambda batch: reader.check_batch(batch, url_table),
                                             num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        # Full batches only, but the last partial one is checked before it is dropped: it may hold
        # the only example that shows a shard ended early. (Not batch(drop_remainder=True).)
        batches = batches.filter(lambda images, labels: tf.shape(labels)[0] == batch_size).map(
            lambda images, labels: (tf.ensure_shape(images, [batch_size, image_size, image_size, 3]),
                                    tf.ensure_shape(labels, [batch_size])),
            num_parallel_calls=tf.data.AUTOTUNE)
    return without_autotune(batches.prefetch(tf.data.AUTOTUNE))
