"""Bad input to `trainer train` and `trainer evaluate`: one line on stderr, exit 1, no traceback.

Most cases run in this process (`train_in_process`, `assert_fails_as`: the exit status and line
`trainer` gives that error); the subprocess adds only the interpreter's start, and the tests that
need one (CPU replicas, start-up noise, flag parsing) keep it.
"""

import json
import logging
import os

import pytest
from helpers import TINY_JOB, assert_fails_as, prepare_stripes, run_trainer, train_in_process

from trainer.infra import folders, storage


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors")
    prepare_stripes(folder, per_class=20, num_shards=2)
    return folder


def train_args(dataset, tmp_path, *args, data=None):
    data = data or str(dataset / "data" / "dataset.json")
    return [f"--data={data}", f"--job_dir={tmp_path / 'job'}", *TINY_JOB, "--batch_size=8",
            *(args if any(arg.startswith("--epochs") for arg in args) else ("--epochs=1", *args))]


def train(dataset, tmp_path, *args, data=None):
    """`trainer train` in this process; returns what the command line would end with: (exit, line)."""
    return lambda: train_in_process(*train_args(dataset, tmp_path, *args, data=data))


def test_unknown_backbone(dataset, tmp_path):
    assert_fails_as(train(dataset, tmp_path, "--backbone=alexnet"), "alexnet")


def test_batch_not_divisible_by_replicas():
    from trainer.train.state import derive_batches

    assert_fails_as(lambda: derive_batches(9, 2, 100), "--batch_size=9 is not divisible by the 2 replicas")
    assert_fails_as(lambda: derive_batches(64, 1, 40), "--batch_size=64 exceeds the 40 training examples")


def test_missing_manifest(dataset, tmp_path):
    assert_fails_as(train(dataset, tmp_path, data=str(tmp_path / "nowhere" / "dataset.json")), "no dataset manifest")


def test_foreign_manifest(dataset, tmp_path):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"hello": "world"}))
    assert_fails_as(train(dataset, tmp_path, data=str(foreign)), str(foreign))


def test_weights_file_that_does_not_fit_the_backbone(dataset, tmp_path):
    from trainer.train import model

    other = model.build_base("mobilenet_v2", 32, weights=None)
    path = str(tmp_path / "mobilenet.weights.h5")
    other.save_weights(path)
    assert_fails_as(train(dataset, tmp_path, "--backbone=vgg16", f"--weights={path}"), "mobilenet.weights.h5")


def test_split_absent(dataset, tmp_path):
    manifest = storage.read_json(str(dataset / "data" / "dataset.json"))
    del manifest["splits"]["val"]
    del manifest["splits"]["test"]
    damaged = dataset / "data" / "no-test.json"
    storage.write_json(str(damaged), manifest)
    from trainer.evaluate import run as evaluate

    assert_fails_as(lambda: evaluate.run(str(tmp_path / "model"), str(damaged), "test", str(tmp_path / "eval")),
                    "test")


def test_corrupt_shard_found_during_training_names_the_shard(dataset, tmp_path):
    copy = tmp_path / "data"
    folders.copy_tree(str(dataset / "data"), str(copy))
    shard = sorted(name for name in os.listdir(copy) if name.startswith("train-"))[0]
    raw = bytearray((copy / shard).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flip a byte in the middle: same size, bad checksum
    (copy / shard).write_bytes(bytes(raw))
    # Several epochs: the damaged record is certain to be read (an epoch here is 3 batches of 8 from
    # 25 shuffled records, so one epoch alone may never reach it).
    # --shuffle_buffer=1: every pass reads the damaged shard in order (a large buffer drawn from at
    # random could, rarely, not yet emit the example that shows the damage).
    assert_fails_as(train(dataset, tmp_path, "--feature_cache=off", "--epochs=4", "--shuffle_buffer=1",
                          data=str(copy / "dataset.json")), shard)


def test_corrupt_shard_found_while_caching_features_names_the_shard(dataset, tmp_path):
    copy = tmp_path / "data"
    folders.copy_tree(str(dataset / "data"), str(copy))
    shard = sorted(name for name in os.listdir(copy) if name.startswith("train-"))[1]
    raw = bytearray((copy / shard).read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    (copy / shard).write_bytes(bytes(raw))
    assert_fails_as(train(dataset, tmp_path, "--feature_cache=on", data=str(copy / "dataset.json")), shard)


def flip_a_byte(dataset, tmp_path, which, where):
    copy = tmp_path / "data"
    folders.copy_tree(str(dataset / "data"), str(copy))
    shard = sorted(name for name in os.listdir(copy) if name.startswith("train-"))[which]
    raw = bytearray((copy / shard).read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    (copy / shard).write_bytes(bytes(raw))
    return copy, shard


def test_skip_corrupt_shards_with_the_feature_cache_trains_and_records_what_it_skipped(dataset, tmp_path, caplog):
    copy, shard = flip_a_byte(dataset, tmp_path, 1, 1 / 3)
    with caplog.at_level(logging.INFO, logger="absl"):
        train(dataset, tmp_path, "--feature_cache=on", "--skip_corrupt_shards", data=str(copy / "dataset.json"))()
    assert "skipped" in caplog.text and "damaged records" in caplog.text
    history = storage.read_json(str(tmp_path / "job" / "history.json"))
    [entry] = history["skipped_data"]
    assert entry["shard"] == str(copy / shard) and entry["records"] >= 1
    assert "checksum mismatch" in entry["problems"][0]
    assert storage.exists(str(tmp_path / "job" / "DONE"))


def test_feature_cache_on_replicas_with_a_last_batch_smaller_than_the_replicas(dataset, tmp_path):
    """A split whose last batch holds fewer examples than there are replicas: some replica would
    get an empty batch, which the convolution kernels reject."""
    counts = {name: split["count"] for name, split in
              storage.read_json(str(dataset / "data" / "dataset.json"))["splits"].items()}
    assert any(0 < counts[split] % 8 < 4 for split in ("train", "val")), counts  # the case under test
    # Its own process: CPU replicas are set before TensorFlow starts.
    result = run_trainer("train", *train_args(dataset, tmp_path, "--cpu_replicas=4", "--feature_cache=on"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"feature cache: worker 0 of 1: train: {counts['train']} examples" in result.stderr
    assert f"feature cache: worker 0 of 1: val: {counts['val']} examples" in result.stderr


def test_a_misspelt_fine_tune_from_fails_before_the_head_phase(dataset, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="absl"):
        assert_fails_as(train(dataset, tmp_path, "--epochs=5", "--fine_tune_epochs=1", "--fine_tune_from=blok2_conv1"),
                        "--fine_tune_from: no layer 'blok2_conv1'", "did you mean: block2_conv1")
    assert "epoch 1 done" not in caplog.text and not (tmp_path / "job" / "history.json").exists()  # nothing trained


def test_tensorflow_start_up_noise_is_silenced_and_verbosity_brings_it_back(tmp_path):
    import re

    from trainer.infra import tfstart

    args = ["train", f"--data={tmp_path / 'none' / 'dataset.json'}", f"--job_dir={tmp_path / 'job'}"]
    quiet = run_trainer(*args)
    assert quiet.returncode == 1
    assert not tfstart.TENSORFLOW_START_NOISE.search(quiet.stderr), quiet.stderr
    assert re.search(r"^error: no dataset manifest", quiet.stderr, re.M), quiet.stderr
    loud = run_trainer(*args, "--verbosity=1")
    assert loud.returncode == 1
    assert len(loud.stderr.splitlines()) > len(quiet.stderr.splitlines())


def test_a_missing_flagfile_is_named_plainly(tmp_path):
    result = run_trainer("train", f"--flagfile={tmp_path / 'nope.flags'}")
    assert result.returncode == 1
    assert result.stderr.strip() == f"trainer train: error: cannot read --flagfile: [Errno 2] No such file or " \
                                    f"directory: '{tmp_path / 'nope.flags'}'"
