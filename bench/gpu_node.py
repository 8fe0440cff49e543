"""What a GPU node gives a training run, measured in one command within a time budget.

    python -m bench.gpu_node --output=bench_output            # a GPU node: 420 s at most
    python -m bench.gpu_node --smoke --output=/tmp/bench      # tests, on CPU: tiny settings

On whatever accelerators the machine has (every GPU under MirroredStrategy; the CPU without one),
it writes photo-like shards once (full size, and with --max_side), then measures each as images/s
while sampling the GPUs' utilisation and memory (trainer.infra.devices):

  reader          the input pipeline alone, full-size and --max_side shards: what the node's CPUs feed
  seed_fp32       the seed recipe (VGG16, 150 px, batch 64 per GPU) streaming from the shards
  seed_mixed, seed_jit, seed_mixed_jit   the same with --mixed_precision and/or --jit_compile
  extract         the frozen base over the shards once (the feature cache's pass)
  cached_head     the head phase on cached features, in memory
  fine_tune       VGG16 from block5_conv1, streaming
  modern          EfficientNetV2-S at 224 px, mixed precision, streaming

Every training figure is paired with the same model on one in-memory synthetic batch: the ratio
says whether that configuration is input-bound (well below 1) or compute-bound (about 1). Each
measurement gets an equal share of what is left of --budget_seconds (after the shards are
written) and stops by itself; one that does not fit is recorded as skipped. Prints a table and
writes OUTPUT/gpu_node.json (docs/benchmarks.md §4 explains the figures and the cores rule).
"""

import time

STARTED = time.perf_counter()  # the budget counts from the process's start: TensorFlow's too

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import common  # noqa: E402

# (name, backbone, image size, mixed precision, XLA, fine-tune from): the training measurements.
FULL = {"seed": ("vgg16", 150), "modern": ("efficientnetv2s", 224), "fine_tune_from": "block5_conv1",
        "batch_per_replica": 64, "images": 2000, "max_side": 225}
SMOKE = {"seed": ("tiny", 32), "modern": ("tiny", 48), "fine_tune_from": "block3_conv1",
         "batch_per_replica": 8, "images": 48, "max_side": 48}
WARMUP_STEPS = 3  # untimed steps of each measurement (tracing, XLA compilation, filling the prefetch)


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Timed:
    """A Keras callback: images/s after WARMUP_STEPS steps, stopping the fit once `seconds` passed."""

    def __new__(cls, seconds, batch):
        from trainer.infra.kerasapi import keras

        class _Timed(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.steps, self.started, self.deadline = 0, None, None

            def on_train_batch_end(self, step, logs=None):
                self.steps += 1
                now = time.perf_counter()
                if self.steps == WARMUP_STEPS:
                    self.started, self.deadline = now, now + seconds
                elif self.deadline and now >= self.deadline:
                    self.model.stop_training = True
                self.last = now

            def rate(self):
                timed = self.steps - WARMUP_STEPS
                return timed * batch / (self.last - self.started) if timed > 0 else None

        return _Timed()


def measure(name, seconds, sampler, run):
    """`run(seconds)` -> images/s, with the GPUs sampled while it runs."""
    sampler.take()
    started = time.perf_counter()
    rate = run(seconds)
    result = {"name": name, "images_per_second": round(rate, 1) if rate else None,
              "seconds": round(time.perf_counter() - started, 1), **(sampler.take() or {})}
    log(f"{name}: {result['images_per_second']} img/s in {result['seconds']} s")
    return result


def reader_rate(manifest, image_size, batch):
    from trainer.data.pipeline import make_dataset

    def run(seconds):
        dataset = iter(make_dataset(manifest, "train", image_size, batch, training=True))
        for _ in range(WARMUP_STEPS):
            next(dataset)
        started, images = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            images += int(next(dataset)[0].shape[0])
        return images / (time.perf_counter() - started)

    return run


def synthetic(image_size, batch, classes=2):
    import tensorflow as tf

    images = tf.random.stateless_uniform([batch, image_size, image_size, 3], seed=[0, 1], maxval=255.0)
    return tf.data.Dataset.from_tensors((images, tf.range(batch) % classes)).repeat()


def training_rate(strategy, manifest, backbone, image_size, batch, mixed=False, jit=False, fine_tune_from=None,
                  data="reader"):
    """A fit of the classifier on the shards (`data="reader"`) or on one synthetic batch."""
    from trainer.data.pipeline import make_dataset
    from trainer.infra.kerasapi import keras
    from trainer.train import model as model_lib
    from trainer.train import optimize

    def run(seconds):
        keras.mixed_precision.set_global_policy(optimize.mixed_precision_policy() if mixed else "float32")
        try:
            with strategy.scope():
                classifier = model_lib.build_model(backbone, 2, image_size, weights=None)
                if fine_tune_from:
                    model_lib.unfreeze_from(classifier, fine_tune_from)
                optimize.compile_model(classifier, 2, 1e-5, jit_compile=jit)
            dataset = (make_dataset(manifest, "train", image_size, batch, training=True) if data == "reader"
                       else synthetic(image_size, batch))
            timer = Timed(seconds, batch)
            classifier.fit(dataset, epochs=1, steps_per_epoch=10**6, verbose=0, callbacks=[timer])
            return timer.rate()
        finally:
            keras.mixed_precision.set_global_policy("float32")

    return run


def extraction_rate(strategy, manifest, backbone, image_size, batch):
    """The frozen base over the shards on every replica (the feature cache's one pass), images/s."""
    import tensorflow as tf

    from trainer.data.pipeline import make_dataset
    from trainer.train import model as model_lib

    def run(seconds):
        with strategy.scope():
            base = model_lib.build_base(backbone, image_size, None)

        @tf.function
        def extract(images):
            return strategy.run(lambda pixels: base(pixels, training=False), args=(images,))

        batches = iter(strategy.experimental_distribute_dataset(
            make_dataset(manifest, "train", image_size, batch, training=True).map(lambda images, _: images)))
        for _ in range(WARMUP_STEPS):
            extract(next(batches))
        started, images = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            for part in strategy.experimental_local_results(extract(next(batches))):
                images += int(part.numpy().shape[0])  # to host, as the cache writes it
        return images / (time.perf_counter() - started)

    return run


def cached_head_rate(strategy, backbone, image_size, batch):
    """The head phase on features in memory (the feature cache's epochs), images/s."""
    import tensorflow as tf

    from trainer.train import model as model_lib
    from trainer.train import optimize

    def run(seconds):
        with strategy.scope():
            shape = model_lib.build_base(backbone, image_size, None).output_shape[1:]
            head = model_lib.build_head(shape, 2)
            optimize.compile_model(head, 2, 1e-5)
        features = tf.random.stateless_uniform([batch, *shape], seed=[1, 2])
        dataset = tf.data.Dataset.from_tensors((features, tf.range(batch) % 2)).repeat()
        timer = Timed(seconds, batch)
        head.fit(dataset, epochs=1, steps_per_epoch=10**6, verbose=0, callbacks=[timer])
        return timer.rate()

    return run


def prepare_shards(work_dir, images, max_side):
    """Photo-like JPEGs -> shards at full size and with `max_side`: {"full": manifest, "max_side": manifest}."""
    from trainer.prepare.run import prepare_dataset

    source = os.path.join(work_dir, "images")
    common.write_split_folders(source, images)
    manifests = {}
    for name, side in (("full", None), ("max_side", max_side)):
        output = os.path.join(work_dir, name)
        prepare_dataset(source, output, layout="split_dirs", num_shards=4, max_side=side)
        manifests[name] = os.path.join(output, "dataset.json")
    return manifests


def plan(settings, manifests, strategy, batch):
    """[(name, run, paired synthetic run or None)] in the order they are measured."""
    seed, size = settings["seed"]
    modern, modern_size = settings["modern"]
    full, small = manifests["full"], manifests["max_side"]

    def train(data, **options):
        return training_rate(strategy, small, data=data, batch=batch, **options)

    seed_options = {"backbone": seed, "image_size": size}
    items = [("reader_full_size", reader_rate(full, size, batch), None),
             ("reader_max_side", reader_rate(small, size, batch), None)]
    for name, mixed, jit in (("seed_fp32", False, False), ("seed_mixed", True, False), ("seed_jit", False, True),
                             ("seed_mixed_jit", True, True)):
        items.append((name, train("reader", mixed=mixed, jit=jit, **seed_options),
                      train("synthetic", mixed=mixed, jit=jit, **seed_options)))
    items += [("extract", extraction_rate(strategy, small, seed, size, batch), None),
              ("cached_head", cached_head_rate(strategy, seed, size, batch), None),
              ("fine_tune", train("reader", fine_tune_from=settings["fine_tune_from"], **seed_options),
               train("synthetic", fine_tune_from=settings["fine_tune_from"], **seed_options)),
              ("modern_mixed", train("reader", backbone=modern, image_size=modern_size, mixed=True),
               train("synthetic", backbone=modern, image_size=modern_size, mixed=True))]
    return items


def run(options):
    import tensorflow as tf

    from trainer.infra import devices
    from trainer.train import distribute

    started = STARTED
    settings = SMOKE if options.smoke else FULL
    strategy, _ = distribute.make_strategy("mirrored")
    replicas = strategy.num_replicas_in_sync
    batch = settings["batch_per_replica"] * replicas
    sampler = devices.GpuSampler()
    gpus = devices.describe()
    log(f"{gpus['count']} GPU(s) {gpus['names']}, {replicas} replica(s), global batch {batch}, "
        f"budget {options.budget_seconds} s")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=options.work_dir) as work_dir:
        manifests = prepare_shards(work_dir, options.images or settings["images"], settings["max_side"])
        log(f"shards written in {time.perf_counter() - started:.0f} s")
        items = plan(settings, manifests, strategy, batch)
        # Every run costs its measurement plus building and warming up the model: a share of what
        # is left, of which a third is spent measuring.
        runs_left = sum(2 if paired else 1 for _, _, paired in items)
        for name, measured, paired in items:
            for label, run_one in ((name, measured), (f"{name}_synthetic", paired)):
                if run_one is None:
                    continue
                share = (options.budget_seconds - (time.perf_counter() - started)) / runs_left
                runs_left -= 1
                if share < options.min_seconds:
                    results.append({"name": label, "skipped": f"budget: {share:.0f} s left for it"})
                    log(f"{label}: skipped (budget)")
                    continue
                seconds = min(share / 3, options.measure_seconds or share)
                results.append(measure(label, seconds, sampler, run_one))
    sampler.stop()
    figures = {entry["name"]: entry for entry in results}
    for entry in results:
        paired = figures.get(f"{entry['name']}_synthetic")
        if paired and entry.get("images_per_second") and paired.get("images_per_second"):
            entry["input_bound_ratio"] = round(entry["images_per_second"] / paired["images_per_second"], 3)
    reader = figures.get("reader_max_side", {}).get("images_per_second")
    seed = figures.get("seed_mixed_synthetic", {}).get("images_per_second")
    cores = os.cpu_count() or 1
    # The cores a GPU needs: its model's img/s over what one core of the reader delivers.
    cores_per_gpu = round(seed / max(replicas, 1) / (reader / cores), 2) if reader and seed else None
    output = {
        "benchmark": "gpu_node", "command": " ".join(["python -m bench.gpu_node", *sys.argv[1:]]),
        "machine": common.describe_machine(), "gpus": gpus, "replicas": replicas, "global_batch": batch,
        "tensorflow": tf.__version__, "build": {key: value for key, value in tf.sysconfig.get_build_info().items()
                                                if key in ("cuda_version", "cudnn_version")},
        "settings": {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()},
        "budget_seconds": options.budget_seconds, "measurements": results,
        "cores_per_gpu": {"value": cores_per_gpu, "rule": "seed_mixed_synthetic img/s per GPU / "
                                                          "(reader_max_side img/s / CPU cores)"},
        "seconds": round(time.perf_counter() - started, 1)}
    if "://" in options.output:  # a bucket (the Kubernetes Job's and Vertex AI's runs keep nothing local)
        from trainer.infra import faults, storage

        faults.configure(os.environ)
        storage.write_json(storage.join(options.output, "gpu_node.json"), output)
    else:
        common.write_json(os.path.join(options.output, "gpu_node.json"), output)
    print(f"{'measurement':<26} {'img/s':>9} {'vs synthetic':>13} {'GPU util %':>11} {'GPU MiB':>9}")
    for entry in results:
        rate = entry.get("images_per_second")
        print(f"{entry['name']:<26} {rate if rate is not None else '-':>9} {entry.get('input_bound_ratio', ''):>13} "
              f"{entry.get('gpu_utilization', '-'):>11} {entry.get('gpu_memory_mib', '-'):>9}"
              + (f"  ({entry['skipped']})" if "skipped" in entry else ""))
    print(f"CPU cores one GPU needs to be fed (seed recipe, mixed precision): {cores_per_gpu}; "
          f"{output['seconds']:.0f} s of a {options.budget_seconds} s budget")
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench_output", help="folder (or gs:// prefix) for gpu_node.json")
    parser.add_argument("--budget_seconds", type=common.positive_int, default=420,
                        help="the whole run, shards included, ends within this")
    parser.add_argument("--min_seconds", type=float, default=6.0,
                        help="a measurement with less of the budget left than this is skipped")
    parser.add_argument("--images", type=common.positive_int, default=None, help="photo-like JPEGs to shard")
    parser.add_argument("--work_dir", default=None, help="where the temporary images and shards go")
    parser.add_argument("--measure_seconds", type=float, default=None,
                        help="measure each figure for at most this long (default: a third of its share)")
    parser.add_argument("--smoke", action="store_true", help="tiny backbones and images: a CPU test of the command "
                        "(each figure measured for 1 s)")
    options = parser.parse_args(argv)
    if options.smoke and options.measure_seconds is None:
        options.measure_seconds = 1.0
    run(options)


if __name__ == "__main__":
    main()
