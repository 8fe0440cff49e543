"""The recipe knobs users of timm, Hugging Face and Keras-Hub expect: class weights, optimizers,
learning-rate schedules, label smoothing, and the imbalance metrics of evaluation."""

import math

import numpy as np
import pytest
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from trainer import config
from trainer.data import augment
from trainer.errors import UserError
from trainer.evaluate import metrics as metrics_lib
from trainer.infra.kerasapi import keras
from trainer.train import callbacks, optimize, phases
from trainer.train import run as train


def test_balanced_class_weights_are_scikit_learns_and_explicit_ones_fill_in_one():
    classes, counts = ["cats", "dogs", "owls"], {"cats": 60, "dogs": 30, "owls": 10}
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)

    weights = config.class_weights("balanced", classes, counts)

    assert [weights[index] for index in range(3)] == pytest.approx(list(expected))
    assert sum(weights[label] for label in labels) == pytest.approx(len(labels))  # they average 1
    assert config.class_weights("owls=4, cats=0.5", classes, counts) == {0: 0.5, 1: 1.0, 2: 4.0}
    assert config.class_weights("none", classes, counts) is None


@pytest.mark.parametrize("text, message", [
    ("owls=x", "name=weight"), ("owls=-1", "name=weight"), ("=2", "name=weight"), ("cats=1,cats=2", "name=weight"),
    ("bats=2", "'bats', which is not a class"),
])
def test_bad_class_weights_are_one_line_errors(text, message):
    with pytest.raises(UserError, match=message):
        config.class_weights(text, ["cats", "owls"], {"cats": 3, "owls": 0})
    with pytest.raises(UserError, match="'owls' has no training example"):
        config.class_weights("balanced", ["cats", "owls"], {"cats": 3, "owls": 0})


def test_class_weighted_loss_is_the_hand_computed_weighted_mean():
    """The weights reach the loss as Keras's sample weights: sum(w * loss) / batch size."""
    weights = {0: 0.25, 1: 3.0}
    features = np.array([[0.5], [-1.0], [2.0], [0.1]], np.float32)
    labels = np.array([0, 1, 1, 0], np.int32)
    dataset = augment.with_class_weights(tf.data.Dataset.from_tensors((features, labels)), weights)
    batch_x, batch_y, batch_w = next(iter(dataset))
    assert batch_w.numpy().tolist() == [0.25, 3.0, 3.0, 0.25]

    classifier = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    classifier.set_weights([np.array([[1.5]], np.float32), np.array([-0.2], np.float32)])
    optimize.compile_model(classifier, 2, learning_rate=1e-3)
    loss = classifier.evaluate(dataset, verbose=0)[0]

    p = 1 / (1 + np.exp(-(1.5 * features[:, 0] - 0.2)))
    cross_entropy = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert loss == pytest.approx(np.sum(batch_w.numpy() * cross_entropy) / len(labels), rel=1e-5)
    assert augment.with_class_weights(dataset, None) is dataset


def test_cosine_schedule_with_warmup_at_chosen_steps():
    schedule = optimize.learning_rate_schedule(1e-3, "cosine", total_steps=110, warmup_steps=10)
    values = {step: float(schedule(step)) for step in (0, 5, 10, 60, 110, 200)}
    assert values[0] == 0.0 and values[5] == pytest.approx(5e-4) and values[10] == pytest.approx(1e-3)
    assert values[60] == pytest.approx(5e-4)  # half-way through the cosine
    assert values[110] == pytest.approx(0.0, abs=1e-12) and values[200] == pytest.approx(0.0, abs=1e-12)
    plain = optimize.learning_rate_schedule(2e-4, "cosine", total_steps=40)
    assert float(plain(0)) == pytest.approx(2e-4) and float(plain(20)) == pytest.approx(1e-4)
    assert optimize.learning_rate_schedule(1e-5) == 1e-5


def test_optimizers_and_their_settings():
    adamw = optimize.make_optimizer("adamw", 1e-3, weight_decay=0.05)
    sgd = optimize.make_optimizer("sgd", 1e-2, momentum=0.8)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(0.05)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == pytest.approx(0.8) and sgd.nesterov
    assert type(optimize.make_optimizer("adam", 1e-3)) is keras.optimizers.Adam

    # AdamW shrinks a weight with no gradient by lr x decay per step; Adam leaves it.
    for optimizer, expected in ((optimize.make_optimizer("adamw", 0.1, weight_decay=0.5), 1.0 - 0.1 * 0.5),
                                (optimize.make_optimizer("adam", 0.1), 1.0)):
        variable = tf.Variable([1.0])
        optimizer.apply_gradients([(tf.constant([0.0]), variable)])
        assert float(variable.numpy()[0]) == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_for_two_and_more_classes_matches_the_formula():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([0, 2])
    smoothing = 0.1
    targets = np.eye(3)[labels] * (1 - smoothing) + smoothing / 3
    expected = np.mean(-np.sum(targets * np.log(probabilities), axis=1))
    loss = optimize.SparseCrossentropyWithSmoothing(3, smoothing)
    assert float(loss(labels, probabilities)) == pytest.approx(expected, rel=1e-5)

    binary = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    optimize.compile_model(binary, 2, 1e-3, label_smoothing=0.2)
    assert binary.loss.get_config()["label_smoothing"] == pytest.approx(0.2)


def test_imbalanced_evaluation_reports_balanced_accuracy_and_macro_f1():
    # 8 cats, 2 dogs; the model says "cat" for everything but one dog.
    labels = np.array([0] * 8 + [1] * 2)
    probabilities = np.array([[0.9, 0.1]] * 9 + [[0.2, 0.8]], np.float32)
    metrics = metrics_lib.compute_metrics(labels, probabilities, ["cats", "dogs"])
    assert metrics["accuracy"] == pytest.approx(0.9)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    cat_f1, dog_f1 = 2 * 8 / (2 * 8 + 1), 2 * 1 / (2 * 1 + 1)
    assert metrics["macro_f1"] == pytest.approx((cat_f1 + dog_f1) / 2)
    assert "balanced accuracy 0.7500" in metrics_lib.format_summary({**metrics, "split": "test"})


@pytest.mark.parametrize("flags, message", [
    ({"warmup_epochs": 1.0}, "--warmup_epochs needs --lr_schedule=cosine"),
    ({"label_smoothing": 1.0}, "--label_smoothing must be in"),
    ({"momentum": -0.1}, "--momentum must be in"),
    ({"weight_decay": math.inf}, "--weight_decay must be 0 or more"),
    ({"class_weight": "cats"}, "--class_weight must be"),
])
def test_bad_recipe_flags_answer_before_any_work(flags, message):
    with pytest.raises(UserError, match=message):
        config.check_config(config.TrainConfig(data="d", job_dir="j", **flags))


def _early_stopping_run(tmp_path, recorded=()):
    from trainer.formats import jobdir

    history = {"phases": [{"name": "head", "epochs": list(recorded)}]}
    return train.Run(config=config.TrainConfig(data="d", job_dir=str(tmp_path / "job")),
                     job=jobdir.JobDir(str(tmp_path / "job")), strategy=None, is_chief=True,
                     scratch=str(tmp_path / "scratch"), history=history, damage=None)


def _run_epochs(callback, classifier, losses, first=0):
    """Epochs `first`... with these val losses; each epoch's weights are its number (to tell them apart)."""
    for epoch, loss in enumerate(losses, start=first):
        classifier.set_weights([np.full_like(weight, epoch + 1) for weight in classifier.get_weights()])
        callback.on_epoch_end(epoch, {"val_loss": loss})
        if classifier.stop_training:
            return epoch + 1
    return None


def test_early_stopping_stops_at_the_expected_epoch_and_keeps_the_best_weights(tmp_path):
    classifier = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    classifier.stop_training = False
    callback = callbacks.EarlyStopping(_early_stopping_run(tmp_path), "head", patience=2)
    callback.set_model(classifier)
    # Best at epoch 3 (0.5); epochs 4 and 5 do not improve on it: stop after epoch 5.
    stopped = _run_epochs(callback, classifier, [1.0, 0.7, 0.5, 0.6, 0.5, 0.1, 0.05])
    assert stopped == 5
    callback.restore_best(classifier)
    assert all(np.all(weight == 3) for weight in classifier.get_weights())
    assert callbacks.best_epoch({1: 0.5, 2: 0.4, 3: 0.4}) == 2


def test_a_resumed_run_makes_the_same_early_stopping_decision(tmp_path):
    losses = [1.0, 0.7, 0.5, 0.6, 0.5]
    # The first attempt ran epochs 1-3 (committing epoch 3's weights as the best) and was killed.
    first = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    first.stop_training = False
    callback = callbacks.EarlyStopping(_early_stopping_run(tmp_path), "head", patience=2)
    callback.set_model(first)
    assert _run_epochs(callback, first, losses[:3]) is None
    # A new node: history.json holds epochs 1-3; epoch 4 resumes from the backup, on a fresh scratch.
    recorded = [{"epoch": index + 1, "val_loss": loss} for index, loss in enumerate(losses[:3])]
    resumed_run = _early_stopping_run(tmp_path, recorded)
    resumed_run.scratch = str(tmp_path / "scratch-2")
    second = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    second.stop_training = False
    resumed = callbacks.EarlyStopping(resumed_run, "head", patience=2)
    resumed.set_model(second)
    assert not resumed.stopped()
    assert _run_epochs(resumed, second, losses[3:], first=3) == 5  # the same epoch as uninterrupted
    resumed.restore_best(second)  # epoch 3's weights, from job_dir
    assert all(np.all(weight == 3) for weight in second.get_weights())
    # Killed after that decision but before the phase completed: the next attempt does not train on.
    recorded = [{"epoch": index + 1, "val_loss": loss} for index, loss in enumerate(losses)]
    assert callbacks.EarlyStopping(_early_stopping_run(tmp_path, recorded), "head", patience=2).stopped()


def test_randaugment_changes_training_images_differently_every_epoch():
    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    dataset = augment.with_randaugment(tf.data.Dataset.from_tensors((images, labels)), magnitude=0.5, seed=0)
    first, second = [next(iter(dataset)) for _ in range(2)]  # two passes: two epochs
    assert first[0].shape == images.shape and first[1].numpy().tolist() == labels.tolist()
    assert not np.allclose(first[0].numpy(), images) and not np.allclose(first[0].numpy(), second[0].numpy())
    changed = [not np.allclose(first[0].numpy()[index], images[index]) for index in range(len(images))]
    assert sum(changed) >= 4  # per image, not one draw for the batch
    assert float(tf.reduce_min(first[0])) >= 0 and float(tf.reduce_max(first[0])) <= 255


def test_a_run_with_randaugment_mixup_cutmix_and_two_replicas_streams_and_finishes(tmp_path):
    from helpers import TINY_JOB, prepare_stripes, run_trainer

    from trainer.infra import storage

    url = prepare_stripes(tmp_path, per_class=16)
    job_dir = tmp_path / "job"
    result = run_trainer("train", f"--data={url}", f"--job_dir={job_dir}", *TINY_JOB, "--batch_size=8", "--epochs=2",
                         "--randaugment", "--mixup_alpha=0.2", "--cutmix_alpha=1.0", "--cpu_replicas=2",
                         "--class_weight=balanced", "--lr_schedule=cosine", "--early_stopping_patience=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "feature cache: off (--randaugment and --mixup_alpha and --cutmix_alpha change the images" in result.stderr
    counts = storage.read_json(url)["splits"]["train"]["class_counts"]
    weights = [sum(counts.values()) / (2 * counts[name]) for name in ("horizontal", "vertical")]
    assert f"class weights: horizontal {weights[0]:.3g}, vertical {weights[1]:.3g}" in result.stderr
    recorded = storage.read_json(str(job_dir / "config.json"))
    assert recorded["randaugment"] is True and recorded["class_weight"] == "balanced"
    assert storage.exists(str(job_dir / "DONE"))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_mixup_and_cutmix_give_soft_labels_that_match_the_mixed_images(num_classes):
    images = np.stack([np.full((16, 16, 3), 40.0 * index, np.float32) for index in range(6)])
    labels = np.arange(6) % num_classes
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        dataset = augment.with_mixing(tf.data.Dataset.from_tensors((images, labels)), num_classes, mixup,
                                       cutmix, seed=1)
        (mixed, soft), (again, _) = [next(iter(dataset)) for _ in range(2)]
        soft = soft.numpy()
        if num_classes == 2:
            assert soft.shape == (6,) and np.all((soft >= 0) & (soft <= 1))
        else:
            assert soft.shape == (6, 3) and np.allclose(soft.sum(axis=1), 1.0)
        assert not np.allclose(mixed.numpy(), images) and not np.allclose(mixed.numpy(), again.numpy())
        # Each image is a blend (MixUp) or a patchwork (CutMix) of the batch's originals: every
        # pixel value is a convex combination of two originals, so it stays within 0..200.
        assert float(tf.reduce_min(mixed)) >= 0 and float(tf.reduce_max(mixed)) <= 200 + 1e-3


def test_soft_labels_train_with_the_loss_accuracy_and_class_weights_of_their_mixture():
    # Three classes: soft rows give the same loss as their hard labels when one-hot.
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    loss = optimize.SparseCrossentropyWithSmoothing(3, 0.0)
    assert float(loss(np.eye(3, dtype=np.float32)[[0, 2]], probabilities)) == pytest.approx(
        float(loss(np.array([0, 2]), probabilities)))
    accuracy = optimize.dominant_class_accuracy(3)
    accuracy.update_state(np.array([[0.6, 0.4, 0.0], [0.3, 0.3, 0.4]], np.float32), probabilities)
    assert float(accuracy.result()) == pytest.approx(1.0)
    binary = optimize.dominant_class_accuracy(2)
    binary.update_state(np.array([0.8, 0.3], np.float32), np.array([[0.9], [0.6]], np.float32))
    assert float(binary.result()) == pytest.approx(0.5)
    # A mixture weighs as its classes: 0.25 x 3 + 0.75 x 1.
    soft = tf.data.Dataset.from_tensors((np.zeros((2, 1), np.float32), np.array([0.75, 0.0], np.float32)))
    _, _, weights = next(iter(augment.with_class_weights(soft, {0: 3.0, 1: 1.0})))
    assert weights.numpy().tolist() == pytest.approx([0.25 * 3 + 0.75 * 1, 3.0])
    rows = tf.data.Dataset.from_tensors((np.zeros((1, 1), np.float32), np.array([[0.5, 0.5, 0.0]], np.float32)))
    _, _, weights = next(iter(augment.with_class_weights(rows, {0: 2.0, 1: 4.0, 2: 8.0})))
    assert weights.numpy().tolist() == pytest.approx([3.0])

    # Both head types fit on soft training labels and evaluate on hard ones.
    for classes, targets in ((2, np.array([0.3, 0.9, 0.0, 1.0], np.float32)),
                             (3, np.array([[0.5, 0.5, 0], [0, 0, 1], [1, 0, 0], [0.2, 0.8, 0]], np.float32))):
        output = (keras.layers.Dense(1, activation="sigmoid") if classes == 2
                  else keras.layers.Dense(3, activation="softmax"))
        head = keras.Sequential([keras.Input((4,)), output])
        optimize.compile_model(head, classes, 1e-2, soft_labels=True)
        head.fit(np.eye(4, dtype=np.float32), targets, epochs=2, verbose=0)
        assert set(head.evaluate(np.eye(4, dtype=np.float32), np.array([0, 1, 0, 1]), verbose=0, return_dict=True)) \
            == {"loss", "accuracy"}


def test_a_head_on_a_frozen_random_base_is_warned_about():
    def warning(**flags):
        return phases.random_frozen_base_warning(config.TrainConfig(data="d", job_dir="j", **flags))

    assert "frozen base of random weights" in warning(backbone="mobilenet_v2", weights="none")
    assert warning(backbone="mobilenet_v2", weights="imagenet") is None
    assert warning(backbone="mobilenet_v2", weights="none", fine_tune_epochs=2) is None
    assert warning(backbone="tiny", weights="none") is None  # the tests' and demo's own base
