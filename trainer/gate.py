"""The CI gate: does an evaluation pass (a floor, and no worse than a baseline)?

Used by `trainer evaluate --min_accuracy/--baseline` and by `trainer promote`. It needs only the
metrics.json dicts, so promote imports it without the evaluation's libraries (TensorFlow,
scikit-learn, matplotlib).
"""

from trainer import storage
from trainer.errors import UserError


class GateFailed(UserError):
    """The evaluation ran and was written, but fails the gate (exit 1, one line)."""


def check_gate(metrics, min_accuracy=None, baseline=None, tolerance=0.0):
    """Decides whether an evaluation passes the gate.

    Args:
      metrics: a metrics.json dict (needs "accuracy").
      min_accuracy: the accuracy must be at least this (None: no floor).
      baseline: another metrics.json dict; accuracy may fall below its accuracy by at most
        `tolerance` (None: no baseline).
      tolerance: allowed shortfall against the baseline, in accuracy units (0.01 = one point).

    Returns:
      None when the gate passes, else a one-line reason.
    """
    accuracy = metrics["accuracy"]
    if min_accuracy is not None and accuracy < min_accuracy:
        return f"accuracy {accuracy:.4f} is below --min_accuracy {min_accuracy:.4f}"
    if baseline is not None and accuracy < baseline["accuracy"] - tolerance:
        return (f"accuracy {accuracy:.4f} is {baseline['accuracy'] - accuracy:.4f} below the "
                f"baseline's {baseline['accuracy']:.4f}, more than --tolerance {tolerance:.4f}")
    return None


def read_json(url, what):
    """A JSON file the gate needs; UserError naming `what` when it is missing or not JSON."""
    try:
        return storage.read_json(url)
    except FileNotFoundError as error:
        raise UserError(f"{what}: {url} does not exist") from error
    except ValueError as error:
        raise UserError(f"{what}: {url} is not valid JSON: {error}") from error


def read_metrics(url, what):
    """A metrics.json with a numeric accuracy; UserError naming `what` otherwise."""
    metrics = read_json(url, what)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("accuracy"), (int, float)):
        raise UserError(f"{what}: {url} has no numeric \"accuracy\" (not a metrics.json?)")
    return metrics
