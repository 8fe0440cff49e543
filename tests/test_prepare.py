"""`trainer prepare`: the real command on generated image folders, local and on a GCS server."""

import base64
import collections
import hashlib
import io
import json
import multiprocessing.pool
import os
import re
import signal
import subprocess
import sys
import threading

import helpers
import numpy as np
import pytest
from helpers import assert_one_line_error, run_trainer
from PIL import Image, ImageFile

from trainer.errors import UserError
from trainer.infra import storage
from trainer.prepare import catalog, plan, runners, shards
from trainer.prepare import run as prepare

EXAMPLE_KEYS = {"image/encoded", "image/format", "image/class/label", "image/class/text",
                "image/filename", "image/height", "image/width"}
# Every format helpers.write_images writes; cycled per image, so each class holds each format once.
ALL_FORMATS = tuple(helpers.FORMATS)
BAD_REASONS = {
    "bad_truncated_jpeg.jpg": "truncated image",
    "bad_truncated_png.png": "truncated image",
    "bad_corrupt_png.png": "corrupt image",
    "bad_not_image.jpg": "not an image",
    "bad_empty.jpg": "empty file",
}


def preview_candidates(source, manifest, work):
    """The files prepare's plan of `source` (with the manifest's settings) offers samples.png."""
    with catalog.Catalog(str(source), manifest["split_seed"]) as table:
        planned = prepare.plan_dataset(table, str(source), str(work), None, manifest["layout"],
                                       manifest["val_fraction"], manifest["test_fraction"], manifest["split_seed"])
        _, samples = prepare.store_plan(table, str(work), planned["classes"], manifest["split_seed"], 100.0, None, None)
    return samples


def md5_of(path):
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def read_records(output, tmp_path):
    """manifest, and {split: [record dict]} from every shard the manifest lists at `output`."""
    import tensorflow as tf

    manifest = storage.read_json(storage.join(output, "dataset.json"))
    records = {}
    for split, entry in manifest["splits"].items():
        records[split] = []
        for shard in entry["shards"]:
            local = tmp_path / f"read-{shard['file']}"
            local.write_bytes(storage.read_bytes(storage.join(output, shard["file"])))
            assert local.stat().st_size == shard["bytes"]
            shard_records = []
            for serialized in tf.data.TFRecordDataset(str(local)):
                example = tf.train.Example.FromString(serialized.numpy())
                feature = example.features.feature
                assert set(feature.keys()) == EXAMPLE_KEYS
                shard_records.append({
                    "encoded": feature["image/encoded"].bytes_list.value[0],
                    "format": feature["image/format"].bytes_list.value[0].decode(),
                    "label": feature["image/class/label"].int64_list.value[0],
                    "text": feature["image/class/text"].bytes_list.value[0].decode(),
                    "filename": feature["image/filename"].bytes_list.value[0].decode(),
                    "height": feature["image/height"].int64_list.value[0],
                    "width": feature["image/width"].int64_list.value[0],
                    "shard": shard["file"],
                })
            assert len(shard_records) == shard["records"]
            records[split] += shard_records
    return manifest, records


def check_records(manifest, records):
    """Counts, labels and shapes agree with the manifest, and every image decodes to RGB."""
    import tensorflow as tf

    for split, entry in manifest["splits"].items():
        assert entry["count"] == len(records[split])
        counts = collections.Counter(record["text"] for record in records[split])
        assert entry["class_counts"] == {name: counts.get(name, 0) for name in manifest["classes"]}
        if entry["count"] == 0:
            assert entry["shards"] == []
        for index, shard in enumerate(entry["shards"]):
            assert shard["file"] == f"{split}-{index:05d}-of-{len(entry['shards']):05d}.tfrecord"
        for record in records[split]:
            assert manifest["classes"][record["label"]] == record["text"]
            assert record["format"] in ("jpeg", "png")
            image = tf.io.decode_image(record["encoded"], channels=3, expand_animations=False)
            assert image.dtype == tf.uint8
            assert tuple(image.shape) == (record["height"], record["width"], 3)
    assert manifest["image_stats"]["count"] == sum(len(split) for split in records.values())


def split_of_files(records):
    return {record["filename"]: split for split, split_records in records.items() for record in split_records}


# ----------------------------------------------------------------------------------------------
# The real command, one test per layout.


def test_class_dirs_local_every_format_and_bad_files(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "data"
    written = helpers.write_images(str(source), "class_dirs", per_class=len(ALL_FORMATS), fmt=ALL_FORMATS)
    bad = helpers.write_bad_files(str(source), "cats")
    helpers.write_file(str(source), ".DS_Store", b"finder")
    helpers.write_file(str(source), "dogs/.hidden.jpg", helpers.image_bytes())

    result = run_trainer("prepare", f"--source={source}", f"--output={output}", "--workers=2")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout: class_dirs (detected)" in result.stderr
    assert f"prepared {len(written)} images in 2 classes" in result.stderr
    assert f"skipped {len(bad)} files" in result.stderr
    manifest, records = read_records(str(output), tmp_path)
    check_records(manifest, records)
    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["layout"] == "class_dirs" and manifest["source"] == str(source)
    assert (manifest["schema_version"], manifest["kind"], manifest["split_rule"]) == (2, "trainer-dataset",
                                                                                      "content-md5")
    assert manifest["ignored"] == {"count": 0, "files": []}  # .DS_Store is hidden, not ignored
    assert manifest["duplicates"]["groups"] == 0 and manifest["warnings"] == []
    assert (manifest["val_fraction"], manifest["test_fraction"], manifest["split_seed"]) == (0.15, 0.15, 0)
    assert sorted(split_of_files(records)) == sorted(written)
    totals = collections.Counter()
    for entry in manifest["splits"].values():
        totals.update(entry["class_counts"])
    assert totals == {"cats": len(ALL_FORMATS), "dogs": len(ALL_FORMATS)}
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    assert sorted(reasons) == sorted(bad)
    for path, reason in reasons.items():
        assert reason.startswith(BAD_REASONS[path.split("/")[-1]])
    # RGB and greyscale JPEGs keep their bytes; everything else is re-encoded for the reader.
    for record in (record for split in records.values() for record in split):
        original = (source / record["filename"]).read_bytes()
        fmt = ALL_FORMATS[int(record["filename"].split("_")[-1].split(".")[0]) % len(ALL_FORMATS)]
        if fmt in ("jpeg", "grey"):
            assert (record["encoded"], record["format"]) == (original, "jpeg")
        else:  # (an RGB PNG re-encoded by Pillow may come out byte-identical)
            assert record["format"] == ("jpeg" if fmt == "cmyk" else "png")
            assert fmt == "png" or record["encoded"] != original
    assert manifest["image_stats"]["width"] == {"min": 40, "max": 40, "mean": 40.0}
    # A look at the data next to dataset.json: training images of each class, and the counts.
    from trainer.prepare import preview

    shown = preview._samples(preview_candidates(source, manifest, tmp_path / "plan"), set(reasons), 10**8)
    train_counts = manifest["splits"]["train"]["class_counts"]
    assert {name: len(images) for name, images in shown.items()} == {
        name: min(preview.SAMPLES_PER_CLASS, train_counts[name]) for name in manifest["classes"]}
    for name in ("samples.png", "class_counts.png"):
        with Image.open(output / name) as picture:
            picture.load()
            assert picture.format == "PNG" and picture.size[0] >= 600, (name, picture.size)
    with Image.open(output / "samples.png") as picture:  # pictures, not an empty canvas
        assert np.asarray(picture.convert("L")).std() > 10


def test_split_dirs_local(tmp_path):
    source, output = tmp_path / "seed", tmp_path / "data"
    written = helpers.write_images(str(source), "split_dirs", per_class=3, fmt=("jpeg", "png"))

    # `--source=~/seed`: no shell expands a `~` after `=`; the trainer does.
    result = run_trainer("prepare", "--source=~/seed", f"--output={output}", "--workers=2",
                         env={"HOME": str(tmp_path)})

    assert result.returncode == 0, result.stderr[-3000:]
    # A short line for terminals and Kubernetes logs: the UTC time, the level, the words.
    short_line = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z I layout: split_dirs \(detected\)$"
    assert re.search(short_line, result.stderr, re.M), result.stderr
    manifest, records = read_records(str(output), tmp_path)
    assert manifest["source"] == str(source)
    assert "in 1 shard," in result.stderr and "1 shards" not in result.stderr  # "6 images ... in 1 shard"
    # --verbosity=1 keeps absl's own prefix (thread, file and line), as in log files.
    again = run_trainer("prepare", f"--source={source}", f"--output={tmp_path / 'again'}", "--workers=1",
                        "--verbosity=1")
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ plan\.py:\d+\] layout: split_dirs", again.stderr, re.M), \
        again.stderr
    check_records(manifest, records)
    assert {split: entry["count"] for split, entry in manifest["splits"].items()} == {
        "train": 6, "val": 6, "test": 6}
    expected = {path: plan.SPLIT_FOLDERS[path.split("/")[0]] for path in written}
    assert split_of_files(records) == expected  # validation/ -> val
    assert manifest["val_fraction"] is None and manifest["skipped"] == []


def test_filename_prefix_local_hash_split_and_mixed_shards(tmp_path):
    source, output = tmp_path / "kaggle", tmp_path / "data"
    written = helpers.write_images(str(source), "filename_prefix", classes=("cat", "dog"), per_class=30,
                                    size=(24, 18))

    result = run_trainer("prepare", f"--source={source}", f"--output={output}", "--workers=2",
                         "--num_shards=3", "--val_fraction=0.2", "--test_fraction=0.1", "--split_seed=7")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout: filename_prefix (detected)" in result.stderr
    manifest, records = read_records(str(output), tmp_path)
    check_records(manifest, records)
    assert manifest["classes"] == ["cat", "dog"]
    # Each image's split is a stable hash of its content (schema 2), the same on every run.
    assert split_of_files(records) == {path: plan.assign_split(md5_of(source / path), 0.2, 0.1, 7)
                                       for path in written}
    for record in (record for split in records.values() for record in split):
        assert record["text"] == record["filename"].split(".")[0]
    # Examples are spread so that no shard holds a single class.
    assert len(manifest["splits"]["train"]["shards"]) == 3
    by_shard = collections.defaultdict(list)
    for record in (record for split in records.values() for record in split):
        by_shard[record["shard"]].append(record["text"])
    assert all(set(labels) == {"cat", "dog"} for labels in by_shard.values() if len(labels) >= 4)
    assert all(set(by_shard[shard["file"]]) == {"cat", "dog"} for shard in manifest["splits"]["train"]["shards"])


def test_gcs_source_and_output(gcs_bucket, tmp_path):
    source, output = f"{gcs_bucket}/photos", f"{gcs_bucket}/datasets/pets"
    written = helpers.write_images(source, "class_dirs", per_class=5, fmt=("jpeg", "png", "cmyk"))
    bad = helpers.write_bad_files(source, "dogs", kinds=("truncated_jpeg", "not_image"))

    result = run_trainer("prepare", f"--source={source}", f"--output={output}", "--workers=2",
                         "--num_shards=2")

    assert result.returncode == 0, result.stderr[-3000:]
    manifest, records = read_records(output, tmp_path)
    check_records(manifest, records)
    assert sorted(split_of_files(records)) == sorted(written)
    assert sorted(entry["file"] for entry in manifest["skipped"]) == sorted(bad)
    assert manifest["source"] == source
    # A second run does not replace the dataset without --overwrite.
    again = run_trainer("prepare", f"--source={source}", f"--output={output}")
    assert_one_line_error(again, "already holds a dataset", "--overwrite")


# ----------------------------------------------------------------------------------------------
# Splits are stable: reruns and added files.


def test_rerun_is_identical_and_added_files_keep_their_split(tmp_path):
    source = tmp_path / "photos"
    helpers.write_images(str(source), "class_dirs", per_class=20, size=(16, 12))
    first = prepare.prepare_dataset(str(source), str(tmp_path / "one"), num_shards=2, workers=1)
    second = prepare.prepare_dataset(str(source), str(tmp_path / "two"), num_shards=2, workers=1)

    assert first["splits"] == second["splits"]
    for split in first["splits"].values():
        for shard in split["shards"]:  # byte-identical shards: same split, same order
            assert (tmp_path / "one" / shard["file"]).read_bytes() == (
                tmp_path / "two" / shard["file"]).read_bytes()
    _, before = read_records(str(tmp_path / "one"), tmp_path)

    helpers.write_images(str(source), "class_dirs", per_class=10, size=(16, 12), start=20)
    grown = prepare.prepare_dataset(str(source), str(tmp_path / "three"), num_shards=2, workers=1)
    _, after = read_records(str(tmp_path / "three"), tmp_path)

    old, new = split_of_files(before), split_of_files(after)
    assert sum(entry["count"] for entry in grown["splits"].values()) == 60
    assert {path: new[path] for path in old} == old
    assert set(old.values()) == {"train", "val", "test"}


def test_assign_split_is_a_fixed_function_of_seed_and_path():
    # Fixed values: a change of the hash would silently reshuffle every user's splits.
    assert plan.assign_split("cat.1.jpg", 0.15, 0.15, 0) == "test"
    assert plan.assign_split("f", 0.15, 0.15, 0) == "val"
    assert plan.assign_split("a", 0.15, 0.15, 1) == "val"
    assert plan.assign_split("d", 0.15, 0.15, 1) == "test"
    assert plan.assign_split("d", 0.15, 0.15, 0) == "train"
    counts = collections.Counter(plan.assign_split(f"x/{i}.jpg", 0.2, 0.1) for i in range(4000))
    assert abs(counts["val"] / 4000 - 0.2) < 0.03 and abs(counts["test"] / 4000 - 0.1) < 0.03


# ----------------------------------------------------------------------------------------------
# Re-encoding and decoding.


def test_max_side_shrinks_large_images_only(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "data"
    large = helpers.write_images(str(source), "class_dirs", per_class=2, size=(120, 90), fmt=("jpeg", "png"))
    small = helpers.write_images(str(source), "class_dirs", per_class=1, size=(20, 15), start=2)

    manifest = prepare.prepare_dataset(str(source), str(output), max_side=32, val_fraction=0,
                                       test_fraction=0, workers=1)

    _, records = read_records(str(output), tmp_path)
    stored = {record["filename"]: record for record in records["train"]}
    assert sorted(stored) == sorted(large + small) and manifest["max_side"] == 32
    for path in large:
        record = stored[path]
        assert (record["width"], record["height"], record["format"]) == (32, 24, "jpeg")
        assert len(record["encoded"]) < len((source / path).read_bytes())
    for path in small:
        assert stored[path]["encoded"] == (source / path).read_bytes()
    assert manifest["image_stats"]["width"]["max"] == 32
    check_records(manifest, records)


def png_declaring(width, height):
    """A few bytes of PNG whose header declares width x height RGB pixels (a decompression bomb's
    header: its pixels, were they there, would take width * height * 3 bytes to decode)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_images_declaring_more_pixels_than_max_pixels_are_skipped_without_decoding(tmp_path):
    source = tmp_path / "images"
    helpers.write_images(str(source), "class_dirs", per_class=4, size=(40, 30))
    helpers.write_file(str(source), "cats/bomb.png", png_declaring(12000, 12000))  # 432 MB decoded
    manifest = prepare.prepare_dataset(str(source), str(tmp_path / "data"), workers=1, num_shards=1)
    [skipped] = manifest["skipped"]
    assert skipped["file"] == "cats/bomb.png"
    assert skipped["reason"] == "too many pixels: 12000 x 12000 pixels, more than --max_pixels=120000000"
    # A lower limit, from the command line: the 40 x 30 photos are over it too.
    result = run_trainer("prepare", f"--source={source}", f"--output={tmp_path / 'small'}", "--max_pixels=1000",
                         "--workers=1")
    assert_one_line_error(result)
    assert "--max_pixels=1000" in result.stderr
    assert_one_line_error(run_trainer("prepare", f"--source={source}", f"--output={tmp_path / 'x'}",
                                      "--max_pixels=0"), "--max_pixels must be at least 1")


def test_images_larger_than_max_image_bytes_are_skipped_and_read_no_further(tmp_path, monkeypatch):
    source = tmp_path / "images"
    helpers.write_images(str(source), "class_dirs", per_class=4, size=(40, 30))
    big = helpers.image_bytes("png", size=(400, 300), seed=3)
    helpers.write_file(str(source), "dogs/huge.png", big)
    limit = len(big) - 1
    reads = []
    real_read_many = storage.read_many

    def watched(locations, max_bytes=None):
        reads.append(max_bytes)
        return real_read_many(locations, max_bytes)

    monkeypatch.setattr(storage, "read_many", watched)
    manifest = prepare.prepare_dataset(str(source), str(tmp_path / "data"), workers=1, num_shards=1,
                                       max_image_bytes=limit)
    assert manifest["skipped"] == [{"file": "dogs/huge.png",
                                    "reason": f"too large: more than --max_image_bytes={limit} bytes"}]
    assert set(reads) == {limit}  # every read of an image is capped
    assert sum(split["count"] for split in manifest["splits"].values()) == 8
    assert storage.read_many([str(source / "dogs" / "huge.png")], 10) == [big[:11]]
    assert_one_line_error(run_trainer("prepare", f"--source={source}", f"--output={tmp_path / 'x'}",
                                      "--max_image_bytes=0"), "--max_image_bytes must be at least 1")


def test_a_phone_photo_held_sideways_is_stored_upright_for_training_and_predict(tmp_path):
    from PIL import ImageOps

    from trainer.formats import imagefiles
    from trainer.serve import shards as shards_of_predict

    stored_pixels = helpers.make_image(0, size=(40, 30), seed=5)  # as the sensor wrote them: landscape
    exif = Image.Exif()
    exif[imagefiles.EXIF_ORIENTATION] = 6  # "turn 90 degrees clockwise to view"
    buffer = io.BytesIO()
    stored_pixels.save(buffer, "JPEG", quality=95, exif=exif)
    source = tmp_path / "images"
    helpers.write_images(str(source), "class_dirs", per_class=3, size=(40, 30))
    helpers.write_file(str(source), "cats/phone.jpg", buffer.getvalue())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
    assert upright.shape == (40, 30, 3)  # portrait, as a viewer shows it

    prepare.prepare_dataset(str(source), str(tmp_path / "data"), workers=1, num_shards=1, val_fraction=0,
                            test_fraction=0)
    _, records = read_records(str(tmp_path / "data"), tmp_path)
    [record] = [record for record in records["train"] if record["filename"] == "cats/phone.jpg"]
    assert (record["width"], record["height"]) == (30, 40)
    pixels = np.asarray(Image.open(io.BytesIO(record["encoded"])).convert("RGB")).astype(int)
    # The same picture (re-encoded once), turned the right way: not upside down.
    assert np.abs(pixels - upright).mean() < 0.5 * np.abs(pixels - upright[::-1, ::-1]).mean()
    # predict gives the model the very bytes training stored.
    assert shards_of_predict._read(str(source / "cats" / "phone.jpg"))[0] == record["encoded"]
    # An upright JPEG keeps its bytes.
    plain = (source / "cats" / "cats_0000.jpg").read_bytes()
    assert imagefiles.encode_image(plain)["encoded"] == plain


def test_truncated_images_are_skipped_even_when_pillow_would_pad_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    source = tmp_path / "photos"
    helpers.write_images(str(source), "class_dirs", per_class=2, size=(16, 12))
    helpers.write_bad_files(str(source), "dogs", kinds=("truncated_jpeg", "truncated_png"))

    manifest = prepare.prepare_dataset(str(source), str(tmp_path / "data"), workers=1)

    assert [entry["reason"] for entry in manifest["skipped"]] == ["truncated image"] * 2
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_imap_bounded_keeps_a_bounded_window():
    pulled, consumed = [0], []
    lock = threading.Lock()

    def items():
        for index in range(40):
            with lock:
                pulled[0] += 1
                assert pulled[0] - len(consumed) <= 4  # never more than the window ahead
            yield index

    with multiprocessing.pool.ThreadPool(2) as pool:
        for result in shards.imap_bounded(pool, lambda value: value * 2, items(), window=4):
            consumed.append(result)
    assert consumed == [value * 2 for value in range(40)]


def _a_worker_with_a_python_sigterm_handler():
    signal.signal(signal.SIGTERM, lambda *_: os._exit(75))  # as trainer.cli's start-up handler was
    runners._worker_signals()


def _sigterm_is_default():
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_prepares_pool_workers_end_by_sigterms_default_action():
    # Pool.__exit__ ends idle workers with SIGTERM while they wait on a semaphore. A worker whose
    # SIGTERM had a Python handler (trainer.cli's start-up one: a spawned worker runs that module as
    # __mp_main__) was seen blocked there with the signal delivered and its handler never run, and
    # prepare waiting on it for ever after its last shard (CI's prepare benchmark).
    with multiprocessing.get_context("spawn").Pool(1, initializer=_a_worker_with_a_python_sigterm_handler) as pool:
        assert pool.apply(_sigterm_is_default)
    as_a_worker = subprocess.run([sys.executable, "-c", "import runpy, signal; runpy.run_module('trainer.cli', "
                                  "run_name='__mp_main__'); print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"],
                                 capture_output=True, text=True, timeout=300)
    assert as_a_worker.stdout.strip() == "True", as_a_worker.stderr[-2000:]


def stratified(rows, seed=3, count=1):
    """The shards of the catalog's stratified order of `rows` ((path, label) in train) as (path, label) lists."""
    with catalog.Catalog(seed=seed) as table:
        table.add_label_rows([(None, path, label, "train") for path, label in rows])
        table.db.execute("UPDATE files SET digest = path, split = 0")
        return [[(path, label) for path, _, label, *_ in shard] for shard in table.shards("train", count)]


def test_stratified_order_mixes_every_run_of_four_whatever_the_listing_order():
    rows = [(f"{label}/{index}", label) for label in ("a", "b") for index in range(50)]
    [ordered] = stratified(rows)
    assert sorted(ordered) == sorted(rows)
    assert all(len({label for _, label in ordered[start:start + 4]}) == 2 for start in range(97))
    assert ordered == stratified(list(reversed(rows)))[0]
    assert ordered != stratified(rows, seed=4)[0]
    # Cut into consecutive shards of (nearly) equal size, each with its share of both classes.
    pieces = stratified([*rows, *((f"c/{index}", "c") for index in range(25))], count=5)
    assert [len(piece) for piece in pieces] == [25] * 5
    assert all(collections.Counter(label for _, label in piece) == {"a": 10, "b": 10, "c": 5} for piece in pieces)


# ----------------------------------------------------------------------------------------------
# Layout detection and errors.


@pytest.mark.parametrize("paths, layout", [
    (["cats/a.jpg", "dogs/b.jpg"], "class_dirs"),
    (["cats/2019/a.jpg", "dogs/b.jpg"], "class_dirs"),
    (["train/cats/a.jpg", "validation/dogs/b.jpg", "test/cats/c.jpg"], "split_dirs"),
    (["cat.1.jpg", "dog.2.jpg"], "filename_prefix"),
])
def test_detect_layout(paths, layout):
    assert plan.detect_layout(paths) == layout


@pytest.mark.parametrize("paths", [
    ["cats/a.jpg", "README.txt"],
    ["train/cats/a.jpg", "cats/b.jpg"],
    ["train/a.jpg", "test/b.jpg"],
])
def test_detect_layout_refuses_ambiguous(paths):
    with pytest.raises(UserError, match="cannot tell the layout"):
        plan.detect_layout(paths)


def test_explicit_layout_skips_files_it_has_no_place_for(tmp_path):
    source = tmp_path / "photos"
    helpers.write_images(str(source), "class_dirs", per_class=2, size=(16, 12))
    helpers.write_file(str(source), "LICENSE.txt", b"CC-BY")

    manifest = prepare.prepare_dataset(str(source), str(tmp_path / "data"), layout="class_dirs", workers=1)

    assert manifest["skipped"] == []  # not an image by name: ignored, never a class nor a failure
    assert manifest["ignored"] == {"count": 1, "files": ["LICENSE.txt"]}


def _make_error_case(case, tmp_path):
    """Sets up one error case; returns the extra command-line arguments."""
    source = tmp_path / "photos"
    if case == "missing source":
        return []
    if case == "one class":
        helpers.write_images(str(source), "class_dirs", classes=("cats",), per_class=2)
    elif case == "ambiguous layout":
        helpers.write_images(str(source), "class_dirs", per_class=1)
        helpers.write_file(str(source), "stray.jpg", helpers.image_bytes())
    elif case == "nothing usable":  # (all in train: the plan has training files for both classes)
        helpers.write_bad_files(str(source), "cats", kinds=("truncated_jpeg", "not_image"))
        helpers.write_bad_files(str(source), "dogs", kinds=("empty",))
        return ["--val_fraction=0", "--test_fraction=0"]
    elif case == "empty class":
        helpers.write_images(str(source), "class_dirs", classes=("cats",), per_class=3)
        helpers.write_bad_files(str(source), "dogs", kinds=("truncated_jpeg", "not_image"))
        return ["--val_fraction=0", "--test_fraction=0"]
    elif case == "existing dataset":
        helpers.write_images(str(source), "class_dirs", per_class=1)
        storage.write_json(str(tmp_path / "data" / "dataset.json"), {"kind": "trainer-dataset"})
    else:
        helpers.write_images(str(source), "class_dirs", per_class=1)
        return case.split()
    return []


@pytest.mark.parametrize("case, message", [
    ("missing source", "source not found"),
    ("one class", "only one class ('cats')"),
    ("ambiguous layout", "cannot tell the layout"),
    ("nothing usable", "nothing usable"),
    ("empty class", "class 'dogs' has no usable image: its 2 files were skipped"),
    ("existing dataset", "already holds a dataset"),
    ("--val_fraction=0.6 --test_fraction=0.5", "must be below 1"),
    ("--val_fraction=-0.1", "--val_fraction must be in [0, 1)"),
    ("--test_fraction=1", "--test_fraction must be in [0, 1)"),
])
def test_errors_are_one_line_and_exit_1(case, message, tmp_path):
    arguments = _make_error_case(case, tmp_path)

    result = run_trainer("prepare", f"--source={tmp_path / 'photos'}", f"--output={tmp_path / 'data'}",
                         "--workers=2", *arguments)

    assert_one_line_error(result, message)
    leftovers = sorted(os.listdir(tmp_path / "data")) if (tmp_path / "data").exists() else []
    assert leftovers in ([], ["dataset.json"])  # no shards left behind


def test_overwrite_removes_only_the_old_datasets_files(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "data"
    helpers.write_images(str(source), "class_dirs", per_class=10, size=(16, 12))
    old = prepare.prepare_dataset(str(source), str(output), num_shards=3, workers=1)
    (output / "notes.txt").write_text("mine")
    (output / "train-00000-of-00009.tfrecord").write_text("not in the manifest")

    result = run_trainer("prepare", f"--source={source}", f"--output={output}", "--overwrite",
                         "--num_shards=1", "--workers=2")

    assert result.returncode == 0, result.stderr[-3000:]
    new = json.loads((output / "dataset.json").read_text())
    kept = {"notes.txt", "train-00000-of-00009.tfrecord", *helpers.DATASET_FILES}
    assert sorted(os.listdir(output)) == sorted(
        kept | {shard["file"] for split in new["splits"].values() for shard in split["shards"]})
    assert all(len(split["shards"]) == 1 for split in new["splits"].values())
    assert new["splits"]["train"]["count"] == old["splits"]["train"]["count"]
