"""The backbones beyond the seed's: each builds headless with its own preprocessing inside, has the
parameter count Keras documents for it, offers the `--fine_tune_from` layer docs/model.md suggests,
and (one per family) trains a step with its base frozen; one exports."""

import os
import re

import numpy as np
import pytest

from trainer import config
from trainer.infra.kerasapi import keras
from trainer.serve.load import load_model
from trainer.train import export, model, optimize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The whole application's parameters (include_top=True, 1,000 classes) as Keras documents them, and
# the precision of that figure. Exact: Keras's applications table; 0.1M: keras.io's table (and the
# ResNet-RS paper's, which Keras's docstring cites). MobileNetV3's docstring quotes the TF-Slim
# checkpoints (2.9M, 5.4M) and RegNet's has no figure: for those, Keras's own full model's count.
DOCUMENTED = {
    "resnet50_v2": (25_613_800, 1), "resnet101_v2": (44_675_560, 1), "xception": (22_910_480, 1),
    "inception_resnet_v2": (55_873_736, 1), "densenet121": (8_062_504, 1),
    "efficientnet_v2_b0": (7.2e6, 1e5), "efficientnet_v2_b1": (8.2e6, 1e5), "efficientnet_v2_b2": (10.2e6, 1e5),
    "efficientnet_v2_b3": (14.5e6, 1e5), "efficientnet_v2_s": (21.6e6, 1e5),
    "convnext_tiny": (28.6e6, 1e5), "convnext_small": (50.2e6, 1e5),
    "resnet_rs50": (35.7e6, 1e5), "resnet_rs101": (63.7e6, 1e5),
    # Keras's own full applications (tf-keras 2.21, include_top=True, weights=None), counted once:
    "mobilenet_v3_small": (2_554_968, 1), "mobilenet_v3_large": (5_507_432, 1), "regnety_032": (19_502_498, 1),
    "regnetx_032": (15_359_112, 1),
}
# Built by hand only (54-350M parameters): docs/model.md.
TOO_LARGE_FOR_MAKE_TEST = {"efficientnet_v2_m", "efficientnet_v2_l", "convnext_base", "convnext_large",
                           "convnext_xlarge"}
MOBILENET_V3_TOP_UNITS = {"mobilenet_v3_small": 1024, "mobilenet_v3_large": 1280}


def suggested_layers():
    """docs/model.md's table: backbone -> its suggested `--fine_tune_from` (first of "a / b")."""
    rows = re.findall(r"^\| ([a-z0-9_, ()]+?) \|.*\| `([^`]+)`(?: / `([^`]+)`)?", open(os.path.join(ROOT, "docs",
                      "model.md")).read(), re.MULTILINE)
    suggested = {}
    for names, first, second in rows:
        family = [name.strip() for name in names.replace("(default)", "").replace("(tests, demo)", "").split(",")]
        stem = family[0].rsplit("_", 1)[0] if family[1:] and family[1].startswith("_") else None
        for index, name in enumerate(family):
            name = f"{stem}{name}" if name.startswith("_") else name
            suggested[name] = second if second and index == 1 else first
    return suggested


def imagenet_top(backbone, channels):
    """Parameters Keras's include_top=True adds on a headless base of `channels` output channels."""
    if backbone.startswith("convnext"):
        return 2 * channels + (channels + 1) * 1000  # LayerNorm, then the classifier
    if backbone in MOBILENET_V3_TOP_UNITS:
        units = MOBILENET_V3_TOP_UNITS[backbone]
        return (channels + 1) * units + (units + 1) * 1000  # a 1x1 conv, then the classifier
    return (channels + 1) * 1000


def test_every_backbone_is_listed_and_documented():
    older = {"vgg16", "vgg19", "resnet50", "inception_v3", "mobilenet_v2", "efficientnet_b0", "tiny"}
    assert set(DOCUMENTED) | TOO_LARGE_FOR_MAKE_TEST | older == set(config.BACKBONES)
    assert set(suggested_layers()) == set(config.BACKBONES)


def check_base(backbone, base):
    """The headless count plus Keras's top is the documented figure; the suggested layer exists."""
    total = base.count_params() + imagenet_top(backbone, base.output_shape[-1])
    documented, precision = DOCUMENTED[backbone]
    assert abs(total - documented) <= precision / 2, (backbone, total, documented)
    layer = suggested_layers()[backbone].replace("convnext_tiny", backbone)
    assert layer in [entry.name for entry in base.layers], layer


FAMILIES = [("efficientnet_v2_b0", 32), ("convnext_tiny", 32), ("densenet121", 32), ("xception", 71),
            ("mobilenet_v3_small", 32)]


@pytest.mark.parametrize("backbone", sorted(set(DOCUMENTED) - {name for name, _ in FAMILIES}))
def test_headless_parameters_are_kerass_documented_figure_and_the_suggested_layer_exists(backbone):
    check_base(backbone, model.build_base(backbone, max(32, config.BACKBONES[backbone][2]), None))


@pytest.mark.parametrize("backbone, size", FAMILIES)
def test_one_of_each_family_has_its_documented_size_trains_a_step_and_unfreezes(backbone, size):
    classifier = model.build_model(backbone, 3, size, weights="none", head="avgpool", dense_units=8)
    check_base(backbone, classifier.get_layer("base"))
    optimize.compile_model(classifier, 3, 1e-3)
    images = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    head_before = [weight.copy() for weight in classifier.get_layer("head").get_weights()]
    base_before = [weight.copy() for weight in classifier.get_layer("base").get_weights()]
    classifier.fit(images, np.array([0, 1, 2, 1]), epochs=1, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(head_before, classifier.get_layer("head").get_weights(),
                                                         strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(base_before, classifier.get_layer("base").get_weights(),
                                                     strict=True))  # frozen (BatchNorm statistics too)
    frozen = model.count_trainable_params(classifier)
    model.unfreeze_from(classifier, suggested_layers()[backbone].replace("convnext_tiny", backbone))
    assert model.count_trainable_params(classifier) > frozen


def test_a_new_backbone_exports_and_serves_what_keras_predicts(tmp_path):
    classifier = model.build_model("mobilenet_v3_small", 2, 32, weights="none", head="avgpool", dense_units=8)
    images = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    export.export_model(classifier, ["a", "b"], 32, str(tmp_path / "model"), backbone="mobilenet_v3_small")
    loaded, metadata = load_model(str(tmp_path / "model"))
    scores = loaded.signatures["predict_images"](images=images)["probabilities"].numpy()
    np.testing.assert_allclose(scores[:, 1], classifier.predict(images, verbose=0)[:, 0], atol=1e-5)
    assert metadata["backbone"] == "mobilenet_v3_small"


def test_densenet_preprocessing_is_kerass_torch_mode():
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    base = model.build_base("densenet121", 32, None)
    ours = keras.Model(base.inputs, base.get_layer("preprocess").output)(pixels).numpy()
    expected = keras.applications.densenet.preprocess_input(pixels.copy())
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
