"""metrics.json and pictures for one split of a dataset, and the CI gate."""


def check_gate(metrics, min_accuracy=None, baseline=None, tolerance=0.0):
    """Decides whether an evaluation passes the CI gate.

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
        return (f"accuracy {accuracy:.4f} is below the baseline's {baseline['accuracy']:.4f} "
                f"by more than the tolerance {tolerance:.4f}")
    return None
