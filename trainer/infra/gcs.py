"""The google-cloud-storage client (one per process): for what gcsfs cannot do in one request,
compare-and-swap writes (trainer.infra.cas) and a bucket's existence."""

import functools
import os
import threading

from trainer.infra import faults


@functools.cache
def client():
    """One google-cloud-storage client per process (anonymous against an emulator)."""
    from google.cloud import storage as gcs

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return gcs.Client.create_anonymous_client()
    return gcs.Client()


def blob(location):
    bucket, _, name = location[len("gs://"):].partition("/")
    return client().bucket(bucket).blob(name)


def call_options():
    """Per-request timeout and the deadline of the retries for google-cloud-storage calls."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    timeout = faults.request_timeout_seconds()
    return {"timeout": (timeout, timeout), "retry": DEFAULT_RETRY.with_timeout(faults.client_deadline_seconds())}


def bounded(call, location):
    """`call()`, given up on after `faults.client_deadline_seconds()`: the client's own timeouts
    are per socket read, so a store that trickles bytes would hold a call forever. The call is
    left behind in its thread (the command ends soon after, with the retryable exit).

    Raises:
      TimeoutError: no answer in time (storage unreachable, as faults.translate_errors says).
    """
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread as it is
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"gcs {location}", daemon=True)
    worker.start()
    worker.join(faults.client_deadline_seconds())
    if worker.is_alive():
        raise TimeoutError(f"no complete answer within {faults.client_deadline_seconds():g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def bucket_exists(location):
    """Whether the bucket of a gs:// location exists (and this account can see it): one request."""
    bucket = location[len("gs://"):].split("/", 1)[0]
    with faults.translate_gcs_errors(location):
        return bounded(lambda: client().lookup_bucket(bucket, **call_options()), location) is not None
