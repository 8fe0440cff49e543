"""`trainer prepare` at scale: shards as units of work, the local and Beam runners, resume.

The Beam runs use Apache Beam's DirectRunner (in this process or in the command's); the gs://
ones go to the fake-gcs-server of the fixtures.
"""

import json
import os
import signal
import subprocess
import sys
import time

import helpers
import pytest
import tensorflow as tf
from helpers import DATASET_FILES, run_trainer
from test_prepare import assert_one_line_error

from trainer.errors import RetryableError
from trainer.formats import tfrecord
from trainer.infra import folders, storage
from trainer.infra.beam import options as beam_options
from trainer.prepare import run as prepare
from trainer.prepare import shards

# What differs between two runs that wrote the same dataset.
VOLATILE = ("created", "seconds")


def comparable(manifest):
    return {key: value for key, value in manifest.items() if key not in VOLATILE}


def shard_bytes(output):
    manifest = storage.read_json(storage.join(output, "dataset.json"))
    return {shard["file"]: storage.read_bytes(storage.join(output, shard["file"]))
            for split in manifest["splits"].values() for shard in split["shards"]}


def write_source(root, per_class=12, size=(40, 30)):
    helpers.write_images(str(root), "class_dirs", per_class=per_class, size=size, fmt=("jpeg", "png", "cmyk"))
    helpers.write_bad_files(str(root), "dogs", kinds=("truncated_jpeg", "not_image"))


def test_records_are_tensorflows_deterministic_serialization(tmp_path):
    features = {"image/encoded": b"\x00\xffbytes" * 50, "image/format": b"jpeg", "image/class/label": 3,
                "image/class/text": "chat noir é".encode(), "image/filename": b"", "image/height": 2**40,
                "image/width": -1}
    expected = tf.train.Example(features=tf.train.Features(feature={
        key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value])) if isinstance(value, bytes)
        else tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        for key, value in features.items()})).SerializeToString(deterministic=True)
    assert tfrecord.encode_example(features) == expected

    path = tmp_path / "one.tfrecord"
    path.write_bytes(tfrecord.frame(expected) + tfrecord.frame(b""))
    assert [record.numpy() for record in tf.data.TFRecordDataset(str(path))] == [expected, b""]


def test_local_and_beam_runners_in_separate_processes_write_identical_datasets(tmp_path):
    source = tmp_path / "photos"
    write_source(source)
    outputs = {}
    for name, arguments, seed in (("local", ["--workers=2"], "1"), ("beam", ["--runner=DirectRunner"], "2")):
        outputs[name] = str(tmp_path / name)
        result = run_trainer("prepare", f"--source={source}", f"--output={outputs[name]}", "--num_shards=3",
                             *arguments, env={"PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr[-3000:]
    in_process = prepare.prepare_dataset(str(source), str(tmp_path / "inline"), num_shards=3, workers=1)

    local = storage.read_json(storage.join(outputs["local"], "dataset.json"))
    beam = storage.read_json(storage.join(outputs["beam"], "dataset.json"))
    assert comparable(local) == comparable(beam) == comparable(in_process)
    assert len(local["skipped"]) == 2 and sum(split["count"] for split in local["splits"].values()) == 24
    assert shard_bytes(outputs["local"]) == shard_bytes(outputs["beam"]) == shard_bytes(str(tmp_path / "inline"))
    for picture in DATASET_FILES[1:]:  # the look at the data is the same picture too
        assert len({open(os.path.join(output, picture), "rb").read()
                    for output in (*outputs.values(), str(tmp_path / "inline"))}) == 1, picture
    for output in (*outputs.values(), str(tmp_path / "inline")):
        assert not os.path.exists(os.path.join(output, shards.STATE_FOLDER))  # cleaned up once finished


def test_beam_direct_runner_gcs_to_gcs(gcs_bucket, tmp_path):
    source, output = f"{gcs_bucket}/photos", f"{gcs_bucket}/datasets/pets"
    write_source(source, per_class=6)
    local = prepare.prepare_dataset(source, str(tmp_path / "local"), num_shards=2, workers=1)

    beam = prepare.prepare_dataset(source, output, num_shards=2, runner="DirectRunner")

    assert comparable(beam) == comparable(local)
    assert shard_bytes(output) == shard_bytes(str(tmp_path / "local"))
    assert not storage.exists(storage.join(output, shards.STATE_FOLDER, shards.PLAN_NAME))


def _reports(output):
    folder = os.path.join(output, shards.STATE_FOLDER)
    return [name for name in os.listdir(folder) if name.endswith(".json")] if os.path.isdir(folder) else []


def _kill_after(arguments, output, reports):
    """Starts `trainer prepare`, and SIGKILLs it once `reports` shards have committed (the plan is
    written for 0). SIGSTOP first, at once: a shard takes far longer than one poll."""
    process = subprocess.Popen([sys.executable, "-m", "trainer.cli", "prepare", *arguments],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plan = os.path.join(output, shards.STATE_FOLDER, shards.PLAN_NAME)
    while process.poll() is None and not (os.path.exists(plan) and len(_reports(output)) >= reports):
        time.sleep(0.001)
    process.send_signal(signal.SIGSTOP)
    process.kill()
    process.wait()
    assert not os.path.exists(os.path.join(output, "dataset.json")), "the run finished before the kill"


@pytest.mark.parametrize("reports", [0, 4])
def test_rerun_after_sigkill_writes_only_what_is_missing(reports, tmp_path):
    source, reference = tmp_path / "photos", tmp_path / "reference"
    # PNGs are re-encoded: each shard takes long enough to be caught part-way.
    helpers.write_images(str(source), "class_dirs", per_class=30, size=(320, 240), fmt="png")
    arguments = [f"--source={source}", "--num_shards=4", "--workers=1"]
    expected = prepare.prepare_dataset(str(source), str(reference), num_shards=4, workers=1)
    output = str(tmp_path / "data")

    _kill_after([*arguments, f"--output={output}"], output, reports)
    committed = {name[:-len(".json")]: os.stat(os.path.join(output, name[:-len(".json")])).st_mtime_ns
                 for name in _reports(output)}
    assert len(committed) >= reports

    result = run_trainer("prepare", *arguments, f"--output={output}")

    assert result.returncode == 0, result.stderr[-3000:]
    if committed:
        assert f"resuming: {len(committed)} of 12 shards already written" in result.stderr
    assert comparable(storage.read_json(os.path.join(output, "dataset.json"))) == comparable(expected)
    assert shard_bytes(output) == shard_bytes(str(reference))
    for name, written in committed.items():  # committed shards were kept, not written again
        assert os.stat(os.path.join(output, name)).st_mtime_ns == written
    assert sorted(os.listdir(output)) == sorted([*DATASET_FILES, *shard_bytes(output)])  # nothing left over


def test_resume_on_gcs_rewrites_only_uncommitted_or_damaged_shards(gcs_bucket, tmp_path, monkeypatch):
    source, output, reference = tmp_path / "photos", f"{gcs_bucket}/data", str(tmp_path / "reference")
    helpers.write_images(str(source), "class_dirs", per_class=10, size=(24, 18))
    expected = prepare.prepare_dataset(str(source), reference, num_shards=3, workers=1)
    write_shard, written = shards.write_shard, []

    def killed_after_four(*job):
        if len(written) == 4:
            raise KeyboardInterrupt  # as a kill between two shards leaves it
        report = write_shard(*job)
        written.append(report["file"])
        return report

    monkeypatch.setattr(shards, "write_shard", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(str(source), output, num_shards=3, workers=1)
    first = list(written)
    # A shard without its report (killed between the two), a shard cut short under its report, and
    # a shard and report of an earlier plan (other shard counts).
    storage.remove(shards.state_location(output, first[0] + ".json"))
    storage.write_bytes(storage.join(output, first[1]), storage.read_bytes(storage.join(output, first[1]))[:-9])
    storage.write_bytes(storage.join(output, "train-00000-of-00007.tfrecord"), b"old")
    storage.write_json(shards.state_location(output, "train-00000-of-00007.tfrecord.json"), {"plan": "old"})

    written.clear()
    monkeypatch.setattr(shards, "write_shard", lambda *job: written.append(job) or write_shard(*job))
    again = prepare.prepare_dataset(str(source), output, num_shards=3, workers=1)

    total = sum(len(split["shards"]) for split in expected["splits"].values())
    assert len(first) == 4 and len(written) == total - 2  # all but the two intact committed shards
    assert comparable(again) == comparable(expected)
    assert shard_bytes(output) == shard_bytes(reference)
    assert sorted(name for name, _ in folders.list_files(output)) == sorted([*DATASET_FILES, *shard_bytes(output)])


def test_bad_input_through_beam_is_the_same_one_line_error(tmp_path):
    missing = run_trainer("prepare", f"--source={tmp_path / 'nowhere'}", f"--output={tmp_path / 'data'}",
                          "--runner=DirectRunner")
    assert_one_line_error(missing, "source not found")
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "dogs").mkdir()
    for name in ("cats/a.jpg", "dogs/b.jpg"):
        (tmp_path / "photos" / name).write_bytes(b"not an image")
    unusable = run_trainer("prepare", f"--source={tmp_path / 'photos'}", f"--output={tmp_path / 'data'}",
                           "--runner=DirectRunner")
    assert_one_line_error(unusable, "nothing usable")  # found by the shards' reports, after the pipeline
    assert os.listdir(tmp_path / "data") == []
    for arguments, message in ((["--runner=DirectRunner", "--", "--no_such_option=1"],
                                "unknown Beam pipeline option --no_such_option"),
                               (["--", "--project=p"], "are for a Beam --runner, not --runner=local"),
                               (["--runner=NoSuchRunner"], "NoSuchRunner")):
        result = run_trainer("prepare", f"--source={tmp_path / 'photos'}", f"--output={tmp_path / 'data'}",
                             *arguments)
        assert_one_line_error(result, message)


def test_storage_errors_inside_a_beam_pipeline_keep_their_kind_and_message(tmp_path, monkeypatch):
    source = tmp_path / "photos"
    helpers.write_images(str(source), "class_dirs", per_class=3)

    def unreachable(location):
        raise RetryableError(f"storage unreachable at {location}: no answer within 20 s")

    monkeypatch.setattr(shards.storage, "read_bytes", unreachable)
    with pytest.raises(RetryableError) as raised:
        prepare.prepare_dataset(str(source), str(tmp_path / "data"), runner="DirectRunner")
    assert str(raised.value).startswith("storage unreachable at ") and "while running" not in str(raised.value)
    assert str(raised.value).endswith("no answer within 20 s")


def test_readmes_dataflow_commands_have_only_known_flags_and_beam_options():
    """Prepare at scale and Predict at scale (with a GPU worker): our flags, then Beam's options as
    Beam's own parser reads them."""
    import re
    import shlex

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    commands = [block for block in re.findall(r"```[a-z]*\n(.*?)```", readme, re.DOTALL) if "DataflowRunner" in block]
    assert [command.split()[1] for command in commands] == ["prepare", "predict"]
    from trainer import cli

    source = open(cli.__file__).read()
    for command in commands:
        words = shlex.split(command.replace("\\\n", " "))
        ours, beam = words[:words.index("--")], words[words.index("--") + 1:]
        assert ours[0] == "trainer" and "--runner=DataflowRunner" in ours
        defined = source[source.index(f"def define_{ours[1]}_flags"):source.index(f"def run_{ours[1]}")]
        for word in ours[2:]:
            assert f'("{word.lstrip("-").split("=", 1)[0]}"' in defined, word
        options = beam_options("DataflowRunner", beam).get_all_options()
        for name in ("project", "region", "temp_location", "service_account_email", "machine_type",
                     "max_num_workers", "sdk_container_image"):
            assert options[name], name
        if ours[1] == "predict":  # one L4 GPU per worker, its driver installed by Dataflow
            assert options["dataflow_service_options"] == ["worker_accelerator=type:nvidia-l4;count:1;"
                                                           "install-nvidia-driver"]
            assert options["machine_type"].startswith("g2-") and options["sdk_location"] == "container"


# The subprocess reads the manifest through fsspec (the GCS server of the fixtures) and the shards
# through TensorFlow's own gs:// filesystem, as in production (tests/tlsproxy.py reaches the same
# server). It prints, per split, the labels and a digest of the decoded pixels of every example.
NATIVE_READ = r"""
import hashlib, json, sys
import numpy as np
from trainer.data import pipeline
from trainer.infra import storage
import tensorflow as tf
if sys.argv[1].startswith("gs://"):
    assert not storage.tensorflow_can_read(sys.argv[1])  # the emulator is set: fsspec by default
    storage.tensorflow_can_read = lambda location: True  # the production path for these shards
    assert tf.io.gfile.exists(sys.argv[1].rsplit("/", 1)[0] + "/train-00000-of-00002.tfrecord")
out = {}
for split in ("train", "val", "test"):
    rows = []
    for images, labels in pipeline.make_dataset(sys.argv[1], split, 32, 4, training=False):
        for image, label in zip(images.numpy(), labels.numpy()):
            rows.append([int(label), hashlib.sha256(np.round(image, 3).tobytes()).hexdigest()])
    out[split] = rows
print(json.dumps(out))
"""


def test_tensorflows_own_gcs_filesystem_reads_shards_as_local_copies_give_them(gcs_server, gcs_bucket, tmp_path):
    from tlsproxy import TLSProxy

    source, output = tmp_path / "photos", f"{gcs_bucket}/data"
    helpers.write_images(str(source), "class_dirs", per_class=8, size=(40, 30), fmt=("jpeg", "png"))
    prepare.prepare_dataset(str(source), output, num_shards=2, workers=1)
    folders.copy_tree(output, str(tmp_path / "local"))
    results = {}
    with TLSProxy(int(gcs_server.rsplit(":", 1)[1]), str(tmp_path)) as proxy:
        for name, manifest, env in (("native", f"{output}/dataset.json", proxy.environment()),
                                    ("local", str(tmp_path / "local" / "dataset.json"), {})):
            result = subprocess.run([sys.executable, "-c", NATIVE_READ, manifest], capture_output=True, text=True,
                                    env={**os.environ, **env}, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            results[name] = json.loads(result.stdout.strip().splitlines()[-1])
        tunnels = list(proxy.tunnels)

    assert results["native"] == results["local"]
    assert sum(len(rows) for rows in results["local"].values()) == 16
    assert "storage.googleapis.com" in tunnels  # TensorFlow's reads went through its own client
