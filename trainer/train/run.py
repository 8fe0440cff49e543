"""`trainer train`: the transfer-learning job, from a dataset manifest to an exported model.

`run(config)` checks the run against its job_dir (trainer.train.guards), makes the strategy
(trainer.train.distribute), takes the job_dir's lease, runs the phases (trainer.train.phases),
exports the model (trainer.train.export) and marks the job done. Everything it writes goes to
job_dir through trainer.formats.jobdir, which documents the layout; a rerun resumes whatever a
previous attempt left.
"""

import os
import shutil
import signal
import tempfile

import tensorflow as tf
from absl import logging

from trainer import __version__
from trainer.config import VERTEX_MODEL_DIR, VERTEX_TENSORBOARD_DIR, check_config, class_weights
from trainer.data import records
from trainer.errors import RetryableError, UserError, counted, first_line
from trainer.formats import jobdir, manifest
from trainer.infra import devices, folders, storage, tracking
from trainer.infra.kerasapi import keras
from trainer.train import distribute, export, featurecache, guards, phases
from trainer.train.state import DeadlinePassed, Preempted, Run, derive_batches


def publish_for_vertex(job):
    """On Vertex AI, a copy of the export where AIP_MODEL_DIR says (its model upload reads it)."""
    target = os.environ.get(VERTEX_MODEL_DIR)
    if target and target.rstrip("/") != job.model_url.rstrip("/"):
        folders.copy_tree(job.model_url, target, progress="copy model")
        logging.info("model copied to %s (AIP_MODEL_DIR)", target)


def report_tuning_metric(name, history, early_stopping):
    """Reports `name` of the epoch the exported model keeps (the final phase's best val_loss with
    early stopping, else its last epoch) the way each tuning service reads it: a `NAME=VALUE` line on
    stdout (Katib's StdOut collector) and cloudml-hypertune's metrics file (Vertex AI).

    Raises:
      UserError: the history has no such metric (a typo, or val_* without a validation split).
    """
    import hypertune

    epochs = history["phases"][-1]["epochs"]
    kept = min(epochs, key=lambda entry: entry.get("val_loss", 0)) if early_stopping else epochs[-1]
    if name not in kept:
        raise UserError(f"--tuning_metric={name}: the epochs record {', '.join(sorted(kept))}")
    print(f"{name}={kept[name]:.6g}", flush=True)
    hypertune.HyperTune().report_hyperparameter_tuning_metric(
        hyperparameter_metric_tag=name, metric_value=kept[name], global_step=kept.get("step", 0))
    logging.info("tuning metric: %s=%g (epoch %d of the %s phase)", name, kept[name], kept["epoch"],
                 history["phases"][-1]["name"])


def log_plan(config, strategy, cluster, dataset_manifest, per_replica, steps):
    workers = sum(len(cluster["cluster"].get(kind, [])) for kind in ("chief", "worker")) if cluster else 1
    splits = dataset_manifest["splits"]
    logging.info(
        "plan: %s, %s in sync; global batch %d = %d per replica; %s per epoch "
        "(train %d, val %d examples); head: %s at lr %g; fine-tune: %s at lr %g from %s",
        counted(workers, "worker"), counted(strategy.num_replicas_in_sync, "replica"), config.batch_size,
        per_replica, counted(steps, "step"), splits["train"]["count"], splits.get("val", {}).get("count", 0),
        counted(config.epochs, "epoch"), config.learning_rate, counted(config.fine_tune_epochs, "epoch"),
        config.fine_tune_learning_rate, config.fine_tune_from)


def run(config):
    """Trains, exports and marks a job complete; resumes whatever a previous attempt left.

    Raises:
      UserError: bad configuration, data or weights.
      RetryableError: preempted (a backup was committed first) or storage unreachable.
    """
    check_config(config)
    storage.check_writable(config.job_dir)
    job = jobdir.JobDir(config.job_dir)
    dataset_manifest = manifest.load_manifest(config.data)
    dataset = manifest.dataset_identity(config.data, dataset_manifest)
    if guards.check_same_run(job, config, dataset) and distribute.is_chief(
            distribute.cluster_from_environment(num_workers=config.num_workers, port=config.worker_port)):
        job.forget_start()
    if job.is_done():
        logging.info("job %s is already complete (%s exists); nothing to do", config.job_dir, job.path(jobdir.DONE))
        print(f"already complete: {config.job_dir}")
        return
    deadline_seconds = guards.check_deadline(config, job)
    strategy, cluster = distribute.make_strategy(config.strategy, config.cpu_replicas, config.num_workers,
                                                 config.worker_port, config.peer_timeout_seconds)
    is_chief = distribute.is_chief(cluster)
    lease = job.take_lease() if is_chief else None  # one run at a time; the chief speaks for its workers
    try:
        train_and_export(config, job, dataset_manifest, dataset, deadline_seconds, strategy, cluster)
    finally:
        if lease:
            lease.release()


def train_and_export(config, job, dataset_manifest, dataset, deadline_seconds, strategy, cluster):
    """The run once it holds job_dir: both phases, the export, DONE (see `run`)."""
    is_chief = distribute.is_chief(cluster)
    classes = dataset_manifest["classes"]
    per_replica, steps = derive_batches(config.batch_size, strategy.num_replicas_in_sync,
                                        manifest.count_examples(dataset_manifest, "train"), config.steps_per_epoch)
    log_plan(config, strategy, cluster, dataset_manifest, per_replica, steps)
    keras.utils.set_random_seed(config.seed)

    names = ["head"] * bool(config.epochs) + ["fine_tune"] * bool(config.fine_tune_epochs)
    scratch = tempfile.mkdtemp(prefix=f"trainer-{distribute.task_id(cluster)}-")
    state = Run(config=config, job=job, strategy=strategy, is_chief=is_chief, scratch=scratch,
                history=job.load_history(names), damage=records.DamageReport(),
                tensorboard_copy=os.environ.get(VERTEX_TENSORBOARD_DIR))
    state.worker, state.workers = distribute.worker_position(cluster)
    sampler = devices.GpuSampler()
    state.gpus = sampler if sampler.active else None
    state.num_classes = len(classes)
    state.class_weights = class_weights(config.class_weight, classes,
                                        dataset_manifest["splits"]["train"]["class_counts"])
    if state.class_weights:
        logging.info("class weights: %s", ", ".join(f"{classes[index]} {weight:.3g}"
                                                     for index, weight in state.class_weights.items()))
    switches = (("--augment", config.augment), ("--randaugment", config.randaugment),
                ("--mixup_alpha", config.mixup_alpha), ("--cutmix_alpha", config.cutmix_alpha))
    augmentation = [name for name, on in switches if on]
    feature_cache = featurecache.use_feature_cache(config.feature_cache, augmentation, config.epochs)
    if is_chief:
        job.write_config({**config.to_dict(), "tool_version": __version__, "dataset": dataset, "classes": classes,
                          "plan": {"replicas": strategy.num_replicas_in_sync, "per_replica_batch": per_replica,
                                   "steps_per_epoch": steps}})
    if is_chief and config.tracking_uri:
        state.tracker = tracking.Tracker(config.tracking_uri, config.experiment, job.url)
        state.tracker.start({key: value for key, value in config.to_dict().items() if value is not None},
                            {"job_dir": job.url, "dataset_digest": dataset["digest"], "tool_version": __version__})
    guards.install_stop_handlers(state, deadline_seconds)
    try:
        model = phases.train_phases(state, dataset_manifest, steps, feature_cache)
        # Every worker exports (saving can run collectives under MultiWorkerMirroredStrategy);
        # only the chief's copy goes to job_dir, the others' into scratch, which is removed.
        model_url = job.model_url if is_chief else os.path.join(scratch, "model")
        export.export_model(model, classes, config.image_size, model_url, backbone=config.backbone)
        if is_chief:
            publish_for_vertex(job)
            job.mark_done()
            logging.info("done: model exported to %s", model_url)
            if config.tuning_metric:
                report_tuning_metric(config.tuning_metric, state.history, config.early_stopping_patience)
            if state.tracker:
                final = state.history["phases"][-1]["epochs"][-1] if state.history["phases"][-1]["epochs"] else {}
                state.tracker.log_metrics({f"final_{name}": value for name, value in final.items()
                                           if name not in ("epoch", "step")}, final.get("step", 0))
                state.tracker.finish()
    except Preempted as error:
        raise RetryableError(f"preempted ({error.args[0] if error.args else 'SIGTERM'}); the backup is committed, "
                             "rerun to resume") from error
    except DeadlinePassed as error:
        if state.tracker:
            state.tracker.finish("FAILED")
        raise UserError(guards.deadline_message(config, job.first_started())) from error
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError) as error:
        if not cluster:
            raise
        # A peer worker died or was preempted: the collectives time out. Restarting every worker
        # (the JobSet does) resumes from the last committed backup.
        raise RetryableError(f"lost contact with a peer worker ({type(error).__name__}: {first_line(error)})") \
            from error
    finally:
        sampler.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        shutil.rmtree(scratch, ignore_errors=True)
