"""The transfer model: a pretrained base (with its own preprocessing inside) and a new head.

The model takes float32 RGB pixel values in 0-255, shape [batch, S, S, 3], exactly what
`trainer.data.pipeline` yields and what the exported serving signature decodes: each backbone's own
normalisation is the first layer of the base, so no caller ever preprocesses and serving cannot
drift from training.

    image -> base (preprocessing + headless application; frozen, called with training=False)
          -> head (Flatten or GlobalAveragePooling2D -> Dense(relu) -> Dropout -> Dense)

The seed recipe (vgg16, 150 px, two classes) has 16,812,353 parameters: 2,097,665 in the head
(trainable) and 14,714,688 in the frozen base. `model.get_layer("base")` and
`model.get_layer("head")` are the two halves; the head works on its own on the base's outputs
(shared weights), so training can compute the frozen base once and fit only the head.
"""

import difflib
import os
import re

import tensorflow as tf
from absl import logging

from trainer.config import BACKBONES, HEADS, check_backbone
from trainer.errors import UserError, first_line
from trainer.infra import storage
from trainer.infra.kerasapi import keras

# ImageNet channel means in BGR order: the "caffe" preprocessing of VGG and ResNet50.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="trainer")
class CaffePreprocessing(keras.layers.Layer):
    """RGB 0-255 -> BGR minus the ImageNet mean (`keras.applications.vgg16.preprocess_input`).

    A plain layer rather than a Lambda so the model serializes and exports without Python code.
    """

    def call(self, inputs):
        inputs = tf.cast(inputs, self.compute_dtype)
        mean = tf.constant(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        return inputs[..., ::-1] - mean


def _preprocessing(mode, inputs):
    if mode == "caffe":
        return CaffePreprocessing(name="preprocess")(inputs)
    if mode == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(inputs)
    if mode == "torch":  # (x / 255 - mean) / std, as keras.applications.densenet.preprocess_input
        return keras.layers.Normalization(mean=[255 * m for m in _TORCH_MEAN],
                                          variance=[(255 * s) ** 2 for s in _TORCH_STD], name="preprocess")(inputs)
    return inputs


def _build_tiny(input_tensor):
    """A three-block conv base (~24k parameters) named like VGG's blocks, so fine-tuning flags work."""
    x = input_tensor
    for block, filters in enumerate((16, 32, 64), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv1")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn1")(x)
        x = keras.layers.Activation("relu", name=f"block{block}_relu1")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), x, name="tiny")


def _load_weights(application, weights, backbone):
    """Loads a Keras weights file (local path or URL) into the headless application."""
    try:
        if not storage.exists(weights):
            raise UserError(f"weights file not found: {weights}")
        local_path = storage.local_copy(weights)
    except FileNotFoundError as error:
        raise UserError(f"weights file not found: {weights}") from error
    try:
        application.load_weights(local_path)
    except (ValueError, OSError, KeyError) as error:
        raise UserError(f"weights file {weights} does not fit the headless {backbone}: {first_line(error)}") \
            from error
    logging.info("Loaded %s weights from %s", backbone, weights)


def _build_application(constructor, backbone, weights, preprocessed, image_size):
    try:
        return getattr(keras.applications, constructor)(
            include_top=False, weights="imagenet" if weights == "imagenet" else None,
            input_tensor=preprocessed, input_shape=(image_size, image_size, 3))
    except Exception as error:
        # Keras's download raises a bare Exception("URL fetch failure on ...").
        if weights == "imagenet" and "URL fetch failure" in str(error):
            url = re.search(r"https?://\S+?\.h5", str(error))
            source = url.group(0) if url else "Keras's *_notop.h5 file of the backbone"
            name = os.path.basename(url.group(0)) if url else "FILE_notop.h5"
            raise UserError(
                f"cannot download the ImageNet weights of {backbone} (no internet access?). To try the trainer "
                f"without them, pass --weights=none; on a cluster without egress, copy {source} to your "
                f"bucket and pass --weights=gs://BUCKET/{name}") from error
        raise


def build_base(backbone, image_size, weights):
    """The headless pretrained network with the backbone's own preprocessing as its first layer.

    Args:
      backbone: one of BACKBONES.
      image_size: side S of the square input images.
      weights: "imagenet" (Keras downloads them), "none" or None (random initialisation), or a
        local path or URL of a Keras weights file (.h5 or .weights.h5) of the headless backbone,
        such as Keras's `*_notop.h5` files kept in your own bucket.

    Returns:
      A flat `keras.Model` named "base": float32 RGB 0-255 [S, S, 3] -> feature map. Its layers
      keep the application's names (`block5_conv1`, `conv5_block1_1_conv`, ...).

    Raises:
      UserError: unknown backbone, image size too small, a missing weights file or one that does
        not fit the backbone.
    """
    check_backbone(backbone, image_size)
    constructor, mode, _ = BACKBONES[backbone]
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="image")
    preprocessed = _preprocessing(mode, inputs)
    if weights is None or str(weights).lower() == "none":
        weights = None
    elif backbone == "tiny" and weights == "imagenet":
        raise UserError("backbone 'tiny' has no pretrained weights: use --weights=none or a weights file")
    if backbone == "tiny":
        application = _build_tiny(preprocessed)
    else:
        # Passing the preprocessed tensor makes the application's layers continue this graph:
        # one flat model whose layer names are the application's, so fine-tuning finds them.
        application = _build_application(constructor, backbone, weights, preprocessed, image_size)
    if weights not in (None, "imagenet"):
        _load_weights(application, weights, backbone)
    return keras.Model(application.inputs, application.outputs, name="base")


def build_head(feature_shape, num_classes, head="flatten", dense_units=256, dropout=0.5):
    """The new classifier that sits on the base's feature map.

    Args:
      feature_shape: shape of one feature map, e.g. (4, 4, 512) for vgg16 at 150 px.
      num_classes: 2 gives one sigmoid unit (binary cross-entropy); N > 2 gives N softmax units.
      head: "flatten" (the seed) or "avgpool" (GlobalAveragePooling2D: far fewer parameters).
      dense_units: units of the hidden ReLU layer; 0 leaves it out.
      dropout: rate of the Dropout before the output layer (0 leaves it out).

    Returns:
      A `keras.Model` named "head": feature map -> probabilities.

    Raises:
      UserError: fewer than two classes, an unknown head, or out-of-range sizes.
    """
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if dense_units < 0:
        raise UserError(f"dense_units must be 0 or more, got {dense_units}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout}")
    features = keras.Input(shape=tuple(feature_shape), name="features")
    if head == "flatten":
        x = keras.layers.Flatten(name="flatten")(features)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="avgpool")(features)
    if dense_units:
        x = keras.layers.Dense(dense_units, activation="relu", name="dense")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 output even under a mixed-precision policy: the loss needs the precision.
    if num_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="predictions")(x)
    else:
        outputs = keras.layers.Dense(
            num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(features, outputs, name="head")


def build_model(backbone, num_classes, image_size, weights="imagenet", head="flatten",
                dense_units=256, dropout=0.5):
    """The whole classifier: image 0-255 -> frozen base (training=False) -> new head.

    Args:
      backbone, image_size, weights: as for `build_base`.
      num_classes, head, dense_units, dropout: as for `build_head`.

    Returns:
      A `keras.Model` with sub-models `get_layer("base")` (frozen) and `get_layer("head")`.

    Raises:
      UserError: as `build_base` and `build_head`.
    """
    base = build_base(backbone, image_size, weights)
    base.trainable = False
    classifier = build_head(base.output_shape[1:], num_classes, head, dense_units, dropout)
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="image")
    # training=False keeps BatchNorm in inference mode even after the base is unfrozen for
    # fine-tuning (the keras-io transfer-learning rule); it does not stop weight updates.
    features = base(inputs, training=False)
    outputs = classifier(features)
    model = keras.Model(inputs, outputs, name=f"{backbone}_classifier")
    logging.info("Built %s: %s parameters, %s trainable", model.name, f"{model.count_params():,}",
                 f"{count_trainable_params(model):,}")
    return model


def count_trainable_params(model):
    return int(sum(tf.size(weight).numpy() for weight in model.trainable_weights))


def check_fine_tune_from(model, layer_name):
    """Raises UserError when `layer_name` is not a layer of the model's base (checked before the
    head phase, which may take hours, rather than after it), naming the closest names."""
    base = model.get_layer("base")
    names = [layer.name for layer in base.layers]
    if layer_name in names:
        return
    close = difflib.get_close_matches(layer_name, names, n=3)
    # Else the last few layers with weights (not BatchNorm): where fine-tuning usually starts.
    examples = close or [layer.name for layer in base.layers if layer.weights
                         and not isinstance(layer, keras.layers.BatchNormalization)][-6:]
    raise UserError(f"--fine_tune_from: no layer {layer_name!r} in the {model.name} base; "
                    f"{'did you mean' if close else 'for example'}: {', '.join(examples)}")


def unfreeze_from(model, layer_name):
    """Makes the base trainable from `layer_name` to its end, for the fine-tuning phase.

    Layers before `layer_name` stay frozen, and so does every BatchNormalization layer (its
    statistics were learned on ImageNet; the keras-io transfer-learning guide). The caller must
    recompile for the change to take effect.

    Raises:
      UserError: `layer_name` is not a layer of the base.
    """
    check_fine_tune_from(model, layer_name)
    base = model.get_layer("base")
    start = [layer.name for layer in base.layers].index(layer_name)
    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
    logging.info("Unfroze the base from %s: %s trainable parameters", layer_name,
                 f"{count_trainable_params(model):,}")
