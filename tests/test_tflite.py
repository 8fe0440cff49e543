"""TFLite exports (`trainer tflite`): float32, float16 and int8 agree with the SavedModel, and
`trainer evaluate` scores a .tflite file like an export."""

import numpy as np
import pytest
from helpers import prepare_stripes, run_trainer

from trainer.data import pipeline
from trainer.infra import storage
from trainer.serve import tflite
from trainer.serve.load import load_model
from trainer.train import export, model, optimize


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained a little on stripes, exported, with its TFLite copies."""
    root = tmp_path_factory.mktemp("tflite")
    url = prepare_stripes(root, per_class=60)
    classes = storage.read_json(url)["classes"]
    classifier = model.build_model("tiny", 2, 32, weights="none", dense_units=16, dropout=0.0)
    optimize.compile_model(classifier, 2, 3e-3)
    classifier.fit(pipeline.make_dataset(url, "train", 32, 16, training=True, seed=0), epochs=3, steps_per_epoch=20,
                   verbose=0)
    export.export_model(classifier, classes, 32, str(root / "model"), backbone="tiny")
    result = run_trainer("tflite", f"--model={root / 'model'}", f"--output={root / 'tflite'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "data": url, "model": str(root / "model"), "tflite": str(root / "tflite")}


def predictions(model_url, manifest_url):
    loaded, _ = load_model(model_url)
    scores = [loaded.signatures["predict_images"](images=images)["probabilities"]
              for split in ("train", "val", "test")
              for images, _ in pipeline.make_dataset(manifest_url, split, 32, 16, training=False)]
    return np.concatenate([np.asarray(batch) for batch in scores])


def test_every_kind_agrees_with_the_saved_model_on_top_1(trained):
    saved = predictions(trained["model"], trained["data"])
    metadata = storage.read_json(f"{trained['tflite']}/tflite.json")
    agreement = {}
    for kind in tflite.KINDS:
        converted = predictions(f"{trained['tflite']}/model_{kind}.tflite", trained["data"])
        agreement[kind] = float(np.mean(converted.argmax(1) == saved.argmax(1)))
        if kind == "float32":
            np.testing.assert_allclose(converted, saved, atol=1e-4)
    print("top-1 agreement", agreement, "bytes", {kind: entry["bytes"] for kind, entry in metadata["files"].items()})
    assert len(saved) == 120 and agreement["float32"] == 1.0
    assert agreement["float16"] >= 0.99 and agreement["int8"] >= 0.97
    sizes = {kind: entry["bytes"] for kind, entry in metadata["files"].items()}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    assert metadata["classes"] == storage.read_json(trained["data"])["classes"] and metadata["image_size"] == 32


def test_evaluate_scores_a_tflite_file(trained):
    output = trained["root"] / "eval-int8"
    result = run_trainer("evaluate", f"--model={trained['tflite']}/model_int8.tflite", f"--data={trained['data']}",
                         f"--output={output}", "--batch_size=5")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = storage.read_json(str(output / "metrics.json"))
    assert metrics["examples"] == storage.read_json(trained["data"])["splits"]["test"]["count"]
    assert metrics["model"].endswith("model_int8.tflite") and len(metrics["model_id"]) == 32


def test_bad_kinds_and_missing_files_are_user_errors(trained, tmp_path):
    from trainer.errors import UserError

    with pytest.raises(UserError, match="--kinds must be some of float32, float16, int8"):
        tflite.convert(trained["model"], str(tmp_path), kinds=["int4"])
    with pytest.raises(UserError, match="no TFLite model at"):
        load_model(str(tmp_path / "none.tflite"))
