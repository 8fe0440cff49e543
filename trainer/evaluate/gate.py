"""The CI gate: does an evaluation pass (a floor, and no worse than a baseline)?

Used by `trainer evaluate --min_accuracy/--baseline` and by `trainer promote`. It needs only the
metrics.json dicts, so promote imports it without the evaluation's libraries (TensorFlow,
scikit-learn, matplotlib).
"""

import math

from trainer.errors import UserError
from trainer.infra import storage

ALPHA = 0.05  # the significance level of the paired test


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


def check_baseline_examples(baseline, baseline_url, metrics):
    """Why `baseline` cannot be compared with `metrics` (None: it can): an accuracy of other examples.

    A baseline written before metrics.json recorded its dataset or split is taken as it is.
    """
    if baseline is None:
        return None
    if baseline.get("dataset", {}).get("digest") not in (None, metrics["dataset"]["digest"]) or \
            baseline.get("split") not in (None, metrics["split"]):
        return (f"--baseline {baseline_url} was computed on other examples (split {baseline.get('split')} of "
                f"{baseline.get('data')}): compare models on the same examples with --production")
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


def mcnemar_exact_p(only_candidate, only_production):
    """Two-sided p-value of McNemar's exact test on paired per-example results.

    Args:
      only_candidate: examples the candidate got right and production got wrong.
      only_production: examples production got right and the candidate got wrong.

    Under "both models are equally good" each discordant example is a fair coin: the p-value is the
    two-sided binomial tail of the smaller count among n = the two counts together.
    """
    n = only_candidate + only_production
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_candidate, only_production) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare(labels, candidate_correct, production_correct, classes, recall_tolerance=0.05,
            require_improvement=False, alpha=ALPHA):
    """The paired gate: the candidate and production scored on the same examples.

    Args:
      labels: the true class index of each example.
      candidate_correct, production_correct: per example, whether each model got it right.
      classes: index -> class name.
      recall_tolerance: no class's recall may fall by more than this (0.05 = 5 points).
      require_improvement: pass only when the candidate is significantly better (else: pass unless
        it is significantly worse).
      alpha: significance level of McNemar's exact test.

    Returns:
      A dict for metrics.json: accuracies, the discordant counts, the p-value, per-class recalls,
      "passed" and a one-line "reason".
    """
    if not (len(labels) == len(candidate_correct) == len(production_correct)) or not len(labels):
        raise ValueError("need the same, non-empty examples for both models")
    only_candidate = sum(1 for c, p in zip(candidate_correct, production_correct, strict=True) if c and not p)
    only_production = sum(1 for c, p in zip(candidate_correct, production_correct, strict=True) if p and not c)
    n = len(labels)
    candidate_accuracy = sum(map(bool, candidate_correct)) / n
    production_accuracy = sum(map(bool, production_correct)) / n
    p_value = mcnemar_exact_p(only_candidate, only_production)
    recalls = {}
    for index, name in enumerate(classes):
        rows = [i for i, label in enumerate(labels) if label == index]
        if rows:
            recalls[name] = {"candidate": sum(bool(candidate_correct[i]) for i in rows) / len(rows),
                             "production": sum(bool(production_correct[i]) for i in rows) / len(rows),
                             "support": len(rows)}
    dropped = {name: row for name, row in recalls.items() if row["production"] - row["candidate"] > recall_tolerance}
    significant = p_value < alpha
    figures = (f"accuracy {candidate_accuracy:.4f} vs production's {production_accuracy:.4f} on the same {n} "
               f"examples ({only_candidate} only the candidate got right, {only_production} only production; "
               f"McNemar p={p_value:.3g})")
    if dropped:
        worst = max(dropped, key=lambda name: dropped[name]["production"] - dropped[name]["candidate"])
        row = dropped[worst]
        passed, reason = False, (f"recall of class {worst!r} falls from {row['production']:.4f} to "
                                 f"{row['candidate']:.4f}, more than --recall_tolerance {recall_tolerance:g}; "
                                 + figures)
    elif require_improvement:
        passed = significant and only_candidate > only_production
        reason = ("significantly better: " if passed else "not significantly better (--require_improvement): ") \
            + figures
    else:
        passed = not (significant and only_production > only_candidate)
        reason = ("not significantly worse: " if passed else "significantly worse: ") + figures
    return {"examples": n, "candidate_accuracy": candidate_accuracy, "production_accuracy": production_accuracy,
            "only_candidate_correct": only_candidate, "only_production_correct": only_production,
            "p_value": p_value, "alpha": alpha, "recall_tolerance": recall_tolerance,
            "require_improvement": require_improvement, "per_class_recall": recalls,
            "passed": passed, "reason": reason}
