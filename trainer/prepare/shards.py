"""The unit of work of `trainer prepare`: one shard, the same function under every runner.

  1. `write_plan`: the launcher stores the plan as one JSON line per shard (its name and its files:
     the recorded path, where to read it, class, label, MD5, size) in OUTPUT/.prepare/plan.jsonl,
     streamed from the table of images (trainer.prepare.catalog) one shard at a time.
     Runners are handed only `(output, offset, length)` per shard, so a Beam job graph stays small
     for any number of images.
  2. `write_shard`: reads its line; reads its images in batches of concurrent requests (object
     stores answer in tens of milliseconds, so one read at a time would leave the cores idle);
     decodes each once (trainer.formats.imagefiles); writes the records in plan order to OUTPUT/<shard> (whole
     or not at all: a local temporary file renamed, or one object upload); then commits the
     shard's report, OUTPUT/.prepare/<shard>.json: the digest of its plan line, its counts, image
     sizes and skipped files.
  3. `committed` resumes: a shard whose report matches its plan line and whose file has the
     reported size is done. The rest run on trainer.prepare.runners (a process pool, or an Apache
     Beam pipeline: DirectRunner, DataflowRunner, Flink, Spark, ...). Every report is then read back.
  4. The launcher (trainer.prepare.run) writes dataset.json from the reports, last, then `clean`s up.

A shard's bytes depend only on its plan line (trainer.formats.tfrecord writes records deterministically),
so a rerun, another runner or another machine writes the same bytes.
"""

import collections
import hashlib
import json
import multiprocessing
import multiprocessing.pool
from concurrent import futures

from absl import logging

from trainer.errors import counted
from trainer.formats import imagefiles, tfrecord
from trainer.infra import folders, storage

STATE_FOLDER = ".prepare"
PLAN_NAME = "plan.jsonl"
# Reads in flight per shard: at ~20-50 ms per object-store request, enough to keep a core decoding.
# (the next batch is read while this one decodes: at most two batches of bytes in memory).
READ_BATCH = 64
READ_BATCH_BYTES = 32 * 2**20
# Parallel small requests when reading reports back.
REPORT_THREADS = 32


def state_location(output, *parts):
    return storage.join(output, STATE_FOLDER, *parts)


def plan_line(name, files, max_side, max_pixels=imagefiles.MAX_PIXELS, max_image_bytes=imagefiles.MAX_IMAGE_BYTES):
    """One shard's plan as canonical JSON bytes. `files`: `(path, location, label, index, md5, size)`."""
    return json.dumps({"name": name, "max_side": max_side, "max_pixels": max_pixels, "max_image_bytes": max_image_bytes,
                       "files": [list(file) for file in files]},
                      sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _digest(line):
    return hashlib.sha256(line).hexdigest()


def write_plan(output, lines):
    """Stores the plan lines as they come (one shard's line in memory at a time).

    Args:
      lines: `(shard name, plan line)` pairs, in plan order.

    Returns:
      Each shard's `(name, digest of its line, offset, length)` in plan.jsonl.
    """
    entries, offset = [], 0
    with storage.open_file(state_location(output, PLAN_NAME), "wb") as handle:
        for name, line in lines:
            handle.write(line)
            entries.append((name, _digest(line), offset, len(line)))
            offset += len(line)
    return entries


# --- one shard ---------------------------------------------------------------------------------------


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


def batches(sizes, count, size_bytes):
    """Consecutive `(start, end)` index ranges of at most `count` items and (past one item) `size_bytes`."""
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= count or total + size > size_bytes):
            yield start, index
            start, total = index, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def read_ahead(locations, sizes, max_bytes=None):
    """Yields the bytes of `locations` in order (None for a missing file; at most `max_bytes` + 1
    of each), reading the next batch (`storage.read_many`: concurrent requests) while the caller
    works on this one."""
    ranges = list(batches(sizes, READ_BATCH, READ_BATCH_BYTES))
    with futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as reader:
        pending = reader.submit(storage.read_many, locations[slice(*ranges[0])], max_bytes) if ranges else None
        for index in range(len(ranges)):
            current = pending.result()
            if index + 1 < len(ranges):
                pending = reader.submit(storage.read_many, locations[slice(*ranges[index + 1])], max_bytes)
            yield from current


def _encode_read(data, max_side, max_pixels, max_bytes):
    if data is None:
        return {"skip": "file disappeared while preparing"}
    if reason := imagefiles.too_large(data, max_bytes):
        return {"skip": reason}
    return imagefiles.encode_or_skip(data, max_side, max_pixels)


class _Sizes:
    """Min / max / sum of stored widths and heights: mergeable across shards."""

    def __init__(self):
        self.count, self.width, self.height = 0, [None, None, 0], [None, None, 0]

    def add(self, width, height):
        self.count += 1
        for kept, value in ((self.width, width), (self.height, height)):
            kept[0] = value if kept[0] is None else min(kept[0], value)
            kept[1] = value if kept[1] is None else max(kept[1], value)
            kept[2] += value

    def as_dict(self):
        return {"count": self.count, "width": self.width, "height": self.height}


def image_stats(reports):
    """The manifest's `image_stats` ({"count", "width"/"height": {"min", "max", "mean"}}) of all shards."""
    count = sum(report["sizes"]["count"] for report in reports)
    stats = {"count": count}
    for key in ("width", "height"):
        kept = [report["sizes"][key] for report in reports if report["sizes"]["count"]]
        stats[key] = ({"min": min(low for low, _, _ in kept), "max": max(high for _, high, _ in kept),
                       "mean": round(sum(total for _, _, total in kept) / count, 2)} if count else None)
    return stats


def write_shard(output, offset, length, decoders=1):
    """Writes and commits the shard whose plan line is at `offset` of the plan; returns its report.

    Args:
      output: the dataset folder (local path or URL).
      offset, length: where the shard's line is in OUTPUT/.prepare/plan.jsonl.
      decoders: images decoded at once in this process (Pillow decodes without the GIL).

    Returns:
      `{"plan", "file", "records", "bytes", "class_counts", "sizes", "skipped"}`, as committed in
      OUTPUT/.prepare/<shard>.json.
    """
    line = storage.read_range(state_location(output, PLAN_NAME), offset, offset + length)
    task = json.loads(line)
    class_counts, sizes, skipped, records, size = collections.Counter(), _Sizes(), [], 0, 0
    files = task["files"]
    with (imagefiles.strict_decoding(), multiprocessing.pool.ThreadPool(decoders) as decoder,
          storage.open_file(storage.join(output, task["name"]), "wb") as shard):
        # Reads run a batch ahead; `decoders` threads decode (Pillow releases the GIL), in order.
        limit = task.get("max_image_bytes", imagefiles.MAX_IMAGE_BYTES)
        data = read_ahead([file[1] for file in files], [file[5] for file in files], limit)
        results = imap_bounded(decoder, lambda item: _encode_read(item, task["max_side"], task["max_pixels"], limit),
                               data, 2 * decoders)
        for (path, _, label, index, *_), result in zip(files, results, strict=True):
            if "skip" in result:
                skipped.append({"file": path, "reason": result["skip"], "class": label})
                continue
            record = tfrecord.frame(tfrecord.make_example(
                result["encoded"], result["format"], index, label, path, result["height"], result["width"]))
            shard.write(record)
            size += len(record)
            records += 1
            class_counts[label] += 1
            sizes.add(result["width"], result["height"])
    report = {"plan": _digest(line), "file": task["name"], "records": records, "bytes": size,
              "class_counts": dict(sorted(class_counts.items())), "sizes": sizes.as_dict(), "skipped": skipped}
    storage.write_json(state_location(output, task["name"] + ".json"), report)
    return report


# --- resuming ----------------------------------------------------------------------------------------


def read_reports(output, names):
    def read(name):
        try:
            return storage.read_json(state_location(output, name + ".json"))
        except (FileNotFoundError, ValueError):  # missing, or cut short by a kill: not committed
            return None

    with futures.ThreadPoolExecutor(REPORT_THREADS) as pool:
        return dict(zip(names, pool.map(read, names), strict=True))


def committed(output, entries):
    """The reports of shards already written for exactly these plan lines (`write_plan`'s entries).

    Reports and shards of an earlier plan (other files, other shard counts) are removed.
    """
    try:
        listed = {name: size for name, size in folders.list_files(output) if "/" not in name}
        reports = [name[:-len(".json")] for name, _ in folders.list_files(state_location(output))
                   if name.endswith(".json")]
    except FileNotFoundError:
        return {}
    wanted = {name: digest for name, digest, *_ in entries}
    found = read_reports(output, reports)
    done, stale = {}, []
    for name, report in found.items():
        if (report and wanted.get(name) == report.get("plan") and report.get("file") == name
                and listed.get(name) == report.get("bytes")):
            done[name] = report
        else:
            stale.append(name)
    for name in listed:  # a local copy cut short by a kill (trainer.infra.storage writes a .tmp- file first)
        if name.startswith(".tmp-"):
            storage.remove(storage.join(output, name))
    for name in stale:
        storage.remove(state_location(output, name + ".json"))
        if name not in wanted and name.endswith(".tfrecord") and "/" not in name:
            storage.remove(storage.join(output, name))
    if done or stale:
        logging.info("resuming: %d of %s already written%s", len(done), counted(len(wanted), "shard"),
                     f"; {len(stale)} from an earlier plan are replaced" if stale else "")
    return done


def clean(output):
    """Removes the plan and the reports (once dataset.json holds what they said)."""
    storage.remove(state_location(output), recursive=True)


