"""The distribution strategy and the cluster spec, from flags and the environment.

Where the cluster comes from, in order:
  1. `TF_CONFIG`, when set (any launcher that follows TensorFlow's convention).
  2. A JobSet (`JOBSET_NAME`, `REPLICATED_JOB_NAME`, `JOB_INDEX`, `JOB_COMPLETION_INDEX`): worker
     hostnames are `<jobset>-<replicated job>-<job index>-<pod index>.<subdomain>`.
  3. A Kubernetes Indexed Job behind a headless Service (`JOB_COMPLETION_INDEX`,
     `TRAINER_JOB_NAME`, `TRAINER_SERVICE_NAME`): hostnames are `<job>-<index>.<service>`.
The number of workers comes from `--num_workers` or `TRAINER_NUM_WORKERS`; the port from
`--worker_port` or `TRAINER_WORKER_PORT`. `TRAINER_WORKER_HOSTS` (comma-separated host:port, with
`JOB_COMPLETION_INDEX` as this worker's index) overrides the hostname patterns.
"""

import json
import os

from absl import logging

from trainer.errors import UserError, counted


def cluster_from_environment(environ=None, num_workers=None, port=None):
    """Builds a TF_CONFIG-style dict from the environment, or None for a single machine.

    Args:
      environ: the environment (default: os.environ).
      num_workers: workers in the job; default TRAINER_NUM_WORKERS.
      port: the port every worker listens on; default TRAINER_WORKER_PORT, else 12345.

    Returns:
      {"cluster": {"worker": [...], ...}, "task": {"type": ..., "index": ...}} or None.

    Raises:
      UserError: TF_CONFIG is not valid JSON, or a Kubernetes environment lacks the worker count.
    """
    environ = os.environ if environ is None else environ
    if environ.get("TF_CONFIG"):
        try:
            config = json.loads(environ["TF_CONFIG"])
        except json.JSONDecodeError as error:
            raise UserError(f"TF_CONFIG is not valid JSON: {error}") from error
        if not config.get("cluster"):
            return None
        return config
    if "JOB_COMPLETION_INDEX" not in environ:
        return None
    num_workers = num_workers or int(environ.get("TRAINER_NUM_WORKERS") or 0)
    port = port or int(environ.get("TRAINER_WORKER_PORT") or 12345)
    pod_index = int(environ["JOB_COMPLETION_INDEX"])
    if environ.get("TRAINER_WORKER_HOSTS"):
        # An explicit host:port list, for launchers whose hostnames follow no pattern above.
        hosts = [host.strip() for host in environ["TRAINER_WORKER_HOSTS"].split(",") if host.strip()]
        index = pod_index
        num_workers = len(hosts)
    elif "JOBSET_NAME" in environ:
        jobset, replicated = environ["JOBSET_NAME"], environ["REPLICATED_JOB_NAME"]
        job_index = int(environ.get("JOB_INDEX") or 0)
        jobs = int(environ.get("REPLICATED_JOB_REPLICAS") or 1)
        subdomain = environ.get("TRAINER_SERVICE_NAME") or jobset
        if num_workers < 1 or num_workers % jobs:
            raise UserError(f"JobSet with {jobs} jobs needs --num_workers (or TRAINER_NUM_WORKERS) "
                            f"as a positive multiple of {jobs}, got {num_workers}")
        pods = num_workers // jobs
        hosts = [f"{jobset}-{replicated}-{j}-{p}.{subdomain}:{port}"
                 for j in range(jobs) for p in range(pods)]
        index = job_index * pods + pod_index
    elif "TRAINER_JOB_NAME" in environ and "TRAINER_SERVICE_NAME" in environ:
        if num_workers < 1:
            raise UserError("an Indexed Job needs --num_workers (or TRAINER_NUM_WORKERS)")
        job, service = environ["TRAINER_JOB_NAME"], environ["TRAINER_SERVICE_NAME"]
        hosts = [f"{job}-{i}.{service}:{port}" for i in range(num_workers)]
        index = pod_index
    else:
        return None
    if num_workers == 1:
        return None
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def is_chief(cluster):
    """Whether this task writes the job's final outputs.

    The chief is the `chief` task when the cluster has one, else worker 0. A single machine
    (cluster None) is always the chief.
    """
    if not cluster:
        return True
    task = cluster.get("task", {})
    if "chief" in cluster.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def worker_position(cluster):
    """`(index, count)` of this task among all the training tasks: the chief first when there is
    one (Vertex AI), then the workers in order. A single machine is `(0, 1)`."""
    if not cluster:
        return 0, 1
    tasks = cluster.get("cluster", {})
    chiefs, workers = len(tasks.get("chief", [])), len(tasks.get("worker", []))
    task = cluster.get("task", {})
    index = int(task.get("index", 0))
    return (index if task.get("type") == "chief" else chiefs + index), chiefs + workers


def task_id(cluster):
    """A short name for this task, used for its private temporary folders."""
    if not cluster:
        return "chief"
    task = cluster.get("task", {})
    return f"{task.get('type', 'worker')}-{task.get('index', 0)}"


def split_cpu(replicas):
    """Splits the CPU into `replicas` logical devices (must run before TensorFlow starts)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])


def device_datasets_without_autotune():
    """Turns tf.data autotuning off in the per-replica datasets a strategy feeds its replicas from.

    Each replica's input is a small dataset of its own (tf.distribute's multi-device iterator:
    a generator and a fixed-size prefetch, nothing to tune), created with the default options, so
    autotuning is on and deleting it at the end of `fit` waits out its autotuning thread's sleep
    (`pipeline.without_autotune` has the measurements). tf.distribute has no option for it, so its
    constructor is wrapped, once; tests/test_distribute.py fails if TensorFlow changes it.
    """
    from tensorflow.python.data.ops import multi_device_iterator_ops

    from trainer.data import pipeline

    create = multi_device_iterator_ops._create_device_dataset  # noqa: SLF001 - no public way
    if getattr(create, "without_autotune", False):
        return

    def create_without_autotune(*args, **kwargs):
        return pipeline.without_autotune(create(*args, **kwargs))

    create_without_autotune.without_autotune = True
    multi_device_iterator_ops._create_device_dataset = create_without_autotune  # noqa: SLF001


def watch_peers(cluster, timeout_seconds):
    """Sets up the coordination service MultiWorkerMirroredStrategy runs on, with `timeout_seconds`
    (None: TensorFlow's 10 s) as the time a worker may miss heartbeats before it counts as lost.

    A lost worker (killed, preempted, its node gone) then fails every collective in flight on
    the others, which exit 75 (train.py). Per-collective timeouts (`CommunicationOptions`) would
    also end the wait, but TensorFlow starts a thread per collective op that sleeps out the whole
    timeout: 4,900 threads after 40 s of a cached head phase on two CPU workers, and on a GPU node
    taking 100 steps a second, tens of thousands, past Linux's per-process mapping limit.
    """
    import tensorflow as tf
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    # What MultiWorkerMirroredStrategy configures itself when nothing is, plus the heartbeat timeout.
    spec = tf.train.ClusterSpec(cluster["cluster"])
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs, heartbeat_timeout_in_ms=int(1000 * (timeout_seconds or 0)))


def make_strategy(kind="auto", cpu_replicas=0, num_workers=None, port=None, peer_timeout_seconds=None):
    """Creates the tf.distribute strategy for this process.

    Args:
      kind: auto | mirrored | multi_worker | one_device. auto is multi_worker when the cluster
        environment describes more than one worker, else mirrored.
      cpu_replicas: with no GPU, split the CPU into this many replicas (tests, laptops).
      num_workers, port: see `cluster_from_environment`.
      peer_timeout_seconds: multi-worker: a peer that misses heartbeats for this long is lost
        (`watch_peers`): the job then ends with a retryable error instead of hanging.

    Returns:
      (strategy, cluster) where cluster is the TF_CONFIG dict or None.

    Raises:
      UserError: multi_worker asked for but no cluster described, or an unknown kind.
    """
    import tensorflow as tf

    cluster = cluster_from_environment(num_workers=num_workers, port=port)
    device_datasets_without_autotune()
    if kind == "auto":
        kind = "multi_worker" if cluster else "mirrored"
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "multi_worker":
        if not cluster:
            raise UserError("--strategy=multi_worker needs TF_CONFIG or a Kubernetes Indexed Job/JobSet "
                            "environment")
        # The strategy reads TF_CONFIG itself; a Kubernetes-derived cluster is handed over here.
        os.environ["TF_CONFIG"] = json.dumps(cluster)
        watch_peers(cluster, peer_timeout_seconds)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "mirrored":
        if not gpus and cpu_replicas > 1:
            split_cpu(cpu_replicas)
            devices = [f"/cpu:{i}" for i in range(cpu_replicas)]
            strategy = tf.distribute.MirroredStrategy(devices=devices)
        else:
            strategy = tf.distribute.MirroredStrategy()
        cluster = None
    elif kind == "one_device":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
        cluster = None
    else:
        raise UserError(f"unknown strategy {kind!r}")
    logging.info("strategy %s: %s in sync, %s on this node, task %s", type(strategy).__name__,
                 counted(strategy.num_replicas_in_sync, "replica"), counted(len(gpus), "GPU"), task_id(cluster))
    return strategy, cluster
