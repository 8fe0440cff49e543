"""TensorFlow Lite copies of an exported model (`trainer tflite`); trainer.serve.load scores them.

TFLite cannot run the export's image-bytes signature: its decode (`tf.io.decode_image` with a
scaled JPEG decode and `tf.map_fn`) uses ops TFLite lacks, even with Flex ops. It converts the
pixel signature, `predict_images`, so a device decodes and resizes the image itself:

  input   images         float32 [N, S, S, 3], RGB 0-255, resized to S x S (bilinear, as training)
  output  probabilities  float32 [N, C], in the order of tflite.json's "classes"

  model_float32.tflite   the same weights as the SavedModel
  model_float16.tflite   weights stored as float16 (half the size; computed in float32 on CPUs)
  model_int8.tflite      dynamic-range quantization: int8 weights, float activations (a quarter)
  tflite.json            {"classes", "image_size", "input", "output", "files": {kind: {"file", "bytes"}}}

The preprocessing is inside the model, as in the SavedModel.
"""

import os
import tempfile

import tensorflow as tf
from absl import logging

from trainer.errors import UserError, first_line
from trainer.formats import modeldir
from trainer.infra import folders, storage
from trainer.serve import load

KINDS = ("float32", "float16", "int8")


def _converter(saved_model_dir, kind):
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[modeldir.PIXELS_SIGNATURE])
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
    return converter


def convert(model_url, output_url, kinds=KINDS):
    """Writes `model_<kind>.tflite` for each kind and tflite.json to `output_url`; returns the metadata.

    Raises:
      UserError: `model_url` is not an export of `trainer train`, or a kind is unknown.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise UserError(f"--kinds must be some of {', '.join(KINDS)}, got {','.join(kinds) or 'nothing'}")
    storage.check_writable(output_url)
    _, metadata = load.load_model(model_url)  # checks it is a finished export
    files = {}
    with tempfile.TemporaryDirectory(prefix="trainer-tflite-") as local:
        remote = storage.is_url(model_url)
        saved_model_dir = os.path.join(local, "model") if remote else storage.local_path(model_url)
        if remote:
            folders.copy_tree(model_url, saved_model_dir)
        for kind in kinds:
            try:
                flatbuffer = _converter(saved_model_dir, kind).convert()
            except Exception as error:  # noqa: BLE001 - the converter raises many types; the line names it
                raise UserError(f"cannot convert {model_url} to TFLite ({kind}): {first_line(error)}") from None
            name = f"model_{kind}.tflite"
            storage.write_bytes(storage.join(output_url, name), flatbuffer)
            files[kind] = {"file": name, "bytes": len(flatbuffer)}
            logging.info("wrote %s: %.1f MB", storage.join(output_url, name), len(flatbuffer) / 1e6)
    size = metadata["image_size"]
    tflite_metadata = {"classes": metadata["classes"], "image_size": size, "backbone": metadata.get("backbone", ""),
                       "num_classes": metadata["num_classes"], "source_model": model_url,
                       "input": f"images float32 [N, {size}, {size}, 3], RGB 0-255",
                       "output": f"probabilities float32 [N, {metadata['num_classes']}], in the order of classes",
                       "files": files}
    storage.write_json(storage.join(output_url, modeldir.TFLITE_METADATA_FILE), tflite_metadata)
    return tflite_metadata
