"""The training configuration: one frozen dataclass, the single source of `trainer train`'s flags.

Every field of `TrainConfig` is a flag of the same name, type and default, with the help text
written next to the field (`define_flags` generates them, as Hugging Face's HfArgumentParser does
from its dataclasses), so the flags and the config cannot drift apart. The resolved config is
written to job_dir/config.json.

This module imports no TensorFlow: `trainer train --help` and flag errors answer at once.
"""

import dataclasses
import math
import types
import typing

# name -> (tf_keras.applications constructor, preprocessing, minimum image size).
# Preprocessing: "caffe" (RGB->BGR minus the ImageNet mean: VGG, ResNet50), "tf" (scale to
# [-1, 1]), "torch" (scale to [0, 1], then the ImageNet mean and deviation: DenseNet), "none" (the
# application normalises 0-255 input itself: EfficientNet(V2), ConvNeXt, ResNet-RS, RegNet, MobileNetV3).
BACKBONES = {
    "vgg16": ("VGG16", "caffe", 32),
    "vgg19": ("VGG19", "caffe", 32),
    "resnet50": ("ResNet50", "caffe", 32),
    "resnet50_v2": ("ResNet50V2", "tf", 32),
    "resnet101_v2": ("ResNet101V2", "tf", 32),
    "resnet_rs50": ("ResNetRS50", "none", 32),
    "resnet_rs101": ("ResNetRS101", "none", 32),
    "inception_v3": ("InceptionV3", "tf", 75),
    "inception_resnet_v2": ("InceptionResNetV2", "tf", 75),
    "xception": ("Xception", "tf", 71),
    "densenet121": ("DenseNet121", "torch", 32),
    "mobilenet_v2": ("MobileNetV2", "tf", 32),
    "mobilenet_v3_small": ("MobileNetV3Small", "none", 32),
    "mobilenet_v3_large": ("MobileNetV3Large", "none", 32),
    "efficientnet_b0": ("EfficientNetB0", "none", 32),
    "efficientnet_v2_b0": ("EfficientNetV2B0", "none", 32),
    "efficientnet_v2_b1": ("EfficientNetV2B1", "none", 32),
    "efficientnet_v2_b2": ("EfficientNetV2B2", "none", 32),
    "efficientnet_v2_b3": ("EfficientNetV2B3", "none", 32),
    "efficientnet_v2_s": ("EfficientNetV2S", "none", 32),
    "efficientnet_v2_m": ("EfficientNetV2M", "none", 32),
    "efficientnet_v2_l": ("EfficientNetV2L", "none", 32),
    "convnext_tiny": ("ConvNeXtTiny", "none", 32),
    "convnext_small": ("ConvNeXtSmall", "none", 32),
    "convnext_base": ("ConvNeXtBase", "none", 32),
    "convnext_large": ("ConvNeXtLarge", "none", 32),
    "convnext_xlarge": ("ConvNeXtXLarge", "none", 32),
    "regnety_032": ("RegNetY032", "none", 32),
    "regnetx_032": ("RegNetX032", "none", 32),
    "tiny": (None, "tf", 16),  # tests and the offline demo only: trainer.train.model builds it
}
HEADS = ("flatten", "avgpool")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")
FEATURE_CACHE_MODES = ("auto", "on", "off")


def _field(default, help, choices=None, defines_run=True):  # noqa: A002 - `help` as in absl and argparse
    """A config field. `defines_run=False` marks settings a resumed run may change (they change how
    the run goes, not what it computes); the others must stay as the run's config.json records."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "defines_run": defines_run}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Each field is the flag `--<name>` (see `define_flags`)."""

    data: str = _field(None, "URL of the dataset.json written by `trainer prepare`.")
    job_dir: str = _field(None, "Where everything of this run goes (local or URL); rerunning with the same "
                          "job_dir resumes. On Vertex AI it defaults to AIP_CHECKPOINT_DIR.", defines_run=False)
    backbone: str = _field("vgg16", "Pretrained base ('tiny': tests and demo only).", BACKBONES)
    weights: str = _field("imagenet", "imagenet | none | path or URL of a Keras weights file.")
    image_size: int = _field(150, "Images are resized to image_size x image_size.")
    batch_size: int = _field(64, "Global batch size (split over all replicas and workers).")
    epochs: int = _field(10, "Epochs of the first phase (frozen base, new head).")
    learning_rate: float = _field(1e-5, "Peak learning rate of the first phase, for --optimizer (the seed: Adam, "
                                        "1e-5).")
    augment: bool = _field(False, "Random flips, crops and brightness on training images.")
    randaugment: bool = _field(False, "RandAugment on training images (keras.layers.RandAugment, in the input "
                               "pipeline: 2 random operations per image at magnitude --randaugment_magnitude); off in "
                               "evaluation and export, and it turns the feature cache off.")
    randaugment_magnitude: float = _field(0.5, "RandAugment's strength, in (0, 1].")
    mixup_alpha: float = _field(0.0, "MixUp on training batches (keras.layers.MixUp): the alpha of its Beta "
                                "distribution (0.2 is common; 0: off). Labels become soft.")
    cutmix_alpha: float = _field(0.0, "CutMix on training batches (keras.layers.CutMix; 1.0 is common; 0: off). With "
                                 "--mixup_alpha too, each batch gets one of the two at random.")
    head: str = _field("flatten", "How the head pools the base's output.", HEADS)
    dense_units: int = _field(256, "Units of the head's hidden Dense layer (0: none).")
    dropout: float = _field(0.5, "Dropout rate before the output layer.")
    fine_tune_epochs: int = _field(0, "Epochs of the second phase (0: no fine-tuning).")
    fine_tune_from: str = _field("block5_conv1", "Layer of the base from which the second phase unfreezes "
                                 "(BatchNorm stays frozen).")
    fine_tune_learning_rate: float = _field(1e-5, "Peak learning rate of the second phase (of --optimizer).")
    optimizer: str = _field("adam", "adam (the seed's), adamw (decoupled weight decay) or sgd (with --momentum), "
                            "for both phases.", OPTIMIZERS)
    weight_decay: float = _field(0.0, "Decoupled weight decay of adamw and sgd (timm's AdamW default: 0.05).")
    momentum: float = _field(0.9, "Momentum of sgd (Nesterov).")
    lr_schedule: str = _field("constant", "constant (the seed's), or cosine: each phase decays its learning rate "
                              "to 0 along a cosine, after --warmup_epochs of linear warmup.", LR_SCHEDULES)
    warmup_epochs: float = _field(0.0, "With --lr_schedule=cosine: epochs of linear warmup from 0 at the start of "
                                  "each phase.")
    label_smoothing: float = _field(0.0, "Label smoothing of the cross-entropy (0.1 is common).")
    early_stopping_patience: int = _field(0, "Stop a phase once its val loss has not improved for this many epochs, "
                                          "and keep its best epoch's weights for the export and the next phase "
                                          "(0: off).")
    class_weight: str = _field("none", "none, balanced (each class weighs train count / (classes x its count), "
                               "from dataset.json), or explicit weights: cats=1,dogs=3 (unnamed classes weigh 1).")
    strategy: str = _field("auto", "auto: multi_worker when the cluster environment says so, else mirrored.",
                           STRATEGIES, defines_run=False)
    cpu_replicas: int = _field(0, "With no GPU: split the CPU into this many replicas.", defines_run=False)
    summary: bool = _field(False, "Print the model's layers, output shapes and parameter counts (model.summary()) "
                           "at start.", defines_run=False)
    tuning_metric: str = _field(None, "Hyperparameter tuning: at the end, report this metric of the epoch the model "
                                "keeps (val_accuracy, val_loss, ...) as a `NAME=VALUE` line on stdout (Katib's "
                                "collector) and through cloudml-hypertune (Vertex AI).", defines_run=False)
    tracking_uri: str = _field(None, "An MLflow tracking server (http://host:5000): the run's parameters, each "
                               "epoch's metrics and the final ones are logged there. A server that fails never stops "
                               "training (a warning, then training goes on).", defines_run=False)
    experiment: str = _field(None, "The MLflow experiment of --tracking_uri (default: image-transfer-trainer).",
                             defines_run=False)
    profile_steps: str = _field(None, "A,B: a TensorFlow Profiler trace of steps A to B of each phase into the "
                                "job_dir's TensorBoard folder (e.g. 10,20).", defines_run=False)
    progress_seconds: float = _field(30.0, "Within an epoch, log the step, img/s, the epoch's ETA and the loss "
                                     "at most every this many seconds (0: every step).", defines_run=False)
    num_workers: int | None = _field(None, "Workers of a multi-node job (default: from the environment).",
                                     defines_run=False)
    worker_port: int = _field(12345, "Port the workers talk on (multi-node jobs).", defines_run=False)
    backup_every_steps: int = _field(100, "Steps between preemption backups (and every epoch end).",
                                     defines_run=False)
    peer_timeout_seconds: int = _field(60, "Multi-worker: a peer worker that sends no heartbeat for this long "
                                       "(killed, frozen, its node gone) is lost: the others exit 75 (retryable).",
                                       defines_run=False)
    preempt_exit_seconds: int = _field(25, "After SIGTERM, exit 75 this many seconds later even when no step "
                                       "could end to back up (a stalled store): keep it below the pod's "
                                       "terminationGracePeriodSeconds.", defines_run=False)
    deadline_hours: float | None = _field(None, "Give up (exit 1, after committing a backup) once this many hours "
                                          "have passed since the run first started (job_dir/STARTED): one bound "
                                          "for the whole run, however often it is preempted and restarted.",
                                          defines_run=False)
    steps_per_epoch: int | None = _field(None, "Cap on steps per epoch (default: one pass over train).")
    shuffle_buffer: int = _field(1000, "Examples in the training shuffle buffer.")
    seed: int = _field(0, "Seed for weights initialisation and shuffling.")
    skip_corrupt_shards: bool = _field(False, "Skip (and count) damaged shards instead of failing.",
                                       defines_run=False)
    feature_cache: str = _field("auto", "Compute the frozen base once per split and train the head on its "
                                "outputs. auto: when the base is frozen and --augment is off.",
                                FEATURE_CACHE_MODES, defines_run=False)
    mixed_precision: bool = _field(False, "mixed_float16 on GPU (bfloat16 on CPU).")
    jit_compile: bool = _field(False, "Compile the training step with XLA.", defines_run=False)

    @classmethod
    def field_names(cls):
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def from_flags(cls, flag_values):
        """The config from parsed absl flags defined by `define_flags`."""
        return cls(**{name: flag_values[name].value for name in cls.field_names()})

    def to_dict(self):
        return dataclasses.asdict(self)

    def changed_settings(self, recorded):
        """The run-defining fields whose value differs from `recorded` (a config.json), as
        `--name=recorded (now: new)` strings; fields `recorded` lacks (an older version) are skipped."""
        return [f"--{field.name}={recorded[field.name]} (now: {getattr(self, field.name)})"
                for field in dataclasses.fields(self)
                if field.metadata["defines_run"] and field.name in recorded
                and recorded[field.name] != getattr(self, field.name)]


REQUIRED = ("data",)  # and job_dir, unless the launcher names one (`with_launcher_defaults`)

# What Vertex AI custom training sets when a job has a base output directory
# (https://cloud.google.com/vertex-ai/docs/training/code-requirements#environment-variables).
VERTEX_CHECKPOINT_DIR = "AIP_CHECKPOINT_DIR"  # -> the default job_dir
VERTEX_MODEL_DIR = "AIP_MODEL_DIR"  # -> a copy of the export, where Vertex looks for the model
VERTEX_TENSORBOARD_DIR = "AIP_TENSORBOARD_LOG_DIR"  # -> a copy of the TensorBoard event files


def flag_type(field):
    """The Python type a field's flag parses to: str, int, float or bool (`int | None` -> int)."""
    kind = field.type
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind not in (str, int, float, bool):
        raise TypeError(f"TrainConfig.{field.name}: no flag type for {kind!r}")
    return kind


def define_flags(flag_values, config_class=TrainConfig):
    """Defines one absl flag per field of `config_class`: same name, type, default and choices.

    Args:
      flag_values: the absl FlagValues to define them in (`absl.flags.FLAGS`).
      config_class: a dataclass whose fields were made with `_field`.

    The flags belong to this module (`flag_values.module_help(trainer.config)` lists them).
    """
    from absl import flags

    definers = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                bool: flags.DEFINE_bool}
    for field in dataclasses.fields(config_class):
        options = {"flag_values": flag_values}
        choices = field.metadata["choices"]
        if choices:
            flags.DEFINE_enum(field.name, field.default, list(choices), field.metadata["help"], **options)
        else:
            definers[flag_type(field)](field.name, field.default, field.metadata["help"], **options)
    flags.mark_flags_as_required(list(REQUIRED), flag_values=flag_values)


def with_launcher_defaults(config, environ):
    """`config` with what the launcher's environment supplies: job_dir from AIP_CHECKPOINT_DIR."""
    if config.job_dir is None and environ.get(VERTEX_CHECKPOINT_DIR):
        return dataclasses.replace(config, job_dir=environ[VERTEX_CHECKPOINT_DIR])
    return config


def check_config(config):
    """Raises UserError for values no run can use; instant (no TensorFlow), before any work."""
    from trainer.errors import UserError

    if not config.data or not config.job_dir:
        raise UserError("--data and --job_dir are required (on Vertex AI, job_dir defaults to "
                        f"{VERTEX_CHECKPOINT_DIR})")
    positive = {"image_size": config.image_size, "batch_size": config.batch_size,
                "backup_every_steps": config.backup_every_steps, "shuffle_buffer": config.shuffle_buffer,
                "peer_timeout_seconds": config.peer_timeout_seconds,
                "preempt_exit_seconds": config.preempt_exit_seconds}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name} must be positive, got {value}")
    for name in ("cpu_replicas", "num_workers", "steps_per_epoch", "early_stopping_patience", "progress_seconds"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise UserError(f"--{name} must not be negative, got {value}")
    if config.epochs < 0 or config.fine_tune_epochs < 0:
        raise UserError("--epochs and --fine_tune_epochs must be >= 0")
    if config.epochs + config.fine_tune_epochs == 0:
        raise UserError("nothing to train: --epochs and --fine_tune_epochs are both 0")
    if not 0 <= config.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.dense_units < 0:
        raise UserError(f"--dense_units must be 0 or more, got {config.dense_units}")
    if config.deadline_hours is not None and not (config.deadline_hours > 0 and math.isfinite(config.deadline_hours)):
        raise UserError(f"--deadline_hours must be a positive number, got {config.deadline_hours}")
    for name in ("learning_rate", "fine_tune_learning_rate"):
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"--{name} must be a positive number, got {value}")
    if config.weight_decay < 0 or not math.isfinite(config.weight_decay):
        raise UserError(f"--weight_decay must be 0 or more, got {config.weight_decay}")
    if not 0 <= config.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {config.momentum}")
    if not 0 <= config.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if not (config.warmup_epochs >= 0 and math.isfinite(config.warmup_epochs)):
        raise UserError(f"--warmup_epochs must be 0 or more, got {config.warmup_epochs}")
    for name in ("mixup_alpha", "cutmix_alpha"):
        if not (getattr(config, name) >= 0 and math.isfinite(getattr(config, name))):
            raise UserError(f"--{name} must be 0 (off) or more, got {getattr(config, name)}")
    if not 0 < config.randaugment_magnitude <= 1:
        raise UserError(f"--randaugment_magnitude must be in (0, 1], got {config.randaugment_magnitude}")
    if config.warmup_epochs and config.lr_schedule != "cosine":
        raise UserError("--warmup_epochs needs --lr_schedule=cosine")
    parse_class_weight(config.class_weight)
    if config.profile_steps:
        parse_profile_steps(config.profile_steps)
    check_backbone(config.backbone, config.image_size)


def parse_profile_steps(text):
    """`--profile_steps=A,B` as (A, B), 1 <= A <= B; raises UserError if malformed."""
    from trainer.errors import UserError

    try:
        first, last = (int(part) for part in text.split(","))
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise UserError(f"--profile_steps must be A,B with 1 <= A <= B (steps of a phase), got {text!r}")
    return first, last


def parse_class_weight(text):
    """`--class_weight` as "none", "balanced" or `{class name: weight}`; raises UserError if malformed."""
    from trainer.errors import UserError

    if text in ("none", "balanced"):
        return text
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not name.strip() or not (weight >= 0 and math.isfinite(weight)) or name.strip() in weights:
            raise UserError(f"--class_weight must be none, balanced or name=weight,... (weights >= 0, each class "
                            f"once), got {text!r}")
        weights[name.strip()] = weight
    return weights


def class_weights(text, classes, train_counts):
    """The weight of each class index for `--class_weight=text`, or None for "none".

    "balanced" is scikit-learn's rule: total / (classes x count), so the weights average 1 over the
    training examples. Raises UserError for a named class the dataset does not have, or a class with
    no training example under "balanced".
    """
    from trainer.errors import UserError

    chosen = parse_class_weight(text)
    if chosen == "none":
        return None
    if chosen == "balanced":
        empty = [name for name in classes if not train_counts.get(name)]
        if empty:
            raise UserError(f"--class_weight=balanced: class {empty[0]!r} has no training example")
        total = sum(train_counts[name] for name in classes)
        return {index: total / (len(classes) * train_counts[name]) for index, name in enumerate(classes)}
    unknown = sorted(set(chosen) - set(classes))
    if unknown:
        raise UserError(f"--class_weight names {unknown[0]!r}, which is not a class of this dataset "
                        f"({', '.join(classes)})")
    return {index: chosen.get(name, 1.0) for index, name in enumerate(classes)}


def check_backbone(backbone, image_size):
    """Raises UserError for an unknown backbone or an image size below its minimum."""
    from trainer.errors import UserError

    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; choose one of: {', '.join(BACKBONES)}")
    minimum = BACKBONES[backbone][2]
    if image_size < minimum:
        raise UserError(f"image_size {image_size} is too small for {backbone}: it needs at least {minimum}")
