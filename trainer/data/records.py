"""TFRecord shards: building and parsing records, reading the framing, and naming damage.

- `PARSE_SPEC` is what the reader parses (`trainer.formats.tfrecord.make_example` writes the records),
  with the keys of `trainer.formats.manifest`.
- `read_shard_records` reads a shard through fsspec, checking both checksums of every record
  (`trainer.formats.tfrecord`): the fsspec read path of `trainer.data.pipeline`, and the diagnosis below.
- `DamageReport` is called (in Python, only on the failure path) when `trainer.data.pipeline` sees records
  of a shard go missing. It re-reads that shard to say exactly what is wrong (the shard and byte
  offset, or the image's file name) and raises, or, when skipping damaged data was asked for,
  logs and counts it. One report per run: what it skipped is logged and kept in history.json.
"""

import threading

import tensorflow as tf
from absl import logging

from trainer.data import decode
from trainer.errors import RetryableError, UserError, first_line
from trainer.formats import manifest, tfrecord
from trainer.infra import storage

# Object stores want few large requests: the fsspec path reads shards in blocks this big.
READ_BLOCK_BYTES = 16 * 2**20

PARSE_SPEC = {
    manifest.KEY_ENCODED: tf.io.FixedLenFeature([], tf.string),
    manifest.KEY_LABEL: tf.io.FixedLenFeature([], tf.int64),
}


def read_shard_records(url):
    """Yields the records of one shard at any location, through fsspec, in large blocks."""
    with storage.open_file(url, "rb", block_size=READ_BLOCK_BYTES) as stream:
        yield from tfrecord.iterate_records(stream, url)


# --- what went wrong in a shard --------------------------------------------------------------------


def _record_problem(record, index, url, num_classes):
    """Why a record that passed its checksums could not be used, or None if it can."""
    try:
        example = tf.train.Example.FromString(record)
    except Exception:  # protobuf's DecodeError; any parse failure means the same here
        return f"record {index} of shard {url} is not a tf.train.Example"
    feature = example.features.feature
    filename = feature[manifest.KEY_FILENAME].bytes_list.value[0].decode("utf-8", "replace") if (
        feature[manifest.KEY_FILENAME].bytes_list.value) else f"record {index}"
    for key in manifest.REQUIRED_KEYS:
        if key not in feature:
            return f"{filename} (record {index} of shard {url}) has no {key}"
    try:
        decode.decode_image(feature[manifest.KEY_ENCODED].bytes_list.value[0], 8)
    except (tf.errors.InvalidArgumentError, IndexError) as error:
        reason = "no image bytes" if isinstance(error, IndexError) else first_line(error).rstrip(".")
        return f"image {filename!r} (record {index} of shard {url}) does not decode: {reason}"
    label = feature[manifest.KEY_LABEL].int64_list.value
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


class DamageReport:
    """Names the damage behind missing records, and keeps what was skipped (thread-safe).

    `trainer.data.pipeline` calls `missing` from tf.data's threads. A gap met again on a later pass over
    the data (the next epoch) is not diagnosed again.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._diagnosed = {}  # (shard, first missing, next seen, stride) -> problems
        self._skipped = []

    def missing(self, url, expected, seen, *, stride, num_classes, skip):
        """Records `expected`, `expected + stride`, ... before `seen` of shard `url` never arrived.

        Returns:
          How many records were skipped (with `skip`).

        Raises:
          UserError: naming the shard and what is wrong with it (without `skip`).
          RetryableError: the records went missing but the shard re-reads intact (storage trouble).
        """
        url = url.decode() if isinstance(url, bytes) else url
        missing = list(range(int(expected), int(seen), stride))
        key = (url, int(expected), int(seen), stride)
        with self._lock:
            problems = self._diagnosed.get(key)
        repeated = problems is not None
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
        with self._lock:
            self._diagnosed[key] = problems
            self._skipped.append({"shard": url, "records": len(missing), "problems": problems})
        return len(missing)

    def skipped(self):
        """What was skipped so far, once per damaged place: [{"shard", "records", "problems"}]."""
        with self._lock:
            return [dict(entry) for entry in self._skipped]
