"""Exports a trained classifier as a SavedModel that serves encoded image bytes.

The export folder holds a SavedModel (saved_model.pb, variables/) and `metadata.json`
({"classes", "image_size", "backbone", "num_classes"}), written last: a folder without it is not a
finished export. Signatures:

  serving_default: image_bytes  tf.string [None] (JPEG/PNG/BMP/GIF bytes)
                   -> probabilities float32 [None, C] (in the order of metadata.json's classes),
                      classes tf.string [None, C] and scores float32 [None, C]: every class
                      name and its probability, best first (TF Serving's classification shape)
  predict_images:  images float32 [None, S, S, 3], RGB 0-255
                   -> probabilities float32 [None, C]

Decoding and resizing use `trainer.data.decode.decode_image`, the function training reads with, and the
model does its own normalisation: no training/serving skew. It loads with plain
`tf.saved_model.load` (or TF Serving) in a process that never imports this package.
"""

import os
import tempfile

import tensorflow as tf
from absl import logging

from trainer.data import decode
from trainer.formats import modeldir
from trainer.infra import folders, storage


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
            pixels = tf.map_fn(lambda encoded: decode.decode_image(encoded, image_size), image_bytes,
                               fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
            scores = probabilities(pixels)
            # TF Serving's classification shape: `classes` and `scores` of the same shape, best first.
            order = tf.argsort(scores, axis=-1, direction="DESCENDING", stable=True)
            return {"probabilities": scores, "classes": tf.gather(names, order),
                    "scores": tf.gather(scores, order, batch_dims=1)}

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
    metadata_url = modeldir.metadata_url(export_url)
    # The old export goes first, its marker with it: a crash mid-copy must not leave a folder that
    # looks finished, nor files of an earlier attempt (a killed upload's temporary) in the new one.
    storage.remove(export_url, recursive=True)
    with tempfile.TemporaryDirectory(prefix="trainer-export-") as local_dir:
        saved_model_dir = os.path.join(local_dir, "model")
        tf.saved_model.save(servable, saved_model_dir, signatures={
            modeldir.SERVING_SIGNATURE: servable.serve, modeldir.PIXELS_SIGNATURE: servable.predict_images})
        folders.copy_tree(saved_model_dir, export_url)
    storage.write_json(metadata_url, {
        "classes": class_names, "image_size": int(image_size), "backbone": backbone,
        "num_classes": len(class_names)})
    logging.info("Exported the model to %s", export_url)
    return export_url
