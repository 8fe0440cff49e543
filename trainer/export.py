"""Exports a trained classifier as a SavedModel that serves encoded image bytes.

The export folder holds a SavedModel (saved_model.pb, variables/) and `metadata.json`
({"classes", "image_size", "backbone", "num_classes"}), written last: a folder without it is not a
finished export. Signatures:

  serving_default: image_bytes  tf.string [None] (JPEG/PNG/BMP/GIF bytes)
                   -> probabilities float32 [None, C], classes tf.string [None]
  predict_images:  images float32 [None, S, S, 3], RGB 0-255
                   -> probabilities float32 [None, C]

Decoding and resizing use `trainer.images.decode_image`, the function training reads with, and the
model does its own normalisation: no training/serving skew. It loads with plain
`tf.saved_model.load` (or TF Serving) in a process that never imports this package.
"""

import os
import tempfile

import tensorflow as tf
from absl import logging

from trainer import images, storage
from trainer.errors import UserError, first_line

METADATA_FILE = "metadata.json"
SAVED_MODEL_FILE = "saved_model.pb"


class _Servable(tf.Module):
    """The Keras model's variables plus the two serving functions, and nothing Keras-specific."""

    def __init__(self, model, class_names, image_size):
        super().__init__(name="classifier")
        # Only the variables are tracked, not the Keras model (the functions reach it through a
        # closure): the export holds plain TensorFlow graphs, no Keras objects or layer configs.
        self.model_variables = list(model.variables)
        self.class_names = tf.constant(class_names, dtype=tf.string)
        names = self.class_names

        def probabilities(images):
            outputs = tf.cast(model(images, training=False), tf.float32)
            if outputs.shape[-1] == 1:  # two classes: the one sigmoid p is P(class 1)
                return tf.concat([1.0 - outputs, outputs], axis=-1)
            return outputs

        @tf.function(input_signature=[
            tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])
        def predict_images(images):
            return {"probabilities": probabilities(images)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(image_bytes):
            pixels = tf.map_fn(lambda encoded: images.decode_image(encoded, image_size), image_bytes,
                               fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
            scores = probabilities(pixels)
            return {"probabilities": scores, "classes": tf.gather(names, tf.argmax(scores, axis=-1))}

        self.predict_images = predict_images
        self.serve = serve


def export_model(model, class_names, image_size, export_url, backbone=""):
    """Writes the SavedModel and metadata.json to `export_url` (local path or URL).

    Args:
      model: the Keras classifier: float32 RGB 0-255 [batch, S, S, 3] -> [batch, 1] sigmoid (two
        classes) or [batch, C] softmax.
      class_names: index -> class name, as in dataset.json's "classes".
      image_size: S.
      export_url: destination folder; an earlier export there is replaced.
      backbone: recorded in metadata.json.

    Returns:
      `export_url`.
    """
    class_names = [str(name) for name in class_names]
    outputs = model.output_shape[-1]
    if outputs != (1 if len(class_names) == 2 else len(class_names)):
        raise ValueError(f"model has {outputs} outputs for {len(class_names)} classes")
    servable = _Servable(model, class_names, image_size)
    metadata_url = storage.join(export_url, METADATA_FILE)
    # Remove the old marker first: a crash mid-copy must not leave a folder that looks finished.
    storage.remove(metadata_url)
    with tempfile.TemporaryDirectory(prefix="trainer-export-") as local_dir:
        saved_model_dir = os.path.join(local_dir, "model")
        tf.saved_model.save(servable, saved_model_dir, signatures={
            "serving_default": servable.serve, "predict_images": servable.predict_images})
        storage.copy_tree(saved_model_dir, export_url)
    storage.write_json(metadata_url, {
        "classes": class_names, "image_size": int(image_size), "backbone": backbone,
        "num_classes": len(class_names)})
    logging.info("Exported the model to %s", export_url)
    return export_url


def load_model(model_url):
    """Loads an export written by `export_model` from a local path or URL.

    Args:
      model_url: the export folder (JOB_DIR/model or any copy of it), or a `.tflite` file written
        by `trainer tflite` (trainer.tflite: a model with the `predict_images` signature only).

    Returns:
      (loaded SavedModel, metadata dict). Call `loaded.signatures["serving_default"]
      (image_bytes=...)` or `loaded.signatures["predict_images"](images=...)`.

    Raises:
      UserError: the folder is missing or is not a finished export.
    """
    if model_url.endswith(".tflite"):
        from trainer import tflite

        return tflite.load(model_url)
    metadata_url = storage.join(model_url, METADATA_FILE)
    if not storage.exists(metadata_url) or not storage.exists(storage.join(model_url, SAVED_MODEL_FILE)):
        raise UserError(f"no exported model at {model_url} (expected {METADATA_FILE} and {SAVED_MODEL_FILE})")
    metadata = storage.read_json(metadata_url)
    if not storage.is_url(model_url):
        return _load_saved_model(model_url, model_url), metadata
    # TensorFlow's gs:// cannot reach every store (nor an emulator): load from a local copy. The
    # variables are read during loading and the export has no assets, so the copy can go after.
    with tempfile.TemporaryDirectory(prefix="trainer-model-") as local_dir:
        storage.copy_tree(model_url, local_dir)
        loaded = _load_saved_model(local_dir, model_url)
    return loaded, metadata


def model_id(model_url):
    """A short content id of a model: `storage.tree_digest` of an export folder, or of one file."""
    if model_url.endswith(".tflite"):
        import hashlib

        return hashlib.sha256(storage.read_bytes(model_url)).hexdigest()[:32]
    return storage.tree_digest(model_url)


def _load_saved_model(local_dir, model_url):
    try:
        return tf.saved_model.load(local_dir)
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise UserError(f"cannot load the model at {model_url}: {first_line(error)}") from error
