"""trainer/evaluate.py: metrics against hand-checked cases, real PNG pictures, and the CI gate
through the real `trainer evaluate` command (local and on the GCS server)."""

import io
import math
import os

import numpy as np
import pytest
from helpers import assert_fails_as, record, write_records_dataset
from PIL import Image

from trainer.errors import UserError
from trainer.evaluate import gate, pictures, scoring
from trainer.evaluate import metrics as metrics_lib
from trainer.evaluate import run as evaluate
from trainer.infra import figures, folders, storage

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
    metrics = metrics_lib.compute_metrics(labels, one_hot_probabilities(labels, 2), ["cats", "dogs"])

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
    metrics = metrics_lib.compute_metrics(labels, one_hot_probabilities(predictions, 2), ["cats", "dogs"])

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
    metrics = metrics_lib.compute_metrics(labels, probabilities, ["a", "b", "c"])

    # The last row ties b and c: argmax takes the first, b.
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert metrics["accuracy"] == 0.5
    assert metrics["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["per_class"]["c"]["precision"] == 0.5
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.6, 0.5])))
    assert "roc_auc" not in metrics and "pr_auc" not in metrics and "curves" not in metrics


def test_auc_of_a_known_ranking():
    # scikit-learn's documented example: one of the four positive-negative pairs is out of order.
    metrics = metrics_lib.compute_metrics([0, 0, 1, 1], binary_probabilities([0.1, 0.4, 0.35, 0.8]),
                                       ["no", "yes"])

    assert metrics["roc_auc"] == pytest.approx(0.75)
    # Precision at the two positives' thresholds: 1/1 at 0.8, then 2/3 at 0.35.
    assert metrics["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    roc = metrics["curves"]["roc"]
    assert roc["false_positive_rate"][0] == 0.0 and roc["true_positive_rate"][-1] == 1.0
    assert len(metrics["curves"]["pr"]["precision"]) == len(metrics["curves"]["pr"]["recall"])


def test_one_class_present_leaves_aucs_undefined():
    metrics = metrics_lib.compute_metrics([1, 1], binary_probabilities([0.8, 0.3]), ["no", "yes"])

    assert metrics["roc_auc"] is None and metrics["pr_auc"] is None
    assert metrics["accuracy"] == 0.5


def test_loss_is_clipped_like_keras():
    metrics = metrics_lib.compute_metrics([1], binary_probabilities([0.0]), ["no", "yes"])

    assert metrics["loss"] == pytest.approx(-math.log(metrics_lib.EPSILON))


def test_rejects_mismatched_shapes_and_labels():
    with pytest.raises(ValueError, match="probabilities"):
        metrics_lib.compute_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        metrics_lib.compute_metrics([0, 2], binary_probabilities([0.1, 0.9]), ["a", "b"])


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
    metrics = {"split": "test", **metrics_lib.compute_metrics(labels, binary_probabilities(positive),
                                                           ["cats", "dogs"])}

    urls = pictures.write_pictures(str(tmp_path / "eval"), pictures.draw_pictures(metrics, history=HISTORY))

    names = [os.path.basename(url) for url in urls]
    assert names == ["confusion_matrix.png", "roc_curve.png", "pr_curve.png", "training_curves.png"]
    for url in urls:
        assert_png(url)
    width, height = assert_png(urls[-1])
    assert width > 1.5 * height  # loss and accuracy side by side


def test_many_classes_get_a_larger_confusion_matrix(tmp_path):
    names = [f"class_{i:02d}" for i in range(20)]
    labels = np.arange(200) % 20
    metrics = metrics_lib.compute_metrics(labels, one_hot_probabilities(labels[::-1], 20), names)

    small = pictures.write_pictures(str(tmp_path / "three"), pictures.draw_pictures(
        metrics_lib.compute_metrics([0, 1, 2], one_hot_probabilities([0, 1, 2], 3), ["a", "b", "c"])))
    large = pictures.write_pictures(str(tmp_path / "twenty"), pictures.draw_pictures(metrics))

    assert [os.path.basename(url) for url in small] == ["confusion_matrix.png"]  # no ROC for 3
    assert assert_png(large[0])[0] > 1.5 * assert_png(small[0])[0]


def test_hundreds_of_classes_get_a_heatmap_of_bounded_size_and_the_most_confused_pairs(tmp_path):
    from trainer.evaluate import page

    names = [f"class_{i:03d}" for i in range(300)]
    labels = np.arange(900) % 300
    predictions = labels.copy()
    predictions[:3] = 7  # class_000, 001, 002 -> class_007 once each; class_010 -> class_011 three times
    predictions[[10, 310, 610]] = 11
    metrics = metrics_lib.compute_metrics(labels, one_hot_probabilities(predictions, 300), names)
    assert len(metrics["confusion_matrix"]) == 300  # metrics.json keeps every count
    pairs = metrics_lib.most_confused(metrics, limit=2)
    assert pairs[0] == {"true": "class_010", "predicted": "class_011", "count": 3, "share": 1.0}
    assert (pairs[1]["true"], pairs[1]["predicted"], pairs[1]["count"]) == ("class_000", "class_007", 1)
    drawn = pictures.draw_pictures(metrics)
    width, height = assert_png(pictures.write_pictures(str(tmp_path), drawn)[0])
    assert max(width, height) <= (pictures.MAX_MATRIX_INCHES + 1.2) * 100
    metrics["calibration"] = metrics_lib.calibration(labels, one_hot_probabilities(predictions, 300))
    report = storage.read_text(page.write_html(str(tmp_path), metrics, drawn))
    assert "Most confused pairs" in report and "<td>class_010</td><td>class_011</td><td>3</td><td>100.0%</td>" in report


def test_history_without_epochs_draws_no_training_curves(tmp_path):
    metrics = metrics_lib.compute_metrics([0, 1], binary_probabilities([0.2, 0.9]), ["a", "b"])
    history = {"phases": [{"name": "head", "epochs": []}]}

    urls = pictures.write_pictures(str(tmp_path), pictures.draw_pictures(metrics, history=history))

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

    labels, probabilities = scoring.score(fake_predict, batches, expected_examples=5, batch_size=2)

    assert labels.tolist() == [0, 1, 0, 1, 1]
    assert probabilities[:, 1] == pytest.approx([0.0, 1.0, 0.2, 0.8, 1.0])


def test_score_refuses_a_shortfall():
    batches = fake_batches([0, 255, 51], [0, 1, 0], batch_size=2)

    with pytest.raises(UserError, match="scored 3 examples but the manifest lists 4"):
        scoring.score(fake_predict, batches, expected_examples=4, batch_size=2)


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
        gate.read_metrics(str(tmp_path / "missing.json"), "--baseline")
    storage.write_json(str(tmp_path / "other.json"), {"loss": 0.1})
    with pytest.raises(UserError, match="accuracy"):
        gate.read_metrics(str(tmp_path / "other.json"), "--baseline")


def test_check_gate():
    assert gate.check_gate({"accuracy": 0.9}) is None
    assert gate.check_gate({"accuracy": 0.9}, min_accuracy=0.9) is None
    assert "below --min_accuracy" in gate.check_gate({"accuracy": 0.89}, min_accuracy=0.9)
    assert gate.check_gate({"accuracy": 0.9}, baseline={"accuracy": 0.92}, tolerance=0.02) is None
    reason = gate.check_gate({"accuracy": 0.9}, baseline={"accuracy": 0.95}, tolerance=0.02)
    assert "baseline" in reason and "\n" not in reason


def test_summary_has_a_row_per_class():
    metrics = {"split": "val", **metrics_lib.compute_metrics(
        [0, 1, 2], one_hot_probabilities([0, 1, 1], 3), ["ants", "bees", "wasps"])}

    lines = metrics_lib.format_summary(metrics).splitlines()

    assert lines[0].startswith("val split: 3 examples, accuracy 0.6667")
    assert [line.split()[0] for line in lines[2:]] == ["ants", "bees", "wasps"]


# ---------------------------------------------------------------- the real command

CLASSES = ["cats", "dogs"]
IMAGE_SIZE = 8
# The test split: (brightness, label). The model below calls bright images dogs, so the bright
# cat (200) is its one mistake: accuracy 6/7.
TEST_EXAMPLES = [(20, 0), (40, 0), (60, 0), (200, 0), (180, 1), (220, 1), (250, 1)]
ACCURACY = 6 / 7


def encode_png(brightness, size=16):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (brightness,) * 3).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(folder, examples, num_shards=2):
    """A `test` split of `(brightness, label)` images in shards, then dataset.json, written as
    `trainer prepare` writes them (helpers.write_records_dataset)."""
    records = [record(encode_png(brightness), "png", label, CLASSES[label], f"{CLASSES[label]}/{index}.png", 16, 16)
               for index, (brightness, label) in enumerate(examples)]
    return write_records_dataset(folder, CLASSES, {"test": [records[shard::num_shards] for shard in range(num_shards)]})


def export_brightness_model(model_url, classes=CLASSES, bias=-5.0):
    """Exports, with the real export code, a model whose P(dogs) = sigmoid(10 mean/255 + bias)
    (the default: sigmoid(10 (mean/255 - 0.5)))."""
    from trainer.infra.kerasapi import keras
    from trainer.train import export

    model = keras.Sequential([keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.layers[-1].set_weights([np.full((3, 1), 10 / (3 * 255), np.float32),
                                  np.array([bias], np.float32)])
    export.export_model(model, list(classes), IMAGE_SIZE, model_url, backbone="brightness")
    return model_url


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A dataset and a job folder (model/ and history.json) on local disk."""
    root = tmp_path_factory.mktemp("evaluate")
    manifest = write_dataset(str(root / "data"), TEST_EXAMPLES)
    model = export_brightness_model(str(root / "job" / "model"))
    storage.write_json(str(root / "job" / "history.json"), HISTORY)
    storage.write_json(str(root / "baseline.json"), {"accuracy": 0.9})
    return {"root": root, "data": manifest, "model": model, "baseline": str(root / "baseline.json")}


def evaluate_command(job, output, *flags):
    from helpers import run_trainer

    return run_trainer("evaluate", f"--model={job['model']}", f"--data={job['data']}", "--split=test",
                       f"--output={output}", "--batch_size=3", *flags)


def test_passing_gate_writes_the_report_to_the_gcs_server(job, gcs_bucket):
    data = f"{gcs_bucket}/data"
    folders.copy_tree(os.path.dirname(job["data"]), data)
    output = f"{gcs_bucket}/eval"
    result = evaluate_command({**job, "data": f"{data}/dataset.json"}, output, "--min_accuracy=0.8",
                              f"--baseline={job['baseline']}", "--tolerance=0.05")

    assert result.returncode == 0, result.stderr[-3000:]
    metrics = storage.read_json(f"{output}/metrics.json")
    assert metrics["examples"] == len(TEST_EXAMPLES)  # every example of the split, once
    assert metrics["accuracy"] == pytest.approx(ACCURACY)
    assert metrics["confusion_matrix"] == [[3, 1], [0, 3]]
    assert metrics["roc_auc"] == pytest.approx(11 / 12)  # the bright cat outranks one dog of three
    assert (metrics["split"], metrics["model"], metrics["data"]) == ("test", job["model"],
                                                                     f"{data}/dataset.json")
    assert "curves" not in metrics
    for name in ("confusion_matrix", "roc_curve", "pr_curve", "training_curves"):
        assert_png(f"{output}/{name}.png")
    assert "gate passed" in result.stderr


@pytest.mark.parametrize("settings, reason", [
    ({"min_accuracy": 0.9}, "gate failed: accuracy 0.8571 is below --min_accuracy 0.9000"),
    ({"baseline_url": "{baseline}", "tolerance": 0.02}, "below the baseline's 0.9000"),
])
def test_failing_gate_exits_1_with_one_line_and_keeps_the_report(job, tmp_path, settings, reason):
    output = tmp_path / "eval"
    settings = {key: value.format(**job) if isinstance(value, str) else value for key, value in settings.items()}
    line = assert_fails_as(lambda: evaluate.run(job["model"], job["data"], "test", str(output), batch_size=3,
                                                **settings), reason)
    assert line.startswith("error: gate failed: ")
    assert storage.read_json(str(output / "metrics.json"))["examples"] == len(TEST_EXAMPLES)
    assert (output / "confusion_matrix.png").exists()


def test_bad_input_is_one_line(job, tmp_path):
    other = export_brightness_model(str(tmp_path / "other"), classes=["birds", "fish"])
    assert_fails_as(lambda: evaluate.run(other, job["data"], "test", str(tmp_path / "a")), "differ from the dataset's")
    assert_fails_as(lambda: evaluate.run(job["model"], job["data"], "test", str(tmp_path / "b"),
                                         baseline_url=str(tmp_path / "none.json")), "--baseline")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- The paired gate: candidate and production on the same examples ------------------------------

def test_mcnemar_exact_p_is_the_two_sided_binomial_test():
    from scipy.stats import binomtest

    for only_candidate, only_production in [(0, 0), (1, 0), (3, 10), (10, 3), (50, 70), (200, 250)]:
        n = only_candidate + only_production
        expected = binomtest(min(only_candidate, only_production), n, 0.5).pvalue if n else 1.0
        assert gate.mcnemar_exact_p(only_candidate, only_production) == pytest.approx(expected, rel=1e-9)


def test_compare_promotes_unless_significantly_worse_and_guards_each_class():
    labels = [0] * 100 + [1] * 100
    production = [True] * 200
    # 20 more mistakes spread over both classes: significantly worse.
    worse = [i % 10 != 0 for i in range(200)]
    result = gate.compare(labels, worse, production, ["cats", "dogs"], recall_tolerance=0.2)
    assert not result["passed"] and result["reason"].startswith("significantly worse")
    assert (result["only_candidate_correct"], result["only_production_correct"]) == (0, 20)
    assert result["p_value"] < 0.05
    # Three mistakes more: noise, not a real difference.
    close = [i not in (1, 102, 150) for i in range(200)]
    assert gate.compare(labels, close, production, ["cats", "dogs"])["passed"]
    # ... unless --require_improvement.
    assert not gate.compare(labels, close, production, ["cats", "dogs"], require_improvement=True)["passed"]
    # A class that loses 8 points of recall fails, even though overall the difference is noise.
    one_class = [not (100 <= i < 108) for i in range(200)]
    result = gate.compare(labels, one_class, [True] * 200, ["cats", "dogs"], recall_tolerance=0.05)
    assert not result["passed"] and "recall of class 'dogs' falls from 1.0000 to 0.9200" in result["reason"]


def test_evaluate_with_production_scores_both_models_on_the_same_examples(job, tmp_path):
    from trainer.release import promote

    production = str(tmp_path / "production")
    champion = tmp_path / "champion"
    export_brightness_model(str(champion / "model"), bias=-4.0)
    assert evaluate_command({**job, "model": str(champion / "model")}, str(champion / "eval")).returncode == 0
    version = promote.promote(str(champion), production)

    candidate_eval = tmp_path / "candidate-eval"
    result = evaluate_command(job, str(candidate_eval), f"--production={production}", "--recall_tolerance=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = storage.read_json(str(candidate_eval / "metrics.json"))["comparison"]
    assert comparison["production"]["version"] == version
    assert comparison["production"]["model_id"] == folders.tree_digest(str(champion / "model"))
    assert comparison["examples"] == len(TEST_EXAMPLES)
    assert comparison["candidate_accuracy"] == pytest.approx(ACCURACY)
    assert 0 <= comparison["p_value"] <= 1 and comparison["passed"]
    assert "candidate vs production" in result.stderr

    # The decision reaches promote through metrics.json, tied to the model it evaluated.
    candidate = tmp_path / "candidate"
    folders.copy_tree(job["model"], str(candidate / "model"))
    folders.copy_tree(str(candidate_eval), str(candidate / "eval"))
    assert promote.promote(str(candidate), production) != version


def test_a_do_not_promote_decision_fails_evaluate_unless_report_only(job, tmp_path, caplog):
    import logging

    from trainer.release import promote

    production = str(tmp_path / "production")
    with caplog.at_level(logging.INFO, logger="absl"):  # nothing to compare with yet: said, and no gate
        evaluate.run(job["model"], job["data"], "test", str(tmp_path / "first"), production_url=production)
    assert "no production model yet: the first promotion needs no comparison" in caplog.text
    champion = tmp_path / "champion"
    folders.copy_tree(job["model"], str(champion / "model"))
    evaluate.run(str(champion / "model"), job["data"], "test", str(champion / "eval"))
    promote.promote(str(champion), production)
    # A candidate that calls every image a dog: the cats' recall falls from 1.0 to 0.0.
    worse = export_brightness_model(str(tmp_path / "worse" / "model"), bias=50.0)
    output = tmp_path / "worse" / "eval"
    line = assert_fails_as(lambda: evaluate.run(worse, job["data"], "test", str(output), production_url=production),
                           "error: gate failed: do not promote: recall of class 'cats' falls from")
    assert not storage.read_json(str(output / "metrics.json"))["comparison"]["passed"] and line
    assert (output / "report.html").exists()  # the report is written first
    metrics = evaluate.run(worse, job["data"], "test", str(output), production_url=production, report_only=True)
    assert metrics["comparison"]["passed"] is False


# ---- The report: calibration, mistakes, readable names, report.html --------------------------------

def test_calibration_error_of_known_predictions():
    # Two bins used: confidence 0.9 with 80% right (gap 0.1), and 0.6 with 60% right (gap 0).
    probabilities = [[0.9, 0.1]] * 10 + [[0.4, 0.6]] * 10
    labels = [0] * 8 + [1] * 2 + [1] * 6 + [0] * 4
    result = metrics_lib.calibration(labels, probabilities, bins=10)
    assert result["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.0)
    filled = [row for row in result["bins"] if row["count"]]
    assert [(row["count"], row["accuracy"]) for row in filled] == [(10, pytest.approx(0.6)), (10, pytest.approx(0.8))]


def test_long_names_sharing_a_prefix_stay_apart_and_cjk_names_render():
    import warnings

    names = ["golden_retriever_puppy_indoor", "golden_retriever_puppy_outdoor", "猫", "小狗", "강아지"]
    shown = figures.readable_names(names)
    assert len(set(shown)) == 5 and all(len(name) <= 18 for name in shown)
    metrics = metrics_lib.compute_metrics([0, 1, 2, 3, 4], np.eye(5), names)
    metrics["calibration"] = metrics_lib.calibration([0, 1, 2, 3, 4], np.eye(5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pictures.draw_pictures(metrics, mistakes=[])
    assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught]


def test_class_names_are_plain_text_in_pictures_not_mathtext():
    names = ["a$x^$", "$\\alpha_{$", "price $5"]  # each one a matplotlib mathtext error if parsed
    labels = [0, 1, 2, 0]
    metrics = metrics_lib.compute_metrics(labels, np.eye(3)[[0, 1, 2, 1]], names)
    metrics["calibration"] = metrics_lib.calibration(labels, np.eye(3)[[0, 1, 2, 1]])
    mistake = {"index": 3, "label": 0, "predicted": 1, "confidence": 1.0, "image": np.zeros((8, 8, 3), np.uint8)}
    drawn = pictures.draw_pictures(metrics, mistakes=[mistake])
    assert set(drawn) == {"confusion_matrix.png", "reliability.png", "mistakes.png"}


@pytest.mark.parametrize("count, grid", [(6, (2, 3)), (15, (4, 4)), (40, (8, 5))])
def test_the_mistakes_sheet_is_a_grid_for_any_count(count, grid):
    names = ["cats", "dogs"]
    mistakes = [{"index": index, "label": index % 2, "predicted": 1 - index % 2, "confidence": 0.9,
                 "image": np.full((16, 16, 3), index * 6, np.uint8)} for index in range(count)]
    png = pictures.draw_pictures(metrics_lib.compute_metrics([0, 1], np.eye(2), names), mistakes=mistakes)
    width, height = Image.open(io.BytesIO(png["mistakes.png"])).size
    rows, columns = grid  # tiles of 2.6 x 2.9 inches at 100 dpi, and the title
    assert (width, height) == (round(260 * columns), round(290 * rows + 40)), (width, height)


def test_report_html_renders_in_headless_chromium_with_every_picture(job, tmp_path):
    import shutil
    import subprocess

    output = tmp_path / "eval"
    result = evaluate_command(job, str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = storage.read_json(str(output / "metrics.json"))
    assert 0 <= metrics["calibration"]["ece"] <= 1
    for name in ("reliability.png", "mistakes.png"):
        assert_png(str(output / name))
    page = (output / "report.html").read_text()
    assert f"{metrics['accuracy']:.4f}" in page
    pictures = page.count("data:image/png;base64,")
    assert pictures == 6  # confusion matrix, ROC, PR, training curves, reliability, mistakes

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is needed (make test installs Debian's package)"
    # A copy of the page that reports, in its title, how many pictures decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>onload = () => { document.title = 'decoded ' + "
                                  "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; };"
                                  "</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert f"<title>decoded {pictures}</title>" in dom.stdout, dom.stderr[-2000:]
    screenshot = tmp_path / "page.png"
    subprocess.run([browser, *flags, f"--screenshot={screenshot}", "--window-size=1200,2000",
                    (output / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("L"))
    assert (pixels < 200).mean() > 0.02  # text, tables and pictures: not a blank page


def test_confident_mistakes_keeps_the_most_confident_wrong_predictions_with_their_pixels():
    mistakes = scoring.ConfidentMistakes(limit=2)
    images = np.stack([np.full((4, 4, 3), value, np.float32) for value in (10, 20, 30)])
    mistakes.add(images, [0, 0, 1], [[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]])  # two wrong: p 0.8, 0.6
    mistakes.add(images[:1] + 90, [1], [[0.95, 0.05]])  # wrong with p 0.95, the 4th example
    assert [(m["index"], m["confidence"], m["predicted"]) for m in mistakes.kept] == [(3, 0.95, 0), (0, 0.8, 1)]
    assert mistakes.kept[0]["image"].dtype == np.uint8 and mistakes.kept[0]["image"][0, 0, 0] == 100
