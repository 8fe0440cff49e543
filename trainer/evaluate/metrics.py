"""The numbers of metrics.json for one set of predictions: loss, accuracy, balanced accuracy,
macro-F1, per-class precision/recall/F1, the confusion matrix, ROC and PR AUC for two classes,
calibration; and the log's summary of them."""

import numpy as np
from absl import logging
from sklearn import metrics as skmetrics

# Probabilities are clipped to [EPSILON, 1 - EPSILON] before the log, as Keras does, so the loss
# here is comparable with the val_loss of training (and one confident mistake stays finite).
EPSILON = 1e-7


def compute_metrics(labels, probabilities, class_names):
    """The metrics.json numbers for one set of predictions.

    Args:
      labels: int class indices, shape [N].
      probabilities: float, shape [N, C] with C = len(class_names) >= 2; for two classes column 1
        is P(class 1). The prediction is the argmax (for two classes: p > 0.5).
      class_names: index -> name.

    Returns:
      A dict with "examples", "loss" (mean cross-entropy), "accuracy", "balanced_accuracy",
      "macro_f1", "classes", "per_class"
      ({name: {"precision", "recall", "f1", "support"}}), "confusion_matrix" (rows true, columns
      predicted), and for two classes "roc_auc", "pr_auc" (average precision; None when the
      labels hold only one class) and "curves" (points of the ROC and PR curves, for pictures).

    Raises:
      ValueError: shapes that do not match, fewer than two classes, labels out of range.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(class_names)
    if num_classes < 2 or probabilities.ndim != 2 or probabilities.shape != (len(labels), num_classes):
        raise ValueError(f"need probabilities [{len(labels)}, {num_classes}] for {num_classes} classes "
                         f"(at least 2), got {list(probabilities.shape)}")
    if len(labels) == 0:
        raise ValueError("no examples to compute metrics on")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")

    indices = list(range(num_classes))
    predictions = probabilities.argmax(axis=1)
    true_probability = np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, 1 - EPSILON)
    precision, recall, f1, support = skmetrics.precision_recall_fscore_support(
        labels, predictions, labels=indices, zero_division=0)
    metrics = {
        "examples": int(len(labels)),
        "loss": float(-np.mean(np.log(true_probability))),
        "accuracy": float(skmetrics.accuracy_score(labels, predictions)),
        # Imbalanced classes: the mean recall over the classes present, and the mean F1 over all.
        "balanced_accuracy": float(skmetrics.balanced_accuracy_score(labels, predictions)),
        "macro_f1": float(skmetrics.f1_score(labels, predictions, labels=indices, average="macro", zero_division=0)),
        "classes": list(class_names),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": skmetrics.confusion_matrix(labels, predictions, labels=indices).tolist(),
    }
    if num_classes == 2:
        metrics.update(_binary_metrics(labels, probabilities[:, 1]))
    return metrics


def _binary_metrics(labels, positive_probability):
    """ROC AUC, PR AUC and the curves' points; AUCs are None when only one class is present."""
    if len(np.unique(labels)) < 2:
        logging.warning("only one class among the labels: ROC AUC and PR AUC are undefined")
        return {"roc_auc": None, "pr_auc": None, "curves": None}
    false_positive_rate, true_positive_rate, _ = skmetrics.roc_curve(labels, positive_probability)
    precision, recall, _ = skmetrics.precision_recall_curve(labels, positive_probability)
    return {
        "roc_auc": float(skmetrics.roc_auc_score(labels, positive_probability)),
        "pr_auc": float(skmetrics.average_precision_score(labels, positive_probability)),
        "curves": {
            "roc": {"false_positive_rate": false_positive_rate.tolist(),
                    "true_positive_rate": true_positive_rate.tolist()},
            "pr": {"precision": precision.tolist(), "recall": recall.tolist()},
        },
    }


CALIBRATION_BINS = 15


def calibration(labels, probabilities, bins=CALIBRATION_BINS):
    """Expected calibration error over `bins` equal-width bins of confidence (the top probability).

    Returns:
      {"ece", "bins": [{"lower", "upper", "count", "confidence", "accuracy"}]}: ECE is the
      count-weighted mean gap between a bin's mean confidence and its accuracy.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows, ece = [], 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lower) & (confidence <= upper) if lower > 0 else confidence <= upper
        count = int(inside.sum())
        row = {"lower": float(lower), "upper": float(upper), "count": count,
               "confidence": float(confidence[inside].mean()) if count else None,
               "accuracy": float(correct[inside].mean()) if count else None}
        if count:
            ece += count / len(labels) * abs(row["confidence"] - row["accuracy"])
        rows.append(row)
    return {"ece": float(ece), "bins": rows}


def most_confused(metrics, limit=15):
    """The `limit` largest off-diagonal counts of the confusion matrix, largest first:
    [{"true", "predicted", "count", "share"}] (share: of the true class's examples)."""
    counts = np.asarray(metrics["confusion_matrix"])
    totals = counts.sum(axis=1)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:limit]
    classes = metrics["classes"]
    return [{"true": classes[row], "predicted": classes[column], "count": int(off[row, column]),
             "share": float(off[row, column] / totals[row]) if totals[row] else 0.0}
            for row, column in zip(*np.unravel_index(order, off.shape), strict=True) if off[row, column]]


def format_summary(metrics):
    """A few log lines: the headline numbers, then one row per class."""
    lines = [f"{metrics.get('split', '?')} split: {metrics['examples']} examples, "
             f"accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}"]
    if "balanced_accuracy" in metrics:
        lines[0] += f", balanced accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
    if metrics.get("roc_auc") is not None:
        lines[0] += f", ROC AUC {metrics['roc_auc']:.4f}, PR AUC {metrics['pr_auc']:.4f}"
    if metrics.get("calibration"):
        lines[0] += f", expected calibration error {metrics['calibration']['ece']:.4f}"
    width = max(5, *(len(name) for name in metrics["classes"]))
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
                     f"{row['f1']:6.4f}  {row['support']:7d}")
    return "\n".join(lines)
