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
  - compare-and-swap writes (`write_if_generation`): a generation precondition on `gs://` through
    google-cloud-storage (one client per process), an exclusive lock on the folder locally.
"""

import base64
import contextlib
import fcntl
import functools
import glob as globmodule
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from concurrent import futures

import fsspec

from trainer.errors import RetryableError, UserError, disk_full, first_line

# gcsfs otherwise probes for hierarchical-namespace buckets over gRPC, which an emulator never
# answers: each bucket would cost a 60 s timeout. Real GCS keeps the library default.
if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# What a storage client raises when the service cannot be reached (after its own retries).
_UNREACHABLE = (ConnectionError, TimeoutError)
COPY_BLOCK_BYTES = 16 * 2**20
# Listing an object store (`_find_in_parallel`): folder levels listed first, and listings at once.
LIST_DEPTH = 2
LIST_THREADS = 16

# Deadlines (docs/faults.md): every request to an object store gives up when connecting, or waiting
# for the next bytes of an answer, takes longer than this; the clients retry a failed request a
# bounded number of times (gcsfs: ATTEMPTS in all, with 1-16 s of backoff between them), so a
# stalled or unreachable store ends an operation within about ATTEMPTS x TIMEOUT + 40 s (2.7 min by
# default).
REQUEST_TIMEOUT_SECONDS = float(os.environ.get("TRAINER_STORAGE_TIMEOUT_SECONDS", "20"))
ATTEMPTS = 6  # gcsfs's own (GCSFileSystem.retries); the other clients are given the same
# google-cloud-storage (the compare-and-swap writes): one request's timeout, and the deadline of its
# retries together.
_GCS_CLIENT_DEADLINE_SECONDS = ATTEMPTS * REQUEST_TIMEOUT_SECONDS + 40
# TensorFlow's own gs:// client (training reads on real GCS) waits up to an hour per request by
# default; these environment variables (read when TensorFlow first touches gs://) bring it in line.
TENSORFLOW_GCS_ENVIRONMENT = {
    "GCS_REQUEST_CONNECTION_TIMEOUT_SECS": REQUEST_TIMEOUT_SECONDS,
    "GCS_REQUEST_IDLE_TIMEOUT_SECS": REQUEST_TIMEOUT_SECONDS,
    "GCS_METADATA_REQUEST_TIMEOUT_SECS": REQUEST_TIMEOUT_SECONDS,
    "GCS_READ_REQUEST_TIMEOUT_SECS": ATTEMPTS * REQUEST_TIMEOUT_SECONDS,
    "GCS_WRITE_REQUEST_TIMEOUT_SECS": ATTEMPTS * REQUEST_TIMEOUT_SECONDS,
    "GCS_RETRY_CONFIG_MAX_RETRIES": ATTEMPTS,
}
for _name, _value in TENSORFLOW_GCS_ENVIRONMENT.items():
    os.environ.setdefault(_name, str(int(_value)))
# gcsfs logs a full traceback for every request it gives up on (dozens when many reads fail at once);
# the command's one-line message says what failed.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


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


def _local(location):
    """A local path as the OS takes it: `file://` dropped, and `~` expanded (a shell leaves the `~`
    of `--source=~/photos` as it is)."""
    return os.path.expanduser(location[len("file://"):] if location.startswith("file://") else location)


def join(base, *parts):
    """Joins path parts with `/` for URLs and the OS separator for local paths."""
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(_local(base), *parts)


def basename(location):
    return posixpath.basename(location.rstrip("/")) if is_url(location) else os.path.basename(location)


def dirname(location):
    if is_url(location):
        scheme, rest = location.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(_local(location)))


def _filesystem(location):
    """fsspec's filesystem for `location` and the path on it (local paths: the local filesystem)."""
    if not is_url(location):
        return fsspec.filesystem("file"), os.path.abspath(_local(location))
    # No listings cache: another process (a peer worker, a rerun) may have written since.
    options = {"use_listings_cache": False}
    if is_gcs(location):
        import aiohttp

        options["requests_timeout"] = aiohttp.ClientTimeout(
            total=None, sock_connect=REQUEST_TIMEOUT_SECONDS, sock_read=REQUEST_TIMEOUT_SECONDS)
    return fsspec.core.url_to_fs(location, **options)


@contextlib.contextmanager
def _translate_errors(location):
    try:
        yield
    except FileNotFoundError:
        raise
    except _UNREACHABLE as error:
        reason = first_line(error) if str(error) else f"no answer within {REQUEST_TIMEOUT_SECONDS:g} s"
        raise RetryableError(f"storage unreachable at {location}: {reason}") from error
    except OSError as error:
        # A full disk, or a permission problem, is the user's to fix; aiohttp's connection errors
        # are OSErrors too, and transient.
        if disk_full(error, location):
            raise UserError(disk_full(error, location)) from error
        if str(error).startswith("Forbidden") or isinstance(error, PermissionError):
            raise UserError(f"no permission for {location}: {first_line(error)}") from error
        if is_url(location):
            raise RetryableError(f"storage error at {location}: {first_line(error)}") from error
        raise UserError(f"cannot access {location}: {error}") from error


def exists(location):
    with _translate_errors(location):
        filesystem, path = _filesystem(location)
        return filesystem.exists(path)


def isdir(location):
    """True for a local folder, or a URL prefix that has objects under it.

    Unlike fsspec's `isdir`, which answers False on any error, an unreachable store raises.
    """
    with _translate_errors(location):
        filesystem, path = _filesystem(location)
        try:
            return filesystem.info(path)["type"] == "directory"
        except FileNotFoundError:
            return False


def size(location):
    with _translate_errors(location):
        filesystem, path = _filesystem(location)
        return filesystem.size(path)


def check_writable(location):
    """Raises UserError, at once and before any expensive work, when nothing can be written at
    `location`: a gs:// bucket that does not exist (or this account cannot see), a local path under
    a file, or a local folder without write permission."""
    with _translate_errors(location):
        if is_gcs(location):
            bucket = location[len("gs://"):].split("/", 1)[0]
            with _translate_gcs_errors(location):  # one request (gcsfs's exists may make several)
                found = _gcs_client().lookup_bucket(bucket, **_gcs_call_options())
            if found is None:
                raise UserError(f"bucket gs://{bucket} does not exist (or this account cannot see it): create it, "
                                f"or fix the location {location}")
            return
        if is_url(location):
            return
        path = os.path.abspath(_local(location))
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
        with _translate_errors(location):
            os.makedirs(_local(location), exist_ok=True)


def list_files(location, with_md5=False):
    """Every file under `location`, recursively, as sorted `(relative_path, size)` pairs.

    With `with_md5`, triples `(relative_path, size, md5)`: the base64 MD5 the store's listing
    reports (GCS's md5Hash), or None where it reports none (local files, composite objects; see
    `md5_and_size`). Relative paths always use `/`. Raises FileNotFoundError when `location` does
    not exist.
    """
    with _translate_errors(location):
        if not is_url(location):
            files = _list_local_files(_local(location))
            return [(name, size, None) for name, size in files] if with_md5 else files
        if not isdir(location):
            raise FileNotFoundError(location)
        filesystem, path = _filesystem(location)
        path = path.rstrip("/")
        found = _find_in_parallel(filesystem, path)
        files = sorted(
            (posixpath.relpath(name, path), int(info.get("size") or 0), info.get("md5Hash"))
            for name, info in found.items()
            if info.get("type") != "directory" and not name.endswith("/")
        )
        return files if with_md5 else [(name, size) for name, size, _ in files]


def _find_in_parallel(filesystem, path):
    """`{name: info}` of every object under `path` of an object store, listed folder by folder.

    A listing is a sequence of pages of 1,000 objects, one request each: 10 million objects are
    10,000 requests in a row. The first LIST_DEPTH levels of folders (class folders, or split
    folders of class folders) are listed one request each, and the folders below them are listed
    side by side, LIST_THREADS at a time.
    """
    found, folders = {}, [path]
    with futures.ThreadPoolExecutor(LIST_THREADS) as pool:
        for _ in range(LIST_DEPTH):
            deeper = []
            for entries in pool.map(lambda folder: filesystem.ls(folder, detail=True), folders):
                for info in entries:
                    if info.get("type") == "directory":
                        deeper.append(info["name"].rstrip("/"))
                    else:
                        found[info["name"]] = info
            folders = deeper
        for part in pool.map(lambda folder: filesystem.find(folder, detail=True), folders):
            found.update(part)
    return found


def md5_and_size(location):
    """`(base64 MD5 of the content, size)` of one file: from GCS's metadata when it has one,
    else by reading the file. Raises FileNotFoundError when it does not exist."""
    with _translate_errors(location):
        filesystem, path = _filesystem(location)
        if is_gcs(location):
            info = filesystem.info(path)
            if info.get("md5Hash"):
                return info["md5Hash"], int(info.get("size") or 0)
        digest, size = hashlib.md5(), 0  # noqa: S324 - a content id for finding copies, not security
        with open_file(location, "rb", block_size=COPY_BLOCK_BYTES) as handle:
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
        md5 = md5 or md5_and_size(join(location, *relative.split("/")))[0]
        digest.update(f"{relative}\0{md5}\n".encode())
    return digest.hexdigest()[:32]


def _list_local_files(root):
    """`list_files` of a local folder: symbolic links are followed, each real folder listed once
    (a link loop ends there), and dangling links are left out and logged."""
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    files, seen, dangling = [], set(), 0
    for folder, folders, names in os.walk(root, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:
            folders[:] = []  # a link back to a folder already listed
            continue
        seen.add((status.st_dev, status.st_ino))
        for name in names:
            full = os.path.join(folder, name)
            try:
                size = os.path.getsize(full)
            except FileNotFoundError:  # a link to nothing
                dangling += 1
                continue
            files.append((os.path.relpath(full, root).replace(os.sep, "/"), size))
    if dangling:
        from absl import logging

        logging.warning("%s: left out %d dangling symbolic links", root, dangling)
    return sorted(files)


def glob(pattern):
    """Sorted full locations matching a glob pattern (`*`, `?`, `[..]`, `**`).

    Local matches keep the form of the pattern (relative stays relative), as a shell would.
    """
    with _translate_errors(pattern):
        if not is_url(pattern):
            return sorted(globmodule.glob(_local(pattern), recursive=True))
        filesystem, path = _filesystem(pattern)
        return sorted(filesystem.unstrip_protocol(name) for name in filesystem.glob(path))


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
    with _translate_errors(location):
        if is_url(location):
            filesystem, path = _filesystem(location)
            options = {"block_size": block_size} if block_size else {}
            if mode.startswith("r"):
                # Plain read-ahead: gcsfs's default "adaptive" cache starts a background prefetcher
                # that deadlocks when several threads (tf.data's generator threads) read at once.
                options["cache_type"] = "readahead"
            with filesystem.open(path, mode, **options) as handle:
                yield handle
        elif mode.startswith("r"):
            with open(_local(location), mode) as handle:
                yield handle
        else:
            path = _local(location)
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


def read_bytes(location):
    if is_url(location):  # one request (opening a remote file asks for its metadata first)
        with _translate_errors(location):
            filesystem, path = _filesystem(location)
            return filesystem.cat_file(path)
    with open_file(location, "rb") as handle:
        return handle.read()


def read_many(locations):
    """The bytes of each location, in order, or None for one that does not exist.

    On object stores the requests run concurrently in fsspec's event loop (one batch, no thread
    per request): at tens of milliseconds a request, reading one object at a time would leave the
    cores idle. All locations must share one scheme (one filesystem).
    """
    if not locations:
        return []
    schemes = {location.split("://", 1)[0] if is_url(location) else "" for location in locations}
    if len(schemes) > 1:  # a label file may name images on several stores
        return [value for location in locations for value in read_many([location])]
    with _translate_errors(locations[0]):
        filesystem, _ = _filesystem(locations[0])
        paths = [_filesystem(location)[1] for location in locations]
        results = filesystem.cat_ranges(paths, None, None, on_error="return")
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, FileNotFoundError):
                raise result
        return [None if isinstance(result, FileNotFoundError) else result for result in results]


def read_range(location, start, end):
    """Bytes `start` to `end` of one file (one ranged request on object stores)."""
    with _translate_errors(location):
        filesystem, path = _filesystem(location)
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
        copy(join(source, *relative.split("/")), join(destination, *relative.split("/")))
    return files


def remove(location, recursive=False):
    """Removes a file (or with `recursive`, everything under a folder or prefix); missing is fine."""
    with _translate_errors(location):
        filesystem, path = _filesystem(location)
        if filesystem.exists(path):
            filesystem.rm(path, recursive=recursive)


def local_copy(location, cache_dir=None):
    """A local path holding `location`'s content: itself when local, else a cached download.

    Used for files that libraries only read from local disk (Keras weight files). The cache key is
    the URL, and a download is renamed into place only when complete.
    """
    if not is_url(location):
        return _local(location)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "trainer-cache")
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, digest, basename(location))
    if not os.path.exists(target):
        copy(location, target)
    return target


# --- compare-and-swap -------------------------------------------------------------------------------


@functools.cache
def _gcs_client():
    """One google-cloud-storage client per process (anonymous against an emulator)."""
    from google.cloud import storage as gcs

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return gcs.Client.create_anonymous_client()
    return gcs.Client()


def _gcs_blob(location):
    bucket, _, name = location[len("gs://"):].partition("/")
    return _gcs_client().bucket(bucket).blob(name)


def _gcs_call_options():
    """Per-request timeout and the deadline of the retries for google-cloud-storage calls."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return {"timeout": (REQUEST_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS),
            "retry": DEFAULT_RETRY.with_timeout(_GCS_CLIENT_DEADLINE_SECONDS)}


@contextlib.contextmanager
def _translate_gcs_errors(location):
    """google-cloud-storage's own errors: server-side failures (after its retries) are transient."""
    from google.api_core import exceptions

    with _translate_errors(location):
        try:
            yield
        except exceptions.RetryError as error:
            cause = f" (last: {first_line(error.cause)})" if error.cause else ""
            raise RetryableError(f"storage unreachable at {location}: no answer within "
                                 f"{_GCS_CLIENT_DEADLINE_SECONDS:g} s of retries{cause}") from error
        except exceptions.ServerError as error:
            raise RetryableError(f"storage error at {location}: {first_line(error)}") from error
        except exceptions.Forbidden as error:
            raise UserError(f"no permission for {location}: {first_line(error)}") from error
        except exceptions.NotFound as error:  # writing into a bucket that does not exist
            raise UserError(f"cannot write {location}: {first_line(error)}") from error


def read_with_generation(location):
    """Reads a (small) file together with its generation, for a later `write_if_generation`.

    Args:
      location: a local path or URL.

    Returns:
      `(data, generation)`; `(None, 0)` when nothing is there. The generation is an opaque token:
      the object's generation on gs://, a hash of the content elsewhere.

    Raises:
      RetryableError: remote storage unreachable after the client's retries.
    """
    if is_gcs(location):
        from google.api_core import exceptions

        with _translate_gcs_errors(location):
            while True:  # the object may change between the metadata and the content: reread
                blob = _gcs_blob(location)
                try:
                    blob.reload(**_gcs_call_options())
                    data = blob.download_as_bytes(if_generation_match=blob.generation, **_gcs_call_options())
                    return data, blob.generation
                except exceptions.NotFound:
                    return None, 0
                except exceptions.PreconditionFailed:
                    continue
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        return None, 0
    return data, hashlib.sha256(data).hexdigest()


def write_if_generation(location, data, generation):
    """Replaces `location` with `data` only if it is still at `generation`; returns whether it did.

    A compare-and-swap: of several writers that read the same generation (`read_with_generation`),
    exactly one succeeds; generation 0 means "only if absent" (`write_if_absent`). `gs://` uses the
    `ifGenerationMatch` precondition. Local files compare and rename under an exclusive lock on
    their folder. Other fsspec stores fall back to compare-then-write, which is not atomic.

    Raises:
      RetryableError: remote storage unreachable after the client's retries.
    """
    if is_gcs(location):
        from google.api_core import exceptions

        with _translate_gcs_errors(location):
            try:
                _gcs_blob(location).upload_from_string(data, if_generation_match=generation,
                                                       **_gcs_call_options())
                return True
            except exceptions.PreconditionFailed:
                return False
    if is_url(location):
        if read_with_generation(location)[1] != generation:
            return False
        write_bytes(location, data)
        return True
    path = _local(location)
    folder = os.path.dirname(os.path.abspath(path))
    makedirs(folder)
    with _translate_errors(location):
        lock = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the descriptor closes
            if read_with_generation(path)[1] != generation:
                return False
            write_bytes(path, data)
            return True
        finally:
            os.close(lock)


def write_if_absent(location, data):
    """Creates `location` with `data` only if nothing is there yet; returns whether it did."""
    return write_if_generation(location, data, 0)
