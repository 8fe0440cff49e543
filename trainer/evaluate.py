"""metrics.json and pictures for one split of a dataset, and the CI gate.

`run` scores every example of a split with an exported model (its `predict_images` signature, so
the pixels come from the same reader as in training), writes `metrics.json` and PNG pictures to
the output folder, logs a summary, and only then applies the gate, so a failed CI run still leaves
its report behind.
"""

import io
import math
import sys

import numpy as np
from absl import logging
from sklearn import metrics as skmetrics
from tqdm import tqdm

from trainer import gate, jobdir, manifest, storage
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
      A dict with "examples", "loss" (mean cross-entropy), "accuracy", "classes", "per_class"
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


def write_pictures(metrics, output_url, roc_data=None, history=None):
    """Writes the PNG pictures of an evaluation to `output_url`.

    Args:
      metrics: a dict from `compute_metrics` (optionally with "split").
      output_url: folder (local or URL) for the pictures.
      roc_data: the "curves" of `compute_metrics` (default: `metrics["curves"]`); with it, two
        classes also get roc_curve.png and pr_curve.png.
      history: a job's history.json dict; with it, training_curves.png.

    Returns:
      The URLs written: confusion_matrix.png, then roc_curve.png, pr_curve.png,
      training_curves.png when their data is there.
    """
    roc_data = roc_data if roc_data is not None else metrics.get("curves")
    pictures = {"confusion_matrix.png": _draw_confusion_matrix(metrics)}
    if roc_data is not None and metrics.get("roc_auc") is not None:
        pictures["roc_curve.png"] = _draw_roc_curve(metrics, roc_data["roc"])
        pictures["pr_curve.png"] = _draw_pr_curve(metrics, roc_data["pr"])
    if history is not None:
        figure = _draw_training_curves(history)
        if figure is None:
            logging.warning("history has no epochs: no training_curves.png")
        else:
            pictures["training_curves.png"] = figure
    urls = []
    for name, figure in pictures.items():
        url = storage.join(output_url, name)
        storage.write_bytes(url, _to_png(figure))
        urls.append(url)
    return urls


def _new_figure(width, height, columns=1):
    # A Figure on its own Agg canvas: no pyplot, so no global state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns)
    return figure, axes


def _to_png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _short(name, limit=18):
    return name if len(name) <= limit else name[:limit - 1] + "…"


def _draw_confusion_matrix(metrics):
    """Counts in the cells; colour is the share of the true class, so small classes still show."""
    counts = np.asarray(metrics["confusion_matrix"])
    names = [_short(name) for name in metrics["classes"]]
    num_classes = len(names)
    size = max(4.5, 1.5 + 0.5 * num_classes)
    figure, axes = _new_figure(size + 1.2, size)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("share of the true class")
    font_size = max(8, 12 - 0.2 * num_classes)
    for row in range(num_classes):
        for column in range(num_classes):
            # Zeros fade so that the mistakes stand out in a large matrix.
            color = "white" if shares[row, column] > 0.5 else "black" if counts[row, column] else "silver"
            axes.text(column, row, str(counts[row, column]), ha="center", va="center",
                      color=color, fontsize=font_size)
    axes.set_xticks(range(num_classes), names, rotation=45 if num_classes > 3 else 0,
                    ha="right" if num_classes > 3 else "center", fontsize=font_size)
    axes.set_yticks(range(num_classes), names, fontsize=font_size)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{_title_prefix(metrics)}accuracy {metrics['accuracy']:.2%} "
                   f"on {metrics['examples']} images")
    return figure


def _title_prefix(metrics):
    return f"{metrics['split']} split: " if metrics.get("split") else ""


def _draw_roc_curve(metrics, roc):
    figure, axes = _new_figure(5, 5)
    axes.plot(roc["false_positive_rate"], roc["true_positive_rate"], linewidth=2,
              label=f"ROC AUC = {metrics['roc_auc']:.4f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    _finish_unit_square(axes, "false positive rate", "true positive rate", "lower right")
    axes.set_title(f"{_title_prefix(metrics)}ROC curve (positive: {_short(metrics['classes'][1])})")
    return figure


def _draw_pr_curve(metrics, pr):
    figure, axes = _new_figure(5, 5)
    axes.step(pr["recall"], pr["precision"], where="post", linewidth=2,
              label=f"PR AUC (average precision) = {metrics['pr_auc']:.4f}")
    # A classifier that guesses scores the positive class's share at every recall.
    positives = metrics["per_class"][metrics["classes"][1]]["support"] / metrics["examples"]
    axes.axhline(positives, linestyle="--", color="grey", label=f"chance ({positives:.2f})")
    _finish_unit_square(axes, "recall", "precision", "lower left")
    axes.set_title(f"{_title_prefix(metrics)}precision-recall "
                   f"(positive: {_short(metrics['classes'][1])})")
    return figure


def _finish_unit_square(axes, xlabel, ylabel, legend_location):
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(loc=legend_location)


def _draw_training_curves(history):
    """Loss and accuracy per epoch over all phases on one epoch axis; fine-tuning is shaded."""
    epochs, phase_starts = [], []
    for phase in history.get("phases", []):
        if phase.get("epochs"):
            phase_starts.append((phase.get("name", "?"), len(epochs) + 1))
            epochs.extend(phase["epochs"])
    if not epochs:
        return None
    x = np.arange(1, len(epochs) + 1)
    figure, (loss_axes, accuracy_axes) = _new_figure(11, 4.2, columns=2)
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        for key, style, label in ((metric, "-o", "train"), (f"val_{metric}", "--s", "validation")):
            values = np.array([epoch.get(key, np.nan) for epoch in epochs], dtype=np.float64)
            if np.isfinite(values).any():
                axes.plot(x, values, style, markersize=4, label=label)
        for index, (name, start) in enumerate(phase_starts):
            if index > 0:  # every phase after the first (the fine-tuning) gets a band and a label
                end = phase_starts[index + 1][1] if index + 1 < len(phase_starts) else len(epochs) + 1
                axes.axvspan(start - 0.5, end - 0.5, color="orange", alpha=0.12)
                axes.axvline(start - 0.5, color="orange", linestyle=":")
                axes.text(start - 0.4, 0.98, name.replace("_", "-"), transform=axes.get_xaxis_transform(),
                          va="top", color="darkorange")
        axes.set_xlabel("epoch (all phases)")
        axes.set_ylabel(metric)
        axes.set_title(metric)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def score(predict_images, dataset, expected_examples, batch_size=None, others=()):
    """Runs a model's `predict_images` over every batch of a dataset (and the same batches through
    the `others`: the production model the candidate is compared with sees the very same pixels).

    Args:
      predict_images: callable taking `images=` float32 [B, S, S, 3] and returning a dict with
        "probabilities" [B, C] (an exported model's signature).
      dataset: yields (images, labels) batches.
      expected_examples: how many examples the dataset must yield (the manifest's count).
      batch_size: for the progress bar's total only.
      others: more signatures like `predict_images`.

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
    if metrics.get("roc_auc") is not None:
        lines[0] += f", ROC AUC {metrics['roc_auc']:.4f}, PR AUC {metrics['pr_auc']:.4f}"
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
    with data.translate_errors():  # a damaged record: its one-line UserError, not an OpError
        scored = score(loaded.signatures["predict_images"], examples, expected, batch_size, others=others)
    labels, probabilities = scored[:2]
    metrics = {"split": split, **compute_metrics(labels, probabilities, dataset_manifest["classes"]),
               "model": model_url, "data": manifest_url, "model_id": storage.tree_digest(model_url),
               "dataset": manifest.dataset_identity(manifest_url, dataset_manifest)}
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
    pictures = write_pictures(metrics, output_url, roc_data=curves,
                              history=read_history(model_url, history_url))
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
