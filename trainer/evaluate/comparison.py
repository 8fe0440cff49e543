"""Candidate vs production: the model production serves now (its LATEST pointer,
trainer.formats.production), scored on the very same examples as the candidate, and the paired
comparison (trainer.evaluate.gate.compare) that `trainer promote` acts on."""

import dataclasses

from absl import logging

from trainer.evaluate import gate
from trainer.formats import modeldir, production


@dataclasses.dataclass
class Production:
    """What production serves now, loaded to be scored beside the candidate."""

    version: str
    model_url: str
    model_id: str
    classes: list
    predict_images: object = None  # its pixel signature; None when its classes differ from the candidate's


def load_production(production_url, candidate_classes):
    """The model production serves now, or None before the first promotion."""
    from trainer.serve.load import load_model

    served = production.served_model(production_url)
    if served is None:
        logging.info("no production model yet: the first promotion needs no comparison (%s has no LATEST)",
                     production_url)
        return None
    version, model_url = served
    loaded, metadata = load_model(model_url)
    found = Production(version, model_url, modeldir.model_id(model_url), list(metadata["classes"]))
    if found.classes == list(candidate_classes):
        found.predict_images = loaded.signatures[modeldir.PIXELS_SIGNATURE]
        logging.info("scoring production version %s (%s) on the same examples", version, model_url)
    return found


def compare_with_production(found, production_url, candidate_classes, labels, candidate_probabilities,
                            production_probabilities, recall_tolerance=0.05, require_improvement=False):
    """metrics.json's "comparison": what was compared, the paired gate's figures and its decision."""
    record = {"production": {"url": production_url, "version": found.version, "model_id": found.model_id,
                             "classes": found.classes}}
    if production_probabilities is None:
        record.update(passed=False, reason=f"production's classes {preview(found.classes)} differ from the "
                      f"candidate's {preview(candidate_classes)}: no paired comparison")
        logging.warning("%s", record["reason"])
        return record
    record.update(gate.compare(labels, candidate_probabilities.argmax(1) == labels,
                               production_probabilities.argmax(1) == labels, candidate_classes,
                               recall_tolerance=recall_tolerance, require_improvement=require_improvement))
    logging.info("candidate vs production %s: %s", found.version, record["reason"])
    return record


def preview(names, limit=6):
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"
