"""The production location that `trainer promote` writes and serving reads.

  PRODUCTION/LATEST                            the pointer consumers read: {"version", "model",
                                               "model_id", "promoted", "candidate", "accuracy"}
  PRODUCTION/versions/<version>/CLAIM          created only-if-absent: one writer per version
  PRODUCTION/versions/<version>/model/...      the SavedModel, copied whole
  PRODUCTION/versions/<version>/metrics.json   the candidate's evaluation
  PRODUCTION/versions/<version>/COMPLETE       written after the copy; the same JSON as LATEST
                                               would be, so copying it onto LATEST rolls back

Version names sort by time: `20261128T070000Z-<start of the model's id>`. LATEST changes only by
compare-and-swap on the generation read before (trainer.infra.cas).
"""

import json

from trainer.errors import UserError
from trainer.formats import timestamps
from trainer.infra import cas, storage

POINTER = "LATEST"
VERSIONS = "versions"
MODEL = "model"
METRICS = "metrics.json"
CLAIM = "CLAIM"
COMPLETE = "COMPLETE"


def pointer_url(production):
    return storage.join(production, POINTER)


def version_url(production, version, *parts):
    return storage.join(production, VERSIONS, version, *parts)


def version_name(model_id, now=None):
    """A sortable, unique version name: UTC time, then the start of the model's content id."""
    now = now or timestamps.now()
    return f"{now:%Y%m%dT%H%M%SZ}-{model_id[:8]}"


def pointer_record(version, model_id, candidate, accuracy):
    """What LATEST (and the version's COMPLETE marker) holds for `version`."""
    return {"version": version, "model": f"{VERSIONS}/{version}/{MODEL}", "model_id": model_id,
            "promoted": timestamps.now_text(), "candidate": candidate, "accuracy": accuracy}


def read_pointer(production):
    """Production's LATEST pointer and its generation; `(None, 0)` before the first promotion.

    Raises:
      UserError: LATEST is there but is not a pointer.
    """
    url = pointer_url(production)
    data, generation = cas.read_with_generation(url)
    if data is None:
        return None, 0
    try:
        pointer = json.loads(data)
    except ValueError as error:
        raise UserError(f"{url} is not a promotion pointer: {error}") from error
    if not isinstance(pointer, dict) or not pointer.get("version"):
        raise UserError(f"{url} is not a promotion pointer: it names no version")
    return pointer, generation


def served_model(production):
    """(version, model URL) of what production serves now, or None before the first promotion."""
    pointer, _ = read_pointer(production)
    if not pointer:
        return None
    return pointer["version"], storage.join(production, *pointer["model"].split("/"))
