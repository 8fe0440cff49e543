"""The launcher's table of images: prepare's plan made in SQLite on local disk, not in memory.

Every listed image is one row (path, size, MD5, class, split) of an SQLite file in a temporary
folder, and each step of the plan (trainer.prepare.plan's rules) is a pass over that table: the
listing streams in, the layout labels each row, digests fill in, duplicate groups and splits are
SQL over the rows, and the stratified shards stream out ordered by SQL. SQLite sorts and groups
within its page cache (CACHE_KIB) and spills the rest to temporary files, so the launcher's memory
is that cache plus one shard's line, whatever the number of images: the disk holds the rest
(about 150 bytes per image).

The order within a class is a hash of the path and the seed, so the plan depends on the set of
files alone, not on the order a store lists them in: the same source gives the same shards on
every run, runner and machine.
"""

import collections
import hashlib
import os
import shutil
import sqlite3
import tempfile
from concurrent import futures

from absl import logging

from trainer.errors import UserError, counted
from trainer.formats.imagefiles import is_hidden, is_image_name
from trainer.formats.manifest import SPLITS
from trainer.infra import folders, storage
from trainer.prepare import plan

CACHE_KIB = 16 * 1024  # SQLite's page cache: its memory for sorting and grouping (it spills the rest to disk)
BATCH = 10_000  # rows inserted, or digests computed, at a time
PROGRESS_EVERY = 250_000  # a log line per this many files listed or hashed
# Parallel reads when hashing files whose store gives no MD5 (local disks, composite objects).
HASH_THREADS = 16
SPLIT_INDEX = {name: index for index, name in enumerate(SPLITS)}

_SCHEMA = """
CREATE TABLE listed (path TEXT, size INTEGER, digest TEXT);
CREATE TABLE ignored (path TEXT);
CREATE TABLE files (path TEXT, size INTEGER, digest TEXT, label TEXT, given INTEGER, split INTEGER, line INTEGER,
                    shuffle INTEGER);
"""


def shuffle_key(seed, path):
    """A 63-bit stable hash of `seed` and `path` (the same on every machine): a file's place in its
    class's shuffled order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{path}".encode(), digest_size=8).digest(), "big") >> 1


class Catalog:
    """The table of one prepare run.

    Args:
      source: SRC (None for a label file's rows, which are URIs).
      seed: the split seed, which also seeds the shuffle across shards.
    """

    def __init__(self, source=None, seed=0):
        self.source, self.seed = source, seed
        # Each row's location is SRC's prefix and its path (storage.join's result, at a tenth of the cost).
        self.prefix = "" if source is None else storage.join(source, "")
        self.folder = tempfile.mkdtemp(prefix="prepare-plan-")
        self.db = sqlite3.connect(os.path.join(self.folder, "plan.sqlite"), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size=-{CACHE_KIB}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        self.db.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        # SQLite reports a full disk (or a file-size limit) as one of these, without an errno.
        if isinstance(error, sqlite3.OperationalError) and str(error) in ("database or disk is full", "disk I/O error"):
            raise UserError(f"no space left on device for the plan's table in {os.path.dirname(self.folder)} "
                            f"({error}; about 160 bytes per image): free space, or point TMPDIR at a larger disk"
                            ) from None

    def _insert(self, table, rows):
        statement = f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})"
        self.db.execute("BEGIN")
        self.db.executemany(statement, rows)
        self.db.execute("COMMIT")
        rows.clear()

    def location(self, path):
        return self.prefix + path

    # --- 1. the listing ------------------------------------------------------------------------------

    def add_listing(self, output):
        """Lists SRC into the table (images by name; other files set aside as ignored), without hidden
        files and without DST if inside; returns the layout facts of the images' paths.

        Raises:
          UserError: SRC does not exist or is not a folder, holds no file or no image, or is DST.
        """
        source = self.source
        (source_key, separator), (output_key, _) = plan.comparable(source), plan.comparable(output)
        if source_key == output_key:
            raise UserError("--output must not be the --source folder itself (use a subfolder or elsewhere)")
        # DST inside SRC (e.g. SRC/tfrecords): its shards from an earlier run are not images to prepare.
        inside = None
        if output_key.startswith(source_key + separator):
            inside = output_key[len(source_key) + 1:].replace(os.sep, "/") + "/"
        facts, images, others, hidden = plan.LayoutFacts(), [], [], 0
        try:
            for count, entry in enumerate(folders.iter_files(source), start=1):
                if count % PROGRESS_EVERY == 0:  # a listing of millions takes minutes
                    logging.info("listing %s: %s so far", source, counted(count, "file"))
                path = entry[0]
                if is_hidden(path) or (inside and path.startswith(inside)):
                    hidden += 1
                elif is_image_name(path):
                    facts.add(path)
                    images.append(entry)
                    if len(images) >= BATCH:
                        self._insert("listed", images)
                else:
                    others.append((path,))
                    if len(others) >= BATCH:
                        self._insert("ignored", others)
        except FileNotFoundError:
            raise UserError(f"source not found (or not a folder): {source}") from None
        for table, rows in (("listed", images), ("ignored", others)):
            if rows:
                self._insert(table, rows)
        ignored = self.ignored_summary()
        logging.info("source %s: %s%s", source, counted(facts.count + ignored["count"], "file"),
                     f" (ignored {hidden} hidden or inside --output)" if hidden else "")
        if not facts.count + ignored["count"]:
            raise UserError(f"nothing to prepare: no files in {source}")
        if ignored["count"]:
            shown = ", ".join(ignored["files"][:5]) + (", ..." if ignored["count"] > 5 else "")
            logging.info("ignored %d files that are not images by name: %s", ignored["count"], shown)
        if not facts.count:
            raise UserError(f"nothing to prepare: no image files in {source} ({ignored['count']} other files)")
        return facts

    def ignored_summary(self):
        """dataset.json's `ignored`: the count, and the first plan.IGNORED_LISTED names in order."""
        count = self.db.execute("SELECT COUNT(*) FROM ignored").fetchone()[0]
        names = [path for path, in self.db.execute("SELECT path FROM ignored ORDER BY path LIMIT ?",
                                                   (plan.IGNORED_LISTED,))]
        return {"count": count, "files": names}

    def label_listing(self, layout):
        """Gives each listed image its class (and split, for split_dirs); returns the skipped files
        the layout has no place for, as `{"file", "reason"}`, sorted."""
        rows, skipped = [], []
        cursor = self.db.execute("SELECT path, size, digest FROM listed")
        while batch := cursor.fetchmany(BATCH):
            for path, size, digest in batch:
                label, split, reason = plan.place(path, layout)
                if reason:
                    skipped.append({"file": path, "reason": reason})
                else:
                    rows.append((path, size, digest, label, SPLIT_INDEX.get(split), None, None,
                                 shuffle_key(self.seed, path)))
            if rows:
                self._insert("files", rows)
        self.db.execute("DELETE FROM listed")
        return sorted(skipped, key=lambda entry: entry["file"])

    def add_label_rows(self, rows):
        """A label file's rows `(line, location, label, split or None)`, recorded under their URI."""
        batch = []
        for line, location, label, split in rows:
            batch.append((location, 0, None, label, SPLIT_INDEX.get(split), None, line,
                          shuffle_key(self.seed, location)))
            if len(batch) >= BATCH:
                self._insert("files", batch)
        if batch:
            self._insert("files", batch)

    def repeated_rows(self):
        """`(line, location, label, first line, first label)` of each label-file row naming an image
        an earlier row named, in line order (SQL over the rows: no set of names in memory)."""
        return self.db.execute("""
            SELECT later.line, later.path, later.label, first.line, first.label
            FROM (SELECT path, MIN(line) AS line FROM files GROUP BY path HAVING COUNT(*) > 1) AS firsts
            JOIN files AS first ON first.path = firsts.path AND first.line = firsts.line
            JOIN files AS later ON later.path = firsts.path AND later.line > firsts.line
            ORDER BY later.line""").fetchall()

    def label_counts(self):
        """`(rows, rows with a split of their own)` of a label file's rows."""
        return self.db.execute("SELECT COUNT(*), COUNT(given) FROM files").fetchone()

    def label_rows(self):
        """A label file's rows `(line, location, label, split or None)` back from the table, in line order."""
        return [(line, path, label, None if given is None else SPLITS[given]) for line, path, label, given in
                self.db.execute("SELECT line, path, label, given FROM files ORDER BY line")]

    def classes(self, origin):
        """Sorted class names (index -> name); raises UserError for fewer than two."""
        return plan.check_class_count([label for label, in self.db.execute(
            "SELECT DISTINCT label FROM files ORDER BY label")], origin)

    # --- 2. digests, splits, duplicates ----------------------------------------------------------------

    def add_digests(self, origin=None):
        """Fills in each row's MD5 (and size) the store did not report, from the bytes, HASH_THREADS
        files at a time, BATCH rows at a time.

        Raises:
          UserError: a file that does not exist (a label file's row naming a missing image: by line).
        """
        absent, count, last, done = [], 0, 0, 0
        todo = self.db.execute("SELECT COUNT(*) FROM files WHERE digest IS NULL").fetchone()[0]

        def digest(row):
            try:
                return folders.md5_and_size(self.location(row[1]))
            except FileNotFoundError:
                return "image not found"
            except storage.NotRegularFile:  # never opened
                return "not a regular file (a device, a FIFO or a socket)"

        with futures.ThreadPoolExecutor(HASH_THREADS) as pool:
            while batch := self.db.execute("SELECT rowid, path, line FROM files WHERE digest IS NULL AND rowid > ? "
                                           "ORDER BY rowid LIMIT ?", (last, BATCH)).fetchall():
                last, found, done = batch[-1][0], [], done + len(batch)
                if todo >= PROGRESS_EVERY and done % PROGRESS_EVERY < BATCH:
                    logging.info("hashing the files the store gives no MD5 for: %d of %d", done, todo)
                for row, value in zip(batch, pool.map(digest, batch), strict=True):
                    if isinstance(value, str):
                        count += 1
                        if len(absent) < 5:
                            absent.append((row[2], value, row[1]))
                    else:
                        found.append((*value, row[0]))
                if found:
                    self.db.execute("BEGIN")
                    self.db.executemany("UPDATE files SET digest = ?, size = ? WHERE rowid = ?", found)
                    self.db.execute("COMMIT")
        if absent and absent[0][0] is not None:
            shown = "; ".join(f"line {line}: {reason}: {path}" for line, reason, path in absent)
            more = f" (and {count - 5} more)" if count > 5 else ""
            raise UserError(f"{origin}: {count} bad rows: {shown}{more}")
        if absent:
            raise UserError(f"{count} images disappeared while preparing, e.g. {absent[0][2]} ({absent[0][1]})")

    def assign_splits(self, val_fraction, test_fraction, seed):
        """Gives every row its split, every group of identical files (one MD5) the same one.

        A group none of whose files has a split of its own (no split folders, ML_USE unassigned) gets
        the stable hash of its content's digest (plan.assign_split). A group with given splits goes to
        train if any copy is in train, else val, else test: then no test or val image has a twin in
        training.

        Returns:
          dataset.json's duplicates summary {"groups", "files", "moved": [{"file", "from", "to"}],
          "conflicts": [{"files", "labels"}]}.
        """
        self.db.create_function("hash_split", 1, lambda digest: SPLIT_INDEX[plan.assign_split(
            digest, val_fraction, test_fraction, seed)], deterministic=True)
        self.db.executescript("""
            BEGIN;
            UPDATE files SET split = COALESCE(given, hash_split(digest));
            CREATE TEMP TABLE groups AS SELECT digest, MIN(given) AS best, COUNT(*) AS copies,
                COUNT(DISTINCT label) AS labels FROM files GROUP BY digest HAVING COUNT(*) > 1;
            CREATE UNIQUE INDEX temp.groups_digest ON groups (digest);
            UPDATE files SET split = (SELECT best FROM groups WHERE groups.digest = files.digest)
                WHERE digest IN (SELECT digest FROM groups WHERE best IS NOT NULL);
            COMMIT;""")
        groups, copies = self.db.execute("SELECT COUNT(*), COALESCE(SUM(copies), 0) FROM groups").fetchone()
        moved = [{"file": path, "from": SPLITS[given], "to": SPLITS[split]} for path, given, split in self.db.execute(
            "SELECT path, given, split FROM files WHERE given IS NOT NULL AND given != split ORDER BY path")]
        conflicts = {}
        for digest, path, label in self.db.execute(
                "SELECT files.digest, path, label FROM files JOIN groups ON files.digest = groups.digest "
                "WHERE groups.labels > 1 ORDER BY files.digest, path"):
            entry = conflicts.setdefault(digest, {"files": [], "labels": set()})
            entry["files"].append(path)
            entry["labels"].add(label)
        conflicts = [{"files": entry["files"], "labels": sorted(entry["labels"])} for entry in conflicts.values()]
        self.db.execute("DROP TABLE groups")
        if copies:
            logging.info("duplicates: %d groups of identical files (%d files), each kept in one split; %d files "
                         "moved to their group's split", groups, copies, len(moved))
        for conflict in conflicts:
            logging.warning("identical files with different labels %s: %s", conflict["labels"],
                            ", ".join(conflict["files"][:4]))
        return {"groups": groups, "files": copies, "moved": moved, "conflicts": conflicts}

    def counts(self):
        """`({(class, split): images}, {split: source bytes})`."""
        images, sizes = collections.Counter(), dict.fromkeys(SPLITS, 0)
        for label, split, count, size in self.db.execute(
                "SELECT label, split, COUNT(*), SUM(size) FROM files GROUP BY label, split"):
            images[label, SPLITS[split]] = count
            sizes[SPLITS[split]] += size
        return images, sizes

    # --- 3. the shards -----------------------------------------------------------------------------------

    def shards(self, split, count):
        """Yields the `count` shards of `split` in order, each a list of `(path, location, label, md5, size)`.

        Stratified: the i-th of a class's n files (ordered by `shuffle_key`) gets the position
        (i + jitter) / n, its jitter in [0, 1) from the key's low bits; sorting by position
        interleaves the classes in proportion, so any run of consecutive files (a shard) holds each
        class in about its overall share: with two equal classes, every run of 4 holds both. The
        sorted list is cut into `count` consecutive pieces.
        """
        self.db.executescript(f"""
            DROP TABLE IF EXISTS temp.members;
            CREATE TEMP TABLE members AS SELECT label, COUNT(*) AS n FROM files WHERE split = {SPLIT_INDEX[split]}
                GROUP BY label;""")
        total = self.db.execute("SELECT COALESCE(SUM(n), 0) FROM members").fetchone()[0]
        if not total:
            return
        cursor = self.db.execute("""
            SELECT path, label, digest, size, (ROW_NUMBER() OVER (PARTITION BY label ORDER BY shuffle, path) - 1
                + (shuffle & 1048575) / 1048576.0) / members.n AS position
            FROM files JOIN members USING (label) WHERE split = ? ORDER BY position, path""", (SPLIT_INDEX[split],))
        index, piece, shard = 0, 0, []
        for row in cursor:
            shard.append((row[0], self.location(row[0]), row[1], row[2], row[3]))
            index += 1
            if index == (piece + 1) * total // count:  # count <= total: no piece is empty
                yield shard
                piece, shard = piece + 1, []
