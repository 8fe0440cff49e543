"""Two real workers on loopback under MultiWorkerMirroredStrategy (TF_CONFIG and the Kubernetes
Indexed Job environment), and a worker lost mid-run.

The first test is also the guard for the Keras choice (docs/architecture.md): if an upgrade breaks
`fit` under MultiWorkerMirroredStrategy, it fails here.
"""

import json
import signal

import pytest
from helpers import TINY_JOB, fingerprints, free_ports, optimizer_steps, prepare_stripes, start_trainer, wait_until

from trainer.errors import EXIT_RETRYABLE
from trainer.infra import folders, storage

BATCH = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = prepare_stripes(tmp_path_factory.mktemp("mw-data"), per_class=40, num_shards=4)
    return {"url": url, "steps": storage.read_json(url)["splits"]["train"]["count"] // BATCH}


def worker_args(dataset, job_dir, *extra):
    return ["train", f"--data={dataset['url']}", f"--job_dir={job_dir}", *TINY_JOB, "--strategy=multi_worker",
            f"--batch_size={BATCH}", "--learning_rate=1e-3", "--backup_every_steps=2", *extra]


def tf_config_env(ports, index, tmp_path):
    cluster = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
               "task": {"type": "worker", "index": index}}
    return {"TF_CONFIG": json.dumps(cluster), "TMPDIR": str(make_dir(tmp_path / f"tmp-{index}"))}


def indexed_job_env(ports, index, tmp_path):
    return {"JOB_COMPLETION_INDEX": str(index), "TRAINER_WORKER_HOSTS": ",".join(f"127.0.0.1:{p}" for p in ports),
            "TMPDIR": str(make_dir(tmp_path / f"tmp-{index}"))}


def make_dir(path):
    path.mkdir(exist_ok=True)
    return path


def run_workers(args, envs, tmp_path, name):
    logs = [tmp_path / f"{name}-{i}.log" for i in range(len(envs))]
    processes = [start_trainer(args, env=env, log_path=log) for env, log in zip(envs, logs, strict=True)]
    codes = [process.wait(timeout=900) for process in processes]
    return codes, [log.read_text() for log in logs]


def test_keras_fits_under_multi_worker_mirrored_strategy(dataset, gcs_bucket, tmp_path):
    job_dir = f"{gcs_bucket}/job"
    ports = free_ports(2)
    # With the modern recipe's knobs: class weights, AdamW on a cosine schedule, early stopping (each
    # new best epoch saved by both workers, committed by the chief).
    args = worker_args(dataset, job_dir, "--epochs=2", "--fine_tune_epochs=1", "--fine_tune_from=block2_conv1",
                       "--class_weight=balanced", "--optimizer=adamw", "--weight_decay=0.01", "--lr_schedule=cosine",
                       "--early_stopping_patience=5")
    codes, logs = run_workers(args, [tf_config_env(ports, i, tmp_path) for i in range(2)], tmp_path, "w")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    # Both workers end with the same weights after each phase, at the same step.
    assert fingerprints(logs[0]) == fingerprints(logs[1]) and set(fingerprints(logs[0])) == {"head", "fine_tune"}
    assert optimizer_steps(logs[0]) == {"head": 2 * dataset["steps"], "fine_tune": dataset["steps"]}
    assert "2 workers, 2 replicas in sync; global batch 8 = 4 per replica" in logs[0]
    # The chief exported once; the other worker left nothing in job_dir.
    files = [name for name, _ in folders.list_files(job_dir)]
    assert "model/saved_model.pb" in files and "DONE" in files
    assert not [name for name in files if "worker" in name or "tmp" in name.lower()], files


def test_indexed_job_environment_trains_two_workers(dataset, tmp_path):
    job_dir = str(tmp_path / "job")
    ports = free_ports(2)
    codes, logs = run_workers(worker_args(dataset, job_dir, "--epochs=1"),
                              [indexed_job_env(ports, i, tmp_path) for i in range(2)], tmp_path, "ij")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert fingerprints(logs[0]) == fingerprints(logs[1])
    assert "task worker-1" in logs[1]


def vertex_env(ports, index, tmp_path, base):
    """What Vertex AI custom training gives each machine: TF_CONFIG whose first pool is "chief"
    (cloud.google.com/vertex-ai/docs/training/distributed-training), and the AIP_* folders."""
    task = {"type": "chief", "index": 0} if index == 0 else {"type": "worker", "index": index - 1}
    tf_config = {"cluster": {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{p}" for p in ports[1:]]},
                 "task": {**task, "trial": ""}, "environment": "cloud", "job": {"worker_pool_specs": []}}
    return {"TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(make_dir(tmp_path / f"tmp-{index}")),
            "AIP_CHECKPOINT_DIR": f"{base}/checkpoints", "AIP_MODEL_DIR": f"{base}/model",
            "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs"}


def test_vertex_chief_and_worker_train_with_the_vertex_folders(dataset, gcs_bucket, tmp_path):
    base = f"{gcs_bucket}/vertex"
    ports = free_ports(2)
    args = [arg for arg in worker_args(dataset, "unused", "--epochs=1") if not arg.startswith("--job_dir")]
    codes, logs = run_workers(args, [vertex_env(ports, i, tmp_path, base) for i in range(2)], tmp_path, "vx")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert fingerprints(logs[0]) == fingerprints(logs[1])
    assert "task chief-0" in logs[0] and "task worker-0" in logs[1]
    job_dir = f"{base}/checkpoints"  # --job_dir defaults to AIP_CHECKPOINT_DIR
    assert storage.exists(f"{job_dir}/DONE")
    # The chief's export, copied where Vertex looks for it, and the event files for Vertex TensorBoard.
    exported = dict(folders.list_files(f"{job_dir}/model"))
    assert dict(folders.list_files(f"{base}/model")) == exported and "saved_model.pb" in exported
    assert any(name.startswith("head/") for name, _ in folders.list_files(f"{base}/logs"))


def test_lost_worker_then_restart_of_both_completes(dataset, gcs_bucket, tmp_path):
    job_dir = f"{gcs_bucket}/job"
    ports = free_ports(2)
    epochs = 6
    args = worker_args(dataset, job_dir, f"--epochs={epochs}", "--peer_timeout_seconds=10")
    envs = [tf_config_env(ports, i, tmp_path) for i in range(2)]
    logs = [tmp_path / f"first-{i}.log" for i in range(2)]
    chief, other = (start_trainer(args, env=env, log_path=log) for env, log in zip(envs, logs, strict=True))
    committed = storage.join(job_dir, "backup", "head", "checkpoint")
    assert wait_until(lambda: storage.exists(committed) or chief.poll() is not None, timeout=600)
    assert chief.poll() is None, logs[0].read_text()[-3000:]
    # Frozen, not killed: no connection is reset, as when a node drops off the network. Only the
    # coordination service's heartbeats (distribute.watch_peers) can tell the survivor.
    other.send_signal(signal.SIGSTOP)
    try:
        code = chief.wait(timeout=300)
    finally:
        other.send_signal(signal.SIGKILL)  # a frozen process is not left behind, whatever happened
        other.wait()
    # The survivor must not hang: the peer is declared lost and it exits with the retryable code.
    assert code == EXIT_RETRYABLE, logs[0].read_text()[-3000:]
    assert "lost contact with a peer worker" in logs[0].read_text()
    # Restart both (what the JobSet does): training completes at the exact step count.
    ports = free_ports(2)
    args = worker_args(dataset, job_dir, f"--epochs={epochs}", "--peer_timeout_seconds=30")
    codes, texts = run_workers(args, [tf_config_env(ports, i, tmp_path) for i in range(2)], tmp_path, "again")
    assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    assert optimizer_steps(texts[0]) == {"head": epochs * dataset["steps"]}
    assert fingerprints(texts[0]) == fingerprints(texts[1])


# ---- The frozen-feature cache across workers ----------------------------------------------------

def part_files(job_dir, split):
    """{worker: (features, labels)} of every committed part of a split's feature cache."""
    import io

    import numpy as np

    parts = {}
    for name, _ in folders.list_files(f"{job_dir}/features/{split}"):
        if name.endswith("/COMPLETE"):
            folder = name.rsplit("/", 1)[0]
            worker = int(folder.split("-")[1])
            parts[worker] = tuple(np.load(io.BytesIO(storage.read_bytes(f"{job_dir}/features/{split}/{folder}/{f}")))
                                  for f in ("features.npy", "labels.npy"))
    return parts


def start_workers(args, envs, tmp_path, name):
    logs = [tmp_path / f"{name}-{i}.log" for i in range(len(envs))]
    return [start_trainer(args, env=env, log_path=log) for env, log in zip(envs, logs, strict=True)], logs


def test_feature_cache_across_two_workers_holds_every_example_once_and_resumes(dataset, gcs_bucket, tmp_path):
    job_dir, epochs = f"{gcs_bucket}/job", 4
    args = worker_args(dataset, job_dir, f"--epochs={epochs}", "--feature_cache=on", "--backup_every_steps=1",
                       "--peer_timeout_seconds=30", "--class_weight=balanced")
    ports = free_ports(2)
    processes, logs = start_workers(args, [tf_config_env(ports, i, tmp_path) for i in range(2)], tmp_path, "first")
    # The head phase has taken a step (both workers committed their parts first): stop both there.
    committed = storage.join(job_dir, "backup", "head", "checkpoint")
    assert wait_until(lambda: storage.exists(committed) or processes[0].poll() is not None, timeout=600)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait()
    text = [log.read_text() for log in logs]
    assert "feature cache: worker 0 of 2: train:" in text[0] and "feature cache: worker 1 of 2: train:" in text[1]

    # Every training example is in exactly one worker's part: the counts add up to the split, per
    # class too, and no row repeats (each image has its own features).
    import numpy as np

    manifest = storage.read_json(dataset["url"])
    for split in ("train", "val"):
        parts = part_files(job_dir, split)
        assert sorted(parts) == [0, 1]
        features = np.concatenate([parts[w][0] for w in (0, 1)])
        labels = np.concatenate([parts[w][1] for w in (0, 1)])
        assert len(labels) == manifest["splits"][split]["count"]
        counts = np.bincount(labels, minlength=len(manifest["classes"]))
        assert dict(zip(manifest["classes"], counts.tolist(), strict=True)) == manifest["splits"][split]["class_counts"]
        assert len(np.unique(features.reshape(len(features), -1), axis=0)) == len(features)

    # Restarted (new ports, empty scratch): both reuse their committed parts, none is recomputed,
    # and training ends at the step count of an uninterrupted run, with the same weights on both.
    ports = free_ports(2)
    envs = [{**tf_config_env(ports, i, tmp_path), "TMPDIR": str(make_dir(tmp_path / f"again-{i}"))} for i in range(2)]
    codes, texts = run_workers(args, envs, tmp_path, "again")
    assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    for worker in (0, 1):
        assert f"feature cache: worker {worker} of 2: train: reusing" in texts[worker]
        assert f"feature cache: worker {worker} of 2: val: reusing" in texts[worker]
    assert "resuming from the backup" in texts[0]
    assert optimizer_steps(texts[0]) == optimizer_steps(texts[1]) == {"head": epochs * dataset["steps"]}
    assert fingerprints(texts[0]) == fingerprints(texts[1])
    # Only the chief wrote shared files; the parts went with the completed head phase.
    files = [name for name, _ in folders.list_files(job_dir)]
    assert "DONE" in files and not [name for name in files if name.startswith("features/")]


def test_feature_cache_killed_during_extraction_completes_with_the_exact_step_count(dataset, tmp_path):
    job_dir, epochs = str(tmp_path / "job"), 3
    args = worker_args(dataset, job_dir, f"--epochs={epochs}", "--feature_cache=on", "--peer_timeout_seconds=30")
    ports = free_ports(2)
    processes, _ = start_workers(args, [tf_config_env(ports, i, tmp_path) for i in range(2)], tmp_path, "first")
    first_part = f"{job_dir}/features/train/part-0-of-2/COMPLETE"
    assert wait_until(lambda: storage.exists(first_part) or processes[0].poll() is not None, timeout=600)
    for process in processes:  # a node lost while the cache is being built
        process.send_signal(signal.SIGKILL)
        process.wait()
    # Worker 1 always recomputes (whether or not it got as far), worker 0 reuses its part: the
    # workers then run different numbers of batches through the base (the tiny base has BatchNorm),
    # which must not desynchronise them.
    storage.remove(f"{job_dir}/features/train/part-1-of-2", recursive=True)
    ports = free_ports(2)
    envs = [{**tf_config_env(ports, i, tmp_path), "TMPDIR": str(make_dir(tmp_path / f"again-{i}"))} for i in range(2)]
    codes, texts = run_workers(args, envs, tmp_path, "again")
    assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    assert "feature cache: worker 0 of 2: train: reusing" in texts[0]  # committed before the kill
    assert optimizer_steps(texts[0]) == {"head": epochs * dataset["steps"]}
    assert fingerprints(texts[0]) == fingerprints(texts[1])


def test_one_worker_and_two_workers_train_the_same_recipe_equally(dataset, tmp_path):
    """Same dataset and flags, cache on: one machine with 2 replicas and two 1-replica workers make
    the same number of optimizer steps and reach models of equal quality (noise aside)."""
    from helpers import run_trainer

    epochs = 8
    flags = ["--data=" + dataset["url"], *TINY_JOB, f"--batch_size={BATCH}", "--learning_rate=1e-3",
             f"--epochs={epochs}", "--feature_cache=on"]
    one = run_trainer("train", f"--job_dir={tmp_path / 'one'}", "--cpu_replicas=2", *flags, check=True)
    ports = free_ports(2)
    codes, texts = run_workers(["train", f"--job_dir={tmp_path / 'two'}", "--strategy=multi_worker", *flags],
                               [tf_config_env(ports, i, tmp_path) for i in range(2)], tmp_path, "two")
    assert codes == [0, 0], texts[0][-3000:]
    assert optimizer_steps(one.stderr) == optimizer_steps(texts[0]) == {"head": epochs * dataset["steps"]}
    curves = [storage.read_json(str(tmp_path / name / "history.json"))["phases"][0]["epochs"]
              for name in ("one", "two")]
    for curve in curves:  # both learn: the validation loss falls well below where it started
        assert curve[-1]["val_loss"] < 0.8 * curve[0]["val_loss"], curve
    assert abs(curves[0][-1]["val_accuracy"] - curves[1][-1]["val_accuracy"]) <= 0.2, curves
    assert abs(curves[0][-1]["loss"] - curves[1][-1]["loss"]) <= 0.25, curves
