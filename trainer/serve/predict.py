"""Batch prediction: image files -> an exported model's serving signature -> a CSV.

Input is a folder or URL prefix (every image under it, recursively), a single image file, or a
glob pattern (`*`, `?`, `[...]`; a path that exists is taken as it is, so a folder named
`photos [2024]` is a folder). Images are the files `trainer prepare` takes (trainer.prepare.plan: JPEG,
PNG, BMP, GIF, WebP, TIFF, PNM, ICO; any case); other files are ignored. Each image goes through
the conversion `trainer prepare` applies (JPEGs as they are, other formats to PNG), and the
serving signature decodes and resizes it as training did: the model sees the pixels it was
trained on.

CSV cells that a spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, a tab or a
carriage return: a class or file named `=HYPERLINK(...)`) are written with a leading `'`.

The CSV has one row per image file, in sorted path order:

    path,predicted_class,prob_<class 0>,...,prob_<class C-1>,error

A file that cannot be read or decoded is never dropped: its row has an empty predicted class and
probabilities and the reason in `error` (empty for every scored file), and it is logged.
"""

import concurrent.futures
import csv
import io
import sys

import numpy as np
import tensorflow as tf
from absl import logging
from tqdm import tqdm

from trainer.errors import RetryableError, UserError, counted, first_line
from trainer.formats import imagefiles, modeldir
from trainer.formats.imagefiles import IMAGE_EXTENSIONS, is_hidden, is_image_name
from trainer.infra import folders, storage
from trainer.serve.load import load_model

_GLOB_CHARACTERS = "*?["
_READ_THREADS = 8  # object-store reads are latency-bound: overlap them
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def list_images(input_location):
    """Sorted image locations under a folder or prefix, matching a glob, or the one file given.

    Raises:
      UserError: nothing there, or no image files in it.
    """
    if storage.isdir(input_location):
        found = [storage.join(input_location, *relative.split("/"))
                 for relative, _ in folders.list_files(input_location) if not is_hidden(relative)]
    elif storage.exists(input_location):
        found = [input_location]
    elif any(character in input_location for character in _GLOB_CHARACTERS):
        # The files a pattern names are hidden by their own name (`*.jpg` may match `..jpg`).
        found = [location for location in folders.glob(input_location) if not is_hidden(storage.basename(location))]
    else:
        raise UserError(f"input not found: {input_location}")
    images = sorted(location for location in found if is_image_name(location))
    if not images:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {input_location}")
    return images


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


def _format_row(location, class_names, probabilities, error):
    if probabilities is None:
        return [location, ""] + [""] * len(class_names) + [error]
    predicted = class_names[int(np.argmax(probabilities))]
    return [location, predicted] + [f"{float(value):.6f}" for value in probabilities] + [""]


def predict(model_url, input_location, output_url, batch_size=64, max_image_bytes=imagefiles.MAX_IMAGE_BYTES):
    """Scores every image at `input_location` with the exported model; writes the CSV.

    Args:
      model_url: an export folder written by `trainer.train.export.export_model` (local or URL).
      input_location: a folder or URL prefix, a glob pattern, or one image file.
      output_url: the CSV to write (local path or URL).
      batch_size: images per call of the serving signature.
      max_image_bytes: a larger image file gets its row with the reason; no read goes further.

    Returns:
      The number of rows written (one per image file, including files that failed).

    Raises:
      UserError: missing model or input, no image files, batch_size < 1.
    """
    if batch_size < 1 or max_image_bytes < 1:
        raise UserError(f"--batch_size and --max_image_bytes must be at least 1, got {batch_size} and "
                        f"{max_image_bytes}")
    if modeldir.is_tflite(model_url):
        raise UserError(f"{model_url} is a TensorFlow Lite file, which takes decoded pixels: trainer predict scores "
                        "an export's image-bytes signature (--model=JOB_DIR/model); score a .tflite file on a split "
                        "with `trainer evaluate --model=FILE.tflite`")
    storage.check_writable(output_url)
    loaded, metadata = load_model(model_url)
    serve = loaded.signatures[modeldir.SERVING_SIGNATURE]
    class_names = list(metadata["classes"])
    locations = list_images(input_location)
    logging.info("Scoring %d images from %s with %s (%s, classes %s)", len(locations), input_location,
                 model_url, metadata.get("backbone") or "model", ", ".join(class_names))
    rows, failures = [], 0
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool, \
            tqdm(total=len(locations), unit="img", desc="predict", file=sys.stderr) as progress:
        for start in range(0, len(locations), batch_size):
            batch = locations[start:start + batch_size]
            contents = list(pool.map(lambda location: _read(location, max_image_bytes), batch))
            readable = [index for index, (content, _) in enumerate(contents) if content is not None]
            scores = dict(zip(readable, _score(serve, [contents[index][0] for index in readable]), strict=True))
            for index, location in enumerate(batch):
                probabilities, error = scores.get(index, (None, contents[index][1]))
                if error:
                    failures += 1
                    logging.warning("%s: %s", location, error)
                rows.append(_format_row(location, class_names, probabilities, error))
            progress.update(len(batch))
    _write_csv(output_url, class_names, rows)
    logging.info("wrote %s to %s (%s could not be scored)", counted(len(rows), "prediction"), output_url,
                 counted(failures, "file"))
    return len(rows)


def _cell(value):
    """A CSV cell a spreadsheet shows as text, never runs as a formula (OWASP's CSV injection)."""
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_STARTS) else value


def _write_csv(output_url, class_names, rows):
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([_cell(name) for name in ["path", "predicted_class", *(f"prob_{name}" for name in class_names),
                                              "error"]])
    writer.writerows([_cell(value) for value in row] for row in rows)
    storage.write_text(output_url, text.getvalue())
