"""trainer.train.model: the seed's parameter counts, backbones, preprocessing inside, weights, head, fine-tuning."""

import numpy as np
import pytest

from trainer.errors import UserError
from trainer.infra import storage
from trainer.infra.kerasapi import keras
from trainer.train import model, optimize


def random_images(size, count=2, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def perturb_weights(network, seed=1):
    """Moves every weight away from its initial value so a round trip cannot pass by accident."""
    rng = np.random.RandomState(seed)
    network.set_weights([value + rng.normal(0, 0.1, value.shape).astype(value.dtype)
                         for value in network.get_weights()])


def trainable_count(network):
    return sum(int(np.prod(weight.shape)) for weight in network.trainable_weights)


@pytest.fixture(scope="module")
def seed_model():
    return model.build_model("vgg16", 2, 150, weights=None)


def test_seed_model_has_the_articles_parameter_counts(seed_model):
    assert seed_model.count_params() == 16_812_353
    assert trainable_count(seed_model) == 2_097_665
    assert seed_model.count_params() - trainable_count(seed_model) == 14_714_688
    assert seed_model.get_layer("base").output_shape == (None, 4, 4, 512)
    assert not seed_model.get_layer("base").trainable


def test_unfreeze_block5_of_the_seed_trains_block5_and_the_head(seed_model):
    model.unfreeze_from(seed_model, "block5_conv1")
    base = seed_model.get_layer("base")
    assert [layer.name for layer in base.layers if layer.trainable] == [
        "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]
    # The head (2,097,665) plus block5's three 3x3x512x512 convolutions with biases.
    assert trainable_count(seed_model) == 2_097_665 + 3 * (3 * 3 * 512 * 512 + 512)


@pytest.mark.parametrize("backbone,size", [
    ("tiny", 32), ("mobilenet_v2", 32), ("resnet50", 32), ("efficientnet_b0", 32),
    ("vgg19", 32), ("inception_v3", 75),
])
def test_every_backbone_builds_with_random_weights(backbone, size):
    classifier = model.build_model(backbone, 3, size, weights="none", head="avgpool", dense_units=8)
    assert classifier(random_images(size)).shape == (2, 3)
    assert classifier.get_layer("base").name == "base"
    assert not classifier.get_layer("base").trainable


def test_tiny_is_small_and_has_block_names():
    base = model.build_base("tiny", 32, None)
    assert base.count_params() < 50_000
    names = [layer.name for layer in base.layers]
    assert {"block1_conv1", "block2_conv1", "block3_conv1"} <= set(names)


@pytest.mark.parametrize("backbone", model.BACKBONES)
def test_every_backbone_name_validates_its_minimum_size(backbone):
    with pytest.raises(UserError, match="too small"):
        model.build_base(backbone, 8, None)


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(UserError, match="vgg16, vgg19, resnet50, resnet50_v2"):
        model.build_model("alexnet", 2, 150, weights=None)


@pytest.mark.parametrize("backbone,application,preprocess,first_conv", [
    ("vgg16", keras.applications.VGG16, keras.applications.vgg16.preprocess_input, "block1_conv1"),
    ("mobilenet_v2", keras.applications.MobileNetV2, keras.applications.mobilenet_v2.preprocess_input,
     "Conv1"),
])
def test_base_applies_the_backbones_own_preprocessing(backbone, application, preprocess, first_conv):
    base = model.build_base(backbone, 32, None)
    raw = application(include_top=False, weights=None, input_shape=(32, 32, 3))
    raw.set_weights(base.get_weights())  # the preprocessing layer has no weights
    # Compare after the first convolution: deep random-init outputs are too small to tell apart.
    base_conv = keras.Model(base.input, base.get_layer(first_conv).output)
    raw_conv = keras.Model(raw.input, raw.get_layer(first_conv).output)
    images = random_images(32)
    expected = raw_conv(preprocess(images.copy())).numpy()
    assert np.abs(expected).mean() > 0.1
    np.testing.assert_allclose(base_conv(images).numpy(), expected, rtol=1e-4, atol=1e-3)
    # The preprocessing really matters: raw 0-255 pixels give something else.
    assert not np.allclose(raw_conv(images).numpy(), expected, atol=1e-2)
    # And the whole base agrees too.
    np.testing.assert_allclose(base(images).numpy(), raw(preprocess(images.copy())).numpy(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("filename", ["base.h5", "base.weights.h5"])
def test_weights_file_round_trip(tmp_path, filename):
    base = model.build_base("tiny", 32, None)
    perturb_weights(base)
    path = str(tmp_path / filename)
    base.save_weights(path)
    loaded = model.build_base("tiny", 32, path)
    images = random_images(32)
    np.testing.assert_array_equal(loaded(images).numpy(), base(images).numpy())


def test_weights_from_a_bucket_are_copied_locally_and_loaded(tmp_path, gcs_bucket):
    base = model.build_base("tiny", 32, None)
    perturb_weights(base)
    path = str(tmp_path / "tiny_notop.h5")
    base.save_weights(path)
    url = f"{gcs_bucket}/weights/tiny_notop.h5"
    storage.copy(path, url)
    loaded = model.build_model("tiny", 2, 32, weights=url).get_layer("base")
    images = random_images(32)
    np.testing.assert_array_equal(loaded(images).numpy(), base(images).numpy())


def test_weights_file_of_another_backbone_is_a_user_error(tmp_path):
    path = str(tmp_path / "tiny.h5")
    model.build_base("tiny", 32, None).save_weights(path)
    with pytest.raises(UserError, match="tiny.h5 does not fit the headless mobilenet_v2") as caught:
        model.build_base("mobilenet_v2", 32, path)
    assert "\n" not in str(caught.value)


def test_missing_or_foreign_weights_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        model.build_base("tiny", 32, str(tmp_path / "missing.h5"))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(UserError, match="junk.h5 does not fit"):
        model.build_base("tiny", 32, str(junk))


def test_head_for_two_classes_is_one_sigmoid_unit():
    head = model.build_head((4, 4, 512), 2)
    assert head.name == "head"
    assert [layer.name for layer in head.layers[1:]] == ["flatten", "dense", "dropout", "predictions"]
    assert head.output_shape == (None, 1)
    assert head.get_layer("predictions").activation is keras.activations.sigmoid
    assert head.count_params() == 2_097_665


def test_head_for_ten_classes_is_softmax():
    head = model.build_head((2, 2, 64), 10, head="avgpool", dense_units=0, dropout=0.0)
    assert [layer.name for layer in head.layers[1:]] == ["avgpool", "predictions"]
    assert head.output_shape == (None, 10)
    probabilities = head(np.random.RandomState(0).normal(size=(3, 2, 2, 64)).astype("float32")).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert head.count_params() == 64 * 10 + 10


def test_head_needs_two_classes():
    with pytest.raises(UserError, match="at least 2 classes"):
        model.build_head((4, 4, 8), 1)


def test_head_sub_model_shares_weights_with_the_full_model():
    classifier = model.build_model("tiny", 3, 32, weights=None)
    images = random_images(32)
    features = classifier.get_layer("base")(images, training=False)
    np.testing.assert_allclose(classifier.get_layer("head")(features).numpy(),
                               classifier(images).numpy(), rtol=1e-6)


def test_binary_accuracy_compares_int_labels_with_the_sigmoid_column():
    # A fixed sigmoid model: predictions ~[0, 1, 1, 0]; labels [0, 1, 0, 0] -> 3 of 4 right.
    # (Broadcasting [batch] labels against [batch, 1] outputs would give 0.5.)
    inputs = keras.Input((1,))
    fixed = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
    fixed.set_weights([np.array([[1.0]], "float32"), np.array([0.0], "float32")])
    optimize.compile_model(fixed, 2, learning_rate=1e-3)
    features = np.array([[-10.0], [10.0], [10.0], [-10.0]], "float32")
    labels = np.array([0, 1, 0, 0], "int32")
    results = fixed.evaluate(features, labels, verbose=0, return_dict=True)
    assert results["accuracy"] == pytest.approx(0.75)


def test_sparse_accuracy_for_more_classes():
    classifier = model.build_model("tiny", 3, 16, weights=None, head="avgpool", dense_units=0, dropout=0)
    optimize.compile_model(classifier, 3, learning_rate=1e-3)
    images = random_images(16, count=6)
    predicted = classifier.predict(images, verbose=0).argmax(axis=1)
    labels = predicted.astype("int32")
    labels[:2] = (labels[:2] + 1) % 3  # exactly two wrong
    results = classifier.evaluate(images, labels, verbose=0, return_dict=True)
    assert results["accuracy"] == pytest.approx(4 / 6)
    history = classifier.fit(images, labels, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy"}


def test_unfreeze_keeps_batchnorm_and_earlier_layers_frozen():
    classifier = model.build_model("tiny", 2, 32, weights=None)
    model.unfreeze_from(classifier, "block2_conv1")
    base = classifier.get_layer("base")
    trainable = {layer.name for layer in base.layers if layer.trainable}
    assert trainable == {"block2_conv1", "block2_relu1", "block2_pool",
                         "block3_conv1", "block3_relu1", "block3_pool"}
    trainable_weights = {weight.name for weight in classifier.trainable_weights}
    assert any("block2_conv1" in name for name in trainable_weights)
    assert not any("block1" in name or "_bn" in name for name in trainable_weights)
    assert classifier.get_layer("head").trainable


def test_unfreeze_from_an_unknown_layer_lists_valid_names():
    classifier = model.build_model("tiny", 2, 32, weights=None)
    with pytest.raises(UserError, match="no layer 'block5_conv1'.*block3_conv1"):
        model.unfreeze_from(classifier, "block5_conv1")


def test_imagenet_download_failure_says_how_to_use_a_weights_file(monkeypatch):
    from tf_keras.src.utils import data_utils

    def offline(*args, **kwargs):  # what Keras's get_file raises without network access
        raise Exception("URL fetch failure on https://example/x_notop.h5: None -- Name not known")

    monkeypatch.setattr(data_utils, "get_file", offline)
    with pytest.raises(UserError, match="cannot download the ImageNet weights of mobilenet_v2") as raised:
        model.build_base("mobilenet_v2", 96, "imagenet")
    # Both ways on: a try-out without weights, and the file Keras wants, by name, for a bucket.
    assert "--weights=none" in str(raised.value)
    assert "copy https://example/x_notop.h5 to your bucket and pass --weights=gs://BUCKET/x_notop.h5" \
        in str(raised.value)
    with pytest.raises(UserError, match="'tiny' has no pretrained weights"):
        model.build_base("tiny", 32, "imagenet")
