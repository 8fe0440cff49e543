"""The `trainer` command: `trainer <subcommand> --flag=value ...`.

This is the only module that reads flags. Each subcommand defines its own absl flags (so `--help`
lists only those), turns them into plain arguments, and calls one library function. Errors become
one line on stderr and an exit code from `trainer.errors`; presets are absl flagfiles
(`--flagfile=configs/seed_vgg16.flags`), and later flags override a flagfile's values.
"""

import logging as std_logging
import os
import signal
import sys

# Before TensorFlow is imported anywhere: keep its C++ INFO lines out of the user's terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _stopped_while_starting(signum, frame):
    """SIGTERM or Ctrl-C before the command has started (while importing, parsing flags): nothing
    is written yet, so the process ends at once with the same line and exit 75 as later on."""
    sys.stderr.write(f"interrupted ({signal.Signals(signum).name}); rerun to go on\n")
    os._exit(75)


# Not in a worker process that `multiprocessing` spawned (it runs this module as __mp_main__): its
# parent ends it, and must not see this line then.
if __name__ != "__mp_main__":
    for _signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signum, _stopped_while_starting)

from absl import app, flags, logging  # noqa: E402

from trainer import config, errors  # noqa: E402
from trainer.formats.imagefiles import MAX_IMAGE_BYTES, MAX_PIXELS  # noqa: E402
from trainer.formats.manifest import LAYOUTS, SPLITS  # noqa: E402
from trainer.infra import faults, tfstart  # noqa: E402

FLAGS = flags.FLAGS
# Set: parse the command line (flagfiles too), report a problem as usual, and run nothing. No
# TensorFlow is loaded, so `make submit-*` checks a run's flags before any cluster sees them.
CHECK_FLAGS_VARIABLE = "TRAINER_CHECK_FLAGS_ONLY"


def define_prepare_flags():
    flags.DEFINE_string("source", None, "Image folder: a local path or URL (gs://bucket/prefix).")
    flags.DEFINE_string("labels", None, "Instead of --source: a Vertex AI image-classification import file, "
                        "CSV ([ML_USE,]IMAGE_URI,LABEL) or JSONL, local or gs://.")
    flags.DEFINE_string("output", None, "Where the shards and dataset.json go: local path or URL.")
    flags.DEFINE_enum("layout", "auto", ["auto", *LAYOUTS],
                      "class_dirs: SRC/<class>/*; split_dirs: SRC/{train,val|validation,test}/<class>/*; "
                      "filename_prefix: SRC/<class>.<anything> (Kaggle's cat.123.jpg); auto: detect.")
    flags.DEFINE_float("val_fraction", 0.15, "Share of images for validation (layouts without splits).")
    flags.DEFINE_float("test_fraction", 0.15, "Share of images for test (layouts without splits).")
    flags.DEFINE_integer("split_seed", 0, "Seed of the stable hash that assigns files to splits.")
    flags.DEFINE_float("shard_size_mb", 100.0, "Target shard size; ~100 MB suits GCS throughput.")
    flags.DEFINE_integer("num_shards", None, "Shards per split (overrides --shard_size_mb).")
    flags.DEFINE_integer("max_side", None, "Re-encode images whose longer side exceeds this many pixels.")
    flags.DEFINE_integer("max_pixels", MAX_PIXELS, "Skip (with the reason in dataset.json) an image whose header "
                         "declares more pixels than this: a decompression bomb, not a photo (108 MP phone photos fit).")
    flags.DEFINE_integer("max_image_bytes", MAX_IMAGE_BYTES, "Skip (with the reason) an image file larger than "
                         "this; no read goes further, so no stream can hold a worker (1 GiB: any real photo fits).")
    flags.DEFINE_bool("overwrite", False, "Replace a dataset already at --output.")
    flags.DEFINE_integer("workers", None, "--runner=local: parallel decode/encode processes (default: all cores).")
    flags.DEFINE_string("runner", "local", "local (a process pool on this machine), or an Apache Beam runner: "
                        "DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ... Beam's pipeline options "
                        "follow a lone --: `trainer prepare ... --runner=DataflowRunner -- --project=P "
                        "--region=R --temp_location=gs://...` (README: Prepare at scale).")
    flags.DEFINE_bool("strict", False, "Suspicious classes (few images, names equal but for case, ...) fail the "
                      "run instead of a warning.")
    flags.DEFINE_bool("allow_missing_classes", False, "A class with no training image is a warning, not an error.")
    flags.DEFINE_bool("allow_http", False, "--labels rows may name http(s) images (off: each such row is a request "
                      "from wherever prepare runs, e.g. inside your cluster's network, to any address the file names).")
    flags.mark_flags_as_required(["output"])


def run_prepare(argv):
    from trainer.prepare import run as prepare

    _no_extra_args(argv, passthrough_allowed=True)
    prepare.prepare_dataset(
        source=FLAGS.source, output=FLAGS.output, layout=FLAGS.layout,
        val_fraction=FLAGS.val_fraction, test_fraction=FLAGS.test_fraction,
        split_seed=FLAGS.split_seed, shard_size_mb=FLAGS.shard_size_mb,
        num_shards=FLAGS.num_shards, max_side=FLAGS.max_side, max_pixels=FLAGS.max_pixels,
        max_image_bytes=FLAGS.max_image_bytes, overwrite=FLAGS.overwrite,
        workers=FLAGS.workers, labels=FLAGS.labels, strict=FLAGS.strict,
        allow_missing_classes=FLAGS.allow_missing_classes, runner=FLAGS.runner, allow_http=FLAGS.allow_http,
        pipeline_args=tuple(_PASSTHROUGH))


def define_train_flags():
    # One flag per TrainConfig field, with its type, default, choices and help (trainer/config.py).
    config.define_flags(FLAGS)


def run_train(argv):
    _no_extra_args(argv)
    train_config = config.with_launcher_defaults(config.TrainConfig.from_flags(FLAGS), os.environ)
    config.check_config(train_config)  # before TensorFlow loads: a bad value answers at once
    from trainer.train import run as train

    train.run(train_config)


def define_evaluate_flags():
    flags.DEFINE_string("model", None, "The exported model: JOB_DIR/model, or any copy of it; or a .tflite file "
                        "of `trainer tflite`.")
    flags.DEFINE_string("data", None, "URL of the dataset.json written by `trainer prepare`.")
    flags.DEFINE_enum("split", "test", list(SPLITS), "Which split to evaluate.")
    flags.DEFINE_string("output", None, "Folder for metrics.json and the pictures.")
    flags.DEFINE_string("history", None, "A job's history.json for training curves "
                        "(default: next to --model, when there).")
    flags.DEFINE_integer("batch_size", 64, "Batch size for evaluation.")
    flags.DEFINE_float("min_accuracy", None, "Gate: fail (exit 1) when accuracy is below this.")
    flags.DEFINE_string("baseline", None, "Gate: a metrics.json this evaluation must not fall behind.")
    flags.DEFINE_float("tolerance", 0.0, "Gate: how far below --baseline accuracy is still a pass.")
    flags.DEFINE_string("production", None, "The production location of `trainer promote`: its current model is "
                        "scored on the same examples, and metrics.json gets the paired comparison promote decides on.")
    flags.DEFINE_float("recall_tolerance", 0.05, "With --production: no class's recall may fall by more than this.")
    flags.DEFINE_bool("report_only", False, "With --production: write the comparison without failing (exit 0) when "
                      "its decision is 'do not promote'; promote still acts on the recorded decision.")
    flags.DEFINE_bool("require_improvement", False, "With --production: pass only when the candidate is "
                      "significantly better (McNemar's exact test), instead of 'not significantly worse'.")
    flags.mark_flags_as_required(["model", "data", "output"])


def run_evaluate(argv):
    from trainer.evaluate import run as evaluate

    _no_extra_args(argv)
    evaluate.run(model_url=FLAGS.model, manifest_url=FLAGS.data, split=FLAGS.split,
                 output_url=FLAGS.output, history_url=FLAGS.history, batch_size=FLAGS.batch_size,
                 min_accuracy=FLAGS.min_accuracy, baseline_url=FLAGS.baseline,
                 tolerance=FLAGS.tolerance, production_url=FLAGS.production,
                 recall_tolerance=FLAGS.recall_tolerance, require_improvement=FLAGS.require_improvement,
                 report_only=FLAGS.report_only)


def define_predict_flags():
    flags.DEFINE_string("model", None, "The exported model: JOB_DIR/model, or any copy of it.")
    flags.DEFINE_string("input", None, "A folder, a glob, a gs:// prefix of images, one image, or a Vertex AI "
                        "label file (.csv/.jsonl, as prepare --labels takes) listing the images to score.")
    flags.DEFINE_string("output", None, "A .csv or .jsonl file (one file, --runner=local), or a folder for shards "
                        "predictions-00000-of-000NN.csv: path, predicted class, one probability per class, error.")
    flags.DEFINE_enum("format", "csv", ["csv", "jsonl"], "csv, or jsonl in Vertex AI batch prediction's shape "
                      "({instance, prediction: {ids, displayNames, confidences}}); a file --output's ending decides.")
    flags.DEFINE_integer("top_k", 0, "For many classes: the best K classes and their probabilities per row "
                         "(0: every class's probability).")
    flags.DEFINE_integer("num_shards", None, "Shards of a folder --output (default: one per 10,000 images).")
    flags.DEFINE_bool("overwrite", False, "Replace the shards of a finished run at --output (an unfinished one "
                      "resumes: only its missing shards are written).")
    flags.DEFINE_string("runner", "local", "local (this process), or an Apache Beam runner (DirectRunner, "
                        "DataflowRunner, ...) scoring the shards with RunInference; Beam's pipeline options follow a "
                        "lone -- (README: Predict at scale).")
    flags.DEFINE_integer("batch_size", 64, "Images scored per batch.")
    flags.DEFINE_integer("max_image_bytes", MAX_IMAGE_BYTES, "An image file larger than this gets its row with the "
                         "reason instead of a score; no read goes further.")
    flags.DEFINE_bool("allow_http", False, "A label file --input may name http(s) images.")
    flags.mark_flags_as_required(["model", "input", "output"])


def run_predict(argv):
    from trainer.serve import predict

    _no_extra_args(argv, passthrough_allowed=True)
    predict.predict(model_url=FLAGS.model, input_location=FLAGS.input, output_url=FLAGS.output,
                    batch_size=FLAGS.batch_size, max_image_bytes=FLAGS.max_image_bytes, output_format=FLAGS.format,
                    top_k=FLAGS.top_k, runner=FLAGS.runner, pipeline_args=tuple(_PASSTHROUGH),
                    num_shards=FLAGS.num_shards, overwrite=FLAGS.overwrite, allow_http=FLAGS.allow_http)


def define_promote_flags():
    flags.DEFINE_string("candidate", None, "The candidate's job_dir (its model/ and eval/metrics.json).")
    flags.DEFINE_string("production", None, "The production location that serving reads.")
    flags.DEFINE_float("min_accuracy", None, "Also require at least this test accuracy.")
    flags.DEFINE_bool("allow_class_change", False, "Let a model with other classes replace production's.")
    flags.DEFINE_string("registry", None, "After the switch, register the version in MLflow's Model Registry as a new "
                        "version of one model with the alias champion: mlflow://HOST:PORT/MODEL (or mlflow+https://).")
    flags.mark_flags_as_required(["candidate", "production"])


def run_promote(argv):
    from trainer.release import promote

    _no_extra_args(argv)
    promote.promote(candidate=FLAGS.candidate, production=FLAGS.production,
                    min_accuracy=FLAGS.min_accuracy, allow_class_change=FLAGS.allow_class_change,
                    registry_url=FLAGS.registry)


def define_tflite_flags():
    flags.DEFINE_string("model", None, "The exported model: JOB_DIR/model, or any copy of it.")
    flags.DEFINE_string("output", None, "Folder for model_<kind>.tflite and tflite.json (e.g. JOB_DIR/tflite).")
    flags.DEFINE_list("kinds", ["float32", "float16", "int8"], "Which: float32, float16 (half the size), int8 "
                      "(dynamic-range quantization, a quarter). Score one with `trainer evaluate --model=FILE.tflite`.")
    flags.mark_flags_as_required(["model", "output"])


def run_tflite(argv):
    from trainer.serve import tflite

    _no_extra_args(argv)
    tflite.convert(FLAGS.model, FLAGS.output, kinds=FLAGS.kinds)


COMMANDS = {
    "prepare": (define_prepare_flags, run_prepare, "images -> sharded TFRecords + dataset.json"),
    "train": (define_train_flags, run_train, "train (and export) a transfer-learning classifier"),
    "evaluate": (define_evaluate_flags, run_evaluate, "metrics.json + pictures for a split; CI gate"),
    "predict": (define_predict_flags, run_predict, "score images with an exported model -> CSV/JSONL, here or on Beam"),
    "promote": (define_promote_flags, run_promote, "copy a candidate model to production if it passes"),
    "tflite": (define_tflite_flags, run_tflite, "TensorFlow Lite copies of an exported model (float32, float16, int8)"),
}


# The arguments after a lone `--` (Beam's pipeline options for `trainer prepare --runner=...`).
_PASSTHROUGH = []


def _no_extra_args(argv, passthrough_allowed=False):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _PASSTHROUGH and not passthrough_allowed:
        raise app.UsageError(f"unexpected arguments after --: {' '.join(_PASSTHROUGH)}")


def _usage():
    lines = ["usage: trainer <command> [--flag=value ...]   (trainer <command> --help)", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "\n".join(lines)


def _parse_flags(argv):
    """absl's parser, with every problem reported on one line (and exit code 1)."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        if "Unable to open flagfile" in message:  # absl: "ERROR:: Unable to open flagfile: [Errno 2] ..."
            message = "cannot read --flagfile: " + message.split("Unable to open flagfile:", 1)[-1].strip()
        sys.stderr.write(f"{argv[0]}: error: {message}\n")
        sys.exit(errors.EXIT_BAD_INPUT)


def _run_safely(run):
    def main(argv):
        try:
            if FLAGS.verbosity < 1:  # `--verbosity=1` or more keeps TensorFlow's start-up lines
                tfstart.quiet_tensorflow_start()
                if not FLAGS.log_dir:  # and absl's long prefix (thread, file:line), as log files do
                    logging.get_absl_handler().setFormatter(_short_format())
            faults.configure(os.environ)
            run(argv)
        except Exception as error:  # noqa: BLE001 - every error ends as one line and its exit status
            code, message = errors.exit_status(error)
            if code == errors.EXIT_SOFTWARE:
                logging.exception("internal error")  # a bug: keep the traceback for the report
            _exit(code, message)
        except KeyboardInterrupt as stop:  # our handler names the signal; Python's own Ctrl-C does not
            _exit(errors.EXIT_RETRYABLE, f"interrupted ({stop.args[0] if stop.args else 'SIGINT'}); rerun to go on")
        _exit(errors.EXIT_OK)

    return main


_exit = errors.exit_process


def _short_format():
    """`2026-12-07T05:44:00.123Z I message`: the UTC time and the level, for terminals and Kubernetes logs."""
    import time

    formatter = std_logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname).1s %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    return formatter


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else errors.EXIT_BAD_INPUT)
    name = argv[1]
    if name not in COMMANDS:
        sys.stderr.write(f"trainer: error: unknown command {name!r}\n{_usage()}\n")
        sys.exit(errors.EXIT_BAD_INPUT)
    define, run, summary = COMMANDS[name]
    define()
    program = f"trainer {name}"
    rest = argv[2:]
    if "--" in rest:
        _PASSTHROUGH[:] = rest[rest.index("--") + 1:]
        rest = rest[:rest.index("--")]
    if any(arg in ("-h", "--help", "-help", "--helpshort") for arg in rest):
        print(f"usage: {program} [--flag=value ...]\n\n{summary}\n")
        # This module's flags, or (train) those trainer.config defines from TrainConfig.
        print("\n".join(text for text in (FLAGS.module_help(sys.modules[__name__]), FLAGS.module_help(config))
                        if text))
        sys.exit(0)
    if os.environ.get(CHECK_FLAGS_VARIABLE):  # k8s/render.py: are these a valid command line?
        extra = _parse_flags([program, *rest])[1:]
        if extra:
            sys.stderr.write(f"{program}: error: unexpected arguments: {' '.join(extra)}\n")
            sys.exit(errors.EXIT_BAD_INPUT)
        sys.exit(errors.EXIT_OK)
    logging.set_verbosity(logging.INFO)
    # Our INFO lines, not TensorFlow's (it logs every cross-device reduction at INFO).
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    if name != "train":  # train backs up first (trainer.train.guards.install_stop_handlers)
        for signum in STOP_SIGNALS:
            signal.signal(signum, _interrupted)
        errors.exit_after_signal(STOP_SIGNALS, SIGTERM_EXIT_SECONDS, errors.EXIT_RETRYABLE,
                                 "interrupted ({signal}); rerun to go on")
    try:
        app.run(_run_safely(run), argv=[program, *rest], flags_parser=_parse_flags)
    except KeyboardInterrupt as stop:  # while absl parsed the flags, before the command ran
        _exit(errors.EXIT_RETRYABLE, f"interrupted ({stop.args[0] if stop.args else 'SIGINT'}); rerun to go on")


SIGTERM_EXIT_SECONDS = 25  # below the manifests' terminationGracePeriodSeconds (30)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # Kubernetes' stop, and Ctrl-C: the same bounded exit 75


def _interrupted(signum, frame):
    """SIGTERM or SIGINT: stop with exit 75 (files are written whole or not at all); within
    SIGTERM_EXIT_SECONDS even when the main thread is stuck (`errors.exit_after_signal`)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    main()
