"""Image folders -> sharded TFRecords + `dataset.json` (`trainer prepare`).

The pipeline, top to bottom:
  1. list SRC (local folder or any URL), ignoring hidden files;
  2. tell the layout (class folders, split folders, or Kaggle's `cat.123.jpg` names);
  3. label every file, and give it a split: its folder for split_dirs, else a stable hash of its
     relative path, so reruns, other machines and added files never move a file;
  4. per split, a seeded stratified shuffle cut into n consecutive shards (classes spread evenly);
  5. worker processes read and fully decode every image once, re-encoding only what must be;
  6. the main process writes one shard at a time (local temp file, then copied to DST);
  7. `dataset.json` last: a folder without it is not a dataset.

Memory stays flat with the number of images: only the list of file names is held, and a bounded
window of images is in flight between the workers and the writer.
"""

import collections
import contextlib
import io
import math
import multiprocessing
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import tqdm
from absl import logging
from PIL import Image, ImageFile, UnidentifiedImageError

from trainer import plan, storage
from trainer.errors import UserError
from trainer.manifest import MANIFEST_NAME, SPLITS, new_manifest, shard_name

# Pillow's names for files whose bytes TensorFlow's JPEG decoder reads as they are (MPO: the
# multi-picture JPEG many cameras write; its first frame is a plain JPEG).
JPEG_FORMATS = ("JPEG", "MPO")
# Modes of a JPEG kept byte for byte: `decode_image(channels=3)` turns both into RGB.
KEPT_JPEG_MODES = ("RGB", "L")
CONVERTED_JPEG_QUALITY = 95  # CMYK/YCCK JPEGs: near-lossless, and still a JPEG
RESIZED_JPEG_QUALITY = 90  # --max_side: the point is to cut bytes and decode time
# Images in flight per worker process: enough to keep every core busy, bounded so memory is.
IN_FLIGHT_PER_WORKER = 4
# Skipped files listed one by one in the closing log (all of them are in dataset.json).
SKIPPED_LOGGED = 20

def prepare_dataset(source=None, output=None, layout="auto", val_fraction=0.15, test_fraction=0.15, split_seed=0,
                    shard_size_mb=100.0, num_shards=None, max_side=None, overwrite=False, workers=None,
                    labels=None, strict=False, allow_missing_classes=False):
    """Turns a folder of images, or a label file's images, into sharded TFRecords plus `dataset.json`.

    Args:
      source: folder of images, a local path or URL (`gs://bucket/prefix`, any fsspec URL).
      output: where the shards and `dataset.json` go, a local path or URL.
      layout: "auto", "class_dirs", "split_dirs" or "filename_prefix".
      val_fraction: share of images hashed into `val` (no split folders, no ML_USE).
      test_fraction: share of images hashed into `test` (no split folders, no ML_USE).
      split_seed: seed of the split hash and of the shuffle across shards.
      shard_size_mb: target shard size, estimated from the source bytes of each split.
      num_shards: shards per split (overrides shard_size_mb; at most one per image).
      max_side: re-encode images whose longer side exceeds this many pixels (None: never).
      overwrite: replace a dataset already at `output` (only its own files are removed).
      workers: decode/encode processes (default: all cores; 1: in this process).
      labels: instead of `source`, a Vertex AI CSV or JSONL label file (trainer.labelfile).
      strict: suspicious classes (trainer.plan.check_classes) are errors, not warnings.
      allow_missing_classes: a class with no training image is a warning, not an error.

    Returns:
      The manifest written to `output/dataset.json`, as a dict.

    Raises:
      UserError: bad options, missing source, unknown layout, too few classes, an empty class,
        bad label-file rows, nothing usable, or an existing dataset at `output` without `overwrite`.
    """
    started = time.monotonic()
    check_options(val_fraction, test_fraction, shard_size_mb, num_shards, max_side, workers)
    if (source is None) == (labels is None):
        raise UserError("give either --source (a folder of images) or --labels (a Vertex AI CSV/JSONL file)")
    workers = workers or os.cpu_count() or 1
    check_output(output, overwrite)
    origin, skipped, ignored, lines = source or labels, [], [], None
    if labels:
        from trainer import labelfile

        layout = "labels"
        rows = labelfile.read_label_file(labels)
        files, lines = plan.files_from_label_rows(rows), {location: line for line, location, _, _ in rows}
        logging.info("labels: %d images in %s (%d with their own split)", len(rows), labels,
                     sum(split is not None for *_, split in rows))
    else:
        images, ignored = plan.set_aside_non_images(plan.list_source(source, output))
        if not images:
            raise UserError(f"nothing to prepare: no image files in {source} ({len(ignored)} other files)")
        layout = plan.resolve_layout([entry[0] for entry in images], layout, source)
        files, skipped = plan.label_files(images, layout, source)
    classes = plan.find_classes(files, origin)
    files = plan.add_digests(files, lines=lines, origin=origin)
    files, duplicates = plan.assign_splits(files, val_fraction, test_fraction, split_seed)
    warnings = plan.check_classes(files, classes, strict=strict, allow_missing_classes=allow_missing_classes,
                                  conflicts=duplicates["conflicts"])
    shards = plan.plan_shards(files, split_seed, shard_size_mb, num_shards)
    _log_plan(output, layout, classes, shards, skipped, workers)
    if overwrite:
        remove_dataset(output)

    written = write_dataset(output, shards, classes, max_side, workers)
    undecodable = [{"file": entry["file"], "reason": entry["reason"]} for entry in written["skipped"]]
    skipped = sorted(skipped + undecodable, key=lambda entry: entry["file"])
    try:
        check_usable(written["splits"], classes, written["skipped"], origin, allow_missing_classes)
    except UserError:
        # Leave DST as it was: shards of a dataset that cannot be made are only clutter.
        for split in written["splits"].values():
            for shard in split["shards"]:
                storage.remove(storage.join(output, shard["file"]))
        raise

    manifest = new_manifest(
        source=origin, layout=layout, val_fraction=val_fraction, test_fraction=test_fraction,
        split_seed=split_seed, max_side=max_side, classes=classes, splits=written["splits"],
        image_stats=written["image_stats"], skipped=skipped, ignored=plan.ignored_summary(ignored),
        duplicates=duplicates, warnings=warnings, seconds=round(time.monotonic() - started, 2))
    storage.write_json(storage.join(output, MANIFEST_NAME), manifest)
    _log_summary(manifest, output)
    return manifest


def check_options(val_fraction, test_fraction, shard_size_mb, num_shards, max_side, workers):
    """Raises UserError for option values that cannot work."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:  # also catches NaN
            raise UserError(f"--{name} must be in [0, 1), got {value}")
    if not val_fraction + test_fraction < 1:
        raise UserError(f"--val_fraction + --test_fraction must be below 1 (nothing left to train on), "
                        f"got {val_fraction} + {test_fraction}")
    if not (shard_size_mb > 0 and math.isfinite(shard_size_mb)):
        raise UserError(f"--shard_size_mb must be a positive number, got {shard_size_mb}")
    for name, value in (("num_shards", num_shards), ("max_side", max_side), ("workers", workers)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


def check_output(output, overwrite):
    """Raises UserError when `output` cannot be written, or already holds a dataset and `overwrite`
    is off."""
    storage.check_writable(output)
    if storage.exists(storage.join(output, MANIFEST_NAME)) and not overwrite:
        raise UserError(f"{output} already holds a dataset ({MANIFEST_NAME}); pass --overwrite to replace it")


def remove_dataset(output):
    """Removes the dataset at `output`: its manifest first, then the shards that manifest names.

    Nothing else is touched: other files in the folder are not ours to delete.
    """
    location = storage.join(output, MANIFEST_NAME)
    if not storage.exists(location):
        return
    try:
        old = storage.read_json(location)
        names = [shard["file"] for split in old["splits"].values() for shard in split["shards"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        logging.warning("the old %s is unreadable: removing only it", location)
        names = []
    # The manifest goes first: should we stop half-way, the folder is no longer a (broken) dataset.
    storage.remove(location)
    removed = 0
    for name in names:
        # Only plain shard names next to the manifest, whatever an edited manifest may say.
        if isinstance(name, str) and name.endswith(".tfrecord") and "/" not in name and "\\" not in name:
            storage.remove(storage.join(output, name))
            removed += 1
    logging.info("--overwrite: removed the old dataset at %s (%s and %d shards)", output, MANIFEST_NAME, removed)


# ----------------------------------------------------------------------------------------------
# Decoding and encoding: runs in the worker processes.


def _init_worker():
    # A truncated image must fail, not come back padded with grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def fit_within(size, max_side):
    """`(width, height)` scaled so the longer side is `max_side`, keeping the aspect ratio."""
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image):
    """Any Pillow image as 8-bit RGB (alpha dropped, as `tf.io.decode_image(channels=3)` does)."""
    if image.mode.startswith("I") or image.mode == "F":
        # Pillow's I/I;16 -> L conversion clips at 255 instead of scaling 16-bit values down.
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _encoded(image, image_format, quality=None):
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, "PNG")
    return {"encoded": buffer.getvalue(), "format": image_format,
            "width": image.size[0], "height": image.size[1]}


def encode_image(data, max_side=None):
    """Fully decodes one image and returns what its record stores.

    Original bytes are kept for RGB or greyscale JPEGs within `max_side`; other JPEGs (CMYK) become
    RGB JPEGs, other formats lossless RGB PNGs, and images over `max_side` resized RGB JPEGs.

    Returns:
      dict with `encoded` (bytes), `format` ("jpeg" or "png"), `width`, `height` of the stored image.

    Raises:
      Whatever Pillow raises for a file it cannot fully decode.
    """
    image = Image.open(io.BytesIO(data))
    target = fit_within(image.size, max_side) if max_side and max(image.size) > max_side else None
    if target and image.format in JPEG_FORMATS:
        # Decode at 1/2, 1/4 or 1/8 scale (still at least `target`): several times faster.
        image.draft(None, target)
    image.load()  # the full decode: truncated or corrupt data fails here
    if target is None and image.format in JPEG_FORMATS and image.mode in KEPT_JPEG_MODES:
        return {"encoded": data, "format": "jpeg", "width": image.size[0], "height": image.size[1]}
    rgb = to_rgb(image)
    if target:
        return _encoded(rgb.resize(target, Image.Resampling.LANCZOS), "jpeg", RESIZED_JPEG_QUALITY)
    if image.format in JPEG_FORMATS:
        return _encoded(rgb, "jpeg", CONVERTED_JPEG_QUALITY)
    return _encoded(rgb, "png")


def _skip_reason(error):
    if isinstance(error, UnidentifiedImageError):
        return "not an image (or an unreadable header)"
    if isinstance(error, Image.DecompressionBombError):
        return "too many pixels (Pillow's decompression-bomb limit)"
    message = " ".join(str(error).split())[:200]
    if "truncated" in message:
        return "truncated image"
    return f"corrupt image ({type(error).__name__}: {message})"


def process_file(task):
    """Worker: reads one file and encodes it, or says why it is skipped.

    Args:
      task: `(location, max_side)`.

    Returns:
      `encode_image`'s dict, or `{"skip": reason}`. Storage errors are raised, not skipped: an
      unreachable bucket is not a bad image.
    """
    location, max_side = task
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        return {"skip": "file disappeared while preparing"}
    return encode_or_skip(data, max_side)


def encode_or_skip(data, max_side=None):
    """`encode_image(data, max_side)`, or `{"skip": reason}` for data that is not a whole image.
    Batch prediction calls it too, so that a model is given the very bytes training stored."""
    if not data:
        return {"skip": "empty file"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd EXIF, palettes, big images
            return encode_image(data, max_side)
    except Exception as error:  # Pillow raises many types for bad data; the reason names it
        return {"skip": _skip_reason(error)}


def imap_bounded(pool, function, items, window):
    """`pool.imap` with at most `window` items in flight, results in order.

    `Pool.imap` reads its whole input ahead and keeps every finished result until it is read, so
    with a slow consumer memory grows with the number of images. Here it cannot.
    """
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(function, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@contextlib.contextmanager
def image_mapper(workers):
    """A `map(function, items)` that runs on `workers` processes (in this process for 1)."""
    if workers == 1:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        _init_worker()
        try:
            yield map
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
        return
    # spawn, not fork: the parent may hold TensorFlow's and gcsfs's threads, which fork does not
    # carry over safely.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        yield lambda function, items: imap_bounded(pool, function, items, workers * IN_FLIGHT_PER_WORKER)


# ----------------------------------------------------------------------------------------------
# Writing: runs in the main process.


def _make_example(*args):
    # Imported here: a run that stops early (bad options, nothing usable) never loads TensorFlow.
    from trainer import records

    return records.make_example(*args)


class ShardWriter:
    """Writes one shard to a local temporary file, then copies it to its place at DST.

    TFRecordWriter needs a file system TensorFlow can reach (an emulator or fsspec URL is not one);
    a local temporary file works for every DST and bounds local disk to one shard.
    """

    def __init__(self, output, name, temp_dir):
        self.name = name
        self.location = storage.join(output, name)
        self.temporary = os.path.join(temp_dir, name)
        self.writer = None  # opened by the first record: a run with nothing usable skips TensorFlow
        self.records = 0

    def write(self, record):
        if self.writer is None:
            import tensorflow as tf

            self.writer = tf.io.TFRecordWriter(self.temporary)
        self.writer.write(record)
        self.records += 1

    def close(self):
        """Finishes the shard; returns its manifest entry `{"file", "records", "bytes"}`."""
        if self.writer is None:
            with open(self.temporary, "wb"):  # a TFRecord file of no records is an empty file
                pass
        else:
            self.writer.close()
        size = os.path.getsize(self.temporary)
        storage.copy(self.temporary, self.location)
        os.remove(self.temporary)
        return {"file": self.name, "records": self.records, "bytes": size}


class SizeStats:
    """Running min / max / mean of stored image widths and heights (constant memory)."""

    def __init__(self):
        self.count = 0
        self.sums = {"width": 0, "height": 0}
        self.low = {"width": math.inf, "height": math.inf}
        self.high = {"width": 0, "height": 0}

    def add(self, width, height):
        self.count += 1
        for key, value in (("width", width), ("height", height)):
            self.sums[key] += value
            self.low[key] = min(self.low[key], value)
            self.high[key] = max(self.high[key], value)

    def as_dict(self):
        result = {"count": self.count}
        for key in ("width", "height"):
            result[key] = ({"min": self.low[key], "max": self.high[key],
                            "mean": round(self.sums[key] / self.count, 2)} if self.count else None)
        return result


def write_dataset(output, shards, classes, max_side, workers):
    """Decodes every planned file in parallel and writes the shards one at a time, in order.

    Returns:
      dict with `splits` (the manifest's per-split entries), `image_stats`, and `skipped`
      (`{"file", "reason", "class"}` of each file that did not decode).
    """
    label_of = {name: index for index, name in enumerate(classes)}
    order = [(split, index, file) for split in SPLITS
             for index, shard in enumerate(shards[split]) for file in shard]
    tasks = ((file.location, max_side) for _, _, file in order)
    splits = {split: {"count": 0, "class_counts": dict.fromkeys(classes, 0), "shards": []}
              for split in SPLITS}
    stats, skipped = SizeStats(), []
    current, writer = None, None
    interactive = sys.stderr.isatty()
    with (tempfile.TemporaryDirectory(prefix="trainer-prepare-") as temp_dir,
          image_mapper(workers) as map_images,
          tqdm.tqdm(total=len(order), desc="encoding", unit="img", file=sys.stderr,
                    mininterval=0.5 if interactive else 30) as progress):
        for (split, index, file), result in zip(order, map_images(process_file, tasks), strict=True):
            if (split, index) != current:
                if writer:
                    splits[current[0]]["shards"].append(writer.close())
                writer = ShardWriter(output, shard_name(split, index, len(shards[split])), temp_dir)
                current = (split, index)
            progress.update()
            if "skip" in result:
                skipped.append({"file": file.path, "reason": result["skip"], "class": file.label})
                progress.set_postfix(skipped=len(skipped), refresh=False)
                continue
            writer.write(_make_example(result["encoded"], result["format"], label_of[file.label],
                                       file.label, file.path, result["height"], result["width"]))
            splits[split]["count"] += 1
            splits[split]["class_counts"][file.label] += 1
            stats.add(result["width"], result["height"])
        if writer:
            splits[current[0]]["shards"].append(writer.close())
    return {"splits": splits, "image_stats": stats.as_dict(), "skipped": skipped}


def _describe_reasons(skipped):
    counts = collections.Counter(entry["reason"] for entry in skipped)
    return ", ".join(f"{count} {reason}" for reason, count in counts.most_common(3))


def check_usable(splits, classes, skipped, source, allow_missing_classes=False):
    """Raises UserError when no image, or no image of some class, survived decoding, or (unless
    `allow_missing_classes`) no training image of some class did.

    Args:
      splits: the manifest's per-split entries.
      classes: the class names.
      skipped: `{"file", "reason", "class"}` of every file that did not decode.
      source: SRC, for the message.
      allow_missing_classes: a class may lack training images.
    """
    totals = {name: sum(split["class_counts"][name] for split in splits.values()) for name in classes}
    if not any(totals.values()):
        raise UserError(f"nothing usable in {source}: all {len(skipped)} files were skipped "
                        f"({_describe_reasons(skipped)})")
    empty = [name for name in classes if not totals[name]]
    if empty:
        lost = [entry for entry in skipped if entry["class"] == empty[0]]
        raise UserError(f"class {empty[0]!r} has no usable image: its {len(lost)} files were skipped "
                        f"({_describe_reasons(lost)})")
    untrained = [name for name in classes if not splits["train"]["class_counts"][name]]
    if untrained and not allow_missing_classes:
        raise UserError(f"class {untrained[0]!r} has no training image left after skipping the files that do not "
                        "decode; add training images, or pass --allow_missing_classes")


# ----------------------------------------------------------------------------------------------
# Logs.


def _megabytes(count):
    return f"{count / 2**20:.1f} MB"


def _log_plan(output, layout, classes, shards, skipped, workers):
    logging.info("classes (%d): %s", len(classes), ", ".join(classes))
    for split in SPLITS:
        files = sum(len(shard) for shard in shards[split])
        size = sum(file.size for shard in shards[split] for file in shard)
        logging.info("%s: %d files, %s of source, %d shards", split, files, _megabytes(size),
                     len(shards[split]))
    if skipped:
        logging.info("%d files do not fit the %s layout and are skipped", len(skipped), layout)
    logging.info("decoding with %d worker process%s; writing to %s", workers,
                 "" if workers == 1 else "es", output)


def _log_summary(manifest, output):
    total = sum(split["count"] for split in manifest["splits"].values())
    logging.info("prepared %d images in %d classes from %s into %s in %.1f s", total,
                 len(manifest["classes"]), manifest["source"], output, manifest["seconds"])
    for name, split in manifest["splits"].items():
        counts = ", ".join(f"{label} {count}" for label, count in split["class_counts"].items())
        size = sum(shard["bytes"] for shard in split["shards"])
        logging.info("  %-5s %6d images (%s) in %d shards, %s", name, split["count"], counts,
                     len(split["shards"]), _megabytes(size))
    skipped = manifest["skipped"]
    if skipped:
        logging.info("skipped %d files: %s", len(skipped), _describe_reasons(skipped))
        for entry in skipped[:SKIPPED_LOGGED]:
            logging.info("  skipped %s: %s", entry["file"], entry["reason"])
        if len(skipped) > SKIPPED_LOGGED:
            logging.info("  ... and %d more (all listed in %s)", len(skipped) - SKIPPED_LOGGED, MANIFEST_NAME)
    stats = manifest["image_stats"]
    logging.info("stored image sizes: width %d-%d (mean %.0f), height %d-%d (mean %.0f)",
                 stats["width"]["min"], stats["width"]["max"], stats["width"]["mean"],
                 stats["height"]["min"], stats["height"]["max"], stats["height"]["mean"])
