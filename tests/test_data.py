"""The tf.data reader: manifest checks, both read paths, sharding across pipelines, damaged data.

Each test dataset is written here with tf.io.TFRecordWriter (no dependency on `trainer prepare`):
24x24 JPEG and PNG images whose red channel encodes the example's identity, so every yielded image
can be traced back to the record it came from.
"""

import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
import tensorflow as tf
from helpers import record, write_records_dataset
from PIL import Image

from trainer.data import pipeline
from trainer.data import records as records_lib
from trainer.data.decode import decode_image
from trainer.errors import UserError
from trainer.formats import manifest, tfrecord
from trainer.infra import folders, storage

CLASSES = ["cats", "dogs"]
SIZE = 24
# split -> (examples, shards)
LAYOUT = {"train": (20, 4), "val": (7, 2), "test": (5, 1)}


def encode_image(identity, image_format):
    """A 24x24 image: red = 4 * identity + 2 everywhere (read back from the mean), gradients in G, B."""
    pixels = np.zeros([SIZE, SIZE, 3], np.uint8)
    pixels[..., 0] = 4 * identity + 2
    pixels[..., 1] = np.arange(SIZE)[None, :] * 8
    pixels[..., 2] = np.arange(SIZE)[:, None] * 8
    buffer = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(pixels).save(buffer, "JPEG", quality=95, subsampling=0)
    else:
        Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def write_dataset(folder, layout=LAYOUT, broken_image=None, wrong_label=None):
    """Writes shards + dataset.json as `trainer prepare` does (helpers.write_records_dataset);
    returns {identity: example facts}.

    `broken_image`: the identity whose stored bytes are a JPEG's first 200 bytes (does not decode).
    `wrong_label`: the identity stored with label 7 (there are 2 classes).
    """
    examples, splits, identity = {}, {}, 0
    for split, (count, num_shards) in layout.items():
        items = []
        for _ in range(count):
            label, image_format = identity % 2, "jpeg" if identity % 3 else "png"
            encoded = encode_image(identity, image_format)
            if identity == broken_image:
                image_format, encoded = "jpeg", encode_image(identity, "jpeg")[:200]
            filename = f"{CLASSES[label]}/{identity}.{'jpg' if image_format == 'jpeg' else 'png'}"
            items.append(dict(identity=identity, split=split, label=label, filename=filename,
                              encoded=encoded, format=image_format))
            identity += 1
        splits[split] = []
        for number in range(num_shards):
            name = f"{split}-{number:05d}-of-{num_shards:05d}.tfrecord"
            part = items[number::num_shards]
            for index, item in enumerate(part):
                examples[item["identity"]] = {**item, "shard": name, "index": index}
            splits[split].append([record(item["encoded"], item["format"], 7 if item["identity"] == wrong_label
                                         else item["label"], CLASSES[item["label"]], item["filename"], SIZE, SIZE)
                                  for item in part])
    write_records_dataset(folder, CLASSES, splits)
    return examples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dataset"))
    return folder, write_dataset(folder)


def copy_dataset(dataset, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(dataset[0], folder)
    return folder


def identities(images):
    return [int(i) for i in np.round((images[..., 0].mean(axis=(1, 2)) - 2) / 4)]


def read_all(dataset, size=SIZE):
    """Every batch of a finite dataset -> (images [N, S, S, 3], labels [N], batch sizes)."""
    images, labels, sizes = [], [], []
    for batch_images, batch_labels in dataset:
        assert batch_images.dtype == tf.float32 and batch_labels.dtype == tf.int32
        assert batch_images.shape[1:] == (size, size, 3)
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
        sizes.append(len(batch_labels))
    return np.concatenate(images), np.concatenate(labels), sizes


def split_ids(examples, split):
    return sorted(i for i, item in examples.items() if item["split"] == split)


def record_offsets(path):
    """Byte offset and data length of every record of a TFRecord file."""
    raw, offsets, offset = open(path, "rb").read(), [], 0
    while offset < len(raw):
        (length,) = struct.unpack("<Q", raw[offset:offset + 8])
        offsets.append((offset, length))
        offset += 16 + length
    return offsets


def flip_byte(path, record):
    """Flips one byte in the middle of a record's data: its data checksum no longer matches."""
    offset, length = record_offsets(path)[record]
    raw = bytearray(open(path, "rb").read())
    raw[offset + 12 + length // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def write_json(path, value):
    with open(path, "w") as handle:
        json.dump(value, handle)


def eval_dataset(location, split, batch_size=4, **options):
    return pipeline.make_dataset(location, split, SIZE, batch_size, training=False, **options)


# --- the framing parser ----------------------------------------------------------------------------


def test_framing_parser_reads_tfrecord_writer_output_and_checks_it(tmp_path):
    path = str(tmp_path / "records.tfrecord")
    records = [b"", b"x", os.urandom(100), os.urandom(70000)]
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    raw = open(path, "rb").read()
    assert list(tfrecord.iterate_records(io.BytesIO(raw), "s")) == records
    assert list(tfrecord.iterate_records(io.BytesIO(b""), "s")) == []

    data_flipped = bytearray(raw)
    offset, length = record_offsets(path)[2]
    data_flipped[offset + 12 + 50] ^= 1
    with pytest.raises(UserError, match=rf"shard s record 2 \(byte {offset}\) is corrupt: data checksum"):
        list(tfrecord.iterate_records(io.BytesIO(bytes(data_flipped)), "s"))
    length_flipped = bytearray(raw)
    length_flipped[offset + 1] ^= 1
    with pytest.raises(UserError, match="record 2 .* length checksum"):
        list(tfrecord.iterate_records(io.BytesIO(bytes(length_flipped)), "s"))
    for cut in (offset + 5, offset + 12 + 40, offset + 12 + length + 2):
        with pytest.raises(UserError, match="shard s record 2 .* truncated"):
            list(tfrecord.iterate_records(io.BytesIO(raw[:cut]), "s"))
    # Cut at a record boundary, the stream itself looks whole: the manifest's sizes catch that.
    assert list(tfrecord.iterate_records(io.BytesIO(raw[:offset]), "s")) == records[:2]


# --- reading ---------------------------------------------------------------------------------------


def test_eval_yields_every_example_once_in_a_fixed_order(dataset):
    folder, examples = dataset
    for split, (count, _) in LAYOUT.items():
        images, labels, sizes = read_all(eval_dataset(os.path.join(folder, "dataset.json"), split))
        assert sizes == [4] * (count // 4) + ([count % 4] if count % 4 else [])  # partial batch kept
        found = identities(images)
        assert sorted(found) == split_ids(examples, split)
        for image, label, identity in zip(images, labels, found, strict=True):
            assert label == examples[identity]["label"]
            expected = decode_image(examples[identity]["encoded"], SIZE).numpy()
            np.testing.assert_array_equal(image, expected)  # exactly the serving decode
        again = identities(read_all(eval_dataset(folder, split))[0])  # the folder works too
        assert again == found
    assert manifest.count_examples(manifest.load_manifest(folder), "val") == 7


def test_training_shuffles_repeats_and_keeps_only_full_batches(dataset):
    folder, examples = dataset
    once = pipeline.make_dataset(folder, "train", SIZE, 6, training=True, seed=1, repeat=1)
    images, labels, sizes = read_all(once)
    assert sizes == [6, 6, 6]  # 20 examples: the last 2 are dropped, not a short batch
    assert once.options().autotune.enabled is False  # pipeline.without_autotune: no stall when it is deleted
    found = identities(images)
    assert len(set(found)) == 18 and set(found) <= set(split_ids(examples, "train"))
    assert [examples[i]["label"] for i in found] == labels.tolist()

    forever = pipeline.make_dataset(folder, "train", SIZE, 6, training=True, seed=1, shuffle_buffer=10)
    images, _, sizes = read_all(forever.take(10))
    assert sizes == [6] * 10  # 60 examples out of 20: it repeats
    assert set(identities(images)) <= set(split_ids(examples, "train"))

    augmented = pipeline.make_dataset(folder, "train", SIZE, 5, training=True, augment=True, seed=2, repeat=1)
    images, _, sizes = read_all(augmented)
    assert sizes == [5] * 4
    assert images.min() >= 0 and images.max() <= 255
    plain = [decode_image(item["encoded"], SIZE).numpy() for item in examples.values()]
    assert any(not any(np.array_equal(image, other) for other in plain) for image in images)


def test_augmentation_draws_anew_every_epoch(dataset):
    # One shard and no shuffling: both epochs see the images in the same order. Seeded random ops
    # inside a per-shard pipeline would replay the same draws each time the shard is opened.
    folder, _ = dataset
    augmented = pipeline.make_dataset(folder, "test", SIZE, 5, training=True, augment=True, seed=7, shuffle_buffer=1,
                                  repeat=2)
    plain = pipeline.make_dataset(folder, "test", SIZE, 5, training=True, seed=7, shuffle_buffer=1, repeat=2)
    first, second = read_all(augmented)[0].reshape(2, 5, -1)
    plain_first, plain_second = read_all(plain)[0].reshape(2, 5, -1)
    np.testing.assert_array_equal(plain_first, plain_second)  # same order, same images
    assert not np.array_equal(first, second)
    assert all(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("split, pipelines", [("train", 2), ("test", 2), ("val", 3)])
def test_input_pipelines_together_cover_every_example_once(dataset, split, pipelines):
    # train: 4 shards, divided by file; test: 1 shard and val: 2 shards < 3 pipelines, by record.
    folder, examples = dataset
    seen = []
    for pipeline_id in range(pipelines):
        context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=pipelines)
        found = identities(read_all(eval_dataset(folder, split, batch_size=2, input_context=context))[0])
        assert found
        seen += found
    assert sorted(seen) == split_ids(examples, split)


def test_gcs_and_local_copies_yield_the_same_examples(dataset, gcs_bucket):
    folder, examples = dataset
    remote = storage.join(gcs_bucket, "data")
    folders.copy_tree(folder, remote)
    assert not storage.tensorflow_can_read(remote)  # the emulator is reached through fsspec
    for split in ("train", "val"):
        local_images, local_labels, _ = read_all(eval_dataset(folder, split))
        remote_images, remote_labels, _ = read_all(eval_dataset(storage.join(remote, "dataset.json"), split))
        np.testing.assert_array_equal(local_images, remote_images)
        np.testing.assert_array_equal(local_labels, remote_labels)
    training = pipeline.make_dataset(remote, "train", SIZE, 8, training=True, seed=3)
    images, labels, sizes = read_all(training.take(3))
    assert sizes == [8, 8, 8]
    assert [examples[i]["label"] for i in identities(images)] == labels.tolist()


# --- damaged data ----------------------------------------------------------------------------------


@pytest.fixture(params=["local", "gcs"])
def flipped(request, dataset, tmp_path):
    """A copy with record 1 of train-00002 flipped, read by TensorFlow (local) or fsspec (gcs)."""
    folder = copy_dataset(dataset, tmp_path)
    flip_byte(os.path.join(folder, "train-00002-of-00004.tfrecord"), 1)
    if request.param == "gcs":
        bucket = request.getfixturevalue("gcs_bucket")
        folders.copy_tree(folder, storage.join(bucket, "data"))
        folder = storage.join(bucket, "data")
    return folder


def test_flipped_shard_fails_naming_the_shard(flipped):
    shard = storage.join(flipped, "train-00002-of-00004.tfrecord")
    with pytest.raises(tf.errors.OpError, match=f"shard {shard} record 1 .* data checksum mismatch"):
        read_all(eval_dataset(flipped, "train"))
    with pytest.raises(UserError, match=f"^shard {shard} record 1 .* --skip_corrupt_shards"):
        with pipeline.translate_errors():
            read_all(eval_dataset(flipped, "train"))


def test_flipped_shard_is_skipped_and_counted_on_request(dataset, flipped):
    _, examples = dataset
    shard = storage.join(flipped, "train-00002-of-00004.tfrecord")
    damage = records_lib.DamageReport()
    pixels, _, _ = read_all(eval_dataset(flipped, "train", skip_corrupt_shards=True, damage=damage))
    lost = {i for i, item in examples.items()
            if item["shard"] == "train-00002-of-00004.tfrecord" and item["index"] >= 1}
    assert sorted(identities(pixels)) == sorted(set(split_ids(examples, "train")) - lost)
    [entry] = [entry for entry in damage.skipped() if entry["shard"] == shard]
    assert entry["records"] == len(lost)
    assert "data checksum mismatch" in entry["problems"][0]


def test_flipped_shard_fails_naming_the_shard_in_training_too(flipped):
    # Training shuffles examples before the per-batch check: the damage is still named exactly.
    # The shard ends at the flipped record, so 17 examples arrive: batches of 18 leave only a
    # partial batch, which training drops, but only after checking it.
    shard = storage.join(flipped, "train-00002-of-00004.tfrecord")
    with pytest.raises(UserError, match=f"^shard {shard} record 1 .* data checksum mismatch"):
        with pipeline.translate_errors():
            read_all(pipeline.make_dataset(flipped, "train", SIZE, 18, training=True, seed=4, repeat=1))


def test_shard_truncated_at_a_record_boundary_fails_on_the_manifest(dataset, tmp_path):
    folder = copy_dataset(dataset, tmp_path)
    path = os.path.join(folder, "val-00001-of-00002.tfrecord")
    last, _ = record_offsets(path)[-1]
    os.truncate(path, last)
    with pytest.raises(UserError, match=f"shard {path} is {last} bytes but .* says"):
        eval_dataset(folder, "val")
    assert read_all(eval_dataset(folder, "test"))[0].shape[0] == 5  # other splits still read


def test_undecodable_image_fails_naming_the_file_and_is_never_blank(tmp_path):
    folder = str(tmp_path / "broken")
    examples = write_dataset(folder, broken_image=22, wrong_label=29)  # val 20-26, test 27-31
    name = examples[22]["filename"]
    with pytest.raises(UserError, match=f"image '{name}' .* does not decode"):
        with pipeline.translate_errors():
            read_all(eval_dataset(folder, "val", batch_size=1))
    damage = records_lib.DamageReport()
    pixels, _, _ = read_all(eval_dataset(folder, "val", skip_corrupt_shards=True, damage=damage))
    assert sorted(identities(pixels)) == sorted(set(split_ids(examples, "val")) - {22})
    assert pixels.reshape(len(pixels), -1).max(axis=1).min() > 0  # no blank image
    assert [entry["records"] for entry in damage.skipped()] == [1]
    assert name in damage.skipped()[0]["problems"][0]

    # A label outside the classes would only fail later, in the loss: it is named here instead.
    with pytest.raises(UserError, match=f"{examples[29]['filename']} .* has label \\[7\\], not one of 0..1"):
        with pipeline.translate_errors():
            read_all(eval_dataset(folder, "test"))
    images, _, _ = read_all(eval_dataset(folder, "test", skip_corrupt_shards=True))
    assert sorted(identities(images)) == [27, 28, 30, 31]


def test_bad_manifests_and_shards_are_one_line_user_errors(dataset, tmp_path):
    folder = copy_dataset(dataset, tmp_path)
    manifest_path = os.path.join(folder, "dataset.json")
    with open(manifest_path) as handle:
        manifest = json.load(handle)

    with pytest.raises(UserError, match="no dataset manifest at .*nowhere"):
        eval_dataset(str(tmp_path / "nowhere"), "val")
    write_json(manifest_path, {**manifest, "splits": {"train": manifest["splits"]["train"]}})
    with pytest.raises(UserError, match="has no split 'val' .*it has: train"):
        eval_dataset(folder, "val")
    write_json(manifest_path, {**manifest, "splits": {"val": {"count": 0, "shards": []}}})
    with pytest.raises(UserError, match="split 'val' .* has no examples"):
        eval_dataset(folder, "val")
    for content, message in [("not json {", "is not JSON"),
                             (json.dumps({"kind": "something-else"}), "not a trainer dataset"),
                             (json.dumps([1, 2]), "not a trainer dataset"),
                             (json.dumps({**manifest, "schema_version": 99}), "schema_version 99")]:
        with open(manifest_path, "w") as handle:
            handle.write(content)
        with pytest.raises(UserError, match=message) as raised:
            eval_dataset(folder, "train")
        assert "\n" not in str(raised.value)

    write_json(manifest_path, manifest)
    os.remove(os.path.join(folder, "train-00003-of-00004.tfrecord"))
    with pytest.raises(UserError, match="missing shard .*train-00003-of-00004.tfrecord"):
        eval_dataset(folder, "train")


def gradient_jpeg(width, height):
    """A smooth RGB JPEG (gradients), so scaled and full decodes can be compared pixel by pixel."""
    pixels = np.zeros([height, width, 3], np.uint8)
    pixels[..., 0] = (np.arange(width)[None, :] * 255 // width).astype(np.uint8)
    pixels[..., 1] = (np.arange(height)[:, None] * 255 // height).astype(np.uint8)
    pixels[..., 2] = 128
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_decode_image_scales_large_jpegs_while_decoding_and_small_ones_exactly():
    def full_decode(encoded, size):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.image.resize(image, [size, size], method="bilinear").numpy()

    # Shorter side below 2 x size, and PNGs: exactly the plain decode.
    for encoded in (gradient_jpeg(40, 30), encode_image(3, "png")):
        np.testing.assert_array_equal(decode_image(encoded, 16).numpy(), full_decode(encoded, 16))
    # 128x96 at 24 px: shorter side 96 = 4 x 24, so the decoder works at 1/4 scale (32x24).
    large = gradient_jpeg(128, 96)
    quarter = tf.image.resize(tf.io.decode_jpeg(large, channels=3, ratio=4), [24, 24]).numpy()
    scaled = decode_image(large, 24).numpy()
    np.testing.assert_array_equal(scaled, quarter)
    assert scaled.shape == (24, 24, 3)
    assert np.abs(scaled - full_decode(large, 24)).mean() < 4.0  # the same picture


def test_max_side_shards_decode_exactly_as_serving_does(tmp_path):
    # Shards prepared with --max_side under 2 x the image size skip choosing a JPEG decode scale:
    # the pixels must still be exactly those of decode_image, which serving uses.
    from trainer.prepare.run import prepare_dataset

    source = tmp_path / "images"
    for split in ("train", "val", "test"):
        for name in ("cats", "dogs"):
            folder = source / split / name
            folder.mkdir(parents=True)
            for i, (width, height) in enumerate([(120, 90), (90, 120), (50, 40)]):
                (folder / f"{i}.jpg").write_bytes(gradient_jpeg(width + i, height))
    output = str(tmp_path / "shards")
    prepare_dataset(str(source), output, layout="split_dirs", num_shards=1, max_side=60, workers=1)
    location = manifest.manifest_location(output)
    dataset_manifest = manifest.load_manifest(location)
    size = 40
    assert dataset_manifest["max_side"] == 60 < 2 * size
    images, _, _ = read_all(pipeline.make_dataset(output, "train", size, 4, training=False), size)
    [(shard, _, _)] = manifest.list_shards(dataset_manifest, "train", location)
    encoded = [tf.train.Example.FromString(record.numpy()).features.feature["image/encoded"].bytes_list.value[0]
               for record in tf.data.TFRecordDataset(shard)]
    assert max(max(Image.open(io.BytesIO(item)).size) for item in encoded) == 60  # resized ones included
    np.testing.assert_array_equal(images, np.stack([decode_image(item, size).numpy() for item in encoded]))
