"""The unit of work of `trainer predict`: one shard of images, scored and committed: the same
functions on every runner (trainer.serve.predict here, trainer.serve.batch on Beam).

A shard's plan line (OUTPUT/.predict/plan.jsonl) names its images and the settings of its rows.
`Scorer` reads images (each through the conversion `trainer prepare` applies, so the model sees
the pixels it was trained on) and scores them in batches; `commit_shard` writes the shard's rows
in order, whole or not at all, then its marker OUTPUT/.predict/<shard>.json (the digest of its
plan line: a rerun keeps it).
"""

import concurrent.futures
import csv
import io
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.errors import RetryableError, UserError, first_line
from trainer.formats import imagefiles, modeldir
from trainer.infra import storage
from trainer.serve.load import load_model

_READ_THREADS = 32  # object-store reads are latency-bound: overlap them
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
STATE_FOLDER = ".predict"
PLAN_NAME = "plan.jsonl"
MIME_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jpe": "image/jpeg", ".jfif": "image/jpeg",
              ".png": "image/png", ".bmp": "image/bmp", ".gif": "image/gif", ".webp": "image/webp",
              ".tif": "image/tiff", ".tiff": "image/tiff", ".ico": "image/vnd.microsoft.icon"}


def _read(location, max_bytes=imagefiles.MAX_IMAGE_BYTES):
    """(the bytes training would have stored, None), or (None, reason) for a file that cannot be
    read, is larger than `max_bytes` (no more is read), or is not a whole image."""
    try:
        data = storage.read_many([location], max_bytes)[0]
    except RetryableError:
        raise
    except (OSError, UserError) as error:
        return None, f"cannot read: {error}"
    if data is None:
        return None, "cannot read: the file disappeared"
    if reason := imagefiles.too_large(data, max_bytes):
        return None, reason
    encoded = imagefiles.encode_or_skip(data)
    if "skip" in encoded:
        return None, f"cannot decode: {encoded['skip']}"
    return encoded["encoded"], None


def read_class_names(model_url):
    return list(storage.read_json(modeldir.metadata_url(model_url))["classes"])


class Scorer:
    """An export's serving signature, loaded once, scoring batches of image files."""

    def __init__(self, model_url, max_image_bytes=imagefiles.MAX_IMAGE_BYTES):
        loaded, metadata = load_model(model_url)
        self._loaded = loaded  # the signature needs its SavedModel kept alive
        self.serve = loaded.signatures[modeldir.SERVING_SIGNATURE]
        self.class_names = list(metadata["classes"])
        self.max_image_bytes = max_image_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS)

    def read(self, locations):
        """`[(bytes or None, error or None)]` of each location, read _READ_THREADS at a time."""
        return list(self._pool.map(lambda location: _read(location, self.max_image_bytes), locations))

    def score_read(self, contents):
        """`[(probabilities or None, error or None)]` of `read`'s results, in order."""
        readable = [index for index, (content, _) in enumerate(contents) if content is not None]
        scores = dict(zip(readable, _score(self.serve, [contents[index][0] for index in readable]), strict=True))
        return [scores.get(index, (None, contents[index][1])) for index in range(len(contents))]

    def score(self, locations):
        """`[(probabilities or None, error or None)]`, one per location, in order."""
        return self.score_read(self.read(locations))

    def score_all(self, locations, batch_size):
        """`(index, probabilities, error)` of every location, `batch_size` at a time, the next batch
        read while this one is scored (object-store latency hides behind the model)."""
        starts = range(0, len(locations), batch_size)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as ahead:
            pending = ahead.submit(self.read, locations[:batch_size]) if locations else None
            for start in starts:
                contents = pending.result()
                if start + batch_size < len(locations):
                    pending = ahead.submit(self.read, locations[start + batch_size:start + 2 * batch_size])
                yield from ((start + index, *scored) for index, scored in enumerate(self.score_read(contents)))


def _score(serve, contents):
    """Probabilities for each encoded image, or the decoding error for the ones that fail.

    The whole batch goes through the signature at once; if any image in it cannot be decoded,
    each image is scored alone so only the bad ones get an error.
    """
    if not contents:
        return []
    try:
        outputs = serve(image_bytes=tf.constant(contents, dtype=tf.string))
        return [(row, None) for row in outputs["probabilities"].numpy()]
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
        if len(contents) == 1:
            return [(None, f"cannot decode: {first_line(error)}")]
    return [result for content in contents for result in _score(serve, [content])]


# --- rows ---------------------------------------------------------------------------------------------


def _best(probabilities, top_k):
    order = np.argsort(-np.asarray(probabilities), kind="stable")
    return order[:top_k] if top_k else order


def header(class_names, output_format="csv", top_k=0):
    """The CSV's first line (JSONL has none)."""
    if output_format == "jsonl":
        return ""
    names = ([name for rank in range(1, top_k + 1) for name in (f"class_{rank}", f"prob_{rank}")] if top_k
             else [f"prob_{name}" for name in class_names])
    return _csv_line(["path", "predicted_class", *names, "error"])


def format_row(location, class_names, probabilities, error, output_format="csv", top_k=0):
    """One image's line (CSV or Vertex JSONL), with its newline."""
    if output_format == "jsonl":
        instance = {"content": location, "mimeType": MIME_TYPES.get(os.path.splitext(location)[1].lower(),
                                                                    "application/octet-stream")}
        if probabilities is None:
            return json.dumps({"instance": instance, "error": {"message": error}}) + "\n"
        best = _best(probabilities, top_k)
        return json.dumps({"instance": instance, "prediction": {
            "ids": [str(int(index)) for index in best], "displayNames": [class_names[index] for index in best],
            "confidences": [round(float(probabilities[index]), 6) for index in best]}}) + "\n"
    width = 2 * top_k if top_k else len(class_names)
    if probabilities is None:
        return _csv_line([location, "", *[""] * width, error])
    best = _best(probabilities, top_k)
    if top_k:
        values = [value for index in best for value in (class_names[index], f"{float(probabilities[index]):.6f}")]
        values += [""] * (width - len(values))  # fewer classes than top_k
    else:
        values = [f"{float(value):.6f}" for value in probabilities]
    return _csv_line([location, class_names[int(best[0])], *values, ""])


def _cell(value):
    """A CSV cell a spreadsheet shows as text, never runs as a formula (OWASP's CSV injection)."""
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def _csv_line(values):
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerow([_cell(value) for value in values])
    return text.getvalue()


# --- shards: the work units ---------------------------------------------------------------------------


def shard_name(index, count, output_format):
    return f"predictions-{index:05d}-of-{count:05d}.{output_format}"


def state_location(output, *parts):
    return storage.join(output, STATE_FOLDER, *parts)


def plan_lines(locations, settings, count):
    """`(name, line)` of each shard: the sorted images cut into `count` consecutive pieces, and the
    settings that make its rows (model, format, top_k, ...), as canonical JSON."""
    for index in range(count):
        name = shard_name(index, count, settings["format"])
        pieces = locations[index * len(locations) // count:(index + 1) * len(locations) // count]
        yield name, json.dumps({"name": name, "locations": pieces, **settings}, sort_keys=True,
                               separators=(",", ":")).encode() + b"\n"


def read_task(output, offset, length):
    return json.loads(storage.read_range(state_location(output, PLAN_NAME), offset, offset + length))


def commit_shard(output, task, digest, results, class_names):
    """Writes one shard's rows (`results`: `(index, probabilities, error)` of each of its images) whole,
    then its marker. Returns the number of rows that could not be scored.

    Raises:
      RetryableError: the results are not exactly one per image of the shard (never written so).
    """
    results = sorted(results, key=lambda result: result[0])
    if [index for index, *_ in results] != list(range(len(task["locations"]))):
        raise RetryableError(f"{task['name']}: {len(results)} results for {len(task['locations'])} images; run the "
                             "same command again")
    lines = [header(class_names, task["format"], task["top_k"])]
    failures = 0
    for (_, probabilities, error), location in zip(results, task["locations"], strict=True):
        if error:
            failures += 1
            logging.warning("%s: %s", location, error)
        lines.append(format_row(location, class_names, probabilities, error, task["format"], task["top_k"]))
    storage.write_text(storage.join(output, task["name"]), "".join(lines))
    storage.write_json(state_location(output, task["name"] + ".json"),
                       {"plan": digest, "rows": len(results), "failures": failures})
    logging.info("wrote %s: %d rows (%d could not be scored)", task["name"], len(results), failures)
    return failures
