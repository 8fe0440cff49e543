"""The plan of `trainer prepare`: which files, which class, which split, which shard.

From a listing (or a label file) to the assignment of every image to a shard, without reading a
pixel:
  1. files that are not images by name (README.md, labels.csv, .DS_Store-like files) are set aside
     as ignored, never classes; hidden files and DST inside SRC are left out;
  2. the layout (class folders, split folders, Kaggle's `cat.123.jpg` names) gives each file its
     class, and split folders their split;
  3. identical files (the same bytes, by MD5) form one group, and a group is never split: its
     split is a stable hash of its content for layouts without split folders, so reruns, other
     machines and added files never move an image; with split folders a group whose copies sit in
     several splits goes to train if any copy is there, else val (no test image has a twin in
     training); copies with different labels are listed as conflicts;
  4. suspicious classes are named: no training image (an error unless allowed), very few images,
     names that differ only by case or spaces, about as many classes as images;
  5. per split, a seeded stratified shuffle cut into n consecutive shards (classes spread evenly).

These are the rules; trainer.prepare.catalog applies them to a table on disk, so that planning
millions of images takes no more memory than planning a hundred.
"""

import collections
import hashlib
import math
import os

from absl import logging

from trainer.errors import UserError
from trainer.formats.manifest import LAYOUTS, SPLIT_FOLDERS
from trainer.infra import storage

# A class with fewer images than this is worth a warning (a model cannot learn it, nor a test measure it).
FEW_IMAGES = 5
# Ignored files listed one by one in dataset.json (all are counted).
IGNORED_LISTED = 1000


def comparable(location):
    """`(normalised location, separator)`, to tell whether one location is another or inside it."""
    if storage.is_url(location):
        return location.rstrip("/"), "/"
    local = location[len("file://"):] if location.startswith("file://") else location
    return os.path.abspath(os.path.expanduser(local)), os.sep


class LayoutFacts:
    """What `detect_layout` needs of the paths, gathered one path at a time (memory: the top folders)."""

    def __init__(self, paths=()):
        self.count, self.top_file, self.top_folders, self.shallow = 0, None, set(), None
        for path in paths:
            self.add(path)

    def add(self, path):
        self.count += 1
        folder, slash, rest = path.partition("/")
        if not slash:
            self.top_file = path if self.top_file is None else min(self.top_file, path)
            return
        self.top_folders.add(folder)
        if "/" not in rest:
            self.shallow = path if self.shallow is None else min(self.shallow, path)


def detect_layout(paths, source="the source"):
    """Tells the layout from the relative paths alone (or their LayoutFacts); raises UserError when
    it is ambiguous.

    filename_prefix: only files at the top. split_dirs: only folders named train/val/validation/test,
    with files two levels down. class_dirs: only folders, none of them named like a split.
    """
    facts = paths if isinstance(paths, LayoutFacts) else LayoutFacts(paths)
    hint = "pass --layout=class_dirs, split_dirs or filename_prefix"
    top_folders = sorted(facts.top_folders)
    if facts.top_file and top_folders:
        raise UserError(f"cannot tell the layout of {source}: it has both files ({facts.top_file}) and "
                        f"folders ({top_folders[0]}/) at the top; {hint}")
    if facts.top_file:
        return "filename_prefix"
    split_folders = [folder for folder in top_folders if folder in SPLIT_FOLDERS]
    if not split_folders:
        return "class_dirs"
    if len(split_folders) < len(top_folders):
        other = next(folder for folder in top_folders if folder not in SPLIT_FOLDERS)
        raise UserError(f"cannot tell the layout of {source}: it has split folders ({split_folders[0]}/) "
                        f"and other folders ({other}/) at the top; {hint}")
    if facts.shallow:
        raise UserError(f"cannot tell the layout of {source}: split folders without class folders "
                        f"inside ({facts.shallow}); {hint}")
    return "split_dirs"


def resolve_layout(paths, layout, source):
    """The layout to use: `layout` itself, or the detected one for "auto" (logged either way)."""
    if layout == "auto":
        layout = detect_layout(paths, source)
        logging.info("layout: %s (detected)", layout)
        return layout
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    logging.info("layout: %s", layout)
    return layout


def place(path, layout):
    """`(class, split or None, None)` of one file under `layout`, or `(None, None, reason)` for a
    file the layout has no place for."""
    parts = path.split("/")
    if layout == "class_dirs":
        if len(parts) < 2:
            return None, None, "not in a class folder"
        return parts[0], None, None
    if layout == "split_dirs":
        if parts[0] not in SPLIT_FOLDERS:
            return None, None, "not under train/, val/, validation/ or test/"
        if len(parts) < 3:
            return None, None, "not in a class folder"
        return parts[1], SPLIT_FOLDERS[parts[0]], None
    # filename_prefix: the class is the name before its first dot, at any depth
    prefix, _, rest = parts[-1].partition(".")
    if prefix and "." in rest:  # <class>.<id>.<extension>: `dog3.jpg` names no class
        return prefix, None, None
    return None, None, "no class prefix in the name (expected <class>.<anything>.<extension>)"


def check_class_count(classes, source):
    """`classes` (sorted names), or UserError for fewer than two."""
    if not classes:
        raise UserError(f"nothing to prepare: no file in {source} fits the layout")
    if len(classes) == 1:
        raise UserError(f"only one class ({classes[0]!r}) in {source}: a classifier needs at least two")
    return classes


def assign_split(key, val_fraction, test_fraction, seed=0):
    """The split of one image, from a stable hash of `seed` and its key (its content's digest).

    sha256 is the same on every machine and Python (unlike `hash()`), and each image's split
    depends on its own key only: adding or removing files never moves another file.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if point < test_fraction:
        return "test"
    if point < test_fraction + val_fraction:
        return "val"
    return "train"


def count_shards(total_bytes, count, shard_size_mb, num_shards=None):
    """Shards for a split: `num_shards`, or source bytes / shard size; at least 1, at most `count`."""
    if count == 0:
        return 0
    wanted = num_shards or math.ceil(total_bytes / (shard_size_mb * 2**20))
    return max(1, min(wanted, count))


# --- suspicious classes ----------------------------------------------------------------------------


def check_classes(counts, classes, strict=False, allow_missing_classes=False, conflicts=()):
    """Warnings about classes that are probably a mistake; raises for the ones that are errors.

    Args:
      counts: images per `(class, split)`.
      classes: the class names.

    Returns:
      [{"kind", "message"}], also logged: classes with no training image (with
      `allow_missing_classes`), classes with fewer than FEW_IMAGES images, names equal but for case
      or surrounding spaces, about as many classes as images, and label conflicts among copies.

    Raises:
      UserError: a class with no training image (without `allow_missing_classes`), or with
        `strict` any warning.
    """
    totals, training = collections.Counter(), collections.Counter()
    for (label, split), count in counts.items():
        totals[label] += count
        training[label] += count if split == "train" else 0
    images = sum(totals.values())
    warnings = []

    def warn(kind, message):
        warnings.append({"kind": kind, "message": message})

    for name in classes:
        if not training[name]:
            message = (f"class {name!r} has no training images ({totals[name]} in val/test): the model would "
                       "have a class it never learned")
            if not allow_missing_classes:
                raise UserError(f"{message}; add training images, or pass --allow_missing_classes")
            warn("no_training_images", message)
    few = [name for name in classes if totals[name] < FEW_IMAGES]
    if few:
        warn("few_images", f"{len(few)} classes with fewer than {FEW_IMAGES} images: "
             + ", ".join(f"{name!r} ({totals[name]})" for name in few[:10]))
    similar = collections.defaultdict(list)
    for name in classes:
        similar[name.strip().casefold()].append(name)
    for names in similar.values():
        if len(names) > 1:
            warn("similar_names", f"classes that differ only by case or spaces: {', '.join(map(repr, names))}")
    for name in classes:
        if name != name.strip():
            warn("spaces", f"class name {name!r} has leading or trailing spaces")
    if len(classes) > 2 and 2 * len(classes) > images:
        warn("many_classes", f"{len(classes)} classes for {images} images: does the layout fit the folder? "
             "(check --layout)")
    if conflicts:
        warn("label_conflicts", f"{len(conflicts)} groups of identical files carry different labels (dataset.json: "
             "duplicates.conflicts)")
    for warning in warnings:
        logging.warning("suspicious: %s", warning["message"])
    if strict and warnings:
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        raise UserError(f"--strict: {warnings[0]['message']}{more}")
    return warnings
