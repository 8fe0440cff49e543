"""Compare-and-swap on a file: of several writers that read the same generation, exactly one wins.

The LEASE of a job_dir, its STARTED and config.json (create-if-absent), and production's LATEST
pointer change only through here. `gs://` uses generation preconditions through
google-cloud-storage (trainer.infra.gcs); local files compare and rename under an exclusive lock on
their folder; other fsspec stores fall back to compare-then-write, which is not atomic.
"""

import fcntl
import functools
import hashlib
import os

from trainer.infra import faults, gcs, storage


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
    if storage.is_gcs(location):
        from google.api_core import exceptions

        with faults.translate_gcs_errors(location):
            while True:  # the object may change between the metadata and the content: reread
                blob = gcs.blob(location)
                try:
                    gcs.bounded(functools.partial(blob.reload, **gcs.call_options()), location)
                    data = gcs.bounded(functools.partial(blob.download_as_bytes, if_generation_match=blob.generation,
                                                         **gcs.call_options()), location)
                    return data, blob.generation
                except exceptions.NotFound:
                    return None, 0
                except exceptions.PreconditionFailed:
                    continue
    try:
        data = storage.read_bytes(location)
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
    if storage.is_gcs(location):
        from google.api_core import exceptions

        with faults.translate_gcs_errors(location):
            try:
                gcs.bounded(lambda: gcs.blob(location).upload_from_string(data, if_generation_match=generation,
                                                                           **gcs.call_options()), location)
                return True
            except exceptions.PreconditionFailed:
                return False
    if storage.is_url(location):
        if read_with_generation(location)[1] != generation:
            return False
        storage.write_bytes(location, data)
        return True
    path = storage.local_path(location)
    folder = os.path.dirname(os.path.abspath(path))
    storage.makedirs(folder)
    with storage.translate_errors(location):
        lock = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the descriptor closes
            if read_with_generation(path)[1] != generation:
                return False
            storage.write_bytes(path, data)
            return True
        finally:
            os.close(lock)


def write_if_absent(location, data):
    """Creates `location` with `data` only if nothing is there yet; returns whether it did."""
    return write_if_generation(location, data, 0)
