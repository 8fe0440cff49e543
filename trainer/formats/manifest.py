"""The dataset format: `dataset.json` and the keys of its records. Writer and readers both use it.

A dataset is a folder (local or URL) holding shards named `<split>-NNNNN-of-NNNNN.tfrecord` and a
`dataset.json` manifest, written last (a folder without it is not a dataset):

  {"schema_version": 2, "kind": "trainer-dataset", "tool_version", "created", "source", "layout",
   "split_rule", "val_fraction", "test_fraction", "split_seed", "max_side",
   "classes": [names, index order],
   "splits": {"train"|"val"|"test": {"count", "class_counts": {name: n},
                                      "shards": [{"file", "records", "bytes"}]}},
   "image_stats", "skipped": [{"file", "reason"}], "ignored": {"count", "files"},
   "duplicates": {"groups", "files", "moved", "conflicts"}, "warnings": [{"kind", "message"}],
   "seconds"}

Each record is a `tf.train.Example` with the keys below (docs/data.md). This module imports no
TensorFlow: the command line and `trainer prepare`'s planning use it without loading TensorFlow.
"""

import hashlib
import json
from concurrent import futures

import trainer
from trainer.errors import UserError
from trainer.formats import timestamps
from trainer.infra import storage

MANIFEST_NAME = "dataset.json"
# Written next to the manifest, before it (trainer.prepare.preview): a look at the data.
SAMPLES_PICTURE = "samples.png"
CLASS_COUNTS_PICTURE = "class_counts.png"
MANIFEST_KIND = "trainer-dataset"
SCHEMA_VERSION = 2  # what `trainer prepare` writes (2: splits by content, duplicates, ignored, warnings)
SCHEMA_VERSIONS = (1, 2)  # what the readers accept (they read only fields both have)
SPLIT_RULE = "content-md5"  # schema 2: an image's split hashes its bytes' MD5 (schema 1: its path)

SPLITS = ("train", "val", "test")
# Source folder name -> split name (the seed's `validation/` is the `val` split).
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
LAYOUTS = ("class_dirs", "split_dirs", "filename_prefix")

# The record keys: `trainer.data.records` builds and parses them.
KEY_ENCODED = "image/encoded"  # the image bytes (JPEG kept as is, else PNG or re-encoded JPEG)
KEY_LABEL = "image/class/label"  # int64 index into "classes"
KEY_FORMAT = "image/format"  # b"jpeg" or b"png"
KEY_CLASS = "image/class/text"  # the class name
KEY_FILENAME = "image/filename"  # the source path relative to the source folder
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
REQUIRED_KEYS = (KEY_ENCODED, KEY_LABEL)  # what training reads; the rest is for people and diagnosis

# Parallel metadata calls when checking remote shard sizes.
MAX_PARALLEL_CHECKS = 32


def shard_name(split, index, count):
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def new_manifest(*, source, layout, val_fraction, test_fraction, split_seed, max_side, classes, splits,
                 image_stats, skipped, ignored, duplicates, warnings, seconds):
    """The manifest `trainer prepare` writes, with this schema's fields in their order."""
    hashed = layout != "split_dirs"
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": MANIFEST_KIND,
        "tool_version": trainer.__version__,
        "created": timestamps.now_text(),
        "source": source,
        "layout": layout,
        "split_rule": SPLIT_RULE,
        # Split folders decide the splits themselves: the fractions played no part.
        "val_fraction": val_fraction if hashed else None,
        "test_fraction": test_fraction if hashed else None,
        "split_seed": split_seed,
        "max_side": max_side,
        "classes": classes,
        "splits": splits,
        "image_stats": image_stats,
        "skipped": skipped,
        "ignored": ignored,
        "duplicates": duplicates,
        "warnings": warnings,
        "seconds": seconds,
    }


def dataset_identity(manifest_url, dataset_manifest):
    """What a training run records of its dataset (config.json), to tell later whether it changed.

    The digest covers the classes and every split's counts and shards, not when or where the
    dataset was written: the same images prepared again with the same flags keep their digest.
    """
    content = json.dumps({key: dataset_manifest[key] for key in ("classes", "splits")}, sort_keys=True)
    return {"url": manifest_location(manifest_url), "created": dataset_manifest.get("created"),
            "digest": hashlib.sha256(content.encode()).hexdigest(),
            "counts": {name: split["count"] for name, split in dataset_manifest["splits"].items()}}


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
      The manifest as a dict (see the module docstring and docs/data.md for its fields).

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
        raise UserError(f"{location} has no split {split!r} (it has: {', '.join(sorted(splits)) or 'none'})")
    return splits[split]


def count_examples(manifest, split, location="the dataset manifest"):
    """The number of examples of `split` in a loaded manifest (UserError if the split is absent)."""
    return int(_split_entry(manifest, split, location).get("count", 0))


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
