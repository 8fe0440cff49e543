"""Every user-given location goes through this module: local paths, `gs://`, any fsspec URL.

Nothing else in the trainer calls `open()`, `os.makedirs`, gcsfs or `tf.io.gfile` on a location a
user named. fsspec does the work for every store (its local filesystem included; gcsfs for
`gs://`, whose client already retries transient errors with exponential backoff). Own code is kept
only where it adds something:
  - errors: what still fails after the client's retries is raised as `RetryableError`, so the job
    exits with the retryable code instead of a traceback; a local permission problem is a
    `UserError`;
  - whole-or-nothing writes: a local file is written to a temporary name in the same folder and
    renamed (with the permissions the umask gives); an object-store upload only becomes visible
    when it completes;
Folders (listing, copying, digests) are in trainer.infra.folders, compare-and-swap writes in
trainer.infra.cas, what a failed request means (deadlines, errors) in trainer.infra.faults.
"""

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
import uuid

import fsspec

from trainer.errors import UserError
from trainer.infra import faults, gcs

COPY_BLOCK_BYTES = 16 * 2**20

def is_url(location):
    """True for `scheme://...` locations, False for local paths (and `file://`)."""
    return "://" in location and not location.startswith("file://")


def is_gcs(location):
    return location.startswith("gs://")


def tensorflow_can_read(location):
    """Whether TensorFlow's own filesystem reaches `location` (the fastest path).

    TF's `gs://` has the real endpoint compiled in, so it cannot reach an emulator: with
    STORAGE_EMULATOR_HOST set, `gs://` goes through fsspec instead.
    """
    if not is_url(location):
        return True
    return is_gcs(location) and not os.environ.get("STORAGE_EMULATOR_HOST")


def local_path(location):
    """A local path as the OS takes it: `file://` dropped, and `~` expanded (a shell leaves the `~`
    of `--source=~/photos` as it is)."""
    return os.path.expanduser(location[len("file://"):] if location.startswith("file://") else location)


def join(base, *parts):
    """Joins path parts with `/` for URLs and the OS separator for local paths."""
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(local_path(base), *parts)


def basename(location):
    return posixpath.basename(location.rstrip("/")) if is_url(location) else os.path.basename(location)


def dirname(location):
    if is_url(location):
        scheme, rest = location.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(local_path(location)))


def fsspec_filesystem(location):
    """fsspec's filesystem for `location` and the path on it (local paths: the local filesystem)."""
    if not is_url(location):
        return fsspec.filesystem("file"), os.path.abspath(local_path(location))
    # No listings cache: another process (a peer worker, a rerun) may have written since.
    options = {"use_listings_cache": False}
    if is_gcs(location):
        import aiohttp

        options["requests_timeout"] = aiohttp.ClientTimeout(
            total=faults.request_total_seconds(), sock_connect=faults.request_timeout_seconds(),
            sock_read=faults.request_timeout_seconds())
    return fsspec.core.url_to_fs(location, **options)


def translate_errors(location):
    """fsspec's errors at `location` as UserError or RetryableError (trainer.infra.faults)."""
    return faults.translate_errors(location, remote=is_url(location))


def exists(location):
    with translate_errors(location):
        filesystem, path = fsspec_filesystem(location)
        return filesystem.exists(path)


def isdir(location):
    """True for a local folder, or a URL prefix that has objects under it.

    Unlike fsspec's `isdir`, which answers False on any error, an unreachable store raises.
    """
    with translate_errors(location):
        filesystem, path = fsspec_filesystem(location)
        try:
            return filesystem.info(path)["type"] == "directory"
        except FileNotFoundError:
            return False


def size(location):
    with translate_errors(location):
        filesystem, path = fsspec_filesystem(location)
        return filesystem.size(path)


def check_writable(location):
    """Raises UserError, at once and before any expensive work, when nothing can be written at
    `location`: a gs:// bucket that does not exist (or this account cannot see), a local path under
    a file, or a local folder without write permission."""
    with translate_errors(location):
        if is_gcs(location):
            if not gcs.bucket_exists(location):  # one request (gcsfs's exists may make several)
                bucket = location[len("gs://"):].split("/", 1)[0]
                raise UserError(f"bucket gs://{bucket} does not exist (or this account cannot see it): create it, "
                                f"or fix the location {location}")
            return
        if is_url(location):
            return
        path = os.path.abspath(local_path(location))
        if os.path.isfile(path):  # a file to replace: its folder must be writable
            path = os.path.dirname(path)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise UserError(f"cannot write {location}: {path} is a file, not a folder")
        if not os.access(path, os.W_OK):
            raise UserError(f"cannot write {location}: no write permission in {path}")


def makedirs(location):
    """Creates a local folder (and parents). Object stores have no folders: a no-op there."""
    if not is_url(location):
        with translate_errors(location):
            os.makedirs(local_path(location), exist_ok=True)


def _create_temporary(folder):
    """A new empty file in `folder`, created with the permissions the umask gives (not 0600)."""
    while True:
        temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue


@contextlib.contextmanager
def open_file(location, mode="rb", block_size=None):
    """Opens a file for reading or (whole-file, atomic) writing. Modes: rb, r, wb, w.

    Args:
      location: a local path or URL.
      mode: "rb"/"r" to read, "wb"/"w" to write (replacing any existing file).
      block_size: read-ahead size for remote files (large reads suit object storage).

    Raises:
      FileNotFoundError: reading a location that does not exist.
      RetryableError: remote storage unreachable after the client's retries.
    """
    if mode not in ("rb", "r", "wb", "w"):
        raise ValueError(f"unsupported mode {mode!r}")
    with translate_errors(location):
        if is_url(location):
            filesystem, path = fsspec_filesystem(location)
            options = {"block_size": block_size} if block_size else {}
            if mode.startswith("r"):
                # Plain read-ahead: gcsfs's default "adaptive" cache starts a background prefetcher
                # that deadlocks when several threads (tf.data's generator threads) read at once.
                options["cache_type"] = "readahead"
            with filesystem.open(path, mode, **options) as handle:
                yield handle
        elif mode.startswith("r"):
            check_regular_file(location)
            with open(local_path(location), mode) as handle:
                yield handle
        else:
            path = local_path(location)
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            descriptor, temporary = _create_temporary(folder)
            try:
                with os.fdopen(descriptor, mode) as handle:
                    yield handle
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise


class NotRegularFile(UserError):
    """A local path that is a device, a FIFO, a socket, or a link to one."""


def check_regular_file(location):
    """Raises NotRegularFile for a local path that is not a regular file (a device, a FIFO, a
    socket, or a link to one): opening or reading it could block or never end, so it is never opened."""
    path = local_path(location)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the open that follows says which
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise NotRegularFile(f"{location} is not a regular file (a device, a FIFO or a socket): it is not read")


def read_bytes(location):
    if is_url(location):  # one request (opening a remote file asks for its metadata first)
        with translate_errors(location):
            filesystem, path = fsspec_filesystem(location)
            return filesystem.cat_file(path)
    with open_file(location, "rb") as handle:
        return handle.read()


def read_many(locations, max_bytes=None):
    """The bytes of each location, in order, or None for one that does not exist.

    With `max_bytes`, at most `max_bytes + 1` bytes of each are read: a result longer than
    `max_bytes` says the file is larger (and no stream can be read without end).

    On object stores the requests run concurrently in fsspec's event loop (one batch, no thread
    per request): at tens of milliseconds a request, reading one object at a time would leave the
    cores idle. All locations must share one scheme (one filesystem).
    """
    if not locations:
        return []
    schemes = {location.split("://", 1)[0] if is_url(location) else "" for location in locations}
    if len(schemes) > 1:  # a label file may name images on several stores
        return [value for location in locations for value in read_many([location], max_bytes)]
    if not is_url(locations[0]):
        for location in locations:
            check_regular_file(location)
    with translate_errors(locations[0]):
        filesystem, _ = fsspec_filesystem(locations[0])
        paths = [fsspec_filesystem(location)[1] for location in locations]
        ends = None if max_bytes is None else [max_bytes + 1] * len(paths)
        results = filesystem.cat_ranges(paths, None if ends is None else [0] * len(paths), ends, on_error="return")
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, FileNotFoundError):
                raise result
        return [None if isinstance(result, FileNotFoundError) else result for result in results]


def read_range(location, start, end):
    """Bytes `start` to `end` of one file (one ranged request on object stores)."""
    with translate_errors(location):
        filesystem, path = fsspec_filesystem(location)
        return filesystem.cat_file(path, start=start, end=end)


def write_bytes(location, data):
    with open_file(location, "wb") as handle:
        handle.write(data)


def read_text(location):
    return read_bytes(location).decode("utf-8")


def write_text(location, text):
    write_bytes(location, text.encode("utf-8"))


def read_json(location):
    return json.loads(read_bytes(location))


def write_json(location, value):
    write_text(location, json.dumps(value, indent=2, sort_keys=False) + "\n")


def copy(source, destination):
    """Copies one file between any two locations, streaming."""
    with open_file(source, "rb", block_size=COPY_BLOCK_BYTES) as reader, open_file(destination, "wb") as writer:
        shutil.copyfileobj(reader, writer, length=8 * 2**20)


def remove(location, recursive=False):
    """Removes a file (or with `recursive`, everything under a folder or prefix); missing is fine."""
    with translate_errors(location):
        filesystem, path = fsspec_filesystem(location)
        if filesystem.exists(path):
            filesystem.rm(path, recursive=recursive)


def local_copy(location, cache_dir=None):
    """A local path holding `location`'s content: itself when local, else a cached download.

    Used for files that libraries only read from local disk (Keras weight files). The cache key is
    the URL, and a download is renamed into place only when complete.
    """
    if not is_url(location):
        return local_path(location)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "trainer-cache")
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, digest, basename(location))
    if not os.path.exists(target):
        copy(location, target)
    return target


