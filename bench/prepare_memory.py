"""Memory benchmark: peak RSS of `trainer prepare` on 5,000 and 20,000 images (goal <= 1 GiB, flat).

    python -m bench.prepare_memory --output=bench_output      # both runners: local and Beam's DirectRunner
    python -m bench.prepare_memory --smoke --output=/tmp/bench     # tests: 200 and 400 images

The Beam runs use the DirectRunner with one worker process per core
(`--direct_running_mode=multi_processing --direct_num_workers=0`), as the local runner does.

Runs the real command (`python -m trainer.cli prepare`, in a subprocess, with its default worker
processes) on Kaggle-style folders (`cat.123.jpg`, `dog.456.jpg` in one folder) and samples the
resident memory of the whole process tree (the command and its worker processes) every 50 ms
with psutil. The sum over processes counts shared library pages once per process, so it
overstates what the tree really holds: an upper bound.

The images are a few hundred photo-like JPEGs (random crops of scikit-image's sample photos at
about 500 x 375) written many times under different names: generating 20,000 takes seconds, and
prepare decodes every file in full as it would a real photo.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from bench import common

GOAL_BYTES = 2**30
# "Flat": the peak at the larger count within this factor of the peak at the smaller one.
GOAL_GROWTH = 1.15
VARIANTS = 300


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def write_kaggle_folder(folder, count, variants, seed=0):
    """Writes `count` JPEGs named cat.N.jpg / dog.N.jpg, cycling through `variants` encoded photos."""
    rng = np.random.default_rng(seed)
    photos = common.load_photos()
    encoded = [common.make_jpeg(photos, rng) for _ in range(min(variants, count))]
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        name = f"{common.CLASSES[index % 2].rstrip('s')}.{index}.jpg"
        with open(os.path.join(folder, name), "wb") as file:
            file.write(encoded[index % len(encoded)])
    return sum(len(data) for data in encoded) / len(encoded)


def tree_rss(process):
    """(RSS of `process`, RSS summed over it and all its descendants) in bytes; 0 for gone ones."""
    import psutil

    own, total = 0, 0
    try:
        own = process.memory_info().rss
        total = own
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return own, total


BEAM_ARGUMENTS = ["--", "--direct_running_mode=multi_processing", "--direct_num_workers=0"]


def run_prepare(source, output, runner="local", interval=0.05):
    """Runs `trainer prepare` and samples its memory; returns peaks in bytes, processes and seconds."""
    import psutil

    command = [sys.executable, "-m", "trainer.cli", "prepare", f"--source={source}", f"--output={output}",
               f"--runner={runner}", *(BEAM_ARGUMENTS if runner != "local" else [])]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = []
    threading.Thread(target=lambda: stderr.append(child.stderr.read()), daemon=True).start()
    process = psutil.Process(child.pid)
    peak_main, peak_tree, max_processes = 0, 0, 0
    while child.poll() is None:
        own, total = tree_rss(process)
        peak_main, peak_tree = max(peak_main, own), max(peak_tree, total)
        try:
            max_processes = max(max_processes, 1 + len(process.children(recursive=True)))
        except psutil.NoSuchProcess:
            pass
        time.sleep(interval)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"trainer prepare exited {child.returncode}: {''.join(stderr)[-2000:]}")
    return {"peak_tree_rss": peak_tree, "peak_main_rss": peak_main, "processes": max_processes,
            "seconds": round(seconds, 1)}


def run(counts, output, variants=VARIANTS, work_dir=None, runners=("local", "DirectRunner")):
    started = time.perf_counter()
    machine = common.describe_machine()
    runs, ratios = {}, []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=work_dir) as temporary:
            source = os.path.join(temporary, "images")
            mean_bytes = write_kaggle_folder(source, count, variants)
            log(f"wrote {count} JPEGs (mean {mean_bytes / 1024:.0f} KiB) in {source}")
            for runner in runners:
                result = run_prepare(source, os.path.join(temporary, f"shards-{runner}"), runner)
                runs[f"{runner} {count}"] = {"runner": runner, "images": count, "mean_image_bytes": round(mean_bytes),
                                             **result}
                log(f"{runner}, {count} images: peak tree RSS {result['peak_tree_rss'] / 2**20:.0f} MiB, main "
                    f"{result['peak_main_rss'] / 2**20:.0f} MiB, {result['processes']} processes, "
                    f"{result['seconds']:.0f} s")
    for runner in runners:
        small, large = runs[f"{runner} {min(counts)}"], runs[f"{runner} {max(counts)}"]
        growth = large["peak_tree_rss"] / small["peak_tree_rss"]
        ratios += [
            {"name": f"{runner}: peak tree RSS at {max(counts)} images <= 1 GiB",
             "value": round(large["peak_tree_rss"] / 2**30, 3), "goal": 1.0,
             "pass": large["peak_tree_rss"] <= GOAL_BYTES},
            {"name": f"{runner}: flat, peak at {max(counts)} / peak at {min(counts)}", "value": round(growth, 3),
             "goal": GOAL_GROWTH, "pass": growth <= GOAL_GROWTH},
        ]
    results = {"benchmark": "prepare_memory",
               "command": " ".join(["python -m bench.prepare_memory", *sys.argv[1:]]),
               "machine": machine, "config": {"counts": counts, "variants": variants, "runners": list(runners)},
               "loaders": runs, "ratios": ratios, "seconds": round(time.perf_counter() - started, 1)}
    common.write_json(os.path.join(output, "prepare_memory.json"), results)
    print(f"{'runner':>12} {'images':>7} {'peak tree RSS':>14} {'peak main RSS':>14} {'processes':>9} {'seconds':>8}")
    for entry in runs.values():
        print(f"{entry['runner']:>12} {entry['images']:>7} {entry['peak_tree_rss'] / 2**20:>10.0f} MiB "
              f"{entry['peak_main_rss'] / 2**20:>10.0f} MiB {entry['processes']:>9} {entry['seconds']:>8.1f}")
    for ratio in ratios:
        print(f"{ratio['name']:<60} {ratio['value']:>7.3f} (goal <= {ratio['goal']}) "
              f"{'PASS' if ratio['pass'] else 'MISS'}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="5000,20000", help="comma-separated image counts")
    parser.add_argument("--output", default="bench_output", help="folder for prepare_memory.json")
    parser.add_argument("--work_dir", default=None, help="where the temporary images and shards go")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests: 200 and 400 images")
    options = parser.parse_args(argv)
    counts = [200, 400] if options.smoke else [int(value) for value in options.counts.split(",")]
    run(counts, options.output, work_dir=options.work_dir)


if __name__ == "__main__":
    main()
