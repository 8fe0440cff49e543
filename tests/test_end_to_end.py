"""The whole job through the real command line, with data and job_dir on the GCS server.

prepare -> train (2 CPU replicas, head and fine-tune phases) -> evaluate -> the export loaded in a
fresh process that never imports `trainer` -> predict.
"""

import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import CLASSES, run_trainer, write_stripes

from trainer.infra import folders, storage


@pytest.fixture(scope="module")
def trained_job(tmp_path_factory, gcs_server):
    """Runs prepare and train once; the tests below look at what they left in the bucket."""
    import fsspec

    local = tmp_path_factory.mktemp("e2e")
    images = local / "images"
    write_stripes(str(images))
    bucket = "gs://e2e-job"
    fsspec.filesystem("gs", use_listings_cache=False).mkdir("e2e-job")
    data, job = f"{bucket}/data", f"{bucket}/job"
    run_trainer("prepare", f"--source={images}", f"--output={data}", "--num_shards=2", "--workers=2",
                check=True)
    train_args = [
        "train", f"--data={data}/dataset.json", f"--job_dir={job}", "--backbone=tiny", "--weights=none",
        "--image_size=32", "--batch_size=16", "--epochs=2", "--learning_rate=3e-3", "--dense_units=32",
        "--dropout=0.1", "--fine_tune_epochs=2", "--fine_tune_from=block1_conv1",
        "--fine_tune_learning_rate=1e-3", "--cpu_replicas=2", "--backup_every_steps=3", "--progress_seconds=0",
        "--summary", "--profile_steps=2,3"]
    train = run_trainer(*train_args, check=True)
    return {"local": local, "images": images, "data": data, "job": job, "train": train, "train_args": train_args}


def test_train_logs_the_derived_plan(trained_job):
    log = trained_job["train"].stderr
    assert "2 replicas in sync" in log
    assert "global batch 16 = 8 per replica" in log
    # --summary: the model's layers and parameter counts at start.
    assert "block1_conv1" in trained_job["train"].stdout and "Trainable params" in trained_job["train"].stdout
    # Progress within an epoch (every step here, with --progress_seconds=0).
    assert re.search(r"phase head epoch 1/2: step 1/\d+, [\d.]+ img/s, loss [\d.]+, epoch ETA \d+m\d\ds", log), log


def test_job_dir_holds_config_history_tensorboard_and_model(trained_job):
    job = trained_job["job"]
    config = storage.read_json(f"{job}/config.json")
    assert config["plan"]["replicas"] == 2 and config["plan"]["per_replica_batch"] == 8
    assert config["dataset"]["url"] == f"{trained_job['data']}/dataset.json" and config["learning_rate"] == 3e-3
    history = storage.read_json(f"{job}/history.json")
    phases = {phase["name"]: phase["epochs"] for phase in history["phases"]}
    assert [e["epoch"] for e in phases["head"]] == [1, 2]
    assert [e["epoch"] for e in phases["fine_tune"]] == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(phases["fine_tune"][-1])
    files = [name for name, _ in folders.list_files(job)]
    assert any(name.startswith("tensorboard/") for name in files)
    # --profile_steps=2,3: a Profiler trace of each phase, in the job_dir's TensorBoard folder.
    for phase in ("head", "fine_tune"):
        assert any(name.startswith(f"tensorboard/{phase}/profile/plugins/profile/") and name.endswith(".xplane.pb")
                   for name in files), files
    # No GPU here: no GPU figures, and no error for their absence.
    assert not any(key.startswith("gpu_") for phase in history["phases"] for entry in phase["epochs"] for key in entry)
    assert "model/saved_model.pb" in files and "model/metadata.json" in files
    assert "DONE" in files


def test_rerun_of_a_finished_job_exits_zero_at_once(trained_job):
    again = run_trainer(*trained_job["train_args"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete" in again.stdout


def test_rerun_of_a_finished_job_with_another_learning_rate_is_refused(trained_job):
    again = run_trainer(*trained_job["train_args"], "--learning_rate=0.1")
    assert again.returncode == 1
    assert "--learning_rate=0.003 (now: 0.1)" in again.stderr.strip().splitlines()[-1]


def test_evaluate_counts_every_test_example(trained_job):
    data, job = trained_job["data"], trained_job["job"]
    run_trainer("evaluate", f"--model={job}/model", f"--data={data}/dataset.json", "--split=test",
                f"--output={job}/eval", check=True)
    manifest = storage.read_json(f"{data}/dataset.json")
    metrics = storage.read_json(f"{job}/eval/metrics.json")
    assert metrics["examples"] == manifest["splits"]["test"]["count"] > 0
    assert metrics["accuracy"] > 0.7, metrics  # stripes are easy: the model must have learned
    files = {name for name, _ in folders.list_files(f"{job}/eval")}
    assert {"confusion_matrix.png", "roc_curve.png", "pr_curve.png", "training_curves.png"} <= files
    # How the model was trained, from the job's config.json and history.json, in both files.
    config = storage.read_json(f"{job}/config.json")
    training = metrics["training"]
    assert training["backbone"] == "tiny" and training["image_size"] == 32 and training["job_dir"] == job
    assert training["epochs_run"] == {"head": 2, "fine_tune": 2} and training["fine_tune_from"] == "block1_conv1"
    assert training["dataset_digest"] == config["dataset"]["digest"]
    page = storage.read_text(f"{job}/eval/report.html")
    assert "How the model was trained" in page and "head 2, fine_tune 2" in page and job in page
    assert f"<th>balanced accuracy</th><td>{metrics['balanced_accuracy']:.4f}</td>" in page
    assert f"<th>macro-F1</th><td>{metrics['macro_f1']:.4f}</td>" in page


def readme_serving_snippet():
    """The README's Serving example, as written."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    return next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "serving_default" in block)


def test_export_scores_jpeg_bytes_as_the_readme_shows_in_a_process_without_trainer(trained_job, tmp_path):
    folders.copy_tree(f"{trained_job['job']}/model", str(tmp_path / "model"))
    image = sorted((trained_job["images"] / "vertical").iterdir())[0]
    (tmp_path / "cat.jpg").write_bytes(image.read_bytes())
    script = (
        "import json, sys, tensorflow as tf\n"
        + readme_serving_snippet() +
        "print(json.dumps({'p': out['probabilities'].numpy().tolist(), 's': out['scores'].numpy().tolist(),\n"
        "                  'c': [[c.decode() for c in row] for row in out['classes'].numpy()],\n"
        "                  'top': [top_class.numpy().decode(), float(top_score)]}))\n"
        "assert 'trainer' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    classes = storage.read_json(str(tmp_path / "model" / "metadata.json"))["classes"]
    (probabilities,), (scores,), (names,) = scored["p"], scored["s"], scored["c"]
    assert abs(sum(probabilities) - 1.0) < 1e-5 and sorted(names) == sorted(classes) == sorted(CLASSES)
    # classes and scores: every class, best first, each with its own probability.
    assert scores == sorted(scores, reverse=True)
    assert [probabilities[classes.index(name)] for name in names] == scores
    assert scored["top"] == [names[0], pytest.approx(scores[0])]


def test_predict_writes_a_row_per_file(trained_job):
    job = trained_job["job"]
    folder = trained_job["images"] / "horizontal"
    run_trainer("predict", f"--model={job}/model", f"--input={folder}", f"--output={job}/predictions.csv",
                check=True)
    rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{job}/predictions.csv"))))
    assert len(rows) == len(list(folder.iterdir()))
    assert {row["predicted_class"] for row in rows} <= set(CLASSES)
    share = sum(row["predicted_class"] == "horizontal" for row in rows) / len(rows)
    assert share > 0.7
