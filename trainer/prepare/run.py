"""Image folders -> sharded TFRecords + `dataset.json` (`trainer prepare`).

The pipeline, top to bottom:
  1. list SRC (local folder or any URL), ignoring hidden files;
  2. tell the layout (class folders, split folders, or Kaggle's `cat.123.jpg` names);
  3. label every file, and give it a split: its folder for split_dirs, else a stable hash of its
     content, so reruns, other machines and added files never move a file (trainer.prepare.plan);
  4. per split, a seeded stratified shuffle cut into n consecutive shards (classes spread evenly);
  5. every shard is one unit of work (trainer.prepare.shards): read its images with many requests in
     flight, decode each once, write and commit the shard and its report. The runner is a local
     process pool or any Apache Beam runner (Dataflow for large sets); a rerun after a kill writes
     only the shards not yet committed;
  6. `dataset.json` last, from the shards' reports: a folder without it is not a dataset.

Memory stays flat with the number of images: the plan is made in a table on the launcher's disk
(trainer.prepare.catalog) and streamed to OUTPUT/.prepare/plan.jsonl a shard at a time, and each
shard keeps a bounded window of images in flight.
"""

import collections
import math
import os
import sys
import time

import tqdm
from absl import logging

from trainer.errors import UserError, counted
from trainer.formats import imagefiles
from trainer.formats.manifest import (
    CLASS_COUNTS_PICTURE,
    MANIFEST_NAME,
    SAMPLES_PICTURE,
    SPLITS,
    new_manifest,
    shard_name,
)
from trainer.infra import beam, storage
from trainer.prepare import catalog, plan, preview, runners, shards

# Skipped files listed one by one in the closing log (all of them are in dataset.json).
SKIPPED_LOGGED = 20

def prepare_dataset(source=None, output=None, layout="auto", val_fraction=0.15, test_fraction=0.15, split_seed=0,
                    shard_size_mb=100.0, num_shards=None, max_side=None, overwrite=False, workers=None,
                    max_pixels=imagefiles.MAX_PIXELS, max_image_bytes=imagefiles.MAX_IMAGE_BYTES,
                    labels=None, strict=False, allow_missing_classes=False, runner="local", pipeline_args=(),
                    allow_http=False):
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
      max_pixels: skip images whose header declares more pixels than this (decompression bombs).
      max_image_bytes: skip images larger than this; no read goes further.
      overwrite: replace a dataset already at `output` (only its own files are removed).
      workers: decode/encode processes (default: all cores; 1: in this process).
      labels: instead of `source`, a Vertex AI CSV or JSONL label file (trainer.formats.labelfile).
      allow_http: a label file may name http(s) images (off: each is a request from where this runs).
      strict: suspicious classes (trainer.prepare.plan.check_classes) are errors, not warnings.
      allow_missing_classes: a class with no training image is a warning, not an error.
      runner: "local" (a process pool), or the name of an Apache Beam runner ("DirectRunner",
        "DataflowRunner", "FlinkRunner", ...).
      pipeline_args: Beam pipeline options for a Beam runner (`--project=...`, ...).

    Returns:
      The manifest written to `output/dataset.json`, as a dict.

    Raises:
      UserError: bad options, missing source, unknown layout, too few classes, an empty class,
        bad label-file rows, nothing usable, or an existing dataset at `output` without `overwrite`.
    """
    started = time.monotonic()
    check_options(val_fraction, test_fraction, shard_size_mb, num_shards, max_side, workers, max_pixels,
                  max_image_bytes)
    if runner != "local":
        beam.options(runner, pipeline_args)  # a missing Beam or a bad option answers before any work
    elif pipeline_args:
        raise UserError(f"pipeline options ({pipeline_args[0]} ...) are for a Beam --runner, not --runner=local")
    if (source is None) == (labels is None):
        raise UserError("give either --source (a folder of images) or --labels (a Vertex AI CSV/JSONL file)")
    workers = workers or os.cpu_count() or 1
    check_output(output, overwrite)
    origin = source or labels
    if not storage.is_url(origin):
        origin = os.path.expanduser(origin)  # dataset.json names the folder, not the shell's shorthand
    with catalog.Catalog(None if labels else source, split_seed) as table:
        planned = plan_dataset(table, source, output, labels, layout, val_fraction, test_fraction, split_seed,
                               strict, allow_missing_classes, allow_http, origin)
        if overwrite:
            remove_dataset(output)
        entries, samples = store_plan(table, output, planned["classes"], split_seed, shard_size_mb, num_shards,
                                      max_side, max_pixels, max_image_bytes)
    layout, classes, skipped = planned["layout"], planned["classes"], planned["skipped"]
    _log_plan(output, layout, classes, planned["counts"], planned["sizes"], entries, skipped,
              workers if runner == "local" else runner)

    written = write_dataset(output, entries, classes, sum(planned["counts"].values()), workers, runner,
                            pipeline_args)
    undecodable = [{"file": entry["file"], "reason": entry["reason"]} for entry in written["skipped"]]
    skipped = sorted(skipped + undecodable, key=lambda entry: entry["file"])
    try:
        check_usable(written["splits"], classes, written["skipped"], origin, allow_missing_classes)
    except UserError:
        # Leave DST as it was: shards of a dataset that cannot be made are only clutter.
        for split in written["splits"].values():
            for shard in split["shards"]:
                storage.remove(storage.join(output, shard["file"]))
        shards.clean(output)
        raise

    manifest = new_manifest(
        source=origin, layout=layout, val_fraction=val_fraction, test_fraction=test_fraction,
        split_seed=split_seed, max_side=max_side, classes=classes, splits=written["splits"],
        image_stats=written["image_stats"], skipped=skipped, ignored=planned["ignored"],
        duplicates=planned["duplicates"], warnings=planned["warnings"], seconds=round(time.monotonic() - started, 2))
    preview.write_preview(output, classes, samples, manifest, max_pixels, max_image_bytes)
    storage.write_json(storage.join(output, MANIFEST_NAME), manifest)  # the commit point: last
    shards.clean(output)
    _log_summary(manifest, output)
    return manifest


def plan_dataset(table, source, output, labels, layout, val_fraction, test_fraction, split_seed, strict=False,
                 allow_missing_classes=False, allow_http=False, origin=None):
    """Lists (or reads the label file) into `table` (a trainer.prepare.catalog.Catalog), labels, digests
    and splits every image, and checks the classes: everything but the shards, without reading a pixel.

    Returns:
      dict with `layout`, `classes`, `skipped` (files the layout has no place for), `ignored`,
      `duplicates`, `warnings`, `counts` ({(class, split): images}) and `sizes` ({split: bytes}).
    """
    origin = origin or source or labels
    skipped, ignored = [], {"count": 0, "files": []}
    if labels:
        from trainer.formats import labelfile

        layout, problems = "labels", []
        table.add_label_rows(labelfile.label_rows(labels, allow_http, problems))  # streamed into the table
        problems += [labelfile.repeat_problem(*row) for row in table.repeated_rows()]
        if problems:
            problems += labelfile.unreadable_rows(table.label_rows())
        images, given = table.label_counts()
        labelfile.check_problems(labels, problems, images > 0)
        logging.info("labels: %d images in %s (%d with their own split)", images, labels, given)
    else:
        facts = table.add_listing(output)
        layout = plan.resolve_layout(facts, layout, source)
        skipped = table.label_listing(layout)
        ignored = table.ignored_summary()
    classes = table.classes(origin)
    table.add_digests(origin)
    duplicates = table.assign_splits(val_fraction, test_fraction, split_seed)
    counts, sizes = table.counts()
    warnings = plan.check_classes(counts, classes, strict=strict, allow_missing_classes=allow_missing_classes,
                                  conflicts=duplicates["conflicts"])
    return {"layout": layout, "classes": classes, "skipped": skipped, "ignored": ignored, "duplicates": duplicates,
            "warnings": warnings, "counts": counts, "sizes": sizes}


def store_plan(table, output, classes, split_seed, shard_size_mb, num_shards, max_side,
               max_pixels=imagefiles.MAX_PIXELS, max_image_bytes=imagefiles.MAX_IMAGE_BYTES):
    """Streams the shards of every split from `table` into OUTPUT/.prepare/plan.jsonl.

    Returns:
      `(entries, samples)`: each shard's `(name, digest, offset, length)` in plan order, and the
      first training files of each class in plan order, for the preview (trainer.prepare.preview).
    """
    label_of = {name: index for index, name in enumerate(classes)}
    counts, sizes = table.counts()
    samples = preview.Samples(classes)

    def lines():
        for split in SPLITS:
            images = sum(count for (_, name), count in counts.items() if name == split)
            count = plan.count_shards(sizes[split], images, shard_size_mb, num_shards)
            for index, files in enumerate(table.shards(split, count)):
                if split == "train":
                    samples.offer(files)
                yield shard_name(split, index, count), shards.plan_line(
                    shard_name(split, index, count),
                    [(path, location, label, label_of[label], md5, size) for path, location, label, md5, size in files],
                    max_side, max_pixels, max_image_bytes)

    return shards.write_plan(output, lines()), samples.found


def check_options(val_fraction, test_fraction, shard_size_mb, num_shards, max_side, workers, max_pixels=1,
                  max_image_bytes=1):
    """Raises UserError for option values that cannot work."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:  # also catches NaN
            raise UserError(f"--{name} must be in [0, 1), got {value}")
    if not val_fraction + test_fraction < 1:
        raise UserError(f"--val_fraction + --test_fraction must be below 1 (nothing left to train on), "
                        f"got {val_fraction} + {test_fraction}")
    if not (shard_size_mb > 0 and math.isfinite(shard_size_mb)):
        raise UserError(f"--shard_size_mb must be a positive number, got {shard_size_mb}")
    for name, value in (("num_shards", num_shards), ("max_side", max_side), ("workers", workers),
                        ("max_pixels", max_pixels), ("max_image_bytes", max_image_bytes)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


def check_output(output, overwrite):
    """Raises UserError when `output` cannot be written, or already holds a dataset and `overwrite`
    is off."""
    storage.check_writable(output)
    if storage.exists(storage.join(output, MANIFEST_NAME)) and not overwrite:
        raise UserError(f"{output} already holds a dataset ({MANIFEST_NAME}); pass --overwrite to replace it")


def remove_dataset(output):
    """Removes the dataset at `output`: its manifest first, then the shards that manifest names
    (and an unfinished run's plan and reports).

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
    for name in (SAMPLES_PICTURE, CLASS_COUNTS_PICTURE):
        storage.remove(storage.join(output, name))
    shards.clean(output)
    removed = 0
    for name in names:
        # Only plain shard names next to the manifest, whatever an edited manifest may say.
        if isinstance(name, str) and name.endswith(".tfrecord") and "/" not in name and "\\" not in name:
            storage.remove(storage.join(output, name))
            removed += 1
    logging.info("--overwrite: removed the old dataset at %s (%s and %d shards)", output, MANIFEST_NAME, removed)


# ----------------------------------------------------------------------------------------------
# Writing: the shards on a runner (trainer.prepare.shards), then one manifest entry from their reports.


def write_dataset(output, entries, classes, total, workers, runner="local", pipeline_args=()):
    """Writes every planned shard not yet committed, on `runner`, and merges the shards' reports.

    Args:
      entries: the stored plan's shards (`store_plan`); `total`: the images they hold.

    Returns:
      dict with `splits` (the manifest's per-split entries), `image_stats`, and `skipped`
      (`{"file", "reason", "class"}` of each file that did not decode).
    """
    interactive = sys.stderr.isatty()
    with tqdm.tqdm(total=total, desc="encoding", unit="img", file=sys.stderr,
                   mininterval=0.5 if interactive else 30) as progress:
        def on_report(report):
            progress.update(report["records"] + len(report["skipped"]))

        reports = runners.run(output, entries, runner=runner, workers=workers, pipeline_args=pipeline_args,
                             on_report=on_report)
    splits = {split: {"count": 0, "class_counts": dict.fromkeys(classes, 0), "shards": []} for split in SPLITS}
    skipped = []
    for report in reports:
        split = splits[report["file"].split("-", 1)[0]]
        split["shards"].append({"file": report["file"], "records": report["records"], "bytes": report["bytes"]})
        split["count"] += report["records"]
        for name, count in report["class_counts"].items():
            split["class_counts"][name] += count
        skipped += report["skipped"]
    image_stats = shards.image_stats(reports)
    return {"splits": splits, "image_stats": image_stats, "skipped": skipped}


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


def _log_plan(output, layout, classes, counts, sizes, entries, skipped, runner):
    logging.info("classes (%d): %s", len(classes), ", ".join(classes))
    for split in SPLITS:
        files = sum(count for (_, name), count in counts.items() if name == split)
        pieces = sum(name.startswith(split + "-") for name, *_ in entries)
        logging.info("%s: %s, %s of source, %s", split, counted(files, "file"), _megabytes(sizes[split]),
                     counted(pieces, "shard"))
    if skipped:
        logging.info("%s not fitting the %s layout skipped", counted(len(skipped), "file"), layout)
    if isinstance(runner, int):
        logging.info("decoding with %d worker process%s; writing to %s", runner, "" if runner == 1 else "es", output)
    else:
        logging.info("decoding on Apache Beam's %s; writing to %s", runner, output)


def _log_summary(manifest, output):
    total = sum(split["count"] for split in manifest["splits"].values())
    logging.info("prepared %s in %s from %s into %s in %.1f s", counted(total, "image"),
                 counted(len(manifest["classes"]), "class"), manifest["source"], output, manifest["seconds"])
    for name, split in manifest["splits"].items():
        counts = ", ".join(f"{label} {count}" for label, count in split["class_counts"].items())
        size = sum(shard["bytes"] for shard in split["shards"])
        logging.info("  %-5s %6d images (%s) in %s, %s", name, split["count"], counts,
                     counted(len(split["shards"]), "shard"), _megabytes(size))
    skipped = manifest["skipped"]
    if skipped:
        logging.info("skipped %s: %s", counted(len(skipped), "file"), _describe_reasons(skipped))
        for entry in skipped[:SKIPPED_LOGGED]:
            logging.info("  skipped %s: %s", entry["file"], entry["reason"])
        if len(skipped) > SKIPPED_LOGGED:
            logging.info("  ... and %d more (all listed in %s)", len(skipped) - SKIPPED_LOGGED, MANIFEST_NAME)
    stats = manifest["image_stats"]
    logging.info("stored image sizes: width %d-%d (mean %.0f), height %d-%d (mean %.0f)",
                 stats["width"]["min"], stats["width"]["max"], stats["width"]["mean"],
                 stats["height"]["min"], stats["height"]["max"], stats["height"]["mean"])
