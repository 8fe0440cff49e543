"""`trainer prepare` on the data users arrive with: Vertex AI label files, stray files, duplicate
images across splits, and suspicious classes."""

import collections
import json
import uuid

import fsspec
import helpers
import pytest
from helpers import run_trainer

from trainer.errors import UserError
from trainer.infra import storage
from trainer.prepare import run as prepare


def records_by_split(output):
    """{split: [(filename, class name)]} read back from the shards."""
    import tensorflow as tf

    manifest = storage.read_json(storage.join(output, "dataset.json"))
    found = {}
    for split, entry in manifest["splits"].items():
        found[split] = []
        for shard in entry["shards"]:
            data = storage.read_bytes(storage.join(output, shard["file"]))
            local = f"/tmp/shard-{uuid.uuid4().hex}.tfrecord"
            with open(local, "wb") as handle:
                handle.write(data)
            for record in tf.data.TFRecordDataset(local):
                feature = tf.train.Example.FromString(record.numpy()).features.feature
                found[split].append((feature["image/filename"].bytes_list.value[0].decode(),
                                     feature["image/class/text"].bytes_list.value[0].decode()))
    return manifest, found


def last_error(result):
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


# ---- Vertex AI label files -------------------------------------------------------------------------

@pytest.fixture
def two_buckets(gcs_bucket):
    other = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("gs", use_listings_cache=False).mkdir(other)
    return gcs_bucket, f"gs://{other}"


def write_flowers(first, second):
    """Six daisies in one bucket, six tulips in another; returns their URIs by class."""
    uris = {"daisy": [], "tulip": []}
    for index in range(6):
        for name, bucket in (("daisy", first), ("tulip", second)):
            uri = f"{bucket}/flowers/{name}-{index}.jpg"
            storage.write_bytes(uri, helpers.image_bytes(class_index=int(name == "tulip"), seed=index))
            uris[name].append(uri)
    return uris


def test_vertex_csv_with_ml_use_imports_into_gcs_from_two_buckets(two_buckets):
    first, second = two_buckets
    uris = write_flowers(first, second)
    rows = [f"training,{uri},{name}" for name in uris for uri in uris[name][:4]]
    rows += [f"VALIDATION,{uris[name][4]},{name}" for name in uris] + [f"test,{uris[name][5]},{name}" for name in uris]
    storage.write_text(f"{first}/labels.csv", "\n".join(rows) + "\n")
    result = run_trainer("prepare", f"--labels={first}/labels.csv", f"--output={first}/data", "--workers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest, records = records_by_split(f"{first}/data")
    assert manifest["layout"] == "labels" and manifest["source"] == f"{first}/labels.csv"
    assert manifest["classes"] == ["daisy", "tulip"]
    assert {split: len(found) for split, found in records.items()} == {"train": 8, "val": 2, "test": 2}
    assert sorted(records["val"]) == sorted((uris[name][4], name) for name in uris)  # ML_USE decides
    assert sorted(records["test"]) == sorted((uris[name][5], name) for name in uris)


def test_vertex_csv_without_ml_use_and_jsonl_get_the_hash_split(two_buckets, tmp_path):
    first, second = two_buckets
    uris = write_flowers(first, second)
    storage.write_text(f"{first}/plain.csv", "".join(f"{uri},{name}\n" for name in uris for uri in uris[name]))
    jsonl = "".join(json.dumps({"imageGcsUri": uri, "classificationAnnotation": {"displayName": name},
                                "dataItemResourceLabels": ({"aiplatform.googleapis.com/ml_use": "test"}
                                                           if index == 0 else {})}) + "\n"
                    for name in uris for index, uri in enumerate(uris[name]))
    storage.write_text(f"{second}/import.jsonl", jsonl)
    outputs = {}
    for name, labels in (("csv", f"{first}/plain.csv"), ("jsonl", f"{second}/import.jsonl")):
        result = run_trainer("prepare", f"--labels={labels}", f"--output={tmp_path / name}", "--workers=1",
                             "--val_fraction=0.3", "--test_fraction=0.3")
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = records_by_split(str(tmp_path / name))[1]
    # Without ML_USE the split is the content hash's: the same images split the same way in both
    # files, except the JSONL's two rows that say test.
    split_of = {name: {uri: split for split, found in records.items() for uri, _ in found}
                for name, records in outputs.items()}
    assert sorted(split_of["csv"]) == sorted(split_of["jsonl"]) == sorted(uri for name in uris for uri in uris[name])
    for name in uris:
        assert split_of["jsonl"][uris[name][0]] == "test"
        for uri in uris[name][1:]:
            assert split_of["jsonl"][uri] == split_of["csv"][uri]
    assert len(set(split_of["csv"].values())) == 3


@pytest.mark.parametrize("content, message", [
    ("a.jpg,cat\ntrain,b.jpg,dog\n", "line 2: unknown ML_USE 'train'"),
    ("a.jpg,cat\nb.jpg,\n", "line 2: empty label for b.jpg"),
    ("a.jpg,cat\n,dog\n", "line 2: no image URI"),
    ("a.jpg,cat\nb.jpg,dog,extra,field\n", "line 2: 4 fields"),
    ("a.jpg,cat\nb.jpg,dog\na.jpg,dog\n",
     "line 3: a second label 'dog' for "),
])
def test_bad_csv_rows_are_reported_with_their_line(tmp_path, content, message):
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    result = run_trainer("prepare", f"--labels={labels}", f"--output={tmp_path / 'data'}")
    assert message in last_error(result)
    # In the same pass: the rows naming an image that is not there (none of these are).
    assert f"line 1: image not found: {tmp_path / 'a.jpg'}" in last_error(result)


@pytest.mark.parametrize("lines, message", [
    (['{"imageGcsUri": "gs://b/a.jpg", "classificationAnnotation": {"displayName": "cat"}}', "{not json"],
     "line 2: not JSON"),
    (['{"imageGcsUri": "gs://b/a.jpg", "classificationAnnotations": [{"displayName": "cat"}, '
      '{"displayName": "pet"}]}'], "line 1: classificationAnnotations (multi-label)"),
    (['{"imageGcsUri": "gs://b/a.jpg", "classificationAnnotation": {"displayName": "cat"}, '
      '"dataItemResourceLabels": {"aiplatform.googleapis.com/ml_use": "holdout"}}'], "line 1: unknown ML_USE"),
    (['{"classificationAnnotation": {"displayName": "cat"}}'], "line 1: no imageGcsUri"),
])
def test_bad_jsonl_rows_are_reported_with_their_line(tmp_path, lines, message):
    labels = tmp_path / "import.jsonl"
    labels.write_text("\n".join(lines) + "\n")
    assert message in last_error(run_trainer("prepare", f"--labels={labels}", f"--output={tmp_path / 'data'}"))


def test_a_row_naming_a_missing_image_is_reported_with_its_line(tmp_path):
    images = tmp_path / "images"
    helpers.write_images(str(images), "class_dirs", per_class=2, size=(16, 12))
    rows = ["cats/cats_0000.jpg,cats", "dogs/dogs_0000.jpg,dogs", "cats/gone.jpg,cats", "dogs/dogs_0001.jpg,dogs"]
    (images / "labels.csv").write_text("\n".join(rows) + "\n")  # relative URIs: next to the label file
    error = last_error(run_trainer("prepare", f"--labels={images / 'labels.csv'}", f"--output={tmp_path / 'd'}"))
    assert f"line 3: image not found: {images / 'cats' / 'gone.jpg'}" in error


def test_source_and_labels_together_are_refused(tmp_path):
    (tmp_path / "l.csv").write_text("a.jpg,cat\n")
    error = last_error(run_trainer("prepare", f"--source={tmp_path}", f"--labels={tmp_path / 'l.csv'}",
                                   f"--output={tmp_path / 'd'}"))
    assert "either --source" in error


# ---- Stray files -------------------------------------------------------------------------------------

def test_a_kaggle_folder_with_stray_files_prepares_the_two_classes_and_lists_the_rest(tmp_path):
    source = tmp_path / "kaggle"
    helpers.write_images(str(source), "filename_prefix", classes=("cat", "dog"), per_class=5, size=(16, 12))
    for name in ("README.md", "notes.txt", "labels.csv", "LICENSE", "Thumbs.db"):
        helpers.write_file(str(source), name, b"not an image")
    result = run_trainer("prepare", f"--source={source}", f"--output={tmp_path / 'data'}", "--workers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ignored 5 files that are not images by name" in result.stderr
    manifest = storage.read_json(str(tmp_path / "data" / "dataset.json"))
    assert manifest["classes"] == ["cat", "dog"] and manifest["layout"] == "filename_prefix"
    assert manifest["ignored"] == {"count": 5, "files": ["LICENSE", "README.md", "Thumbs.db", "labels.csv",
                                                         "notes.txt"]}
    assert manifest["skipped"] == []


# ---- Duplicates -----------------------------------------------------------------------------------

def test_identical_files_land_in_one_split_and_are_counted(tmp_path):
    source = tmp_path / "photos"
    written = helpers.write_images(str(source), "class_dirs", per_class=30, size=(16, 12))
    # Copies of ten images under other names (Kaggle's dogs-vs-cats has such): by path they would
    # hash into different splits; by content they must share one. One copy carries the other label.
    copies = {}
    for index, original in enumerate(sorted(written)[:10]):
        name = f"{'dogs' if index == 0 else original.split('/')[0]}/copy_{index}.jpg"
        helpers.write_file(str(source), name, (source / original).read_bytes())
        copies[name] = original
    manifest, records = records_by_split(prepare.prepare_dataset(str(source), str(tmp_path / "data"), workers=1)
                                         and str(tmp_path / "data"))
    split_of = {filename: split for split, found in records.items() for filename, _ in found}
    assert len(split_of) == len(written) + len(copies)
    for copy, original in copies.items():
        assert split_of[copy] == split_of[original], (copy, original)
    # Planted across what would be different splits: by path (schema 1's rule) some pairs split.
    from trainer.prepare import plan

    assert any(plan.assign_split(copy, 0.15, 0.15) != plan.assign_split(original, 0.15, 0.15)
               for copy, original in copies.items())
    duplicates = manifest["duplicates"]
    assert (duplicates["groups"], duplicates["files"]) == (10, 20)
    [conflict] = duplicates["conflicts"]
    assert conflict["labels"] == ["cats", "dogs"] and "dogs/copy_0.jpg" in conflict["files"]
    assert any(warning["kind"] == "label_conflicts" for warning in manifest["warnings"])


def test_split_folders_holding_copies_keep_them_out_of_test(tmp_path):
    source = tmp_path / "photos"
    written = helpers.write_images(str(source), "split_dirs", per_class=4, size=(16, 12))
    train_image = next(path for path in sorted(written) if path.startswith("train/cats/"))
    helpers.write_file(str(source), "test/cats/leaked.jpg", (source / train_image).read_bytes())
    manifest, records = records_by_split(prepare.prepare_dataset(str(source), str(tmp_path / "data"), workers=1)
                                         and str(tmp_path / "data"))
    split_of = {filename: split for split, found in records.items() for filename, _ in found}
    assert split_of["test/cats/leaked.jpg"] == "train"
    assert manifest["duplicates"]["moved"] == [{"file": "test/cats/leaked.jpg", "from": "test", "to": "train"}]


def test_adding_a_copy_never_moves_an_existing_image(tmp_path):
    source = tmp_path / "photos"
    written = helpers.write_images(str(source), "class_dirs", per_class=20, size=(16, 12))
    before = records_by_split(prepare.prepare_dataset(str(source), str(tmp_path / "a"), workers=1)
                              and str(tmp_path / "a"))[1]
    for index, original in enumerate(sorted(written)[:5]):
        helpers.write_file(str(source), f"cats/again_{index}.jpg", (source / original).read_bytes())
    after = records_by_split(prepare.prepare_dataset(str(source), str(tmp_path / "b"), workers=1)
                             and str(tmp_path / "b"))[1]
    split_before = {filename: split for split, found in before.items() for filename, _ in found}
    split_after = {filename: split for split, found in after.items() for filename, _ in found}
    assert {name: split_after[name] for name in split_before} == split_before


# ---- Suspicious classes --------------------------------------------------------------------------

def write_named(source, names):
    """Writes a distinct small JPEG (no two alike) at each relative path."""
    for index, name in enumerate(names):
        helpers.write_file(str(source), name, helpers.image_bytes(size=(16, 12), seed=index))


@pytest.mark.parametrize("names, kind, fragment", [
    ([f"cats/{i}.jpg" for i in range(8)] + [f"dogs/{i}.jpg" for i in range(8)] + ["birds/0.jpg", "birds/1.jpg"],
     "few_images", "'birds' (2)"),
    ([f"cats/{i}.jpg" for i in range(8)] + [f"CATS/{i}.jpg" for i in range(8, 16)]
     + [f"dogs/{i}.jpg" for i in range(8)],
     "similar_names", "'CATS', 'cats'"),
    ([f"cat.{i}.jpg" for i in range(8)] + [f"dog.{i}.jpg" for i in range(8)]
     + [f"dog .{i}.jpg" for i in range(8, 16)],
     "spaces", "'dog '"),
    ([f"{i:03d}.photo.jpg" for i in range(24)], "many_classes", "24 classes for 24 images"),
])
def test_suspicious_classes_warn_and_fail_with_strict(tmp_path, names, kind, fragment):
    source = tmp_path / "photos"
    write_named(source, names)
    manifest = prepare.prepare_dataset(str(source), str(tmp_path / "data"), workers=1, val_fraction=0.0,
                                       test_fraction=0.0)
    [warning] = [warning for warning in manifest["warnings"] if warning["kind"] == kind]
    assert fragment in warning["message"]
    strict = run_trainer("prepare", f"--source={source}", f"--output={tmp_path / 'strict'}", "--strict",
                         "--val_fraction=0", "--test_fraction=0", "--workers=1")
    assert last_error(strict).startswith("error: --strict: ")
    assert not (tmp_path / "strict").exists() or not list((tmp_path / "strict").iterdir())  # nothing written


def test_a_class_without_training_images_is_an_error_unless_allowed(tmp_path):
    source = tmp_path / "valonly"
    write_named(source, [f"train/{c}/{i}.jpg" for c in ("cats", "dogs") for i in range(6)]
                + [f"val/{c}/{i}.jpg" for c in ("cats", "dogs", "birds") for i in range(6, 8)])
    error = last_error(run_trainer("prepare", f"--source={source}", f"--output={tmp_path / 'd'}"))
    assert "class 'birds' has no training images (2 in val/test)" in error and "--allow_missing_classes" in error
    allowed = run_trainer("prepare", f"--source={source}", f"--output={tmp_path / 'd'}", "--allow_missing_classes",
                          "--workers=1")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    manifest = storage.read_json(str(tmp_path / "d" / "dataset.json"))
    assert [w["kind"] for w in manifest["warnings"]].count("no_training_images") == 1


def test_flat_names_without_a_class_prefix_are_skipped_not_classes(tmp_path):
    source = tmp_path / "flat"
    write_named(source, [f"cat.{i}.jpg" for i in range(4)] + [f"dog.{i}.jpg" for i in range(4)] + ["dog3.jpg"])
    manifest = prepare.prepare_dataset(str(source), str(tmp_path / "d"), workers=1, val_fraction=0.0,
                                       test_fraction=0.0)
    assert manifest["classes"] == ["cat", "dog"]
    assert [entry["file"] for entry in manifest["skipped"]] == ["dog3.jpg"]


def test_check_classes_directly():
    from trainer.prepare import plan

    images = {("a", "train"): 6, ("b", "train"): 6}
    assert plan.check_classes(images, ["a", "b"]) == []
    with pytest.raises(UserError, match="'c' has no training images"):
        plan.check_classes({**images, ("c", "test"): 1}, ["a", "b", "c"])
    counts = collections.Counter(w["kind"] for w in plan.check_classes(
        {**images, ("c", "test"): 1}, ["a", "b", "c"], allow_missing_classes=True))
    assert counts == {"no_training_images": 1, "few_images": 1}


@pytest.mark.timeout(120)  # reading any of these would block or never end
def test_devices_fifos_and_links_to_them_are_never_opened(tmp_path):
    import os

    images = tmp_path / "images"
    helpers.write_images(str(images), "class_dirs", per_class=3, size=(16, 12))
    os.mkfifo(images / "cats" / "pipe.jpg")
    os.symlink("/dev/zero", images / "dogs" / "zero.jpg")
    # A folder: they are left out (and logged), the rest is prepared.
    manifest = prepare.prepare_dataset(str(images), str(tmp_path / "data"), workers=1, num_shards=1)
    assert sum(split["count"] for split in manifest["splits"].values()) == 6
    # A label file: the rows are named, as a missing image is, and nothing is read.
    rows = ["cats/cats_0000.jpg,cats", "/dev/zero,cats", "cats/pipe.jpg,cats", "dogs/dogs_0000.jpg,dogs"]
    (images / "labels.csv").write_text("\n".join(rows) + "\n")
    error = last_error(run_trainer("prepare", f"--labels={images / 'labels.csv'}", f"--output={tmp_path / 'd'}"))
    assert "line 2: not a regular file (a device, a FIFO or a socket): /dev/zero" in error, error
    assert f"line 3: not a regular file (a device, a FIFO or a socket): {images / 'cats' / 'pipe.jpg'}" in error
    with pytest.raises(UserError, match="is not a regular file"):
        storage.read_many([str(images / "cats" / "pipe.jpg")])


def test_http_rows_need_allow_http_and_class_names_have_a_length_limit(tmp_path):
    from trainer.formats import labelfile

    labels = tmp_path / "labels.csv"
    labels.write_text(f"http://127.0.0.1:9/internal.jpg,cats\na.jpg,{'x' * 300}\nb.jpg,dogs\n")
    error = last_error(run_trainer("prepare", f"--labels={labels}", f"--output={tmp_path / 'd'}"))
    # Both in one pass, nothing fetched.
    assert "3 bad rows" in error, error
    assert "line 1: http://127.0.0.1:9/internal.jpg is an http(s) URL, read only with --allow_http" in error
    assert "line 2: a label of 300 characters (at most 200)" in error
    assert f"line 3: image not found: {tmp_path / 'b.jpg'}" in error
    labels.write_text("http://127.0.0.1:9/internal.jpg,cats\nb.jpg,dogs\n")
    rows = labelfile.read_label_file(str(labels), allow_http=True)
    assert [row[1] for row in rows] == ["http://127.0.0.1:9/internal.jpg", str(tmp_path / "b.jpg")]


def test_a_full_disk_under_the_plan_table_is_one_line_and_exit_1(tmp_path):
    """The plan is made in a table on TMPDIR (trainer.prepare.catalog); files there may not grow past
    128 KB (RLIMIT_FSIZE: writes fail as on a full disk) while 4,000 listed images need more."""
    import resource
    import subprocess
    import sys

    source = tmp_path / "photos"
    for index in range(4000):
        helpers.write_file(str(source), f"{'ab'[index % 2]}/{index:05d}.jpg", b"%d" % index)

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))

    result = subprocess.run([sys.executable, "-m", "trainer.cli", "prepare", f"--source={source}",
                             f"--output={tmp_path / 'data'}", "--workers=1"],
                            capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert last_error(result).startswith("error: no space left on device for the plan's table"), result.stderr[-2000:]
    assert "TMPDIR" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "data" / "dataset.json").exists()
