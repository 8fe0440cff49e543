"""Batch prediction: image files -> an exported model's serving signature -> CSV or JSONL rows.

Input is a folder or URL prefix (every image under it, recursively), a single image file, a
glob pattern (`*`, `?`, `[...]`; a path that exists is taken as it is, so a folder named
`photos [2024]` is a folder), or a Vertex AI label file (`.csv`/`.jsonl`, as `trainer prepare
--labels` takes: its images are scored, its labels ignored). Images are the files `trainer
prepare` takes (JPEG, PNG, BMP, GIF, WebP, TIFF, PNM, ICO; any case); other files are ignored. Each image goes through
the conversion `trainer prepare` applies (JPEGs as they are, other formats to PNG), and the
serving signature decodes and resizes it as training did: the model sees the pixels it was
trained on.

CSV cells that a spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, a tab or a
carriage return: a class or file named `=HYPERLINK(...)`) are written with a leading `'`.

The CSV has one row per image file, in sorted path order:

    path,predicted_class,prob_<class 0>,...,prob_<class C-1>,error

or with `top_k` (for many classes) `path,predicted_class,class_1,prob_1,...,class_K,prob_K,error`,
best first. JSONL is Vertex AI batch prediction's shape, one object per image:
`{"instance": {"content", "mimeType"}, "prediction": {"ids", "displayNames", "confidences"}}`,
best first (all classes, or `top_k`), or `"error": {"message"}` instead of a prediction.

A file that cannot be read or decoded is never dropped: its row has an empty predicted class and
probabilities and the reason in `error` (empty for every scored file), and it is logged.

Output is one file (`--output=preds.csv`, on this machine), or a folder of shards
`predictions-00000-of-000NN.csv` (or `.jsonl`): the images in sorted order cut into consecutive
work units (`IMAGES_PER_SHARD`), scored here (`runner="local"`) or on any Apache Beam runner
(trainer.serve.batch: RunInference). Each shard is written whole or not at all, then a marker of
its plan in OUTPUT/.predict/; a rerun after a kill writes only the missing shards, and the state
folder goes once every shard is there. A folder that holds a finished run needs `overwrite`.
"""

import concurrent.futures
import hashlib
import math
import sys

from absl import logging
from tqdm import tqdm

from trainer.errors import UserError, counted
from trainer.formats import imagefiles, modeldir
from trainer.formats.imagefiles import IMAGE_EXTENSIONS, is_hidden, is_image_name
from trainer.infra import folders, storage
from trainer.serve import shards

_GLOB_CHARACTERS = "*?["
FORMATS = ("csv", "jsonl")
LABEL_FILE_ENDINGS = (".csv", ".jsonl", ".json")
IMAGES_PER_SHARD = 10_000  # a work unit: minutes of a worker, a file of a few MB


def list_images(input_location, allow_http=False):
    """Sorted image locations under a folder or prefix, matching a glob, named by a label file, or
    the one file given.

    Raises:
      UserError: nothing there, no image files in it, or a label file with bad rows.
    """
    if input_location.lower().endswith(LABEL_FILE_ENDINGS) and not storage.isdir(input_location):
        from trainer.formats import labelfile

        return sorted(location for _, location, _, _ in labelfile.read_label_file(input_location, allow_http))
    if storage.isdir(input_location):
        # Streamed, and only the images' locations kept (~130 bytes each), sorted in place.
        prefix = storage.join(input_location, "")
        images = [prefix + relative for relative, _, _ in folders.iter_files(input_location)
                  if not is_hidden(relative) and is_image_name(relative)]
    elif storage.exists(input_location):
        images = [input_location] if is_image_name(input_location) else []
    elif any(character in input_location for character in _GLOB_CHARACTERS):
        # The files a pattern names are hidden by their own name (`*.jpg` may match `..jpg`).
        images = [location for location in folders.glob(input_location)
                  if not is_hidden(storage.basename(location)) and is_image_name(location)]
    else:
        raise UserError(f"input not found: {input_location}")
    images.sort()
    if not images:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {input_location}")
    return images


def _committed(output, entries):
    """Names of the shards already written for exactly these plan lines (a resumed run)."""
    def done(entry):
        name, digest, *_ = entry
        try:
            marker = storage.read_json(shards.state_location(output, name + ".json"))
            return name if marker.get("plan") == digest and storage.exists(storage.join(output, name)) else None
        except (FileNotFoundError, ValueError):
            return None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return {name for name in pool.map(done, entries) if name}


def _shard_files(output):
    """`(prediction shards at output, whether an unfinished run's state folder is there)`."""
    try:
        names = [name for name, _ in folders.list_files(output)]
    except FileNotFoundError:
        return [], False
    unfinished = any(name.startswith(shards.STATE_FOLDER + "/") for name in names)
    return [name for name in names if name.startswith("predictions-") and "/" not in name], unfinished


def _score_all(scorer, locations, batch_size, progress):
    """`(index, probabilities, error)` of every location, the progress bar following."""
    for result in scorer.score_all(locations, batch_size):
        progress.update(1)
        yield result


def run_local(output, entries, model_url, max_image_bytes, batch_size, total):
    """Scores each shard of `entries` in this process (the model loaded once)."""
    scorer = shards.Scorer(model_url, max_image_bytes)
    with tqdm(total=total, unit="img", desc="predict", file=sys.stderr) as progress:
        for _, digest, offset, length in entries:
            task = shards.read_task(output, offset, length)
            shards.commit_shard(output, task, digest, _score_all(scorer, task["locations"], batch_size, progress),
                                scorer.class_names)


def predict(model_url, input_location, output_url, batch_size=64, max_image_bytes=imagefiles.MAX_IMAGE_BYTES,
            output_format="csv", top_k=0, runner="local", pipeline_args=(), num_shards=None, overwrite=False,
            allow_http=False):
    """Scores every image at `input_location` with the exported model; writes the rows.

    Args:
      model_url: an export folder written by `trainer.train.export.export_model` (local or URL).
      input_location: a folder or URL prefix, a glob pattern, one image file, or a label file.
      output_url: a file (`.csv`/`.jsonl`: one file, `runner="local"` only) or a folder of shards.
      batch_size: images per call of the serving signature.
      max_image_bytes: a larger image file gets its row with the reason; no read goes further.
      output_format: "csv" or "jsonl" (Vertex AI batch prediction's shape); a file's ending decides.
      top_k: 0 for every class's probability, else the best `top_k` classes.
      runner: "local", or an Apache Beam runner (DirectRunner, DataflowRunner, ...).
      pipeline_args: Beam's pipeline options, for a Beam runner.
      num_shards: shards of a folder output (default: one per IMAGES_PER_SHARD images).
      overwrite: replace a finished run's shards (a file output is always replaced).
      allow_http: a label file may name http(s) images.

    Returns:
      The number of rows written (one per image file, including files that failed).

    Raises:
      UserError: missing model or input, no image files, bad options, a finished run at
        `output_url` without `overwrite`.
    """
    if batch_size < 1 or max_image_bytes < 1:
        raise UserError(f"--batch_size and --max_image_bytes must be at least 1, got {batch_size} and "
                        f"{max_image_bytes}")
    if top_k < 0 or (num_shards is not None and num_shards < 1):
        raise UserError(f"--top_k must be at least 0 and --num_shards at least 1, got {top_k} and {num_shards}")
    if output_format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if modeldir.is_tflite(model_url):
        raise UserError(f"{model_url} is a TensorFlow Lite file, which takes decoded pixels: trainer predict scores "
                        "an export's image-bytes signature (--model=JOB_DIR/model); score a .tflite file on a split "
                        "with `trainer evaluate --model=FILE.tflite`")
    single = output_url.lower().endswith(tuple(f".{name}" for name in FORMATS))
    if single:
        ending = output_url.lower().rsplit(".", 1)[1]
        if output_format != "csv" and output_format != ending:  # (csv is the default: the ending decides)
            raise UserError(f"--format={output_format} but --output ends in .{ending}: give a .{output_format} file "
                            "or a folder")
        output_format = ending
    if runner != "local":
        from trainer.infra import beam

        beam.options(runner, pipeline_args)  # a missing Beam or a bad option answers before any work
        if single:
            raise UserError(f"--runner={runner} writes a folder of shards: give --output a folder, not a "
                            f"{output_format} file")
    elif pipeline_args:
        raise UserError(f"pipeline options ({pipeline_args[0]} ...) are for a Beam --runner, not --runner=local")
    storage.check_writable(output_url)
    if not modeldir.is_complete(model_url):
        raise UserError(f"no exported model at {model_url} (expected {modeldir.METADATA_FILE} and "
                        f"{modeldir.SAVED_MODEL_FILE})")
    existing, unfinished = ([], False) if single else _shard_files(output_url)
    if existing and not unfinished and not overwrite:
        raise UserError(f"{output_url} already holds predictions ({existing[0]}, ...); pass --overwrite to "
                        "replace them")
    class_names = shards.read_class_names(model_url)
    locations = list_images(input_location, allow_http)
    logging.info("Scoring %d images from %s with %s (classes %s)", len(locations), input_location, model_url,
                 ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else ""))
    if single:
        return _predict_to_file(model_url, locations, output_url, output_format, top_k, batch_size,
                                max_image_bytes, class_names)
    count = max(1, min(len(locations), num_shards or math.ceil(len(locations) / IMAGES_PER_SHARD)))
    names = {shards.shard_name(index, count, output_format) for index in range(count)}
    if overwrite:
        storage.remove(shards.state_location(output_url), recursive=True)
    for name in existing:  # --overwrite's, or an earlier plan's (another shard count): only our own files go
        if overwrite or name not in names:
            storage.remove(storage.join(output_url, name))
    settings = {"model": model_url, "format": output_format, "top_k": top_k, "max_image_bytes": max_image_bytes}
    entries, offset = [], 0
    with storage.open_file(shards.state_location(output_url, shards.PLAN_NAME), "wb") as handle:
        for name, line in shards.plan_lines(locations, settings, count):
            handle.write(line)
            entries.append((name, hashlib.sha256(line).hexdigest(), offset, len(line)))
            offset += len(line)
    done = _committed(output_url, entries)
    if done:
        logging.info("resuming: %d of %s already written", len(done), counted(count, "shard"))
    todo = [entry for entry in entries if entry[0] not in done]
    if todo and runner == "local":
        sizes = {name: (index + 1) * len(locations) // count - index * len(locations) // count
                 for index, (name, *_) in enumerate(entries)}
        run_local(output_url, todo, model_url, max_image_bytes, batch_size, sum(sizes[name] for name, *_ in todo))
    elif todo:
        from trainer.serve import batch

        batch.run(output_url, todo, model_url, max_image_bytes, batch_size, runner, pipeline_args)
    reports = [storage.read_json(shards.state_location(output_url, name + ".json")) for name, *_ in entries]
    storage.remove(shards.state_location(output_url), recursive=True)  # finished: every shard is there
    failures = sum(report["failures"] for report in reports)
    logging.info("wrote %s in %s to %s (%s could not be scored)", counted(len(locations), "prediction"),
                 counted(count, "shard"), output_url, counted(failures, "file"))
    return len(locations)


def _predict_to_file(model_url, locations, output_url, output_format, top_k, batch_size, max_image_bytes,
                     class_names):
    """One file, scored here: today's `trainer predict --output=preds.csv`."""
    scorer = shards.Scorer(model_url, max_image_bytes)
    lines, failures = [shards.header(class_names, output_format, top_k)], 0
    with tqdm(total=len(locations), unit="img", desc="predict", file=sys.stderr) as progress:
        for index, probabilities, error in _score_all(scorer, locations, batch_size, progress):
            if error:
                failures += 1
                logging.warning("%s: %s", locations[index], error)
            lines.append(shards.format_row(locations[index], class_names, probabilities, error, output_format, top_k))
    storage.write_text(output_url, "".join(lines))
    logging.info("wrote %s to %s (%s could not be scored)", counted(len(locations), "prediction"), output_url,
                 counted(failures, "file"))
    return len(locations)
