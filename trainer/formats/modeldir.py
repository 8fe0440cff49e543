"""An exported model's folder (JOB_DIR/model, a production version's model/, any copy): its files
and its content id.

  saved_model.pb, variables/   the SavedModel (written by trainer.train.export, loaded by
                               trainer.serve.load); `serving_default` takes encoded image bytes,
                               `predict_images` decoded pixels
  metadata.json                {"classes", "image_size", "backbone", "num_classes"}

A `.tflite` file of `trainer tflite` also stands for a model where a model is scored. A model's id is
a digest of its files' content, not of its path: a copy has the same id.
"""

import hashlib

from trainer.infra import folders, storage

SAVED_MODEL_FILE = "saved_model.pb"
METADATA_FILE = "metadata.json"
SERVING_SIGNATURE = "serving_default"  # encoded image bytes -> probabilities, classes
PIXELS_SIGNATURE = "predict_images"  # float32 RGB 0-255 pixels -> probabilities (also the TFLite file's)
TFLITE_SUFFIX = ".tflite"
TFLITE_METADATA_FILE = "tflite.json"  # beside the .tflite files: classes, image size, files


def is_tflite(model_url):
    return model_url.endswith(TFLITE_SUFFIX)


def metadata_url(model_url):
    return storage.join(model_url, METADATA_FILE)


def required_files(model_url):
    """The files whose presence makes a folder a finished export (metadata.json is written last)."""
    return [storage.join(model_url, SAVED_MODEL_FILE), metadata_url(model_url)]


def is_complete(model_url):
    return all(storage.exists(url) for url in required_files(model_url))


def model_id(model_url):
    """A short content id of a model: `folders.tree_digest` of an export folder, or of one file."""
    if is_tflite(model_url):
        return hashlib.sha256(storage.read_bytes(model_url)).hexdigest()[:32]
    return folders.tree_digest(model_url)
