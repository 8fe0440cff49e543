"""`trainer promote`: copy a candidate model to production only when it passes the gate.

The candidate is a job_dir: `model/` (the exported SavedModel with its metadata.json) and
`eval/metrics.json` (from `trainer evaluate --output=JOB_DIR/eval`). Production looks like:

  PRODUCTION/LATEST                            the pointer consumers read: {"version", "model",
                                               "promoted", "candidate", "accuracy"}
  PRODUCTION/versions/<version>/CLAIM          created only-if-absent: one writer per version
  PRODUCTION/versions/<version>/model/...      the SavedModel, copied whole
  PRODUCTION/versions/<version>/metrics.json   the candidate's evaluation: the next gate's baseline
  PRODUCTION/versions/<version>/COMPLETE       written after the copy; the same JSON as LATEST
                                               would be, so copying it onto LATEST rolls back

Writes happen in that order and LATEST moves last, so a consumer that follows LATEST never sees a
half-copied model, and a crash at any point leaves production as it was. Versions are immutable
and never deleted: the previous one stays addressable for rollback. Version names sort by time:
`20261128T070000Z-<hash of the candidate>`.

Two promotions at once cannot both win: LATEST is replaced with a compare-and-swap on the
generation that was read before gating (a generation precondition on gs://). The loser re-reads
production and re-checks its gate against the winner: it then promotes on top of it, or fails.
"""

import datetime
import hashlib
import json
import os
import socket

from absl import logging

from trainer import gate, jobdir, storage
from trainer.errors import RetryableError, UserError

POINTER = "LATEST"
VERSIONS = "versions"
# Each lost race means another promotion succeeded meanwhile; more than this many in a row is
# not contention but something looping.
MAX_ATTEMPTS = 5


def promote(candidate, production, min_accuracy=None, tolerance=0.0):
    """Promotes the candidate's model to production if its evaluation passes the gate.

    Args:
      candidate: the candidate's job_dir (local path or URL), with `model/` and `eval/metrics.json`.
      production: the production location (local path or URL) that consumers read.
      min_accuracy: also require at least this accuracy (None: no floor).
      tolerance: how far below production's accuracy still promotes (accuracy units).

    Returns:
      The name of the production version that now holds the candidate's model.

    Raises:
      gate.GateFailed: the candidate does not pass the gate (nothing is promoted).
      UserError: the candidate or production is malformed.
      RetryableError: storage unreachable, or production kept changing under us.
    """
    candidate = candidate.rstrip("/")
    production = production.rstrip("/")
    storage.check_writable(production)
    metrics = read_candidate(candidate)
    version = None
    for _ in range(MAX_ATTEMPTS):
        pointer, generation = read_pointer(production)
        if pointer and pointer.get("candidate") == candidate:
            # A rerun (a retried CronJob pod), or a concurrent promotion of the same candidate.
            logging.info("%s is already production version %s", candidate, pointer["version"])
            if version and version != pointer["version"]:
                discard_version(production, version)
            return pointer["version"]
        baseline = read_baseline(production, pointer)
        reason = gate.check_gate(metrics, min_accuracy=min_accuracy, baseline=baseline,
                                     tolerance=tolerance)
        if reason:
            if version:  # lost a race, and the winner is better: this copy will never be served
                discard_version(production, version)
            raise gate.GateFailed(f"not promoted: {reason}")
        logging.info("gate passed: accuracy %.4f (production: %s)", metrics["accuracy"],
                     f"{baseline['accuracy']:.4f}" if baseline else "none yet")
        if version is None:
            version = version_name(candidate)
            record = publish_version(candidate, production, version, metrics)
        if storage.write_if_generation(storage.join(production, POINTER),
                                       _to_json(record), generation):
            log_promotion(production, version, pointer)
            return version
        logging.warning("production changed while %s was being copied: checking the gate again",
                        version)
    raise RetryableError(f"production at {production} kept changing: {MAX_ATTEMPTS} promotions "
                         "in a row were overtaken")


def read_candidate(candidate):
    """Checks the candidate's layout and returns its metrics.json.

    Raises:
      UserError: the model or its evaluation is missing or unreadable.
    """
    job = jobdir.JobDir(candidate)
    required = [storage.join(job.model_url, export_file) for export_file in ("saved_model.pb", "metadata.json")]
    for url in [*required, job.metrics_url]:
        if not storage.exists(url):
            raise UserError(f"{candidate} is not a candidate: {url} is missing "
                            f"(train exports {jobdir.MODEL}/; `trainer evaluate --output=JOB_DIR/{jobdir.EVAL}`)")
    return gate.read_metrics(job.metrics_url, "candidate")


def read_pointer(production):
    """Production's LATEST pointer and its generation; `(None, 0)` before the first promotion."""
    url = storage.join(production, POINTER)
    data, generation = storage.read_with_generation(url)
    if data is None:
        return None, 0
    try:
        pointer = json.loads(data)
    except ValueError as error:
        raise UserError(f"{url} is not a promotion pointer: {error}") from error
    if not isinstance(pointer, dict) or not pointer.get("version"):
        raise UserError(f"{url} is not a promotion pointer: it names no version")
    return pointer, generation


def read_baseline(production, pointer):
    """The metrics.json of the version in production (the gate's baseline), or None."""
    if not pointer:
        return None
    url = storage.join(production, VERSIONS, pointer["version"], jobdir.METRICS)
    if not storage.exists(url):
        raise UserError(f"{url} is missing: production's version has no metrics to compare with")
    return gate.read_metrics(url, "production")


def version_name(candidate, now=None):
    """A sortable, unique version name: UTC time, then a short hash of the candidate's URL."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    digest = hashlib.sha256(candidate.encode()).hexdigest()[:8]
    return f"{now:%Y%m%dT%H%M%SZ}-{digest}"


def publish_version(candidate, production, version, metrics):
    """Copies the candidate into a new, immutable production version; LATEST is not touched.

    Returns:
      The pointer record for this version (also written as its COMPLETE marker).

    Raises:
      RetryableError: the version name is taken (another promotion of the same candidate in the
        same second), or a copy came out incomplete.
    """
    folder = storage.join(production, VERSIONS, version)
    claim = {"candidate": candidate, "host": socket.gethostname(), "pid": os.getpid(),
             "claimed": _now()}
    if not storage.write_if_absent(storage.join(folder, "CLAIM"), _to_json(claim)):
        raise RetryableError(f"production version {version} is already being written by "
                             "another promotion of the same candidate")
    copy_model(jobdir.JobDir(candidate).model_url, storage.join(folder, jobdir.MODEL))
    storage.write_json(storage.join(folder, jobdir.METRICS), metrics)
    record = {"version": version, "model": f"{VERSIONS}/{version}/{jobdir.MODEL}", "promoted": _now(),
              "candidate": candidate, "accuracy": metrics["accuracy"]}
    storage.write_bytes(storage.join(folder, "COMPLETE"), _to_json(record))
    return record


def copy_model(source, destination):
    """Copies every file of the model folder and checks that all arrived whole."""
    files = storage.copy_tree(source, destination, progress="copy model")
    copied = dict(storage.list_files(destination))
    for relative, size in files:
        if copied.get(relative) != size:
            raise RetryableError(f"copy of {relative} to {destination} is incomplete")
    logging.info("copied %d model files to %s", len(files), destination)


def discard_version(production, version):
    """Removes a version that lost its race and failed the gate against the winner.

    Nothing ever pointed to it (LATEST moves only after a version is complete), so this is safe;
    on failure it merely stays behind, unreferenced.
    """
    try:
        storage.remove(storage.join(production, VERSIONS, version), recursive=True)
    except (OSError, RetryableError, UserError) as error:
        logging.warning("could not remove the unused version %s: %s", version, error)


def log_promotion(production, version, previous):
    logging.info("promoted: %s now serves version %s", production, version)
    if previous:
        complete = storage.join(production, VERSIONS, previous["version"], "COMPLETE")
        latest = storage.join(production, POINTER)
        copy = "gcloud storage cp" if storage.is_gcs(production) else "cp"
        logging.info("to roll back to %s: %s %s %s", previous["version"], copy, complete, latest)


def _to_json(value):
    return (json.dumps(value, indent=2) + "\n").encode()


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
