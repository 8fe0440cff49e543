"""trainer predict at scale: shards of work scored here or on Beam's DirectRunner (RunInference),
against the GCS server: the same rows as one local file, exactly once each, for every input kind;
a kill and a rerun; Vertex JSONL and --top_k; the same one-line errors."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import assert_fails_as
from test_predict import exported, make_images, write_folder  # noqa: F401 (a fixture)

from trainer.errors import UserError
from trainer.infra import folders, storage
from trainer.serve import predict


def rows_of(output):
    """{path: row} of a CSV file or a folder of CSV shards; asserts each path comes once."""
    if output.endswith(".csv"):
        texts = [storage.read_text(output)]
    else:
        names = sorted(name for name, _ in folders.list_files(output))
        assert names and all(name.startswith("predictions-") for name in names), names  # no state left
        texts = [storage.read_text(storage.join(output, name)) for name in names]
    rows = [row for text in texts for row in csv.DictReader(io.StringIO(text))]
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "a row twice"
    return {row["path"]: row for row in rows}


def assert_same_rows(found, expected):
    assert sorted(found) == sorted(expected)
    for path, row in expected.items():
        assert found[path]["predicted_class"] == row["predicted_class"] and found[path]["error"] == row["error"], path
        for key in (key for key in row if key.startswith("prob_")):
            assert (found[path][key] == row[key] == "") or abs(float(found[path][key]) - float(row[key])) <= 1e-6


@pytest.fixture(scope="module")
def bucket_images(gcs_server, exported):  # noqa: F811
    """(bucket, model URL, images): 6 images (one broken) and a text file, three times over, in a bucket."""
    import uuid

    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("gs", use_listings_cache=False).mkdir(name)
    bucket = f"gs://{name}"
    images = {f"{copy}/{path}": blob for copy in ("x", "y", "z") for path, blob in make_images().items()}
    write_folder(f"{bucket}/images", images)
    folders.copy_tree(exported[0], f"{bucket}/model")
    return bucket, f"{bucket}/model", images


def test_directrunner_shards_equal_local_predict_row_for_row_for_every_input_kind(bucket_images, tmp_path):
    bucket, model, images = bucket_images
    prefix = f"{bucket}/images"
    reference = str(tmp_path / "reference.csv")
    assert predict.predict(model, prefix, reference, batch_size=4) == 18
    expected = rows_of(reference)
    assert sum(row["error"] != "" for row in expected.values()) == 3  # the broken JPEGs keep their rows

    # A prefix: three shards on DirectRunner, and the same on the local runner.
    for runner in ("DirectRunner", "local"):
        output = f"{bucket}/out-{runner}"
        assert predict.predict(model, prefix, output, batch_size=4, num_shards=3, runner=runner) == 18
        names = sorted(name for name, _ in folders.list_files(output))
        assert names == [f"predictions-{index:05d}-of-00003.csv" for index in range(3)]
        assert_same_rows(rows_of(output), expected)

    # A glob, one file, and the Vertex label files (CSV and JSONL) listing the images to score.
    labels_csv, labels_jsonl = f"{bucket}/lists/score.csv", f"{bucket}/lists/score.jsonl"
    listed = sorted(path for path in expected if "/y/" in path)
    storage.write_text(labels_csv, "".join(f"{path},unknown\n" for path in listed))
    storage.write_text(labels_jsonl, "".join(json.dumps({"imageGcsUri": path, "classificationAnnotation":
                                                         {"displayName": "unknown"}}) + "\n" for path in listed))
    kinds = {f"{prefix}/z/sub/*.*": [path for path in expected if "/z/sub/" in path and path.count("/") == 6],
             f"{prefix}/x/a.jpg": [f"{prefix}/x/a.jpg"], labels_csv: listed, labels_jsonl: listed}
    for index, (source, paths) in enumerate(kinds.items()):
        output = f"{bucket}/kind-{index}"
        assert predict.predict(model, source, output, batch_size=4, runner="DirectRunner") == len(paths), source
        assert_same_rows(rows_of(output), {path: expected[path] for path in paths})


def test_vertex_jsonl_and_top_k(bucket_images, tmp_path):
    bucket, model, images = bucket_images
    output = str(tmp_path / "jsonl")
    predict.predict(model, f"{bucket}/images/x", output, output_format="jsonl", top_k=1, runner="DirectRunner")
    (name,) = os.listdir(output)
    assert name == "predictions-00000-of-00001.jsonl"
    lines = [json.loads(line) for line in open(os.path.join(output, name))]
    reference = rows_of(predict.predict(model, f"{bucket}/images/x", str(tmp_path / "ref.csv")) and
                        str(tmp_path / "ref.csv"))
    assert len(lines) == 6 and {line["instance"]["content"] for line in lines} == set(reference)
    for line in lines:
        row = reference[line["instance"]["content"]]
        if row["error"]:
            assert line["error"]["message"] == row["error"] and "prediction" not in line
            continue
        assert line["instance"]["mimeType"].startswith("image/")
        prediction = line["prediction"]
        assert prediction["displayNames"] == [row["predicted_class"]] and len(prediction["ids"]) == 1
        assert abs(prediction["confidences"][0] - float(row[f"prob_{row['predicted_class']}"])) <= 1e-6
    # top_k in CSV: the best classes first, with their probabilities.
    predict.predict(model, f"{bucket}/images/x", str(tmp_path / "top.csv"), top_k=2)
    for path, row in rows_of(str(tmp_path / "top.csv")).items():
        assert row["class_1"] == reference[path]["predicted_class"]
        if not row["error"]:
            assert float(row["prob_1"]) >= float(row["prob_2"])


def test_a_killed_run_on_directrunner_resumes_writing_only_the_missing_shards(bucket_images, tmp_path):
    """(The local runner resumes through the same markers: the next test.)"""
    bucket, model, images = bucket_images
    output = tmp_path / "out"
    command = [sys.executable, "-m", "trainer.cli", "predict", f"--model={model}", f"--input={bucket}/images",
               f"--output={output}", "--num_shards=6", "--batch_size=1", "--runner=DirectRunner", "--",
               "--direct_num_workers=1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    markers = output / ".predict"
    while process.poll() is None and not (markers.exists() and any(markers.glob("*.json"))):
        time.sleep(0.02)  # waits for the first committed shard (no assertion on time)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = {path.name: path.stat().st_mtime_ns for path in output.glob("predictions-*")}
    assert 1 <= len(written) < 6, written
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {len(written)} of 6 shards already written" in result.stderr
    assert f"scoring {6 - len(written)} shard" in result.stderr
    assert all((output / name).stat().st_mtime_ns == mtime for name, mtime in written.items())
    assert_same_rows(rows_of(str(output)), rows_of(predict.predict(model, f"{bucket}/images", str(tmp_path / "r.csv"))
                                                    and str(tmp_path / "r.csv")))
    # A finished run is kept unless --overwrite.
    line = assert_fails_as(lambda: predict.predict(model, f"{bucket}/images", str(output)))
    assert line.startswith(f"error: {output} already holds predictions (predictions-00000-of-00006.csv")
    assert predict.predict(model, f"{bucket}/images/x", str(output), overwrite=True) == 6
    assert sorted(os.listdir(output)) == ["predictions-00000-of-00001.csv"]


@pytest.mark.parametrize("runner", ["local", "DirectRunner"])
def test_bad_inputs_are_the_same_one_line_errors_on_every_runner(bucket_images, tmp_path, runner):
    bucket, model, _ = bucket_images
    output = str(tmp_path / "out")
    cases = [
        (lambda: predict.predict(model, f"{bucket}/nowhere", output, runner=runner), "error: input not found"),
        (lambda: predict.predict(f"{bucket}/no-model", f"{bucket}/images", output, runner=runner),
         "error: no exported model at"),
        (lambda: predict.predict(model, f"{bucket}/images", output, top_k=-1, runner=runner), "error: --top_k must"),
        (lambda: predict.predict(model, f"{bucket}/images", output, output_format="xml", runner=runner),
         "error: --format must be one of csv, jsonl"),
        (lambda: predict.predict(model, f"{bucket}/images", "gs://no-such-bucket/out", runner=runner),
         "error: bucket gs://no-such-bucket does not exist"),
    ]
    for call, start in cases:
        assert assert_fails_as(call).startswith(start)
    if runner == "local":
        with pytest.raises(UserError, match="are for a Beam --runner"):
            predict.predict(model, f"{bucket}/images", output, pipeline_args=("--project=p",))
        with pytest.raises(UserError, match="--format=jsonl but --output ends in .csv"):
            predict.predict(model, f"{bucket}/images", str(tmp_path / "one.csv"), output_format="jsonl")
    else:
        with pytest.raises(UserError, match="unknown Beam pipeline option --no_such_option"):
            predict.predict(model, f"{bucket}/images", output, runner=runner, pipeline_args=("--no_such_option=1",))
        with pytest.raises(UserError, match="writes a folder of shards"):
            predict.predict(model, f"{bucket}/images", str(tmp_path / "one.csv"), runner=runner)
    assert not os.path.exists(output)


def test_an_unfinished_run_planned_again_keeps_only_its_own_shards(bucket_images, tmp_path):
    bucket, model, _ = bucket_images
    output = tmp_path / "out"
    predict.predict(model, f"{bucket}/images/x", str(output), num_shards=3)
    (output / "notes.txt").write_text("not ours")
    (output / ".predict").mkdir()  # as a killed run leaves it
    (output / ".predict" / "predictions-00000-of-00003.csv.json").write_text('{"plan": "another"}')
    assert predict.predict(model, f"{bucket}/images/x", str(output), num_shards=2) == 6
    assert sorted(os.listdir(output)) == ["notes.txt", *(f"predictions-0000{index}-of-00002.csv" for index in (0, 1))]
    # --overwrite over an unfinished run's markers: every shard is written again.
    (output / ".predict").mkdir()
    (output / ".predict" / "predictions-00000-of-00002.csv.json").write_text('{"plan": "x"}')
    (output / "predictions-00000-of-00002.csv").unlink()
    assert predict.predict(model, f"{bucket}/images/x", str(output), num_shards=2, overwrite=True) == 6
    assert len(rows_of_folder(output)) == 6


def rows_of_folder(output):
    return [row for name in sorted(os.listdir(output)) if name.startswith("predictions-")
            for row in csv.DictReader(open(output / name))]
