"""Frozen-feature cache benchmark: the seed's 10 head epochs with and without --feature_cache.

    python -m bench.feature_cache --output=bench_output            # VGG16 at 64 px, ~1,000 images
    python -m bench.feature_cache --smoke --output=/tmp/bench      # tests: tiny, 2 epochs
    python -m bench.feature_cache --workers=2 --per_class=600 --batch_size=32 --output=bench_output
                                     # two loopback workers under MultiWorkerMirroredStrategy (issue 13)

The images are photo-like 500x375 JPEGs (random crops of scikit-image's sample photos, each class
from its own half of them: learnable, and as costly to decode as real photos), as in issue 13's
measurement; `--images=stripes` uses the tests' small striped JPEGs instead. Both runs are the real
`trainer train` command on the same prepared data, same backbone, flags and seed; only
--feature_cache differs. Each is then evaluated with the real `trainer evaluate` on the
test split. Goal (issues 6 and 13, one worker or two): >= 5x less wall time with the cache, test
accuracy within one point. With --workers=2 each run is two `trainer train` processes on loopback
(TF_CONFIG, --strategy=multi_worker), each pinned to a core of its own as on a cluster of one-core
nodes (--share_cores: all share every core), timed until both have exited.

On CPU the seed's 150 px VGG16 would take hours uncached, so the images are smaller (64 px) and the
weights random (no ImageNet download here); the learning rate is 1e-4 instead of 1e-5 so the head
learns something on random features in 10 epochs. The ratio is what matters: without the cache
every epoch pays the frozen VGG16 forward pass again; with it, one pass per split. Results:
OUTPUT/feature_cache.json (OUTPUT/feature_cache_2workers.json with --workers=2).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def trainer(*args):
    result = subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"trainer {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def train_on_workers(args, workers, work, share_cores=False):
    """`trainer train` as `workers` loopback processes (TF_CONFIG); returns the chief's log text.

    Each worker is pinned to a core of its own (as each has a node of its own on a cluster;
    TensorFlow then sizes its thread pools to that core), unless `share_cores` or there are
    fewer cores than workers."""
    if workers == 1:
        return trainer("train", *args).stderr
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import free_ports

    hosts = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    processes, logs = [], []
    cores = sorted(os.sched_getaffinity(0))
    pin = not share_cores and len(cores) >= workers
    for index in range(workers):
        scratch = os.path.join(work, f"tmp-{index}-{time.monotonic_ns()}")
        os.makedirs(scratch)
        env = {**os.environ, "TMPDIR": scratch,
               "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})}
        logs.append(open(os.path.join(scratch, "log.txt"), "w+"))  # noqa: SIM115 - closed below
        pinned = (lambda core=cores[index]: os.sched_setaffinity(0, {core})) if pin else None
        processes.append(subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", *args,
                                           "--strategy=multi_worker"], stdout=logs[-1], stderr=subprocess.STDOUT,
                                          env=env, preexec_fn=pinned))
    codes = [process.wait() for process in processes]
    texts = []
    for handle in logs:
        handle.seek(0)
        texts.append(handle.read())
        handle.close()
    if codes != [0] * workers:
        raise SystemExit(f"trainer train on {workers} workers failed ({codes}):\n{texts[0][-3000:]}")
    return texts[0]


def phase_seconds(log_text):
    """Seconds from the logged plan to the end of the head phase (the log's UTC timestamps)."""
    import datetime

    def stamp(line):
        return datetime.datetime.fromisoformat(line.split()[0].rstrip("Z"))

    lines = log_text.splitlines()
    start = next(line for line in lines if " I plan:" in line)
    end = next(line for line in lines if "phase head finished" in line)
    return (stamp(end) - stamp(start)).total_seconds()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench_output", help="folder for feature_cache.json")
    parser.add_argument("--per_class", type=common.positive_int, default=500, help="images per class")
    parser.add_argument("--image_size", type=common.positive_int, default=64)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--epochs", type=common.positive_int, default=10)
    parser.add_argument("--batch_size", type=common.positive_int, default=64, help="global batch")
    parser.add_argument("--workers", type=common.positive_int, default=1,
                        help="loopback workers per run (MultiWorkerMirroredStrategy when > 1)")
    parser.add_argument("--learning_rate", type=float, default=1e-4,
                        help="the head's Adam learning rate (random VGG16 features need more than the seed's 1e-5)")
    parser.add_argument("--images", choices=("photos", "stripes"), default="photos",
                        help="photos: photo-like 500x375 JPEGs, each class cropped from its own sample photos "
                             "(the issue's setup); stripes: the tests' small striped JPEGs (cheap to decode)")
    parser.add_argument("--share_cores", action="store_true",
                        help="with --workers > 1: let the workers share every core (default: one core each)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite")
    options = parser.parse_args()
    if options.smoke:
        options.per_class, options.image_size, options.backbone, options.epochs = 60, 32, "tiny", 2

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import write_stripes

    from trainer.infra import storage

    work = tempfile.mkdtemp(prefix="bench-cache-")
    if options.images == "photos" and not options.smoke:
        common.write_split_folders(os.path.join(work, "images"), 2 * options.per_class, learnable=True)
    else:
        write_stripes(os.path.join(work, "images"), per_class=options.per_class)
    data = os.path.join(work, "data")
    trainer("prepare", f"--source={os.path.join(work, 'images')}", f"--output={data}", "--num_shards=4")
    manifest = storage.read_json(os.path.join(data, "dataset.json"))
    common_flags = [f"--data={data}/dataset.json", f"--backbone={options.backbone}", "--weights=none",
                    f"--image_size={options.image_size}", f"--batch_size={options.batch_size}",
                    f"--epochs={options.epochs}",
                    f"--learning_rate={options.learning_rate}", "--fine_tune_epochs=0", "--seed=0"]
    results = {"machine": common.describe_machine(), "backbone": options.backbone, "workers": options.workers,
               "images": "stripes" if options.smoke else options.images, "learning_rate": options.learning_rate,
               "batch_size": options.batch_size, "share_cores": options.share_cores,
               "image_size": options.image_size, "epochs": options.epochs,
               "train_examples": manifest["splits"]["train"]["count"],
               "test_examples": manifest["splits"]["test"]["count"], "runs": {}}
    for cache in ("off", "on"):
        job = os.path.join(work, f"job-{cache}")
        log(f"training with --feature_cache={cache} ...")
        started = time.perf_counter()
        log_text = train_on_workers([*common_flags, f"--job_dir={job}", f"--feature_cache={cache}"], options.workers,
                                    work, options.share_cores)
        seconds = time.perf_counter() - started
        phase = phase_seconds(log_text)
        trainer("evaluate", f"--model={job}/model", f"--data={data}/dataset.json", f"--output={job}/eval")
        accuracy = storage.read_json(os.path.join(job, "eval", "metrics.json"))["accuracy"]
        results["runs"][cache] = {"seconds": round(seconds, 2), "phase_seconds": round(phase, 2),
                                  "test_accuracy": accuracy}
        log(f"--feature_cache={cache}: {seconds:.1f} s ({phase:.1f} s from the plan to the end of the head phase), "
            f"test accuracy {accuracy:.4f}")
    off, on = results["runs"]["off"], results["runs"]["on"]
    results["speedup"] = round(off["seconds"] / on["seconds"], 2)
    results["phase_speedup"] = round(off["phase_seconds"] / on["phase_seconds"], 2)
    results["accuracy_difference_points"] = round(100 * (on["test_accuracy"] - off["test_accuracy"]), 2)
    print(f"feature cache ({options.workers} worker(s)): {off['seconds']:.1f} s -> {on['seconds']:.1f} s = "
          f"{results['speedup']:.2f}x less wall time "
          f"(goal >= 5x: {'PASS' if results['speedup'] >= 5 else 'MISS'}); test accuracy "
          f"{off['test_accuracy']:.4f} -> {on['test_accuracy']:.4f} "
          f"({results['accuracy_difference_points']:+.2f} points, goal within 1: "
          f"{'PASS' if abs(results['accuracy_difference_points']) <= 1 else 'MISS'}); the head phase alone "
          f"(features included, start-up and export not): {results['phase_speedup']:.2f}x")
    os.makedirs(options.output, exist_ok=True)
    name = "feature_cache.json" if options.workers == 1 else f"feature_cache_{options.workers}workers.json"
    common.write_json(os.path.join(options.output, name), results)


if __name__ == "__main__":
    main()
