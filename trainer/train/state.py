"""The state one training process shares between its phases, and the batch arithmetic."""

import dataclasses

import tensorflow as tf

from trainer.config import TrainConfig
from trainer.data import records
from trainer.errors import UserError
from trainer.formats import jobdir


class Preempted(Exception):
    """Raised inside fit once a SIGTERM (or a Ctrl-C) was received and the backup after it is
    committed; its argument names the signal."""


class DeadlinePassed(Exception):
    """Raised inside fit once --deadline_hours has passed and the backup after it is committed."""


# Why a run stops early (the signal's name, or the deadline) -> what fit raises.
STOPS = {"SIGTERM": Preempted, "SIGINT": Preempted, "deadline": DeadlinePassed}


@dataclasses.dataclass
class Run:
    """The state of one training process that the phases share."""

    config: TrainConfig
    job: jobdir.JobDir
    strategy: tf.distribute.Strategy
    is_chief: bool
    scratch: str  # this process's local scratch folder (removed at the end)
    history: dict  # history.json, rewritten by the chief after every epoch
    damage: records.DamageReport  # damaged data skipped with --skip_corrupt_shards
    tensorboard_copy: str | None = None  # also sync event files here (Vertex AI's AIP_TENSORBOARD_LOG_DIR)
    worker: int = 0  # this task's index among the training tasks (distribute.worker_position)
    workers: int = 1
    active_backups: list = dataclasses.field(default_factory=list)  # what SIGTERM asks to back up
    class_weights: dict | None = None  # class index -> weight of its training examples (--class_weight)
    num_classes: int = 2
    gpus: object = None  # trainer.infra.devices.GpuSampler when the machine has GPUs
    tracker: object = None  # trainer.infra.tracking.Tracker of --tracking_uri (the chief's)


def derive_batches(global_batch, replicas, train_count, steps_cap=None):
    """The per-replica batch and steps per epoch for a global batch.

    Raises:
      UserError: the global batch does not divide over the replicas, or exceeds the train split.
    """
    if global_batch % replicas:
        raise UserError(f"--batch_size={global_batch} is not divisible by the {replicas} replicas in sync; "
                        f"use a multiple of {replicas}")
    steps = train_count // global_batch
    if steps == 0:
        raise UserError(f"--batch_size={global_batch} exceeds the {train_count} training examples")
    if steps_cap:
        steps = min(steps, steps_cap)
    return global_batch // replicas, steps
