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
"""

import collections
import hashlib
import math
import os
import random
from concurrent import futures

from absl import logging

from trainer.errors import UserError, counted
from trainer.formats.imagefiles import is_hidden, is_image_name
from trainer.formats.manifest import LAYOUTS, SPLIT_FOLDERS, SPLITS
from trainer.infra import folders, storage

# A class with fewer images than this is worth a warning (a model cannot learn it, nor a test measure it).
FEW_IMAGES = 5
# Ignored files listed one by one in dataset.json (all are counted).
IGNORED_LISTED = 1000
# Parallel reads when hashing files whose store gives no MD5 (local disks, composite objects).
HASH_THREADS = 16

# `path`: the name recorded in each record (relative to SRC, or the URI of a label file's row);
# `location`: where to read it; `digest`: base64 MD5 of the content (as GCS reports it).
SourceFile = collections.namedtuple("SourceFile", ["path", "location", "size", "label", "split", "digest"])


def set_aside_non_images(entries):
    """Splits listing entries (path first) into images by name and the rest (ignored, never classes)."""
    images = [entry for entry in entries if is_image_name(entry[0])]
    ignored = sorted(entry[0] for entry in entries if not is_image_name(entry[0]))
    if ignored:
        shown = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        logging.info("ignored %d files that are not images by name: %s", len(ignored), shown)
    return images, ignored


def _comparable(location):
    if storage.is_url(location):
        return location.rstrip("/"), "/"
    local = location[len("file://"):] if location.startswith("file://") else location
    return os.path.abspath(os.path.expanduser(local)), os.sep


def list_source(source, output):
    """Lists SRC as sorted `(relative_path, size, md5 or None)`, without hidden files and without
    DST if inside.

    Raises:
      UserError: SRC does not exist or is not a folder, or DST is SRC itself.
    """
    try:
        found = folders.list_files(source, with_md5=True)
    except FileNotFoundError:
        raise UserError(f"source not found (or not a folder): {source}") from None
    (source_key, separator), (output_key, _) = _comparable(source), _comparable(output)
    if source_key == output_key:
        raise UserError("--output must not be the --source folder itself (use a subfolder or elsewhere)")
    # DST inside SRC (e.g. SRC/tfrecords): its shards from an earlier run are not images to prepare.
    inside = None
    if output_key.startswith(source_key + separator):
        inside = output_key[len(source_key) + 1:].replace(os.sep, "/") + "/"
    visible = [entry for entry in found
               if not is_hidden(entry[0])
               and not (inside and entry[0].startswith(inside))]
    hidden = len(found) - len(visible)
    logging.info("source %s: %s%s", source, counted(len(visible), "file"),
                 f" (ignored {hidden} hidden or inside --output)" if hidden else "")
    if not visible:
        raise UserError(f"nothing to prepare: no files in {source}")
    return visible


def detect_layout(paths, source="the source"):
    """Tells the layout from the relative paths alone; raises UserError when it is ambiguous.

    filename_prefix: only files at the top. split_dirs: only folders named train/val/validation/test,
    with files two levels down. class_dirs: only folders, none of them named like a split.
    """
    hint = "pass --layout=class_dirs, split_dirs or filename_prefix"
    top_files = [path for path in paths if "/" not in path]
    top_folders = sorted({path.split("/", 1)[0] for path in paths if "/" in path})
    if top_files and top_folders:
        raise UserError(f"cannot tell the layout of {source}: it has both files ({top_files[0]}) and "
                        f"folders ({top_folders[0]}/) at the top; {hint}")
    if top_files:
        return "filename_prefix"
    split_folders = [folder for folder in top_folders if folder in SPLIT_FOLDERS]
    if not split_folders:
        return "class_dirs"
    if len(split_folders) < len(top_folders):
        other = next(folder for folder in top_folders if folder not in SPLIT_FOLDERS)
        raise UserError(f"cannot tell the layout of {source}: it has split folders ({split_folders[0]}/) "
                        f"and other folders ({other}/) at the top; {hint}")
    shallow = [path for path in paths if path.count("/") < 2]
    if shallow:
        raise UserError(f"cannot tell the layout of {source}: split folders without class folders "
                        f"inside ({shallow[0]}); {hint}")
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


def label_files(entries, layout, source):
    """Gives each file its class (and split, for split_dirs).

    Args:
      entries: `(relative_path, size, md5 or None)` of the files under `source`.
      layout: one of LAYOUTS.
      source: SRC, for each file's location.

    Returns:
      `(files, skipped)`: SourceFile tuples (split None unless the layout has split folders) and
      `{"file", "reason"}` entries for files the layout has no place for.
    """
    files, skipped = [], []
    for path, size, md5 in entries:
        parts = path.split("/")
        label, split, reason = None, None, None
        if layout == "class_dirs":
            if len(parts) < 2:
                reason = "not in a class folder"
            else:
                label = parts[0]
        elif layout == "split_dirs":
            if parts[0] not in SPLIT_FOLDERS:
                reason = "not under train/, val/, validation/ or test/"
            elif len(parts) < 3:
                reason = "not in a class folder"
            else:
                label, split = parts[1], SPLIT_FOLDERS[parts[0]]
        else:  # filename_prefix: the class is the name before its first dot, at any depth
            prefix, _, rest = parts[-1].partition(".")
            if prefix and "." in rest:  # <class>.<id>.<extension>: `dog3.jpg` names no class
                label = prefix
            else:
                reason = "no class prefix in the name (expected <class>.<anything>.<extension>)"
        if reason:
            skipped.append({"file": path, "reason": reason})
        else:
            files.append(SourceFile(path, storage.join(source, *parts), size, label, split, md5))
    return files, skipped


def find_classes(files, source):
    """Sorted class names (index -> name); raises UserError for fewer than two."""
    classes = sorted({file.label for file in files})
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


def stratified_shuffle(files, rng):
    """A seeded shuffle that spreads every class evenly along the list.

    Each class is shuffled, then its i-th file gets the position (i + jitter) / class size; sorting
    by position interleaves the classes in proportion. Any run of consecutive files (a shard)
    therefore holds each class in about its overall share: with two equal classes, every run of 4
    holds both. A plain shuffle only makes that likely.
    """
    by_class = collections.defaultdict(list)
    for file in sorted(files):
        by_class[file.label].append(file)
    positioned = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        positioned += [((index + rng.random()) / len(members), file.path, file)
                       for index, file in enumerate(members)]
    positioned.sort(key=lambda item: item[:2])
    return [file for _, _, file in positioned]


def count_shards(total_bytes, count, shard_size_mb, num_shards=None):
    """Shards for a split: `num_shards`, or source bytes / shard size; at least 1, at most `count`."""
    if count == 0:
        return 0
    wanted = num_shards or math.ceil(total_bytes / (shard_size_mb * 2**20))
    return max(1, min(wanted, count))


def plan_shards(files, seed, shard_size_mb, num_shards=None):
    """Splits -> shards -> files: the shuffled files of each split cut into consecutive pieces."""
    plan = {}
    for split in SPLITS:
        members = stratified_shuffle([file for file in files if file.split == split],
                                     random.Random(f"{seed}:{split}"))
        count = count_shards(sum(file.size for file in members), len(members), shard_size_mb, num_shards)
        plan[split] = [members[index * len(members) // count:(index + 1) * len(members) // count]
                       for index in range(count)]
    return plan




# --- content digests and duplicates ----------------------------------------------------------------


def add_digests(files, lines=None, origin=None):
    """`files` with `digest` filled in: the MD5 the store reports (GCS), else computed from the
    bytes, HASH_THREADS files at a time.

    Args:
      files: SourceFiles.
      lines: {path: line number} of a label file's rows, to name missing images by line.
      origin: the label file, for the message.

    Raises:
      UserError: a file that does not exist (a label file's row naming a missing image).
    """
    missing = [index for index, file in enumerate(files) if file.digest is None]
    if not missing:
        return files

    def digest(index):
        """(MD5, size), or why there is none."""
        try:
            return folders.md5_and_size(files[index].location)
        except FileNotFoundError:
            return "image not found"
        except storage.NotRegularFile:  # never opened
            return "not a regular file (a device, a FIFO or a socket)"

    with futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        found = dict(zip(missing, pool.map(digest, missing), strict=True))
    absent = sorted(((files[index].path, value) for index, value in found.items() if isinstance(value, str)),
                    key=lambda item: (lines or {}).get(item[0], 0))
    if absent and lines:
        shown = "; ".join(f"line {lines[path]}: {reason}: {path}" for path, reason in absent[:5])
        more = f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""
        raise UserError(f"{origin}: {len(absent)} bad rows: {shown}{more}")
    if absent:
        raise UserError(f"{len(absent)} images disappeared while preparing, e.g. {absent[0][0]} ({absent[0][1]})")
    done = []
    for index, file in enumerate(files):
        if index in found:
            md5, size = found[index]
            file = file._replace(digest=md5, size=size)
        done.append(file)
    return done


def assign_splits(files, val_fraction, test_fraction, seed):
    """Gives every file its split, every group of identical files the same one.

    A group none of whose files has a split of its own (no split folders, ML_USE unassigned) gets
    the stable hash of its content's digest. A group with given splits goes to train if any copy is
    in train, else val, else test: then no test or val image has a twin in training.

    Returns:
      `(files, duplicates)`: the files with their split, and dataset.json's duplicates summary
      {"groups", "files", "moved": [{"file", "from", "to"}], "conflicts": [{"files", "labels"}]}.
    """
    groups = collections.defaultdict(list)
    for file in files:
        groups[file.digest].append(file)
    placed, moved, conflicts, copies = [], [], [], 0
    for digest, members in sorted(groups.items()):
        given = {member.split for member in members} - {None}
        if not given:
            split = assign_split(digest, val_fraction, test_fraction, seed)
        else:
            split = next(name for name in SPLITS if name in given)
        for member in members:
            if member.split not in (None, split):
                moved.append({"file": member.path, "from": member.split, "to": split})
            placed.append(member._replace(split=split))
        if len(members) > 1:
            copies += len(members)
            labels = sorted({member.label for member in members})
            if len(labels) > 1:
                conflicts.append({"files": sorted(member.path for member in members), "labels": labels})
    duplicates = {"groups": sum(len(members) > 1 for members in groups.values()), "files": copies,
                  "moved": sorted(moved, key=lambda entry: entry["file"]), "conflicts": conflicts}
    if copies:
        logging.info("duplicates: %d groups of identical files (%d files), each kept in one split; %d files moved "
                     "to their group's split", duplicates["groups"], copies, len(moved))
    for conflict in conflicts:
        logging.warning("identical files with different labels %s: %s", conflict["labels"],
                        ", ".join(conflict["files"][:4]))
    return placed, duplicates


# --- suspicious classes ----------------------------------------------------------------------------


def check_classes(files, classes, strict=False, allow_missing_classes=False, conflicts=()):
    """Warnings about classes that are probably a mistake; raises for the ones that are errors.

    Returns:
      [{"kind", "message"}], also logged: classes with no training image (with
      `allow_missing_classes`), classes with fewer than FEW_IMAGES images, names equal but for case
      or surrounding spaces, about as many classes as images, and label conflicts among copies.

    Raises:
      UserError: a class with no training image (without `allow_missing_classes`), or with
        `strict` any warning.
    """
    totals = collections.Counter(file.label for file in files)
    training = collections.Counter(file.label for file in files if file.split == "train")
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
    if len(classes) > 2 and 2 * len(classes) > len(files):
        warn("many_classes", f"{len(classes)} classes for {len(files)} images: does the layout fit the folder? "
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


def files_from_label_rows(rows):
    """SourceFiles for a label file's rows (trainer.prepare.labelfile): recorded under their URI."""
    return [SourceFile(location, location, 0, label, split, None) for _, location, label, split in rows]


def ignored_summary(ignored):
    return {"count": len(ignored), "files": ignored[:IGNORED_LISTED]}
