"""metrics.json and pictures for one split of a dataset, and the CI gate.

`run` scores every example of a split with an exported model (its `predict_images` signature, so
the pixels come from the same reader as in training), writes `metrics.json` and PNG pictures to
the output folder, logs a summary, and only then applies the gate, so a failed CI run still leaves
its report behind.
"""

import math
import sys

import numpy as np
from absl import logging
from sklearn import metrics as skmetrics
from tqdm import tqdm

from trainer import gate, jobdir, manifest, report, storage
from trainer.errors import UserError

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


def score(predict_images, dataset, expected_examples, batch_size=None, others=(), mistakes=None):
    """Runs a model's `predict_images` over every batch of a dataset (and the same batches through
    the `others`: the production model the candidate is compared with sees the very same pixels).

    Args:
      predict_images: callable taking `images=` float32 [B, S, S, 3] and returning a dict with
        "probabilities" [B, C] (an exported model's signature).
      dataset: yields (images, labels) batches.
      expected_examples: how many examples the dataset must yield (the manifest's count).
      batch_size: for the progress bar's total only.
      others: more signatures like `predict_images`.
      mistakes: a `report.ConfidentMistakes` to feed with every batch.

    Returns:
      (labels [N] int64, probabilities [N, C] float32) as numpy arrays; with `others`, a third
      item: the list of their probabilities.

    Raises:
      UserError: the dataset yielded a different number of examples than expected (shards that do
        not match their manifest); an evaluation never silently scores a part of a split.
    """
    total = math.ceil(expected_examples / batch_size) if batch_size else None
    labels, probabilities, other_probabilities = [], [], [[] for _ in others]
    for images, batch_labels in tqdm(dataset, total=total, unit="batch", desc="evaluating",
                                     file=sys.stderr, mininterval=2.0):
        probabilities.append(np.asarray(predict_images(images=images)["probabilities"]))
        if mistakes is not None:
            mistakes.add(images, batch_labels, probabilities[-1])
        for function, collected in zip(others, other_probabilities, strict=True):
            collected.append(np.asarray(function(images=images)["probabilities"]))
        labels.append(np.asarray(batch_labels))
    scored = sum(len(batch) for batch in labels)
    if scored != expected_examples:
        raise UserError(f"scored {scored} examples but the manifest lists {expected_examples} for this "
                        "split: the shards do not match dataset.json (re-run `trainer prepare`)")
    result = np.concatenate(labels).astype(np.int64), np.concatenate(probabilities)
    if others:
        return (*result, [np.concatenate(collected) for collected in other_probabilities])
    return result


def read_history(model_url, history_url=None):
    """A job's history.json: `history_url`, else the one next to the model folder when it exists.

    Returns:
      The history dict, or None when no history_url was given and none sits next to the model.

    Raises:
      UserError: an explicit `history_url` that is missing, or a history that is not JSON.
    """
    if history_url is None:
        history_url = jobdir.history_next_to_model(model_url)
        if not storage.exists(history_url):
            logging.info("no history.json next to the model (%s): no training curves", history_url)
            return None
    return gate.read_json(history_url, "--history")


def read_baseline(baseline_url):
    """Reads a baseline metrics.json for the gate. Raises UserError if missing or without accuracy."""
    return gate.read_metrics(baseline_url, "--baseline")


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


def _check_arguments(batch_size, min_accuracy, tolerance):
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        raise UserError(f"--min_accuracy must be between 0 and 1, got {min_accuracy}")
    if tolerance < 0.0:
        raise UserError(f"--tolerance must not be negative, got {tolerance}")


def _check_classes(model_classes, data_classes, model_url, manifest_url):
    if list(model_classes) != list(data_classes):
        raise UserError(f"the model's classes {_preview(model_classes)} ({model_url}) differ from the "
                        f"dataset's {_preview(data_classes)} ({manifest_url})")


def _preview(names, limit=6):
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def production_model(production_url):
    """(version, model URL, content id) of what production serves now, or None before the first
    promotion (its LATEST pointer, trainer.promote)."""
    from trainer import promote

    pointer, _ = promote.read_pointer(production_url)
    if not pointer:
        return None
    model_url = storage.join(production_url, *pointer["model"].split("/"))
    return pointer["version"], model_url, storage.tree_digest(model_url)


def run(model_url, manifest_url, split, output_url, history_url=None, batch_size=64,
        min_accuracy=None, baseline_url=None, tolerance=0.0, production_url=None, recall_tolerance=0.05,
        require_improvement=False):
    """Evaluates an exported model on one split: metrics.json and pictures, then the CI gate.

    Args:
      model_url: the exported model folder (JOB_DIR/model or a copy).
      manifest_url: the dataset.json of `trainer prepare`.
      split: "train", "val" or "test".
      output_url: folder for metrics.json and the PNG pictures.
      history_url: a job's history.json for training curves (default: next to the model folder).
      batch_size: examples scored per batch.
      min_accuracy: gate: fail when accuracy is below this (None: no floor).
      baseline_url: gate: a metrics.json whose accuracy this one may not fall below by more than
        `tolerance`.
      tolerance: allowed shortfall against the baseline.
      production_url: the production location of `trainer promote`: its current model is scored
        on the same examples in this run, and `metrics["comparison"]` holds the paired gate's
        figures and decision (`gate.compare`), which promote acts on.
      recall_tolerance, require_improvement: the paired gate's settings (`gate.compare`).

    Returns:
      The metrics.json dict.

    Raises:
      UserError: bad arguments, missing baseline, classes of model and data differ, a split that is
        absent or empty, shards that do not match their manifest.
      GateFailed: metrics and pictures were written, but the gate fails (a one-line reason).
    """
    from trainer import data, export  # TensorFlow: imported only when a model is evaluated

    _check_arguments(batch_size, min_accuracy, tolerance)
    storage.check_writable(output_url)
    # Read the baseline first: a typo in its URL should not cost a whole evaluation.
    baseline = read_baseline(baseline_url) if baseline_url else None
    dataset_manifest = manifest.load_manifest(manifest_url)
    expected = manifest.count_examples(dataset_manifest, split, manifest_url)
    if expected == 0:
        raise UserError(f"split {split!r} of {manifest_url} has no examples to evaluate")
    loaded, metadata = export.load_model(model_url)
    _check_classes(metadata["classes"], dataset_manifest["classes"], model_url, manifest_url)
    if "predict_images" not in loaded.signatures:
        raise UserError(f"{model_url} has no predict_images signature (not exported by `trainer train`?)")
    logging.info("evaluating %s on the %s split of %s: %d examples, image size %d, batch %d",
                 model_url, split, manifest_url, expected, metadata["image_size"], batch_size)

    production = production_model(production_url) if production_url else None
    others = ()
    if production:
        version, production_url_model, _ = production
        production_loaded, production_metadata = export.load_model(production_url_model)
        if list(production_metadata["classes"]) == list(metadata["classes"]):
            others = (production_loaded.signatures["predict_images"],)
            logging.info("scoring production version %s (%s) on the same examples", version, production_url_model)

    examples = data.make_dataset(manifest_url, split, metadata["image_size"], batch_size, training=False)
    mistakes = report.ConfidentMistakes()
    with data.translate_errors():  # a damaged record: its one-line UserError, not an OpError
        scored = score(loaded.signatures["predict_images"], examples, expected, batch_size, others=others,
                       mistakes=mistakes)
    labels, probabilities = scored[:2]
    metrics = {"split": split, **compute_metrics(labels, probabilities, dataset_manifest["classes"]),
               "model": model_url, "data": manifest_url, "model_id": export.model_id(model_url),
               "dataset": manifest.dataset_identity(manifest_url, dataset_manifest),
               "calibration": report.calibration(labels, probabilities)}
    curves = metrics.pop("curves", None)  # plotted, not stored: up to one point per example
    if production:
        version, production_url_model, production_id = production
        comparison = {"production": {"url": production_url, "version": version, "model_id": production_id,
                                     "classes": production_metadata["classes"]}}
        if others:
            comparison.update(gate.compare(labels, probabilities.argmax(1) == labels,
                                           scored[2][0].argmax(1) == labels, dataset_manifest["classes"],
                                           recall_tolerance=recall_tolerance,
                                           require_improvement=require_improvement))
            logging.info("candidate vs production %s: %s", version, comparison["reason"])
        else:
            comparison.update(passed=False, reason=f"production's classes {_preview(production_metadata['classes'])} "
                              f"differ from the candidate's {_preview(metadata['classes'])}: no paired comparison")
            logging.warning("%s", comparison["reason"])
        metrics["comparison"] = comparison

    storage.write_json(storage.join(output_url, jobdir.METRICS), metrics)
    pictures = report.write_pictures(metrics, output_url, roc_data=curves,
                                     history=read_history(model_url, history_url), mistakes=mistakes.kept)
    logging.info("%s", format_summary(metrics))
    logging.info("wrote %s and %s", storage.join(output_url, jobdir.METRICS), ", ".join(pictures))

    if baseline is not None and (baseline.get("dataset", {}).get("digest") not in (None, metrics["dataset"]["digest"])
                                 or baseline.get("split") not in (None, split)):
        raise UserError(f"--baseline {baseline_url} was computed on other examples (split {baseline.get('split')} of "
                        f"{baseline.get('data')}): compare models on the same examples with --production")
    reason = gate.check_gate(metrics, min_accuracy=min_accuracy, baseline=baseline, tolerance=tolerance)
    if reason is not None:
        raise gate.GateFailed(f"gate failed: {reason}")
    if min_accuracy is not None or baseline is not None:
        logging.info("gate passed")
    return metrics
