"""The pictures of an evaluation (`trainer evaluate` writes them next to metrics.json): confusion
matrix, ROC and PR curves, training curves, a reliability diagram, the most confident mistakes.

Drawn with trainer.infra.figures: class names shortened readably, fonts for any script, plain text.
"""

import math

import numpy as np
from absl import logging

from trainer.infra import figures, storage

# The confusion matrix: counts in its cells up to this many classes, names on its axes up to this
# many, and never a canvas larger than this (inches at 100 dpi).
CELL_TEXT_CLASSES = 30
NAMED_CLASSES = 80
MAX_MATRIX_INCHES = 24
MISTAKE_COLUMNS = 5  # the mistakes sheet's widest row

def draw_pictures(metrics, roc_data=None, history=None, mistakes=None):
    """Draws the PNG pictures of an evaluation.

    Args:
      metrics: a metrics.json dict (optionally with "split", "calibration", "comparison").
      roc_data: the "curves" of `metrics.compute_metrics` (default: `metrics["curves"]`); with it,
        two classes also get roc_curve.png and pr_curve.png.
      history: a job's history.json dict; with it, training_curves.png.
      mistakes: the most confident mistakes (`scoring.ConfidentMistakes.kept`); with it, mistakes.png.

    Returns:
      `{file name: PNG bytes}`: confusion_matrix.png, then roc_curve.png, pr_curve.png,
      training_curves.png, reliability.png, mistakes.png when their data is there.
    """
    figures.use_fonts()
    roc_data = roc_data if roc_data is not None else metrics.get("curves")
    drawn = {"confusion_matrix.png": _draw_confusion_matrix(metrics)}
    if roc_data is not None and metrics.get("roc_auc") is not None:
        drawn["roc_curve.png"] = _draw_roc_curve(metrics, roc_data["roc"])
        drawn["pr_curve.png"] = _draw_pr_curve(metrics, roc_data["pr"])
    if history is not None:
        figure = _draw_training_curves(history)
        if figure is None:
            logging.warning("history has no epochs: no training_curves.png")
        else:
            drawn["training_curves.png"] = figure
    if metrics.get("calibration"):
        drawn["reliability.png"] = _draw_reliability(metrics)
    if mistakes is not None:
        drawn["mistakes.png"] = _draw_mistakes(mistakes, metrics["classes"])
    return {name: figures.to_png(figure) for name, figure in drawn.items()}


def write_pictures(output_url, pictures):
    """Writes `{file name: PNG bytes}` into the folder `output_url`; returns the URLs written."""
    urls = []
    for name, png in pictures.items():
        urls.append(storage.join(output_url, name))
        storage.write_bytes(urls[-1], png)
    return urls


def _draw_confusion_matrix(metrics):
    """Counts in the cells; colour is the share of the true class, so small classes still show.

    Above CELL_TEXT_CLASSES classes the matrix is a heatmap without counts in its cells, on a
    canvas of at most MAX_MATRIX_INCHES (per-cell text and a canvas growing with the classes cost
    minutes and gigabytes at a few hundred classes); report.html lists the most confused pairs, and
    metrics.json keeps every count. Above NAMED_CLASSES the axes are class indices.
    """
    counts = np.asarray(metrics["confusion_matrix"])
    names = figures.readable_names(metrics["classes"])
    num_classes = len(names)
    size = min(MAX_MATRIX_INCHES, max(4.5, 1.5 + 0.5 * num_classes))
    figure, axes = figures.new_figure(size + 1.2, size)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("share of the true class")
    font_size = max(8, 12 - 0.2 * num_classes) if num_classes <= CELL_TEXT_CLASSES else 6
    if num_classes <= CELL_TEXT_CLASSES:
        for row in range(num_classes):
            for column in range(num_classes):
                # Zeros fade so that the mistakes stand out in a large matrix.
                color = "white" if shares[row, column] > 0.5 else "black" if counts[row, column] else "silver"
                axes.text(column, row, str(counts[row, column]), ha="center", va="center",
                          color=color, fontsize=font_size)
    if num_classes <= NAMED_CLASSES:
        axes.set_xticks(range(num_classes), names, rotation=45 if num_classes > 3 else 0,
                        ha="right" if num_classes > 3 else "center", fontsize=font_size)
        axes.set_yticks(range(num_classes), names, fontsize=font_size)
    numbered = "" if num_classes <= NAMED_CLASSES else " (its index in metrics.json's classes)"
    axes.set_xlabel(f"predicted class{numbered}")
    axes.set_ylabel(f"true class{numbered}")
    axes.set_title(f"{_title_prefix(metrics)}accuracy {metrics['accuracy']:.2%} "
                   f"on {metrics['examples']} images")
    return figure


def _title_prefix(metrics):
    return f"{metrics['split']} split: " if metrics.get("split") else ""


def _draw_roc_curve(metrics, roc):
    figure, axes = figures.new_figure(5, 5)
    axes.plot(roc["false_positive_rate"], roc["true_positive_rate"], linewidth=2,
              label=f"ROC AUC = {metrics['roc_auc']:.4f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    _finish_unit_square(axes, "false positive rate", "true positive rate", "lower right")
    axes.set_title(f"{_title_prefix(metrics)}ROC curve (positive: {figures.short(metrics['classes'][1])})")
    return figure


def _draw_pr_curve(metrics, pr):
    figure, axes = figures.new_figure(5, 5)
    axes.step(pr["recall"], pr["precision"], where="post", linewidth=2,
              label=f"PR AUC (average precision) = {metrics['pr_auc']:.4f}")
    # A classifier that guesses scores the positive class's share at every recall.
    positives = metrics["per_class"][metrics["classes"][1]]["support"] / metrics["examples"]
    axes.axhline(positives, linestyle="--", color="grey", label=f"chance ({positives:.2f})")
    _finish_unit_square(axes, "recall", "precision", "lower left")
    axes.set_title(f"{_title_prefix(metrics)}precision-recall "
                   f"(positive: {figures.short(metrics['classes'][1])})")
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
    figure, (loss_axes, accuracy_axes) = figures.new_figure(11, 4.2, columns=2)
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


def _draw_reliability(metrics):
    rows = metrics["calibration"]["bins"]
    figure, (axes, counts) = figures.new_figure(10, 4.5, columns=2)
    centers = [(row["lower"] + row["upper"]) / 2 for row in rows]
    width = rows[0]["upper"] - rows[0]["lower"]
    filled = [(center, row) for center, row in zip(centers, rows, strict=True) if row["count"]]
    axes.bar([c for c, _ in filled], [row["accuracy"] for _, row in filled], width=width * 0.9,
             edgecolor="navy", alpha=0.7, label="accuracy in the bin")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    axes.plot([c for c, _ in filled], [row["confidence"] for _, row in filled], "o", color="darkorange",
              label="mean confidence")
    _finish_unit_square(axes, "confidence (top probability)", "accuracy", "upper left")
    axes.set_title(f"reliability: ECE {metrics['calibration']['ece']:.4f}")
    counts.bar(centers, [row["count"] for row in rows], width=width * 0.9, color="grey")
    counts.set_xlabel("confidence (top probability)")
    counts.set_ylabel("images")
    from matplotlib.ticker import MaxNLocator

    counts.yaxis.set_major_locator(MaxNLocator(integer=True))  # whole images
    counts.set_title("how confident the model is")
    return figure


def _draw_mistakes(mistakes, class_names):
    """A contact sheet: the most confident mistakes, each with its true and predicted class."""
    # A near-square grid of at most MISTAKE_COLUMNS columns, whatever the count.
    columns = min(MISTAKE_COLUMNS, max(2, math.ceil(math.sqrt(len(mistakes)))))
    rows = max(1, -(-len(mistakes) // columns))
    figure, axes = figures.new_figure(2.6 * columns, 2.9 * rows + 0.4, columns=columns, rows=rows)
    axes = np.atleast_1d(axes).ravel()
    names = figures.readable_names(class_names, limit=16)
    for index, panel in enumerate(axes):
        panel.set_axis_off()
        if index < len(mistakes):
            mistake = mistakes[index]
            panel.imshow(mistake["image"])
            panel.set_title(f"true: {names[mistake['label']]}\npredicted: {names[mistake['predicted']]}\n"
                            f"p = {mistake['confidence']:.3f}", fontsize=9)
    if not mistakes:
        axes[0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=14)
    figure.suptitle("the most confident mistakes")
    return figure
