"""Folders and prefixes: every file under a location (listed folder by folder in parallel on object
stores), globs, copying a tree, and content digests (a model's id, trainer.formats.modeldir)."""

import base64
import collections
import glob as globmodule
import hashlib
import os
import stat
from concurrent import futures

from trainer.infra import storage

# Listing an object store (`_find_in_parallel`): folder levels listed first, and listings at once.
LIST_DEPTH = 2
LIST_THREADS = 16


def list_files(location, with_md5=False):
    """Every file under `location`, recursively, as sorted `(relative_path, size)` pairs.

    With `with_md5`, triples `(relative_path, size, md5)`: the base64 MD5 the store's listing
    reports (GCS's md5Hash), or None where it reports none (local files, composite objects; see
    `md5_and_size`). Relative paths always use `/`. Raises FileNotFoundError when `location` does
    not exist.
    """
    files = sorted(iter_files(location))
    return files if with_md5 else [(name, size) for name, size, _ in files]


def iter_files(location):
    """`list_files(location, with_md5=True)` in no particular order, as a stream: memory holds one
    folder's listing at a time, whatever the number of files. Raises FileNotFoundError (before
    the first entry) when `location` does not exist."""
    with storage.translate_errors(location):
        if not storage.is_url(location):
            yield from ((name, size, None) for name, size in _walk_local_files(storage.local_path(location)))
            return
        if not storage.isdir(location):
            raise FileNotFoundError(location)
        filesystem, path = storage.fsspec_filesystem(location)
        path = path.rstrip("/")
        start = len(path) + 1  # every name is `path/...` (posixpath.relpath would cost more than the rest)
        for name, size, md5 in _find_in_parallel(filesystem, path):
            yield name[start:], size, md5


def _map_window(pool, function, items, window):
    """`pool.map` with at most `window` calls started ahead of the consumer, results in order."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _compact(entries):
    """`(name, is_folder, size, md5)` of a listing's entries: the store's info dicts (a kilobyte or
    more each) are dropped in the listing thread, not kept while they wait for the consumer."""
    return [(info["name"], info.get("type") == "directory", int(info.get("size") or 0), info.get("md5Hash"))
            for info in entries]


def _find_in_parallel(filesystem, path):
    """Yields `(name, size, md5)` of every object under `path` of an object store, listed folder by folder.

    A listing is a sequence of pages of 1,000 objects, one request each: 10 million objects are
    10,000 requests in a row. The first LIST_DEPTH levels of folders (class folders, or split
    folders of class folders) are listed one request each, and the folders below them are listed
    side by side, LIST_THREADS at a time. Memory holds the listings of those LIST_THREADS
    folders, not the whole tree.
    """
    folders = [path]
    with futures.ThreadPoolExecutor(LIST_THREADS) as pool:
        for _ in range(LIST_DEPTH):
            deeper = []
            for entries in _map_window(pool, lambda folder: _compact(filesystem.ls(folder, detail=True)), folders,
                                       LIST_THREADS):
                for name, is_folder, size, md5 in entries:
                    if is_folder:
                        deeper.append(name.rstrip("/"))
                    elif not name.endswith("/"):
                        yield name, size, md5
            folders = deeper
        for entries in _map_window(pool, lambda folder: _compact(filesystem.find(folder, detail=True).values()),
                                   folders, LIST_THREADS):
            for name, is_folder, size, md5 in entries:
                if not is_folder and not name.endswith("/"):
                    yield name, size, md5


def _walk_local_files(root):
    """`iter_files` of a local folder, as `(relative_path, size)`: symbolic links are followed, each
    real folder listed once (a link loop ends there); dangling links, and what is not a regular
    file (a device, a FIFO, a socket, or a link to one: reading it could block or never end), are
    left out and logged."""
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    seen, dangling, special = set(), 0, []
    for folder, folders, names in os.walk(root, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:
            folders[:] = []  # a link back to a folder already listed
            continue
        seen.add((status.st_dev, status.st_ino))
        for name in names:
            full = os.path.join(folder, name)
            relative = os.path.relpath(full, root).replace(os.sep, "/")
            try:
                status = os.stat(full)
            except FileNotFoundError:  # a link to nothing
                dangling += 1
                continue
            if not stat.S_ISREG(status.st_mode):
                special.append(relative)
                continue
            yield relative, status.st_size
    if dangling or special:
        from absl import logging

        if dangling:
            logging.warning("%s: left out %d dangling symbolic links", root, dangling)
        if special:
            logging.warning("%s: left out %d files that are not regular files (devices, FIFOs, sockets): %s", root,
                            len(special), ", ".join(sorted(special)[:5]) + (", ..." if len(special) > 5 else ""))


def glob(pattern):
    """Sorted full locations matching a glob pattern (`*`, `?`, `[..]`, `**`).

    Local matches keep the form of the pattern (relative stays relative), as a shell would.
    """
    with storage.translate_errors(pattern):
        if not storage.is_url(pattern):
            return sorted(globmodule.glob(storage.local_path(pattern), recursive=True))
        filesystem, path = storage.fsspec_filesystem(pattern)
        return sorted(filesystem.unstrip_protocol(name) for name in filesystem.glob(path))


def copy_tree(source, destination, progress=None):
    """Copies every file under `source` to the same relative path under `destination`.

    Args:
      source, destination: folders (local paths or URLs).
      progress: a description for a progress bar on stderr (shown for 10 files or more).

    Returns:
      The `(relative_path, size)` pairs copied (as `list_files(source)`).
    """
    files = list_files(source)
    if progress and len(files) >= 10:
        import sys

        import tqdm

        files_shown = tqdm.tqdm(files, desc=progress, unit="file", file=sys.stderr)
    else:
        files_shown = files
    for relative, _ in files_shown:
        storage.copy(storage.join(source, *relative.split("/")), storage.join(destination, *relative.split("/")))
    return files


def md5_and_size(location):
    """`(base64 MD5 of the content, size)` of one file: from GCS's metadata when it has one,
    else by reading the file. Raises FileNotFoundError when it does not exist."""
    with storage.translate_errors(location):
        filesystem, path = storage.fsspec_filesystem(location)
        if storage.is_gcs(location):
            info = filesystem.info(path)
            if info.get("md5Hash"):
                return info["md5Hash"], int(info.get("size") or 0)
        digest, size = hashlib.md5(), 0  # noqa: S324 - a content id for finding copies, not security
        with storage.open_file(location, "rb", block_size=storage.COPY_BLOCK_BYTES) as handle:
            while chunk := handle.read(2**20):
                digest.update(chunk)
                size += len(chunk)
        return base64.b64encode(digest.digest()).decode(), size


def tree_digest(location):
    """A short content id of everything under a folder: SHA-256 over each file's relative path and
    MD5 (GCS's listing gives the MD5s; local files are read). Equal for byte-identical copies in
    any store, different as soon as one file differs."""
    digest = hashlib.sha256()
    for relative, _, md5 in list_files(location, with_md5=True):
        md5 = md5 or md5_and_size(storage.join(location, *relative.split("/")))[0]
        digest.update(f"{relative}\0{md5}\n".encode())
    return digest.hexdigest()[:32]
