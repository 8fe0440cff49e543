"""trainer/evaluate.py: metrics against hand-checked cases, real PNG pictures, and the CI gate
through the real `trainer evaluate` command (local and on the GCS server)."""

import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from trainer import evaluate, storage
from trainer.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_hot_probabilities(predictions, num_classes, confidence=0.9):
    """Rows with `confidence` on the predicted class and the rest spread evenly."""
    rest = (1 - confidence) / (num_classes - 1)
    probabilities = np.full((len(predictions), num_classes), rest)
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def binary_probabilities(positive):
    positive = np.asarray(positive, dtype=np.float64)
    return np.stack([1 - positive, positive], axis=1)


# ---------------------------------------------------------------- compute_metrics


def test_perfect_binary_classifier():
    labels = [0, 1, 1, 0]
    metrics = evaluate.compute_metrics(labels, one_hot_probabilities(labels, 2), ["cats", "dogs"])

    assert metrics["examples"] == 4
    assert metrics["accuracy"] == 1.0
    assert metrics["loss"] == pytest.approx(-math.log(0.9))
    assert metrics["confusion_matrix"] == [[2, 0], [0, 2]]
    assert metrics["per_class"] == {
        "cats": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2},
        "dogs": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2},
    }
    assert metrics["roc_auc"] == 1.0
    assert metrics["pr_auc"] == 1.0
    assert metrics["classes"] == ["cats", "dogs"]


def test_known_confusion_matrix():
    labels = [0, 0, 0, 1, 1]
    predictions = [0, 0, 1, 1, 0]
    metrics = evaluate.compute_metrics(labels, one_hot_probabilities(predictions, 2), ["cats", "dogs"])

    assert metrics["confusion_matrix"] == [[2, 1], [1, 1]]  # rows true, columns predicted
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    cats, dogs = metrics["per_class"]["cats"], metrics["per_class"]["dogs"]
    assert (cats["precision"], cats["recall"], cats["support"]) == (pytest.approx(2 / 3),
                                                                   pytest.approx(2 / 3), 3)
    assert (dogs["precision"], dogs["recall"], dogs["support"]) == (0.5, 0.5, 2)
    assert dogs["f1"] == pytest.approx(0.5)
    # Three right at 0.9, two wrong at 0.1.
    assert metrics["loss"] == pytest.approx(-(3 * math.log(0.9) + 2 * math.log(0.1)) / 5)


def test_three_classes_have_no_aucs():
    labels = [0, 1, 2, 2]
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.0, 0.5, 0.5]])
    metrics = evaluate.compute_metrics(labels, probabilities, ["a", "b", "c"])

    # The last row ties b and c: argmax takes the first, b.
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert metrics["accuracy"] == 0.5
    assert metrics["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["per_class"]["c"]["precision"] == 0.5
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.6, 0.5])))
    assert "roc_auc" not in metrics and "pr_auc" not in metrics and "curves" not in metrics


def test_auc_of_a_known_ranking():
    # scikit-learn's documented example: one of the four positive-negative pairs is out of order.
    metrics = evaluate.compute_metrics([0, 0, 1, 1], binary_probabilities([0.1, 0.4, 0.35, 0.8]),
                                       ["no", "yes"])

    assert metrics["roc_auc"] == pytest.approx(0.75)
    # Precision at the two positives' thresholds: 1/1 at 0.8, then 2/3 at 0.35.
    assert metrics["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    roc = metrics["curves"]["roc"]
    assert roc["false_positive_rate"][0] == 0.0 and roc["true_positive_rate"][-1] == 1.0
    assert len(metrics["curves"]["pr"]["precision"]) == len(metrics["curves"]["pr"]["recall"])


def test_one_class_present_leaves_aucs_undefined():
    metrics = evaluate.compute_metrics([1, 1], binary_probabilities([0.8, 0.3]), ["no", "yes"])

    assert metrics["roc_auc"] is None and metrics["pr_auc"] is None
    assert metrics["accuracy"] == 0.5


def test_loss_is_clipped_like_keras():
    metrics = evaluate.compute_metrics([1], binary_probabilities([0.0]), ["no", "yes"])

    assert metrics["loss"] == pytest.approx(-math.log(evaluate.EPSILON))


def test_rejects_mismatched_shapes_and_labels():
    with pytest.raises(ValueError, match="probabilities"):
        evaluate.compute_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        evaluate.compute_metrics([0, 2], binary_probabilities([0.1, 0.9]), ["a", "b"])


# ---------------------------------------------------------------- pictures

HISTORY = {"phases": [
    {"name": "head", "epochs": [
        {"epoch": i, "loss": 1 / i, "accuracy": 1 - 0.4 / i, "val_loss": 1.2 / i,
         "val_accuracy": 1 - 0.5 / i} for i in range(1, 5)]},
    {"name": "fine_tune", "epochs": [
        {"epoch": i, "loss": 0.2, "accuracy": 0.93, "val_loss": 0.25, "val_accuracy": 0.9}
        for i in range(5, 7)]},
]}


def assert_png(url, min_side=200):
    data = storage.read_bytes(url)
    assert data.startswith(PNG_SIGNATURE), url
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    assert min_side <= width <= 3000 and min_side <= height <= 3000, (url, image.size)
    return width, height


def test_binary_pictures_are_real_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    positive = np.clip(0.35 * labels + 0.65 * rng.random(60), 0, 1)
    metrics = {"split": "test", **evaluate.compute_metrics(labels, binary_probabilities(positive),
                                                           ["cats", "dogs"])}

    urls = evaluate.write_pictures(metrics, str(tmp_path / "eval"), history=HISTORY)

    names = [os.path.basename(url) for url in urls]
    assert names == ["confusion_matrix.png", "roc_curve.png", "pr_curve.png", "training_curves.png"]
    for url in urls:
        assert_png(url)
    width, height = assert_png(urls[-1])
    assert width > 1.5 * height  # loss and accuracy side by side


def test_many_classes_get_a_larger_confusion_matrix(tmp_path):
    names = [f"class_{i:02d}" for i in range(20)]
    labels = np.arange(200) % 20
    metrics = evaluate.compute_metrics(labels, one_hot_probabilities(labels[::-1], 20), names)

    small = evaluate.write_pictures(
        evaluate.compute_metrics([0, 1, 2], one_hot_probabilities([0, 1, 2], 3), ["a", "b", "c"]),
        str(tmp_path / "three"))
    large = evaluate.write_pictures(metrics, str(tmp_path / "twenty"))

    assert [os.path.basename(url) for url in small] == ["confusion_matrix.png"]  # no ROC for 3
    assert assert_png(large[0])[0] > 1.5 * assert_png(small[0])[0]


def test_history_without_epochs_draws_no_training_curves(tmp_path):
    metrics = evaluate.compute_metrics([0, 1], binary_probabilities([0.2, 0.9]), ["a", "b"])
    history = {"phases": [{"name": "head", "epochs": []}]}

    urls = evaluate.write_pictures(metrics, str(tmp_path), history=history)

    assert "training_curves.png" not in [os.path.basename(url) for url in urls]


# ---------------------------------------------------------------- scoring, history, baseline


def fake_predict(images):
    """Stands in for a model's predict_images: P(class 1) is the mean pixel / 255."""
    positive = np.asarray(images, dtype=np.float32).mean(axis=(1, 2, 3)) / 255.0
    return {"probabilities": np.stack([1 - positive, positive], axis=1)}


def fake_batches(pixel_values, labels, batch_size):
    images = np.ones((len(labels), 4, 4, 3), np.float32) * np.asarray(pixel_values)[:, None, None, None]
    return [(images[i:i + batch_size], np.asarray(labels[i:i + batch_size], np.int32))
            for i in range(0, len(labels), batch_size)]


def test_score_collects_every_batch_in_order():
    batches = fake_batches([0, 255, 51, 204, 255], [0, 1, 0, 1, 1], batch_size=2)

    labels, probabilities = evaluate.score(fake_predict, batches, expected_examples=5, batch_size=2)

    assert labels.tolist() == [0, 1, 0, 1, 1]
    assert probabilities[:, 1] == pytest.approx([0.0, 1.0, 0.2, 0.8, 1.0])


def test_score_refuses_a_shortfall():
    batches = fake_batches([0, 255, 51], [0, 1, 0], batch_size=2)

    with pytest.raises(UserError, match="scored 3 examples but the manifest lists 4"):
        evaluate.score(fake_predict, batches, expected_examples=4, batch_size=2)


def test_history_defaults_to_the_job_dir(tmp_path):
    job_dir = tmp_path / "job"
    model_url = str(job_dir / "model")
    assert evaluate.read_history(model_url) is None

    storage.write_json(str(job_dir / "history.json"), HISTORY)
    assert evaluate.read_history(model_url + "/") == HISTORY
    with pytest.raises(UserError, match="--history"):
        evaluate.read_history(model_url, str(tmp_path / "missing.json"))


def test_baseline_must_exist_and_hold_an_accuracy(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluate.read_baseline(str(tmp_path / "missing.json"))
    storage.write_json(str(tmp_path / "other.json"), {"loss": 0.1})
    with pytest.raises(UserError, match="accuracy"):
        evaluate.read_baseline(str(tmp_path / "other.json"))


def test_check_gate():
    assert evaluate.check_gate({"accuracy": 0.9}) is None
    assert evaluate.check_gate({"accuracy": 0.9}, min_accuracy=0.9) is None
    assert "below --min_accuracy" in evaluate.check_gate({"accuracy": 0.89}, min_accuracy=0.9)
    assert evaluate.check_gate({"accuracy": 0.9}, baseline={"accuracy": 0.92}, tolerance=0.02) is None
    reason = evaluate.check_gate({"accuracy": 0.9}, baseline={"accuracy": 0.95}, tolerance=0.02)
    assert "baseline" in reason and "\n" not in reason


def test_summary_has_a_row_per_class():
    metrics = {"split": "val", **evaluate.compute_metrics(
        [0, 1, 2], one_hot_probabilities([0, 1, 1], 3), ["ants", "bees", "wasps"])}

    lines = evaluate.format_summary(metrics).splitlines()

    assert lines[0].startswith("val split: 3 examples, accuracy 0.6667")
    assert [line.split()[0] for line in lines[2:]] == ["ants", "bees", "wasps"]
