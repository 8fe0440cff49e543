"""Two real workers on loopback under MultiWorkerMirroredStrategy (TF_CONFIG and the Kubernetes
Indexed Job environment), and a worker lost mid-run.

The first test is also the guard for the Keras choice (docs/architecture.md): if an upgrade breaks
`fit` under MultiWorkerMirroredStrategy, it fails here.
"""

import json
import signal

import pytest
from jobs import TINY_JOB, fingerprints, free_ports, optimizer_steps, prepare_stripes, start_trainer, wait_until

from trainer import storage
from trainer.errors import EXIT_RETRYABLE

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
    args = worker_args(dataset, job_dir, "--epochs=2", "--fine_tune_epochs=1", "--fine_tune_from=block2_conv1")
    codes, logs = run_workers(args, [tf_config_env(ports, i, tmp_path) for i in range(2)], tmp_path, "w")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    # Both workers end with the same weights after each phase, at the same step.
    assert fingerprints(logs[0]) == fingerprints(logs[1]) and set(fingerprints(logs[0])) == {"head", "fine_tune"}
    assert optimizer_steps(logs[0]) == {"head": 2 * dataset["steps"], "fine_tune": dataset["steps"]}
    assert "2 worker(s), 2 replicas in sync; global batch 8 = 4 per replica" in logs[0]
    # The chief exported once; the other worker left nothing in job_dir.
    files = [name for name, _ in storage.list_files(job_dir)]
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
    exported = dict(storage.list_files(f"{job_dir}/model"))
    assert dict(storage.list_files(f"{base}/model")) == exported and "saved_model.pb" in exported
    assert any(name.startswith("head/") for name, _ in storage.list_files(f"{base}/logs"))


def test_lost_worker_then_restart_of_both_completes(dataset, gcs_bucket, tmp_path):
    job_dir = f"{gcs_bucket}/job"
    ports = free_ports(2)
    epochs = 6
    args = worker_args(dataset, job_dir, f"--epochs={epochs}", "--peer_timeout_seconds=30")
    envs = [tf_config_env(ports, i, tmp_path) for i in range(2)]
    logs = [tmp_path / f"first-{i}.log" for i in range(2)]
    chief, other = (start_trainer(args, env=env, log_path=log) for env, log in zip(envs, logs, strict=True))
    committed = storage.join(job_dir, "backup", "head", "checkpoint")
    assert wait_until(lambda: storage.exists(committed) or chief.poll() is not None, timeout=600)
    assert chief.poll() is None, logs[0].read_text()[-3000:]
    other.send_signal(signal.SIGKILL)
    other.wait()
    # The survivor must not hang: its collectives time out and it exits with the retryable code.
    code = chief.wait(timeout=300)
    assert code == EXIT_RETRYABLE, logs[0].read_text()[-3000:]
    # Restart both (what the JobSet does): training completes at the exact step count.
    ports = free_ports(2)
    args = worker_args(dataset, job_dir, f"--epochs={epochs}", "--peer_timeout_seconds=30")
    codes, texts = run_workers(args, [tf_config_env(ports, i, tmp_path) for i in range(2)], tmp_path, "again")
    assert codes == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    assert optimizer_steps(texts[0]) == {"head": epochs * dataset["steps"]}
    assert fingerprints(texts[0]) == fingerprints(texts[1])
