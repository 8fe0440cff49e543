"""Unit tests of train.py's pieces, and the preset flagfiles."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest

from trainer import config as config_lib
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.formats import jobdir
from trainer.infra import folders, storage
from trainer.train import featurecache
from trainer.train import run as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**overrides):
    return dataclasses.replace(TrainConfig(data="d", job_dir="j"), **overrides)


def test_defaults_are_the_seed_recipe():
    seed = TrainConfig(data="d", job_dir="j")
    assert (seed.backbone, seed.image_size, seed.batch_size, seed.epochs, seed.learning_rate) == (
        "vgg16", 150, 64, 10, 1e-5)
    assert (seed.head, seed.dense_units, seed.dropout, seed.augment) == ("flatten", 256, 0.5, False)


def test_per_replica_batch_and_steps():
    assert train.derive_batches(64, 2, 17500) == (32, 273)
    assert train.derive_batches(64, 8, 17500, steps_cap=10) == (8, 10)


def test_batch_not_divisible_by_replicas_is_a_user_error():
    with pytest.raises(UserError, match="not divisible by the 3 replicas"):
        train.derive_batches(64, 3, 1000)


def test_batch_larger_than_train_split_is_a_user_error():
    with pytest.raises(UserError, match="exceeds the 10 training examples"):
        train.derive_batches(64, 1, 10)


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 0}, "batch_size"),
    ({"epochs": 0, "fine_tune_epochs": 0}, "nothing to train"),
    ({"dropout": 1.0}, "dropout"),
    ({"learning_rate": 0.0}, "--learning_rate must be a positive number"),
    ({"fine_tune_learning_rate": float("nan")}, "--fine_tune_learning_rate must be a positive number"),
    ({"backbone": "tiny", "image_size": 8}, "too small for tiny"),
])
def test_bad_values_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        config_lib.check_config(config(**overrides))


def test_feature_cache_auto_only_when_eligible():
    assert featurecache.use_feature_cache("auto", augment=False, epochs=10)
    assert not featurecache.use_feature_cache("auto", augment=True, epochs=10)
    assert not featurecache.use_feature_cache("off", augment=False, epochs=10)
    assert not featurecache.use_feature_cache("auto", augment=False, epochs=0)
    with pytest.raises(UserError, match="--randaugment change the images"):
        featurecache.use_feature_cache("on", augment=["--augment", "--randaugment"], epochs=10)


@pytest.mark.parametrize("remote_kind", ["local", "gcs"])
def test_backup_commit_writes_index_last_and_drops_stale_files(tmp_path, remote_kind, request):
    root = str(tmp_path / "job") if remote_kind == "local" else request.getfixturevalue("gcs_bucket") + "/b"
    job = jobdir.JobDir(root)
    remote = job.backup_url("head")
    local = tmp_path / "local"
    local.mkdir()
    (local / "ckpt-1.index").write_bytes(b"i1")
    (local / "ckpt-1.data-00000-of-00001").write_bytes(b"d1")
    (local / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    job.commit_backup("head", str(local))
    (local / "ckpt-1.index").unlink()
    (local / "ckpt-1.data-00000-of-00001").unlink()
    (local / "ckpt-2.index").write_bytes(b"i2")
    (local / "ckpt-2.data-00000-of-00001").write_bytes(b"d2")
    (local / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n')
    job.commit_backup("head", str(local))
    assert [name for name, _ in folders.list_files(remote)] == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    restored = tmp_path / "restored"
    assert job.restore_backup("head", str(restored))
    assert (restored / "ckpt-2.data-00000-of-00001").read_bytes() == b"d2"
    assert not job.restore_backup("fine_tune", str(tmp_path / "x"))


def test_a_committed_phase_drops_its_backup_and_the_head_phase_the_feature_cache(tmp_path):
    job = jobdir.JobDir(str(tmp_path / "job"))
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "checkpoint").write_text('model_checkpoint_path: "weights"\n')
    (weights / "weights.index").write_bytes(b"w")
    job.commit_backup("head", str(weights))
    storage.write_text(storage.join(job.features_url("train", 1, 2), "COMPLETE"), "x")
    assert not job.is_phase_complete("head")
    job.commit_phase("head", str(weights))
    assert job.is_phase_complete("head")
    assert not storage.exists(job.backup_url("head")) and not storage.exists(job.path("features"))
    restored = tmp_path / "restored"
    job.restore_phase("head", str(restored))
    assert (restored / "weights.index").read_bytes() == b"w"


PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.flags")))


@pytest.mark.parametrize("preset", PRESETS, ids=os.path.basename)
def test_every_preset_parses_and_validates(preset):
    """Each flagfile parses with the real `trainer train` flags and passes the config checks."""
    script = (
        "import json, sys\n"
        "from absl import flags\n"
        "from trainer import cli, config\n"
        "cli.define_train_flags()\n"
        f"flags.FLAGS(['trainer train', '--flagfile={preset}', '--data=gs://b/d.json', '--job_dir=gs://b/j'])\n"
        "train_config = config.TrainConfig.from_flags(flags.FLAGS)\n"
        "config.check_config(train_config)\n"
        "print(json.dumps(train_config.to_dict()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    values = json.loads(result.stdout.strip().splitlines()[-1])
    if os.path.basename(preset) == "seed_vgg16.flags":
        assert values["backbone"] == "vgg16" and values["weights"] == "imagenet"
        assert (values["image_size"], values["batch_size"], values["epochs"]) == (150, 64, 10)
        assert values["learning_rate"] == 1e-5 and values["fine_tune_epochs"] == 0
    if os.path.basename(preset) == "seed_vgg16_finetune.flags":
        assert values["fine_tune_epochs"] == 2 and values["fine_tune_from"] == "block5_conv1"
        assert values["epochs"] == 10
