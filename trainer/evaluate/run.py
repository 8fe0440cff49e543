"""`trainer evaluate`: metrics.json, pictures and report.html for one split, then the CI gate.

`run` scores every example of a split with an exported model (trainer.evaluate.scoring, through
its `predict_images` signature, so the pixels come from the same reader as in training), and with
`--production` production's model on the same examples (trainer.evaluate.comparison); it writes
metrics.json (trainer.evaluate.metrics), the PNG pictures (trainer.evaluate.pictures) and
report.html (trainer.evaluate.page), logs a summary, and only then applies the gate
(trainer.evaluate.gate), so a failed CI run still leaves its report behind.
"""

from absl import logging

from trainer.errors import UserError
from trainer.evaluate import comparison, gate, page, pictures, scoring
from trainer.evaluate import metrics as metrics_lib
from trainer.formats import jobdir, manifest, modeldir
from trainer.infra import storage


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


def training_summary(model_url, metadata, history):
    """How the model was trained, for report.html and metrics.json: the backbone and image size
    (the export's metadata.json), and, when the job's config.json sits next to the model, the
    weights, the epochs run in each phase (history.json) and asked for, the learning rates, the
    batch, the dataset's digest and the job_dir."""
    summary = {"backbone": metadata.get("backbone"), "image_size": metadata.get("image_size")}
    config_url = storage.join(storage.dirname(model_url), jobdir.CONFIG)
    try:
        config = storage.read_json(config_url) if storage.exists(config_url) else None
    except ValueError:
        config = None
    if isinstance(config, dict):
        summary.update({key: config.get(key) for key in ("weights", "epochs", "fine_tune_epochs", "fine_tune_from",
                                                          "learning_rate", "fine_tune_learning_rate", "batch_size",
                                                          "optimizer", "job_dir")})
        dataset = config.get("dataset")
        summary["dataset_digest"] = dataset.get("digest") if isinstance(dataset, dict) else None
    if history:
        summary["epochs_run"] = {phase.get("name"): len(phase.get("epochs", [])) for phase in history.get("phases", [])
                                 if isinstance(phase, dict)}
    return summary


def _check_arguments(batch_size, min_accuracy, tolerance):
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        raise UserError(f"--min_accuracy must be between 0 and 1, got {min_accuracy}")
    if tolerance < 0.0:
        raise UserError(f"--tolerance must not be negative, got {tolerance}")


def _check_classes(model_classes, data_classes, model_url, manifest_url):
    if list(model_classes) != list(data_classes):
        raise UserError(f"the model's classes {comparison.preview(model_classes)} ({model_url}) differ from the "
                        f"dataset's {comparison.preview(data_classes)} ({manifest_url})")



def run(model_url, manifest_url, split, output_url, history_url=None, batch_size=64,
        min_accuracy=None, baseline_url=None, tolerance=0.0, production_url=None, recall_tolerance=0.05,
        require_improvement=False, report_only=False):
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
      report_only: with `production_url`, write the comparison without failing when its decision
        is "do not promote" (promote still acts on the recorded decision).

    Returns:
      The metrics.json dict.

    Raises:
      UserError: bad arguments, missing baseline, classes of model and data differ, a split that is
        absent or empty, shards that do not match their manifest.
      GateFailed: metrics and pictures were written, but the gate fails (a one-line reason).
    """
    from trainer.data import pipeline  # TensorFlow: imported only when a model is evaluated
    from trainer.serve.load import load_model

    _check_arguments(batch_size, min_accuracy, tolerance)
    storage.check_writable(output_url)
    # Read the baseline first: a typo in its URL should not cost a whole evaluation.
    baseline = gate.read_metrics(baseline_url, "--baseline") if baseline_url else None
    dataset_manifest = manifest.load_manifest(manifest_url)
    classes = dataset_manifest["classes"]
    expected = manifest.count_examples(dataset_manifest, split, manifest_url)
    if expected == 0:
        raise UserError(f"split {split!r} of {manifest_url} has no examples to evaluate")
    loaded, metadata = load_model(model_url)
    _check_classes(metadata["classes"], classes, model_url, manifest_url)
    if modeldir.PIXELS_SIGNATURE not in loaded.signatures:
        raise UserError(f"{model_url} has no {modeldir.PIXELS_SIGNATURE} signature (not exported by `trainer train`?)")
    logging.info("evaluating %s on the %s split of %s: %d examples, image size %d, batch %d",
                 model_url, split, manifest_url, expected, metadata["image_size"], batch_size)
    production = comparison.load_production(production_url, metadata["classes"]) if production_url else None

    examples = pipeline.make_dataset(manifest_url, split, metadata["image_size"], batch_size, training=False)
    mistakes = scoring.ConfidentMistakes()
    others = (production.predict_images,) if production and production.predict_images else ()
    with pipeline.translate_errors():  # a damaged record: its one-line UserError, not an OpError
        scored = scoring.score(loaded.signatures[modeldir.PIXELS_SIGNATURE], examples, expected, batch_size,
                               others=others, mistakes=mistakes)
    labels, probabilities = scored[:2]
    results = {"split": split, **metrics_lib.compute_metrics(labels, probabilities, classes),
               "model": model_url, "data": manifest_url, "model_id": modeldir.model_id(model_url),
               "dataset": manifest.dataset_identity(manifest_url, dataset_manifest),
               "calibration": metrics_lib.calibration(labels, probabilities)}
    curves = results.pop("curves", None)  # plotted, not stored: up to one point per example
    if production:
        results["comparison"] = comparison.compare_with_production(
            production, production_url, metadata["classes"], labels, probabilities,
            scored[2][0] if others else None, recall_tolerance=recall_tolerance,
            require_improvement=require_improvement)

    history = read_history(model_url, history_url)
    results["training"] = training_summary(model_url, metadata, history)
    metrics_url = storage.join(output_url, jobdir.METRICS)
    storage.write_json(metrics_url, results)
    drawn = pictures.draw_pictures(results, roc_data=curves, history=history, mistakes=mistakes.kept)
    written = [*pictures.write_pictures(output_url, drawn), page.write_html(output_url, results, drawn)]
    logging.info("%s", metrics_lib.format_summary(results))
    logging.info("wrote %s and %s", metrics_url, ", ".join(written))

    reason = gate.check_baseline_examples(baseline, baseline_url, results) or gate.check_gate(
        results, min_accuracy=min_accuracy, baseline=baseline, tolerance=tolerance)
    decided = results.get("comparison")
    if reason is None and decided and not decided["passed"] and not report_only:
        reason = f"do not promote: {decided['reason']}"
    if reason is not None:
        raise gate.GateFailed(f"gate failed: {reason}")
    if min_accuracy is not None or baseline is not None or decided:
        logging.info("gate passed")
    return results
