"""Cluster spec from each environment source, and chief detection."""

import json

import pytest

from trainer.errors import UserError
from trainer.train import distribute


def test_single_machine_has_no_cluster():
    assert distribute.cluster_from_environment({}) is None
    assert distribute.is_chief(None)


def test_tf_config_is_used_as_given():
    config = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    cluster = distribute.cluster_from_environment({"TF_CONFIG": json.dumps(config)})
    assert cluster == config
    assert not distribute.is_chief(cluster)
    assert distribute.task_id(cluster) == "worker-1"


def test_bad_tf_config_is_a_user_error():
    with pytest.raises(UserError, match="TF_CONFIG"):
        distribute.cluster_from_environment({"TF_CONFIG": "{not json"})


def test_chief_is_worker_zero_without_a_chief_task():
    cluster = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}
    assert distribute.is_chief(cluster)


def test_chief_is_the_chief_task_when_there_is_one():
    base = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert distribute.is_chief({"cluster": base, "task": {"type": "chief", "index": 0}})
    # worker 0 is NOT the chief when a chief task exists (the classic cloud-sample bug).
    assert not distribute.is_chief({"cluster": base, "task": {"type": "worker", "index": 0}})


def test_indexed_job_environment():
    environ = {"JOB_COMPLETION_INDEX": "2", "TRAINER_JOB_NAME": "train-x", "TRAINER_SERVICE_NAME": "train-x-svc",
               "TRAINER_NUM_WORKERS": "3", "TRAINER_WORKER_PORT": "2222"}
    cluster = distribute.cluster_from_environment(environ)
    assert cluster["cluster"]["worker"] == [f"train-x-{i}.train-x-svc:2222" for i in range(3)]
    assert cluster["task"] == {"type": "worker", "index": 2}
    assert not distribute.is_chief(cluster)


def test_indexed_job_flags_override_environment():
    environ = {"JOB_COMPLETION_INDEX": "0", "TRAINER_JOB_NAME": "j", "TRAINER_SERVICE_NAME": "s"}
    cluster = distribute.cluster_from_environment(environ, num_workers=2, port=7000)
    assert cluster["cluster"]["worker"] == ["j-0.s:7000", "j-1.s:7000"]
    assert distribute.is_chief(cluster)


def test_indexed_job_without_worker_count_is_a_user_error():
    environ = {"JOB_COMPLETION_INDEX": "0", "TRAINER_JOB_NAME": "j", "TRAINER_SERVICE_NAME": "s"}
    with pytest.raises(UserError, match="num_workers"):
        distribute.cluster_from_environment(environ)


def test_one_worker_indexed_job_is_a_single_machine():
    environ = {"JOB_COMPLETION_INDEX": "0", "TRAINER_JOB_NAME": "j", "TRAINER_SERVICE_NAME": "s"}
    assert distribute.cluster_from_environment(environ, num_workers=1) is None


def test_jobset_environment():
    environ = {"JOBSET_NAME": "train", "REPLICATED_JOB_NAME": "workers", "JOB_INDEX": "0",
               "JOB_COMPLETION_INDEX": "1", "TRAINER_NUM_WORKERS": "2"}
    cluster = distribute.cluster_from_environment(environ, port=12345)
    assert cluster["cluster"]["worker"] == ["train-workers-0-0.train:12345", "train-workers-0-1.train:12345"]
    assert cluster["task"] == {"type": "worker", "index": 1}


def test_jobset_with_several_jobs_numbers_workers_across_jobs():
    environ = {"JOBSET_NAME": "t", "REPLICATED_JOB_NAME": "w", "JOB_INDEX": "1", "REPLICATED_JOB_REPLICAS": "2",
               "JOB_COMPLETION_INDEX": "0", "TRAINER_SERVICE_NAME": "sub"}
    cluster = distribute.cluster_from_environment(environ, num_workers=4, port=1)
    assert cluster["cluster"]["worker"] == ["t-w-0-0.sub:1", "t-w-0-1.sub:1", "t-w-1-0.sub:1", "t-w-1-1.sub:1"]
    assert cluster["task"]["index"] == 2


def test_plain_job_without_trainer_env_is_single_machine():
    assert distribute.cluster_from_environment({"JOB_COMPLETION_INDEX": "0"}) is None


def test_input_pipelines_and_per_replica_datasets_run_without_tf_data_autotuning(tmp_path):
    """In TensorFlow 2.21 deleting an autotuned iterator waits out its autotuning thread's sleep
    (up to 60 s, at the end of every fit): our pipelines turn autotuning off, and so do the small
    datasets tf.distribute feeds each replica from (wrapped in trainer.train.distribute; this fails if a
    TensorFlow upgrade moves what is wrapped)."""
    import numpy as np
    import tensorflow as tf

    from trainer.data import pipeline
    from trainer.train import featurecache

    paths = (str(tmp_path / "features.npy"), str(tmp_path / "labels.npy"))
    np.save(paths[0], np.zeros([8, 3], np.float32))
    np.save(paths[1], np.arange(8, dtype=np.int32))
    cached = featurecache.cached_dataset(paths, 2, training=True, seed=0)
    assert cached.options().autotune.enabled is False
    assert pipeline.without_autotune(tf.data.Dataset.range(3)).options().autotune.enabled is False

    strategy, _ = distribute.make_strategy("mirrored")
    iterator = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.range(8).batch(2)))
    assert next(iterator).numpy().tolist() == [0, 1]
    per_replica = [device._dataset for worker in iterator._iterators  # noqa: SLF001 - what is wrapped
                   for device in worker._iterator._device_iterators]  # noqa: SLF001
    assert per_replica and all(dataset.options().autotune.enabled is False for dataset in per_replica)
