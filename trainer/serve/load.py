"""Loading an exported model, as evaluate, predict and tflite score it: a SavedModel folder of
`trainer train` (trainer.train.export), or a `.tflite` file of `trainer tflite` behind the same
interface (`signatures["predict_images"]`). The file names are trainer.formats.modeldir's."""

import os
import tempfile

import numpy as np
import tensorflow as tf

from trainer.errors import UserError, first_line
from trainer.formats import modeldir
from trainer.infra import folders, storage


def load_model(model_url):
    """Loads an export written by `export_model` from a local path or URL.

    Args:
      model_url: the export folder (JOB_DIR/model or any copy of it), or a `.tflite` file written
        by `trainer tflite` (a model with the `predict_images` signature only).

    Returns:
      (loaded SavedModel, metadata dict). Call `loaded.signatures["serving_default"]
      (image_bytes=...)` or `loaded.signatures["predict_images"](images=...)`.

    Raises:
      UserError: the folder is missing or is not a finished export.
    """
    if modeldir.is_tflite(model_url):
        return load_tflite(model_url)
    metadata_url = modeldir.metadata_url(model_url)
    if not modeldir.is_complete(model_url):
        raise UserError(f"no exported model at {model_url} (expected {modeldir.METADATA_FILE} and "
                        f"{modeldir.SAVED_MODEL_FILE})")
    metadata = storage.read_json(metadata_url)
    if not storage.is_url(model_url):
        return _load_saved_model(storage.local_path(model_url), model_url), metadata
    # TensorFlow's gs:// cannot reach every store (nor an emulator): load from a local copy. The
    # variables are read during loading and the export has no assets, so the copy can go after.
    with tempfile.TemporaryDirectory(prefix="trainer-model-") as local_dir:
        folders.copy_tree(model_url, local_dir)
        loaded = _load_saved_model(local_dir, model_url)
    return loaded, metadata


def _load_saved_model(local_dir, model_url):
    try:
        return tf.saved_model.load(local_dir)
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise UserError(f"cannot load the model at {model_url}: {first_line(error)}") from error


class TFLiteModel:
    """A .tflite file behind the interface of a loaded export: `signatures["predict_images"]`."""

    def __init__(self, flatbuffer):
        self.interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=os.cpu_count() or 1)
        self.runner = self.interpreter.get_signature_runner(modeldir.PIXELS_SIGNATURE)
        self.signatures = {modeldir.PIXELS_SIGNATURE: self.predict_images}

    def predict_images(self, images):
        return {"probabilities": self.runner(images=np.asarray(images, np.float32))["probabilities"]}


def load_tflite(model_url):
    """(TFLiteModel, metadata) of a .tflite file of `trainer tflite` (tflite.json beside it)."""
    metadata_url = storage.join(storage.dirname(model_url), modeldir.TFLITE_METADATA_FILE)
    if not storage.exists(model_url) or not storage.exists(metadata_url):
        raise UserError(f"no TFLite model at {model_url} (expected it and {modeldir.TFLITE_METADATA_FILE} beside it, "
                        "as `trainer tflite` writes them)")
    try:
        return TFLiteModel(storage.read_bytes(model_url)), storage.read_json(metadata_url)
    except (ValueError, RuntimeError) as error:
        raise UserError(f"cannot load the TFLite model {model_url}: {first_line(error)}") from None
