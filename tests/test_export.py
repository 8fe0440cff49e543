"""trainer.train.export: the SavedModel serves encoded bytes in a fresh process, locally and from gs://."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from trainer.data.decode import decode_image
from trainer.errors import UserError
from trainer.infra import folders, storage
from trainer.serve.load import load_model
from trainer.train import export, model

IMAGE_SIZE = 32

# Runs in a fresh interpreter that imports only TensorFlow: what a serving process does.
LOAD_AND_SCORE = """
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
serve = loaded.signatures["serving_default"]
blobs = [open(path, "rb").read() for path in sys.argv[2:]]
outputs = serve(image_bytes=tf.constant(blobs))
print(json.dumps({
    "probabilities": outputs["probabilities"].numpy().tolist(),
    "classes": [[name.decode() for name in row] for row in outputs["classes"].numpy()],
    "scores": outputs["scores"].numpy().tolist(),
    "signatures": sorted(loaded.signatures),
    "trainer_imported": any(name.split(".")[0] == "trainer" for name in sys.modules),
}))
"""


def make_classifier(num_classes, seed=0):
    """An untrained tiny classifier with weights moved off their init, so outputs differ per image."""
    classifier = model.build_model("tiny", num_classes, IMAGE_SIZE, weights=None, head="avgpool",
                                   dense_units=16)
    rng = np.random.RandomState(seed)
    classifier.set_weights([value + rng.normal(0, 0.05, value.shape).astype(value.dtype)
                            for value in classifier.get_weights()])
    return classifier


def encoded_images():
    """A JPEG and a PNG of other sizes than the model's, so decoding and resizing are exercised."""
    rng = np.random.RandomState(1)
    jpeg = tf.io.encode_jpeg(rng.randint(0, 256, (40, 52, 3), dtype=np.uint8)).numpy()
    png = tf.io.encode_png(rng.randint(0, 256, (21, 30, 3), dtype=np.uint8)).numpy()
    return {"photo.jpg": jpeg, "drawing.png": png}


def keras_probabilities(classifier, blobs):
    images = tf.stack([decode_image(blob, IMAGE_SIZE) for blob in blobs])
    return classifier(images, training=False).numpy()


def test_export_loads_in_a_fresh_process_and_matches_keras(tmp_path):
    classifier = make_classifier(2)
    export_dir = str(tmp_path / "model")
    export.export_model(classifier, ["cats", "dogs"], IMAGE_SIZE, export_dir, backbone="tiny")
    paths = []
    for name, blob in encoded_images().items():
        (tmp_path / name).write_bytes(blob)
        paths.append(str(tmp_path / name))

    result = subprocess.run([sys.executable, "-c", LOAD_AND_SCORE, export_dir, *paths],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])

    assert not served["trainer_imported"]
    assert served["signatures"] == ["predict_images", "serving_default"]
    sigmoid = keras_probabilities(classifier, list(encoded_images().values()))[:, 0]
    expected = np.stack([1 - sigmoid, sigmoid], axis=1)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)  # the images really differ
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-4)
    assert [row[0] for row in served["classes"]] == [["cats", "dogs"][index] for index in expected.argmax(axis=1)]
    np.testing.assert_allclose(served["scores"], np.sort(expected, axis=1)[:, ::-1], atol=1e-4)
    assert storage.read_json(str(tmp_path / "model" / "metadata.json")) == {
        "classes": ["cats", "dogs"], "image_size": IMAGE_SIZE, "backbone": "tiny", "num_classes": 2}


def test_export_of_many_classes_and_predict_images_signature(tmp_path):
    classifier = make_classifier(3)
    names = ["apple", "banana", "cherry"]
    export_dir = str(tmp_path / "model")
    export.export_model(classifier, names, IMAGE_SIZE, export_dir, backbone="tiny")
    loaded, metadata = load_model(export_dir)
    assert metadata["classes"] == names and metadata["num_classes"] == 3

    images = np.random.RandomState(2).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    served = loaded.signatures["predict_images"](images=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_allclose(served, classifier(images).numpy(), atol=1e-5)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)

    blobs = list(encoded_images().values())
    outputs = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
    expected = keras_probabilities(classifier, blobs)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-4)
    # Every class, best first, with its probability (TF Serving's classification shape).
    order = np.argsort(-expected, axis=1, kind="stable")
    assert [[name.decode() for name in row] for row in outputs["classes"].numpy()] == [
        [names[index] for index in row] for row in order]
    np.testing.assert_allclose(outputs["scores"].numpy(), np.take_along_axis(expected, order, axis=1), atol=1e-4)


def test_export_to_gcs_and_load_from_there(tmp_path, gcs_bucket):
    classifier = make_classifier(2, seed=3)
    url = f"{gcs_bucket}/job/model"
    export.export_model(classifier, ["cats", "dogs"], IMAGE_SIZE, url, backbone="tiny")
    assert storage.exists(f"{url}/saved_model.pb")
    assert storage.exists(f"{url}/variables/variables.index")
    assert storage.read_json(f"{url}/metadata.json")["classes"] == ["cats", "dogs"]

    loaded, metadata = load_model(url)
    assert metadata["image_size"] == IMAGE_SIZE
    blobs = list(encoded_images().values())
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
    sigmoid = keras_probabilities(classifier, blobs)[:, 0]
    np.testing.assert_allclose(served["probabilities"].numpy()[:, 1], sigmoid, atol=1e-4)

    # Exporting again over the same folder replaces the model, and leaves nothing of the earlier
    # export or of an upload killed half way (whose temporary would change the model's id).
    storage.write_bytes(f"{url}/variables/.tmp-0123abcd", b"half an upload")
    retrained = make_classifier(2, seed=4)
    export.export_model(retrained, ["cats", "dogs"], IMAGE_SIZE, url, backbone="tiny")
    clean = str(tmp_path / "clean")
    export.export_model(retrained, ["cats", "dogs"], IMAGE_SIZE, clean, backbone="tiny")
    assert sorted(dict(folders.list_files(url))) == sorted(dict(folders.list_files(clean)))
    loaded, _ = load_model(url)
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
    np.testing.assert_allclose(served["probabilities"].numpy()[:, 1],
                               keras_probabilities(retrained, blobs)[:, 0], atol=1e-4)


def test_load_model_of_a_missing_or_unfinished_export_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no exported model at"):
        load_model(str(tmp_path / "nowhere"))
    export_dir = str(tmp_path / "model")
    export.export_model(make_classifier(2), ["a", "b"], IMAGE_SIZE, export_dir)
    storage.remove(storage.join(export_dir, "metadata.json"))
    with pytest.raises(UserError, match="metadata.json"):
        load_model(export_dir)


def test_export_refuses_a_model_that_does_not_match_the_classes(tmp_path):
    with pytest.raises(ValueError, match="3 outputs for 2 classes"):
        export.export_model(make_classifier(3), ["a", "b"], IMAGE_SIZE, str(tmp_path / "model"))
