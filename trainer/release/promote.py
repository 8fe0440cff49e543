"""`trainer promote`: copy a candidate model to production only when it passes the gate.

The candidate is a job_dir: `model/` (the exported SavedModel with its metadata.json) and
`eval/metrics.json` from `trainer evaluate --output=JOB_DIR/eval --production=PRODUCTION`, which
scored the candidate and production's current model on the same examples (the candidate's test
split) and recorded the paired gate's decision (`gate.compare`: no class's recall drops by more
than a tolerance, and McNemar's exact test says the candidate is not significantly worse, or with
`--require_improvement` significantly better). Promote checks that this evaluation belongs to
this model (`model_id`, a digest of the model's files, not its path), was made on the test split,
and compared against the version production serves now; then it acts on the decision.
Production's stored metrics are never compared with numbers from other examples.

The production layout (LATEST, versions/<version>/{CLAIM, model/, metrics.json, COMPLETE}) is
trainer.formats.production's. Writes happen in that order and LATEST moves last, so a consumer
that follows LATEST never sees a half-copied model, and a crash at any point leaves production as
it was. Versions are immutable and never deleted: the previous one stays addressable for rollback.
Two promotions at once cannot both win: LATEST is replaced with a compare-and-swap on the
generation that was read before gating (a generation precondition on gs://). The loser's
evaluation compared it with a version that production no longer serves: it fails, saying so, and
its unused copy is removed. A version that a killed promotion claimed and never completed is
removed by a later promotion once its CLAIM is ABANDONED_CLAIM_HOURS old.
"""

import json
import os
import socket

from absl import logging

from trainer.errors import RetryableError, UserError
from trainer.evaluate import gate
from trainer.formats import jobdir, modeldir, timestamps
from trainer.formats import production as layout
from trainer.infra import cas, folders, storage
from trainer.release import registry

PROMOTED_SPLIT = "test"
MAX_NAME_ATTEMPTS = 100  # names tried for one version: `version_name`, then `-2` ... `-100`
ABANDONED_CLAIM_HOURS = 24  # a claimed version without COMPLETE this old was left by a killed promotion


def promote(candidate, production, min_accuracy=None, allow_class_change=False, registry_url=None):
    """Promotes the candidate's model to production if its evaluation passes the gate.

    Args:
      candidate: the candidate's job_dir (local path or URL), with `model/` and `eval/metrics.json`.
      production: the production location (local path or URL) that consumers read.
      min_accuracy: also require at least this test accuracy (None: no floor).
      allow_class_change: let a model with other classes replace production's.
      registry_url: also register the promoted version there (trainer.release.registry), after
        production switched to it.

    Returns:
      The name of the production version that now holds the candidate's model.

    Raises:
      gate.GateFailed: the candidate does not pass the gate (nothing is promoted).
      UserError: the candidate, its evaluation or production is malformed or does not match.
      RetryableError: storage unreachable.
    """
    candidate = candidate.rstrip("/")
    production = production.rstrip("/")
    if registry_url:
        registry.parse(registry_url)  # a typo fails before any work
    storage.check_writable(production)
    version = switch(candidate, production, min_accuracy, allow_class_change)
    if registry_url:
        pointer, _ = layout.read_pointer(production)
        flags = f" --min_accuracy={min_accuracy}" if min_accuracy is not None else ""
        flags += " --allow_class_change" if allow_class_change else ""
        registry.register(registry_url, {**pointer, "source": storage.join(production, *pointer["model"].split("/"))},
                          read_candidate(candidate),
                          f"trainer promote --candidate={candidate} --production={production}{flags} "
                          f"--registry={registry_url}")
    return version


def switch(candidate, production, min_accuracy=None, allow_class_change=False):
    """The gate and the switch of LATEST (see `promote`); returns the version production serves."""
    metrics = read_candidate(candidate)
    remove_abandoned_claims(production)
    pointer, generation = layout.read_pointer(production)
    if pointer and pointer.get("model_id") == metrics["model_id"]:
        # A rerun (a retried CronJob pod), or the same model promoted from another folder.
        logging.info("%s is already production version %s (the same model)", candidate, pointer["version"])
        return pointer["version"]
    reason = refusal(metrics, pointer, production, min_accuracy, allow_class_change)
    if reason:
        raise gate.GateFailed(f"not promoted: {reason}")
    comparison = metrics.get("comparison", {})
    logging.info("gate passed: %s", comparison.get("reason") or
                 f"test accuracy {metrics['accuracy']:.4f}, no production model yet")
    version = claim_version(candidate, production, metrics["model_id"])
    record = publish_version(candidate, production, version, metrics)
    if not cas.write_if_generation(layout.pointer_url(production), _to_json(record), generation):
        discard_version(production, version)
        now, _ = layout.read_pointer(production)
        if now and now.get("model_id") == metrics["model_id"]:  # a concurrent promotion of this very model
            logging.info("%s became production version %s in a concurrent promotion (the same model)", candidate,
                         now["version"])
            return now["version"]
        raise gate.GateFailed(f"not promoted: production moved to version {now and now['version']} while this "
                              "promotion ran; evaluate the candidate against it (--production) and promote again")
    log_promotion(production, version, pointer)
    return version


def refusal(metrics, pointer, production, min_accuracy=None, allow_class_change=False):
    """Why the candidate's evaluation does not let it replace `pointer` (None: it does)."""
    floor = gate.check_gate(metrics, min_accuracy=min_accuracy)
    if floor:
        return f"test {floor}"
    if not pointer:
        return None
    comparison = metrics.get("comparison")
    how = f"run `trainer evaluate ... --split={PROMOTED_SPLIT} --production={production}` first"
    if not comparison:
        return (f"the candidate's evaluation did not score production's model (version {pointer['version']}) on the "
                f"same examples; {how}")
    compared = comparison.get("production") if isinstance(comparison, dict) else None
    if not (isinstance(compared, dict) and all(key in compared for key in ("version", "model_id", "classes"))
            and "passed" in comparison and "reason" in comparison):
        return f"the candidate's evaluation has a malformed comparison with production (not written by `trainer " \
               f"evaluate`?); {how}"
    served_id = pointer.get("model_id", compared["model_id"])  # (pointers before model ids named none)
    if compared["version"] != pointer["version"] or compared["model_id"] != served_id:
        return (f"the candidate was compared with production version {compared['version']}, but production now "
                f"serves {pointer['version']}; {how}")
    if compared["classes"] != metrics["classes"]:
        if not allow_class_change:
            return (f"production's classes {compared['classes']} differ from the candidate's {metrics['classes']}: "
                    "pass --allow_class_change to replace it with a model of other classes")
        logging.warning("replacing production's classes %s with %s (--allow_class_change)", compared["classes"],
                        metrics["classes"])
        return None
    return None if comparison["passed"] else comparison["reason"]


def read_candidate(candidate):
    """Checks the candidate's layout and that its metrics.json is this model's test evaluation.

    Raises:
      UserError: the model or its evaluation is missing or unreadable, belongs to another model, or
        was made on another split.
    """
    job = jobdir.JobDir(candidate)
    for url in [*modeldir.required_files(job.model_url), job.metrics_url]:
        if not storage.exists(url):
            raise UserError(f"{candidate} is not a candidate: {url} is missing "
                            f"(train exports {jobdir.MODEL}/; `trainer evaluate --output=JOB_DIR/{jobdir.EVAL}`)")
    if not storage.exists(job.report_url):  # evaluate writes it last: without it, it did not finish
        raise UserError(f"{job.metrics_url} is from an evaluation that did not finish ({job.report_url}, written "
                        "last, is missing): run `trainer evaluate` again")
    metrics = gate.read_metrics(job.metrics_url, "candidate")
    model_id = modeldir.model_id(job.model_url)
    if metrics.get("model_id") != model_id:
        raise UserError(f"{job.metrics_url} is not an evaluation of {job.model_url} (it evaluated model "
                        f"{metrics.get('model_id')}, this model is {model_id}): evaluate this model again")
    if metrics.get("split") != PROMOTED_SPLIT:
        raise UserError(f"{job.metrics_url} evaluates the {metrics.get('split')!r} split; promotion needs the "
                        f"{PROMOTED_SPLIT} split (`trainer evaluate --split={PROMOTED_SPLIT}`)")
    return metrics


def claim_version(candidate, production, model_id):
    """A new version name, claimed (its CLAIM created only-if-absent): `version_name`, or with
    `-2`, `-3`, ... when that name is taken (the same model promoted again in the same second, or
    concurrently). The names still sort by time.

    Raises:
      RetryableError: MAX_NAME_ATTEMPTS names in a row were taken.
    """
    base = layout.version_name(model_id)
    claim = _to_json({"candidate": candidate, "host": socket.gethostname(), "pid": os.getpid(),
                      "claimed": timestamps.now_text()})
    for attempt in range(1, MAX_NAME_ATTEMPTS + 1):
        version = base if attempt == 1 else f"{base}-{attempt}"
        if cas.write_if_absent(layout.version_url(production, version, layout.CLAIM), claim):
            return version
    raise RetryableError(f"production versions {base} to {base}-{MAX_NAME_ATTEMPTS} are all taken: promote again")


def publish_version(candidate, production, version, metrics):
    """Copies the candidate into the claimed production `version`; LATEST is not touched.

    Returns:
      The pointer record for this version (also written as its COMPLETE marker).

    Raises:
      RetryableError: a copy came out incomplete.
    """
    copy_model(jobdir.JobDir(candidate).model_url, layout.version_url(production, version, layout.MODEL))
    storage.write_json(layout.version_url(production, version, layout.METRICS), metrics)
    record = layout.pointer_record(version, metrics["model_id"], candidate, metrics["accuracy"])
    storage.write_bytes(layout.version_url(production, version, layout.COMPLETE), _to_json(record))
    return record


def copy_model(source, destination):
    """Copies every file of the model folder and checks that all arrived whole."""
    files = folders.copy_tree(source, destination, progress="copy model")
    copied = dict(folders.list_files(destination))
    for relative, size in files:
        if copied.get(relative) != size:
            raise RetryableError(f"copy of {relative} to {destination} is incomplete")
    logging.info("copied %d model files to %s", len(files), destination)


def remove_abandoned_claims(production, now=None):
    """Removes the versions that a killed promotion claimed and never completed, once their CLAIM
    is older than ABANDONED_CLAIM_HOURS (longer than any live promotion's copy takes). Nothing ever
    pointed to them: LATEST moves only to a complete version."""
    now = now or timestamps.now()
    try:
        listed = folders.list_files(storage.join(production, layout.VERSIONS))
        claimed = {relative.split("/")[0] for relative, _ in listed}
    except FileNotFoundError:
        return
    for version in sorted(claimed):
        if storage.exists(layout.version_url(production, version, layout.COMPLETE)):
            continue
        try:
            claim = json.loads(storage.read_bytes(layout.version_url(production, version, layout.CLAIM)))
            age_hours = (now - timestamps.parse(claim["claimed"])).total_seconds() / 3600
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue  # no readable claim: not ours to judge
        if age_hours > ABANDONED_CLAIM_HOURS:
            logging.info("removing production version %s: claimed %.0f hours ago by %s, never completed", version,
                         age_hours, claim.get("candidate"))
            discard_version(production, version)


def discard_version(production, version):
    """Removes a version that lost its race and failed the gate against the winner.

    Nothing ever pointed to it (LATEST moves only after a version is complete), so this is safe;
    on failure it merely stays behind, unreferenced.
    """
    try:
        storage.remove(layout.version_url(production, version), recursive=True)
    except (OSError, RetryableError, UserError) as error:
        logging.warning("could not remove the unused version %s: %s", version, error)


def log_promotion(production, version, previous):
    logging.info("promoted: %s now serves version %s", production, version)
    if previous:
        complete = layout.version_url(production, previous["version"], layout.COMPLETE)
        latest = layout.pointer_url(production)
        copy = "gcloud storage cp" if storage.is_gcs(production) else "cp"
        logging.info("to roll back to %s: %s %s %s", previous["version"], copy, complete, latest)


def _to_json(value):
    return (json.dumps(value, indent=2) + "\n").encode()

