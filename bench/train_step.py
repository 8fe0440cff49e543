"""Training-step benchmark: model.fit steps/s fed by our reader against an in-memory synthetic dataset.

    python -m bench.train_step --output=bench_output
    python -m bench.train_step --smoke --output=/tmp/bench      # tests: tiny, one round

If the reader keeps up, a step costs what the model costs and the two rates match: the goal
(issue 6) is reader / synthetic >= 0.95. The synthetic dataset is one batch of the same shape and
dtype, held in memory and repeated, so it costs nothing per step.

On a GPU node the decode runs on CPU cores the model does not use. Here both share 2 cores, so
any CPU the reader spends is taken from the model: this is the harder setting, and a model that
is cheap relative to decoding (the "tiny" test backbone at 150 px) makes the ratio mostly a
measure of how much CPU the reader takes, while a real backbone makes it a measure of whether
prefetching hides the reader. Both backbones can be run (--backbone).

Rates are steady-state steps/s, timed from a callback after --skip_steps steps of each fit (the
first steps pay for filling the shuffle buffer and the prefetch queue once per fit; a real run
pays that once per job, not per step). Results: OUTPUT/train_step.json.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import common  # noqa: E402

GOAL = 0.95


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def prepare_shards(work_dir, images, max_side):
    """Photo-like JPEG folders -> shards (at full size, or with --max_side); returns the manifest path."""
    from trainer.prepare.run import prepare_dataset

    folders = os.path.join(work_dir, "images")
    common.write_split_folders(folders, images)
    output = os.path.join(work_dir, "shards")
    prepare_dataset(folders, output, layout="split_dirs", num_shards=4, max_side=max_side)
    return os.path.join(output, "dataset.json")


class StepTimer:
    """A Keras callback: steps/s between the end of step `skip` and the end of the last step of a fit.

    Not up to when `fit` returns: Keras sometimes takes 3-5 s to return after the last step, with
    any dataset, even the synthetic one (measured). That is a cost per `fit` call, which a training
    run pays once per phase; `fit_end_seconds` records it.
    """

    def __new__(cls, skip):
        from trainer.infra.kerasapi import keras

        class _StepTimer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.step, self.started, self.timed, self.last = 0, None, 0, None

            def on_train_batch_end(self, batch, logs=None):
                self.step += 1
                self.last = time.perf_counter()
                if self.step == skip:
                    self.started = self.last
                elif self.step > skip:
                    self.timed += 1

            def rate(self):
                return self.timed / (self.last - self.started)

            def fit_end_seconds(self):
                return time.perf_counter() - self.last

        return _StepTimer()


def synthetic_dataset(image_size, batch_size):
    """One batch of the reader's shape and dtype (float32 0-255, int32 labels), in memory, repeated."""
    import tensorflow as tf

    images = tf.random.stateless_uniform([batch_size, image_size, image_size, 3], seed=[0, 1],
                                         maxval=255.0)
    labels = tf.cast(tf.range(batch_size) % 2, tf.int32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def run(images, rounds, steps, skip_steps, output, backbone, image_size, batch_size, max_side, work_dir=None,
        quiet_cores=0.3, quiet_timeout=120.0, model_threads=None):
    import tensorflow as tf

    if model_threads:
        # The model's ops run on this many threads; tf.data has its own threads, so the reader
        # decodes on the cores left over, as it does beside a GPU.
        tf.config.threading.set_intra_op_parallelism_threads(model_threads)
        tf.config.threading.set_inter_op_parallelism_threads(model_threads)
    from trainer.data.pipeline import make_dataset
    from trainer.infra.kerasapi import keras
    from trainer.train.model import build_model
    from trainer.train.optimize import compile_model

    started = time.perf_counter()
    machine = common.describe_machine()
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=work_dir) as temporary:
        manifest = prepare_shards(temporary, images, max_side)
        datasets = {
            "synthetic": synthetic_dataset(image_size, batch_size),
            "reader": make_dataset(manifest, "train", image_size, batch_size, training=True),  # repeated forever
            # The reader's batches decoded once and then served from memory: the same pipeline shape
            # without the decode CPU, which here comes out of the model's 2 cores.
            "reader_cached": make_dataset(manifest, "train", image_size, batch_size, training=True,
                                          repeat=1).cache().repeat(),
        }
        keras.utils.set_random_seed(0)
        model = build_model(backbone, 2, image_size, weights=None)
        compile_model(model, 2, learning_rate=1e-5)
        timer = StepTimer(skip_steps)

        fit_ends = []

        def fit(name, fit_steps):
            model.fit(datasets[name], epochs=1, steps_per_epoch=fit_steps, verbose=0, callbacks=[timer])
            fit_ends.append(timer.fit_end_seconds())
            return timer.rate()

        epoch_steps = int(0.7 * images) // batch_size + 1
        for name in datasets:
            # Traces the train step once (later fits reuse it) and fills the cache with a whole epoch.
            fit(name, skip_steps + 2 + (epoch_steps if name == "reader_cached" else 0))
        rates = {name: [] for name in datasets}
        others = {name: [] for name in datasets}
        other_load = common.OtherLoad()
        for round_index in range(rounds):
            order = list(datasets) if round_index % 2 == 0 else list(datasets)[::-1]
            for name in order:
                if quiet_cores is not None and other_load.wait_until_below(quiet_cores, quiet_timeout):
                    log("waited for other processes to calm down")
                other_load.start()
                rates[name].append(fit(name, skip_steps + steps))
                others[name].append(round(other_load.cores(), 2))
                log(f"round {round_index + 1}/{rounds} {name}: {rates[name][-1]:.2f} steps/s "
                    f"(other processes: {others[name][-1]:.2f} cores)")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["reader"] / medians["synthetic"]
    cached_ratio = medians["reader_cached"] / medians["synthetic"]
    results = {
        "benchmark": "train_step",
        "command": " ".join(["python -m bench.train_step", *sys.argv[1:]]),
        "machine": machine,
        "config": {"images": images, "rounds": rounds, "steps": steps, "skip_steps": skip_steps,
                   "backbone": backbone, "image_size": image_size, "batch_size": batch_size,
                   "max_side": max_side, "model_threads": model_threads},
        "fit_end_seconds_median": round(statistics.median(fit_ends), 2),
        "fit_end_seconds_max": round(max(fit_ends), 2),
        "loaders": {name: {"rates": [round(value, 3) for value in rates[name]], "median": round(medians[name], 3),
                           "images_per_second": round(medians[name] * batch_size, 1),
                           "other_cores": others[name]} for name in rates},
        "ratios": [{"name": "reader / synthetic steps/s", "value": round(ratio, 3), "goal": GOAL,
                    "pass": ratio >= GOAL},
                   {"name": "reader_cached / synthetic steps/s (not a goal: the pipeline without decoding)",
                    "value": round(cached_ratio, 3), "goal": None, "pass": None}],
        "seconds": round(time.perf_counter() - started, 1),
    }
    name = "train_step" + (f"_max_side_{max_side}" if max_side else "") + (
        f"_model_threads_{model_threads}" if model_threads else "")
    common.write_json(os.path.join(output, f"{name}.json"), results)
    print(f"{'dataset':<12} {'median steps/s':>15} {'images/s':>9}  rounds")
    for name, result in results["loaders"].items():
        print(f"{name:<12} {result['median']:>15.2f} {result['images_per_second']:>9.1f}  {result['rates']}")
    print(f"reader / synthetic = {ratio:.3f} (goal >= {GOAL}): {'PASS' if ratio >= GOAL else 'MISS'}"
          f"  [{backbone}, {image_size} px, batch {batch_size}, shards max_side={max_side}, "
          f"model threads {model_threads or 'all'}]")
    print(f"reader_cached / synthetic = {cached_ratio:.3f} (the same pipeline, decoded once: what is left "
          "when the decode does not share the model's cores)")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=common.positive_int, default=1000, help="photo-like JPEGs (70%% train)")
    parser.add_argument("--rounds", type=common.positive_int, default=3, help="timed fits per dataset (interleaved)")
    parser.add_argument("--steps", type=common.positive_int, default=30, help="timed steps per fit")
    parser.add_argument("--skip_steps", type=common.positive_int, default=5,
                        help="untimed steps at the start of each fit")
    parser.add_argument("--backbone", default="mobilenet_v2", help="trainer.train.model backbone (weights=None)")
    parser.add_argument("--image_size", type=common.positive_int, default=150)
    parser.add_argument("--batch_size", type=common.positive_int, default=64)
    parser.add_argument("--max_side", type=common.positive_int, default=None, help="prepare the shards with --max_side")
    parser.add_argument("--model_threads", type=common.positive_int, default=None,
                        help="run the model's ops on this many threads (default: all cores), leaving the "
                             "rest to the reader as beside a GPU")
    parser.add_argument("--output", default="bench_output", help="folder for train_step.json")
    parser.add_argument("--work_dir", default=None, help="where the temporary images and shards go")
    parser.add_argument("--quiet_cores", type=float, default=0.3,
                        help="before each fit, wait until other processes use fewer cores than this (<0: never)")
    parser.add_argument("--quiet_timeout", type=float, default=120.0, help="longest such wait, in seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
    options = parser.parse_args(argv)
    if options.smoke:
        options.images, options.rounds, options.steps, options.skip_steps = 60, 1, 2, 1
        options.backbone, options.image_size, options.batch_size, options.quiet_cores = "tiny", 32, 8, -1
    run(options.images, options.rounds, options.steps, options.skip_steps, options.output, options.backbone,
        options.image_size, options.batch_size, options.max_side, options.work_dir,
        options.quiet_cores if options.quiet_cores >= 0 else None, options.quiet_timeout, options.model_threads)


if __name__ == "__main__":
    main()
