"""What a storage request may cost and what its failure means: the deadlines, and every client's
errors mapped to the exit-code protocol (trainer.errors) in one place.

Deadlines (docs/faults.md): every request to an object store gives up when connecting, or waiting
for the next bytes of an answer, takes longer than `request_timeout_seconds()`, and when the whole
request takes longer than `request_total_seconds()` (TOTAL_FACTOR x the timeout: a store that
trickles bytes, never quite stalling, is given up on too; the default 80 s lets the largest
request, gcsfs's 50 MiB upload chunk, run at 640 KiB/s). The clients retry a failed request a
bounded number of times (gcsfs: ATTEMPTS in all, with 1-16 s of backoff between them), and a
google-cloud-storage call ends within `client_deadline_seconds()` whatever happens, so a
stalled, dripping or unreachable store ends an operation within minutes (docs/faults.md).

`configure(environ)` is the one step that reads TRAINER_STORAGE_TIMEOUT_SECONDS and writes the
environment the clients read (TensorFlow's own gs:// client, gcsfs against an emulator); the
command line calls it before any work. Nothing here runs at import time.
"""

import contextlib
import logging

from trainer.errors import RetryableError, UserError, disk_full, first_line

DEFAULT_TIMEOUT_SECONDS = 20.0
TIMEOUT_VARIABLE = "TRAINER_STORAGE_TIMEOUT_SECONDS"
ATTEMPTS = 6  # gcsfs's own (GCSFileSystem.retries); the other clients are given the same
TOTAL_FACTOR = 4  # a whole request's deadline, in units of the timeout
# What a storage client raises when the service cannot be reached (after its own retries).
UNREACHABLE = (ConnectionError, TimeoutError)

_settings = {"timeout": DEFAULT_TIMEOUT_SECONDS}


def request_timeout_seconds():
    return _settings["timeout"]


def request_total_seconds():
    """The deadline of one whole request (connect, send, the complete answer)."""
    return TOTAL_FACTOR * request_timeout_seconds()


def client_deadline_seconds():
    """google-cloud-storage (the compare-and-swap writes): the deadline of one call, its retries
    together (160 s by default)."""
    return 2 * request_total_seconds()


def tensorflow_gcs_environment(timeout):
    """TensorFlow's own gs:// client (training reads on real GCS) waits up to an hour per request by
    default; these environment variables (read when TensorFlow first touches gs://) bring it in line."""
    return {
        "GCS_REQUEST_CONNECTION_TIMEOUT_SECS": timeout,
        "GCS_REQUEST_IDLE_TIMEOUT_SECS": timeout,
        "GCS_METADATA_REQUEST_TIMEOUT_SECS": timeout,
        "GCS_READ_REQUEST_TIMEOUT_SECS": ATTEMPTS * timeout,
        "GCS_WRITE_REQUEST_TIMEOUT_SECS": ATTEMPTS * timeout,
        "GCS_RETRY_CONFIG_MAX_RETRIES": ATTEMPTS,
    }


def configure(environ):
    """Reads the storage settings from `environ` and writes what the clients read there.

    Raises:
      UserError: TRAINER_STORAGE_TIMEOUT_SECONDS is not a positive number of seconds.
    """
    text = environ.get(TIMEOUT_VARIABLE, "")
    try:
        timeout = float(text) if text else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        timeout = float("nan")
    if not timeout > 0 or timeout == float("inf"):
        raise UserError(f"{TIMEOUT_VARIABLE}={text!r} is not a positive number of seconds "
                        f"(default {DEFAULT_TIMEOUT_SECONDS:g})")
    _settings["timeout"] = timeout
    for name, value in tensorflow_gcs_environment(timeout).items():
        environ.setdefault(name, str(int(value)))
    # gcsfs otherwise probes for hierarchical-namespace buckets over gRPC, which an emulator never
    # answers: each bucket would cost a 60 s timeout. Real GCS keeps the library default.
    if environ.get("STORAGE_EMULATOR_HOST"):
        environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # gcsfs logs a full traceback for every request it gives up on (dozens when many reads fail at
    # once); the command's one-line message says what failed.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def translate_errors(location, remote):
    """fsspec's (and the local filesystem's) errors as UserError or RetryableError.

    Args:
      location: what was being accessed, for the message.
      remote: whether it is an object store (an OSError there is transient, locally it is not).
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except UNREACHABLE as error:
        reason = first_line(error) if str(error) else (
            f"no complete answer within the deadlines ({request_timeout_seconds():g} s for the next bytes, "
            f"{request_total_seconds():g} s for a whole request)")
        raise RetryableError(f"storage unreachable at {location}: {reason}") from error
    except OSError as error:
        # A full disk, or a permission problem, is the user's to fix; aiohttp's connection errors
        # are OSErrors too, and transient.
        if disk_full(error, location):
            raise UserError(disk_full(error, location)) from error
        if str(error).startswith("Forbidden") or isinstance(error, PermissionError):
            raise UserError(f"no permission for {location}: {first_line(error)}") from error
        if remote:
            raise RetryableError(f"storage error at {location}: {first_line(error)}") from error
        raise UserError(f"cannot access {location}: {error}") from error
    except Exception as error:
        if remote and transient(error):
            raise RetryableError(f"storage error at {location}: {type(error).__name__}: {first_line(error)}") \
                from error
        if remote and isinstance(_status(error), int) and 400 <= _status(error) < 500:
            # The store refused the request itself (a bad name, no permission): retrying cannot help.
            raise UserError(f"storage refused the request for {location}: {first_line(error)}") from error
        raise


# HTTP answers that a later attempt may not get: too many requests, timeouts, the server's errors.
TRANSIENT_STATUS = (408, 429)


def transient(error):
    """Whether `error` (after the client's own retries) is a failure of the transport or an HTTP
    answer a restart may not get again: aiohttp's connection, payload and timeout errors (a
    connection reset mid-answer is `ServerDisconnectedError`), gcsfs's `HttpError` and aiohttp's
    `ClientResponseError` with a 5xx, 408 or 429 status."""
    import asyncio

    import aiohttp

    if isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)):
        return True
    status = _status(error)
    return isinstance(status, int) and (status >= 500 or status in TRANSIENT_STATUS)


def _status(error):
    """The HTTP status of gcsfs's HttpError or aiohttp's ClientResponseError, else None."""
    import aiohttp
    from gcsfs.retry import HttpError

    if isinstance(error, aiohttp.ClientResponseError):
        return error.status
    if isinstance(error, HttpError):
        return getattr(error, "code", None)
    return None


@contextlib.contextmanager
def translate_gcs_errors(location):
    """google-cloud-storage's own errors: server-side failures (after its retries) are transient."""
    from google.api_core import exceptions

    with translate_errors(location, remote=True):
        try:
            yield
        except exceptions.RetryError as error:
            cause = f" (last: {first_line(error.cause)})" if error.cause else ""
            raise RetryableError(f"storage unreachable at {location}: no answer within "
                                 f"{client_deadline_seconds():g} s of retries{cause}") from error
        except (exceptions.ServerError, exceptions.TooManyRequests) as error:
            raise RetryableError(f"storage error at {location}: {first_line(error)}") from error
        except exceptions.Forbidden as error:
            raise UserError(f"no permission for {location}: {first_line(error)}") from error
        except exceptions.NotFound as error:  # writing into a bucket that does not exist
            raise UserError(f"cannot write {location}: {first_line(error)}") from error
