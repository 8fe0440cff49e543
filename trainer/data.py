"""dataset.json + split -> tf.data.Dataset of (images, labels) for training and evaluation.

Images are float32 RGB pixel values in 0-255 (the model does its own normalisation), shape
[batch, image_size, image_size, 3]; labels are int32 class indices, shape [batch].

Two read paths, chosen by `storage.tensorflow_can_read`:
  - local paths and `gs://`: TensorFlow's own TFRecordDataset (C++ reads, no Python per record);
  - any other fsspec URL, and `gs://` while STORAGE_EMULATOR_HOST is set (TensorFlow's gs:// has
    the real endpoint compiled in): a Python generator per shard reads 16 MiB blocks through
    fsspec and checks the TFRecord framing itself (`iterate_records`). Many shards are read at once,
    so the network waits overlap.
Both feed the same per-shard pipeline (parse, decode, integrity check) and the same
shuffle/batch/prefetch, so the two paths yield identical examples.

Damaged data is never silent. The shard sizes are checked against the manifest before anything is
read (a shard truncated at a record boundary is caught there). While reading, every record carries
its index within its shard; errors inside a shard's pipeline (a checksum mismatch, an image that
does not decode) drop the record, and the next record's index shows the gap. Only then does
Python re-read that one shard to name what is wrong (the shard and record offset, or the image's
`image/filename`) and raise it, or, with `skip_corrupt_shards`, log and count it. The fast path
stays pure TensorFlow; the cost is a second read of one shard when something is wrong.
"""

import contextlib
import os
import re
import struct
import threading
from concurrent import futures

import google_crc32c
import tensorflow as tf
from absl import logging

from trainer import storage
from trainer.errors import RetryableError, UserError

MANIFEST_NAME = "dataset.json"
MANIFEST_KIND = "trainer-dataset"
SCHEMA_VERSIONS = (1,)

# Object stores want few large requests: the fsspec path reads shards in blocks this big.
READ_BLOCK_BYTES = 16 * 2**20
# TensorFlow's read buffer per open shard: its default, 256 KiB, is small for gs://; locally a
# bigger one only costs cache misses (8 MiB per open shard read ~5% slower than 1 MiB here).
TENSORFLOW_BUFFER_BYTES = {"remote": 8 * 2**20, "local": 2**20}
# Shards read at the same time by one input pipeline (at least one per core: see make_dataset).
MAX_PARALLEL_SHARDS = 16
# Parallel metadata calls when checking remote shard sizes.
MAX_PARALLEL_CHECKS = 32

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}
REQUIRED_KEYS = tuple(FEATURES)

_TFRECORD_HEADER = struct.Struct("<QI")  # record length, masked crc32c of the length
_TFRECORD_FOOTER = struct.Struct("<I")  # masked crc32c of the data
_CRC_MASK_DELTA = 0xA282EAD8

_skipped = []  # what skip_corrupt_shards skipped in this process: see skipped_data()
_diagnosed = {}  # (shard, first missing, next seen, stride) -> problems: diagnose once, not every epoch
_skipped_lock = threading.Lock()


# JPEG decoders can scale by 1/2, 1/4 or 1/8 while decoding (in the DCT domain), for much less work.
JPEG_SCALES = (1, 2, 4, 8)


def decode_image(encoded, image_size, small=False):
    """Decodes JPEG or PNG bytes to float32 RGB 0-255 resized to `image_size` x `image_size`.

    Training, evaluation and the exported serving signature all call this one function, so the
    pixels a model sees in production are computed exactly as in training.

    A JPEG whose shorter side is at least twice `image_size` is decoded at the largest of 1/2, 1/4,
    1/8 scale that keeps its shorter side at or above `image_size` (libjpeg scales while it
    decodes), then resized: the decode is the input pipeline's main cost, and this cuts it by ~15%
    for a 500x375 photo at 150 px and several times for camera-sized photos, which serving gets
    as they are. Smaller JPEGs, and PNGs, decode exactly as `tf.io.decode_image` does.

    `small=True` promises that no side exceeds 2 x `image_size` (shards prepared with a small
    enough `--max_side`): the same pixels, without the ~12 us per image of choosing a scale.
    """
    if small:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    else:
        image = tf.cond(tf.io.is_jpeg(encoded), lambda: _decode_jpeg_scaled(encoded, image_size),
                        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _decode_jpeg_scaled(encoded, image_size):
    height_width = tf.image.extract_jpeg_shape(encoded)[:2]
    shorter = tf.reduce_min(height_width)
    # Index into JPEG_SCALES of the largest scale that keeps the shorter side >= image_size.
    index = tf.reduce_sum(tf.cast(shorter >= image_size * tf.constant(JPEG_SCALES[1:]), tf.int32))
    branches = [lambda ratio=ratio: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio) for ratio in JPEG_SCALES]
    return tf.switch_case(index, branches)


# --- the manifest ---------------------------------------------------------------------------------


def manifest_location(manifest_url):
    """The dataset.json itself: `manifest_url` may also name the dataset's folder."""
    if manifest_url.rstrip("/").endswith(".json"):
        return manifest_url
    return storage.join(manifest_url, MANIFEST_NAME)


def load_manifest(manifest_url):
    """Reads and checks a dataset.json written by `trainer prepare`.

    Args:
      manifest_url: the dataset.json (or the folder holding it): local path or URL.

    Returns:
      The manifest as a dict (see docs/data.md for its fields).

    Raises:
      UserError: the manifest is missing, is not JSON, or is not a trainer dataset of a schema
        version this trainer reads.
    """
    location = manifest_location(manifest_url)
    try:
        manifest = storage.read_json(location)
    except FileNotFoundError:
        raise UserError(f"no dataset manifest at {location} (run `trainer prepare` first)") from None
    except IsADirectoryError:
        raise UserError(f"{location} is a folder, not a dataset manifest") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{location} is not JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        kind = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{location} is not a trainer dataset manifest (kind: {kind!r}, "
                        f"expected {MANIFEST_KIND!r})")
    if manifest.get("schema_version") not in SCHEMA_VERSIONS:
        raise UserError(f"{location} has schema_version {manifest.get('schema_version')!r}; this "
                        f"trainer reads {', '.join(map(str, SCHEMA_VERSIONS))} (upgrade the trainer, "
                        "or prepare the dataset again)")
    if not isinstance(manifest.get("splits"), dict) or not isinstance(manifest.get("classes"), list):
        raise UserError(f"{location} is malformed: it lacks 'splits' or 'classes'")
    return manifest


def _split_entry(manifest, split, location):
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{location} has no split {split!r} (it has: {', '.join(sorted(splits))})")
    return splits[split]


def count_examples(manifest, split):
    """The number of examples of `split` in a loaded manifest (UserError if the split is absent)."""
    return int(_split_entry(manifest, split, "the dataset manifest").get("count", 0))


def list_shards(manifest, split, location):
    """The shards of `split` as (url, records, bytes), urls relative to the manifest's folder.

    Raises:
      UserError: the split is absent, empty, or its shard list is malformed.
    """
    entry = _split_entry(manifest, split, location)
    folder = storage.dirname(location)
    try:
        shards = [(storage.join(folder, shard["file"]), int(shard["records"]), int(shard["bytes"]))
                  for shard in entry.get("shards") or []]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{location}: the shard list of split {split!r} is malformed") from None
    if not shards or sum(records for _, records, _ in shards) == 0:
        raise UserError(f"split {split!r} of {location} has no examples")
    return shards


def check_shards(shards, location):
    """Fails loudly when a shard is missing or its size differs from the manifest.

    One metadata call per shard (in parallel for remote storage). A size mismatch is how a shard
    truncated at a record boundary, which reads cleanly, is caught.

    Raises:
      UserError: naming the first missing or mismatching shard.
    """

    def actual_size(url):
        try:
            return storage.size(url)
        except FileNotFoundError:
            return None

    urls = [url for url, _, _ in shards]
    if storage.is_url(location) and len(shards) > 1:
        with futures.ThreadPoolExecutor(min(MAX_PARALLEL_CHECKS, len(shards))) as pool:
            sizes = list(pool.map(actual_size, urls))
    else:
        sizes = [actual_size(url) for url in urls]
    for (url, _, expected), found in zip(shards, sizes, strict=True):
        if found is None:
            raise UserError(f"missing shard {url} (listed in {location})")
        if found != expected:
            raise UserError(f"shard {url} is {found} bytes but {location} says {expected}: truncated "
                            "or rewritten since `trainer prepare` (prepare the dataset again)")


# --- TFRecord framing (the fsspec path, and the diagnosis of damaged shards) -----------------------


def _masked_crc(data):
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def _read_exactly(stream, count):
    chunks, missing = [], count
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def iterate_records(stream, name):
    """Yields the records of a TFRecord stream, checking both checksums of every record.

    The framing is: uint64 length, masked crc32c of the length, data, masked crc32c of the data
    (all little-endian).

    Args:
      stream: a binary file object (read sequentially).
      name: the shard's location, for error messages.

    Raises:
      UserError: naming the shard, the record and its byte offset, on a checksum mismatch or a
        record cut short.
    """
    offset = index = 0
    while True:
        header = _read_exactly(stream, _TFRECORD_HEADER.size)
        if not header:
            return
        where = f"shard {name} record {index} (byte {offset})"
        if len(header) < _TFRECORD_HEADER.size:
            raise UserError(f"{where} is truncated: the shard ends inside the record header")
        length, length_crc = _TFRECORD_HEADER.unpack(header)
        if _masked_crc(header[:8]) != length_crc:
            raise UserError(f"{where} is corrupt: length checksum mismatch")
        data = _read_exactly(stream, length)
        footer = _read_exactly(stream, _TFRECORD_FOOTER.size)
        if len(data) < length or len(footer) < _TFRECORD_FOOTER.size:
            raise UserError(f"{where} is truncated: the shard ends inside the record")
        if _masked_crc(data) != _TFRECORD_FOOTER.unpack(footer)[0]:
            raise UserError(f"{where} is corrupt: data checksum mismatch")
        yield data
        offset += _TFRECORD_HEADER.size + length + _TFRECORD_FOOTER.size
        index += 1


def read_shard_records(url):
    """Yields the records of one shard at any location, through fsspec, in large blocks."""
    with storage.open_file(url, "rb", block_size=READ_BLOCK_BYTES) as stream:
        yield from iterate_records(stream, url)


# --- what went wrong in a shard --------------------------------------------------------------------


def _record_problem(record, index, url, num_classes):
    """Why a record that passed its checksums could not be used, or None if it can."""
    try:
        example = tf.train.Example.FromString(record)
    except Exception:  # protobuf's DecodeError; any parse failure means the same here
        return f"record {index} of shard {url} is not a tf.train.Example"
    feature = example.features.feature
    filename = feature["image/filename"].bytes_list.value[0].decode("utf-8", "replace") if (
        feature["image/filename"].bytes_list.value) else f"record {index}"
    for key in REQUIRED_KEYS:
        if key not in feature:
            return f"{filename} (record {index} of shard {url}) has no {key}"
    try:
        decode_image(feature["image/encoded"].bytes_list.value[0], 8)
    except (tf.errors.InvalidArgumentError, IndexError) as error:
        # "{{function_node ...}} jpeg::Uncompress failed. ... [Op:DecodeImage]" -> the middle part
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", getattr(error, "message", str(error))).strip()
        reason = reason.splitlines()[0][:200].rstrip(".") if reason else "no image bytes"
        return f"image {filename!r} (record {index} of shard {url}) does not decode: {reason}"
    label = feature["image/class/label"].int64_list.value
    if len(label) != 1 or not 0 <= label[0] < num_classes:
        return (f"{filename} (record {index} of shard {url}) has label {list(label)}, not one of "
                f"0..{num_classes - 1}")
    return None


def diagnose_shard(url, missing, num_classes):
    """Re-reads a shard to say why the records at indices `missing` never arrived.

    Returns:
      One-line problems (a checksum mismatch ends the list: the rest of the shard is unreadable);
      empty when every record in `missing` reads and decodes cleanly now.
    """
    wanted, problems = set(missing), []
    last, index = max(missing), -1
    try:
        for index, record in enumerate(read_shard_records(url)):
            if index in wanted:
                problem = _record_problem(record, index, url, num_classes)
                if problem:
                    problems.append(problem)
            if index >= last:
                break
    except UserError as error:
        problems.append(str(error))
    else:
        if index < last:
            problems.append(f"shard {url} ends after {index + 1} records; its manifest lists more")
    return problems


def _report_missing(url, expected, seen, *, stride, num_classes, skip):
    """Called (in Python, only on the failure path) when a shard's records `expected`.. are missing.

    Returns:
      How many records were skipped (with `skip`).

    Raises:
      UserError: naming the shard and what is wrong with it (without `skip`).
      RetryableError: the records went missing but the shard re-reads intact (storage trouble).
    """
    url = url.decode() if isinstance(url, bytes) else url
    missing = list(range(int(expected), int(seen), stride))
    key = (url, int(expected), int(seen), stride)
    with _skipped_lock:
        problems = _diagnosed.get(key)
    repeated = problems is not None  # the same damage, met again on a later pass over the data
    if not repeated and not missing:
        problems = [f"shard {url} holds more records than its manifest lists"]
    elif not repeated:
        problems = diagnose_shard(url, missing, num_classes)
    if not problems:
        raise RetryableError(f"reading shard {url} failed part-way, but it re-reads intact "
                             "(a storage error?)")
    if not skip:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; pass --skip_corrupt_shards to skip damaged data")
    if repeated:
        logging.info("skipped %d damaged records of shard %s again", len(missing), url)
        return len(missing)
    for problem in problems:
        logging.warning("skipping damaged data: %s", problem)
    logging.warning("skipped %d records of shard %s", len(missing), url)
    with _skipped_lock:
        _diagnosed[key] = problems
        _skipped.append({"shard": url, "records": len(missing), "problems": problems})
    return len(missing)


def skipped_data():
    """What `skip_corrupt_shards` skipped in this process: [{"shard", "records", "problems"}]."""
    with _skipped_lock:
        return [dict(entry) for entry in _skipped]


def error_from_pipeline(error):
    """The UserError/RetryableError a py_function raised inside a tf.data pipeline, or None."""
    message = getattr(error, "message", str(error))
    for kind in (UserError, RetryableError):
        marker = f"{kind.__name__}: "
        if marker in message:
            return kind(message.split(marker, 1)[1].split("\n", 1)[0].strip())
    return None


@contextlib.contextmanager
def translate_errors():
    """Re-raises damaged-data errors from inside a tf.data pipeline as UserError/RetryableError.

    TensorFlow wraps an exception raised while iterating (e.g. inside `model.fit`) in an OpError
    carrying a traceback; this recovers the original one-line message so the command line can
    report it with the right exit code. Other errors pass through unchanged.
    """
    try:
        yield
    except tf.errors.OpError as error:
        translated = error_from_pipeline(error)
        if translated is None:
            raise
        raise translated from None


# --- the dataset -----------------------------------------------------------------------------------


def _read_with_tensorflow(url, buffer_size):
    return tf.data.TFRecordDataset(url, buffer_size=buffer_size)


def _generate_records(url):
    yield from read_shard_records(url.decode())


def _read_with_fsspec(url):
    return tf.data.Dataset.from_generator(
        _generate_records, args=(url,), output_signature=tf.TensorSpec([], tf.string))


def _parse_and_decode(index, record, image_size, small, num_classes, check_label):
    # One record at a time (not tf.io.parse_example on a batch): an error then drops exactly one
    # record, which the index check below can name. Parsing costs microseconds; decoding, which
    # dominates, is per image either way.
    features = tf.io.parse_single_example(record, FEATURES)
    image = decode_image(features["image/encoded"], image_size, small)
    label = features["image/class/label"]
    if not check_label:  # checked per batch, in `_check_batch`
        return index, image, label
    # With skip_corrupt_shards: a label out of range drops the record, as an image that does not
    # decode does, so the scan names and skips it.
    in_range = tf.debugging.Assert(tf.logical_and(label >= 0, label < num_classes), ["label", label])
    with tf.control_dependencies([in_range]):
        return index, image, label


def _read_shard(number, url, records, *, reader, image_size, small, num_classes, offset, stride, skip, parallel):
    """One shard -> tracked examples `(position, (index, image, label), number)`, in record order.

    Records carry their index in the shard. Any error inside (a checksum mismatch, a record that
    does not parse or decode, a read failure) drops records, and ignore_errors keeps the pipeline
    going; a sentinel after the last record (index `end`, label -1) stands in for a shard that
    ended early. `position` counts what actually came out of the shard, so an intact shard has
    `index == offset + stride * position` for every example, and a lost record breaks that for
    every example after it. `number` is the shard's place in the split's shard list.

    By default the comparison is made per batch (`_check_batch`): per example, the shard only adds
    a native zip, not a traced function (a scan and a filter cost ~30 us an image, 5-10% of the
    decode). The zip ends after the expected number of examples, before the sentinel, when nothing
    was lost; when something was, the sentinel or a shifted example reaches `_check_batch`, which
    names the damage and raises.

    With `skip`, a scan compares each example with the index it expects instead, so it can log and
    count each gap once, keep going, and drop the sentinel (the slower path, on request only).

    `parallel`: decode with a parallel map (fewer shards in flight than cores), else in the
    interleave's thread for this shard.
    """
    indexed = reader(url).enumerate()
    if stride > 1:  # fewer shards than input pipelines: each pipeline takes every stride-th record
        indexed = indexed.shard(stride, offset)
    decoded = indexed.map(lambda index, record: _parse_and_decode(index, record, image_size, small, num_classes,
                                                                  check_label=skip),
                          num_parallel_calls=tf.data.AUTOTUNE if parallel else None,
                          deterministic=True).ignore_errors()
    expected_count = (tf.maximum(records - offset, 0) + stride - 1) // stride
    end = offset + stride * expected_count
    # Label -1 marks the sentinel: real labels are checked to be in 0..num_classes-1.
    sentinel = tf.data.Dataset.from_tensors(
        (end, tf.zeros([image_size, image_size, 3], tf.float32), tf.constant(-1, tf.int64)))
    if not skip:
        # The zip ends with its shortest input, the positions: an intact shard's sentinel is never used.
        return tf.data.Dataset.zip((tf.data.Dataset.range(expected_count), decoded.concatenate(sentinel),
                                    tf.data.Dataset.from_tensors(number).repeat()))

    def check(expected, element):
        index = element[0]
        skipped = tf.cond(
            tf.equal(index, expected), lambda: tf.constant(0, tf.int64),
            lambda: tf.py_function(
                lambda *args: _report_missing(*(arg.numpy() for arg in args), stride=stride,
                                              num_classes=num_classes, skip=True),
                [url, expected, index], tf.int64))
        with tf.control_dependencies([skipped]):
            # The position an intact shard would give this index, so `_check_batch` agrees.
            return index + stride, ((index - offset) // stride, element, number)

    checked = decoded.concatenate(sentinel).scan(tf.constant(offset, tf.int64), check)
    return checked.filter(lambda position, example, number: example[2] >= 0)  # drops the sentinel


def _check_batch(positions, examples, numbers, *, urls, offset, stride, num_classes):
    """A batch of tracked examples -> (images, labels int32), after checking nothing went wrong.

    Two checks, vectorised over the batch: every example's index is the one its position in its
    shard implies (no record went missing), and every label is one of the classes (a label out of
    range would otherwise fail far from here, in the loss, or give NaNs on a GPU). On failure,
    `_report_batch` (Python) names the damage and raises.
    """
    indices, images, labels = examples
    intact = tf.equal(indices, offset + stride * positions)
    known = tf.logical_and(labels >= 0, labels < num_classes)
    checked = tf.cond(
        tf.logical_and(tf.reduce_all(intact), tf.reduce_all(known)), lambda: tf.constant(0, tf.int64),
        lambda: tf.py_function(
            lambda *args: _report_batch(*(arg.numpy() for arg in args), offset=offset, stride=stride,
                                        num_classes=num_classes),
            [tf.gather(urls, numbers), indices, intact, known], tf.int64))
    with tf.control_dependencies([checked]):
        return tf.identity(images), tf.cast(labels, tf.int32)


def _report_batch(urls, indices, intact, known, *, offset, stride, num_classes):
    """Raises, naming the damage, for a batch that failed `_check_batch`."""
    if not intact.all():
        first = intact.argmin()
        # Everything before the first shifted index is suspect: the diagnosis re-reads it all.
        _report_missing(urls[first], offset, indices[first], stride=stride, num_classes=num_classes, skip=False)
    first = known.argmin()
    # A label outside the classes: re-reading that one record names the file and the label.
    _report_missing(urls[first], indices[first], indices[first] + stride, stride=stride, num_classes=num_classes,
                    skip=False)
    return 0


def augment_image(image, seed=None):
    """A random left-right flip, a random crop of 80-100% of each side zoomed back, a brightness shift.

    Args:
      image: float32 [S, S, 3], 0-255. Returns the same shape and range.
    """
    # Distinct op seeds: ops sharing one would draw the same random numbers.
    seeds = [None] * 4 if seed is None else [seed + i for i in range(4)]
    size = image.shape[0]
    image = tf.image.random_flip_left_right(image, seed=seeds[0])
    side = tf.cast(tf.round(tf.random.uniform([], 0.8, 1.0, seed=seeds[1]) * size), tf.int32)
    image = tf.image.random_crop(image, [side, side, 3], seed=seeds[2])
    image = tf.image.resize(image, [size, size], method="bilinear")
    image = tf.image.random_brightness(image, max_delta=0.1 * 255.0, seed=seeds[3])
    return tf.clip_by_value(image, 0.0, 255.0)


def _check_arguments(image_size, batch_size, shuffle_buffer, repeat):
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image size must be a positive integer, not {image_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, not {batch_size!r}")
    if shuffle_buffer < 1:
        raise UserError(f"shuffle buffer must be at least 1, not {shuffle_buffer}")
    if repeat is not None and repeat < 1:
        raise UserError(f"repeat must be at least 1 (or None: forever), not {repeat}")


def make_dataset(manifest_url, split, image_size, batch_size, training, augment=False,
                 shuffle_buffer=1000, seed=None, input_context=None, skip_corrupt_shards=False,
                 repeat=None):
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
      skip_corrupt_shards: skip (log and count, see `skipped_data`) damaged records and shards
        instead of failing.
      repeat: passes over the data in training (None: forever); in evaluation, None means once.

    Returns:
      A tf.data.Dataset of (images float32 [b, S, S, 3] 0-255, labels int32 [b]).

    Raises:
      UserError: a bad argument or manifest, an absent or empty split, a missing shard or one
        whose size differs from the manifest. Damaged records found while iterating raise an
        OpError carrying a UserError message that names the shard or image; wrap the iteration
        in `translate_errors()` to get the UserError itself.
    """
    _check_arguments(image_size, batch_size, shuffle_buffer, repeat)
    location = manifest_location(manifest_url)
    manifest = load_manifest(location)
    shards, num_classes = list_shards(manifest, split, location), len(manifest["classes"])
    pipelines, pipeline = 1, 0
    if input_context is not None:
        pipelines, pipeline = input_context.num_input_pipelines, input_context.input_pipeline_id
    total = len(shards)
    offset, stride = 0, 1
    if total >= pipelines:
        shards = shards[pipeline::pipelines]
    else:
        offset, stride = pipeline, pipelines
    check_shards(shards, location)
    native = storage.tensorflow_can_read(location)
    logging.info("reading split %s of %s: %d of %d shards, %d records%s, %s mode, via %s",
                 split, location, len(shards), total, sum(records for _, records, _ in shards),
                 f" (every {stride}th from record {offset})" if stride > 1 else "",
                 "training" if training else "evaluation", "TensorFlow" if native else "fsspec")

    urls = [url for url, _, _ in shards]
    files = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(shards), dtype=tf.int64), urls,
         tf.constant([records for _, records, _ in shards], tf.int64)))
    if training:
        files = files.shuffle(len(shards), seed=seed, reshuffle_each_iteration=True).repeat(repeat)
    elif repeat is not None:
        files = files.repeat(repeat)

    buffer_size = TENSORFLOW_BUFFER_BYTES["remote" if storage.is_url(location) else "local"]
    reader = (lambda url: _read_with_tensorflow(url, buffer_size)) if native else _read_with_fsspec
    # Each shard decodes its own records, in the interleave's thread for that shard: with at least
    # one shard per core that is all the parallelism there is to have, and every stage after the
    # interleave costs a hand-over between threads per image (~20 us, 4% of a decode). With fewer
    # shards than cores, each shard decodes with a parallel map instead.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    # Shards prepared with --max_side under 2 x image_size hold no JPEG that decodes scaled.
    small = bool(manifest.get("max_side")) and manifest["max_side"] < 2 * image_size
    cycle_length = min(len(shards), max(MAX_PARALLEL_SHARDS, cores))

    def read_shard(number, url, records):
        return _read_shard(number, url, records, reader=reader, image_size=image_size, small=small,
                           num_classes=num_classes, offset=offset, stride=stride, skip=skip_corrupt_shards,
                           parallel=cycle_length < cores)

    examples = files.interleave(read_shard, cycle_length=cycle_length, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=not training)
    if training:
        examples = examples.shuffle(shuffle_buffer, seed=seed)
        if augment:
            # After the interleave: one stream of random draws for the whole run, not one per
            # opening of a shard (whose seeding would depend on how TensorFlow seeds functions
            # instantiated per interleave input).
            examples = examples.map(
                lambda position, example, number: (
                    position, (example[0], augment_image(example[1], seed), example[2]), number),
                num_parallel_calls=tf.data.AUTOTUNE)
    batches = examples.batch(batch_size).map(
        lambda positions, examples, numbers: _check_batch(
            positions, examples, numbers, urls=tf.constant(urls), offset=offset, stride=stride,
            num_classes=num_classes),
        num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        # Full batches only, but the last partial one is checked before it is dropped: it may hold
        # the only example that shows a shard ended early. (Not batch(drop_remainder=True).)
        batches = batches.filter(lambda images, labels: tf.shape(labels)[0] == batch_size).map(
            lambda images, labels: (tf.ensure_shape(images, [batch_size, image_size, image_size, 3]),
                                    tf.ensure_shape(labels, [batch_size])),
            num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)
