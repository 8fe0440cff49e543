"""SIGTERM-to-committed-backup time of the seed recipe (VGG16 at 150 px), the preemption budget.

    python -m bench.sigterm --output=bench_output                 # VGG16, 150 px, batch 64
    python -m bench.sigterm --smoke --output=/tmp/bench           # tests: tiny backbone

GKE gives a Spot VM's pods 15 s between the shutdown notice (SIGTERM) and the node going away. The
trainer answers SIGTERM by backing up at the end of the current step, committing the backup to
job_dir and exiting 75; the time that takes is at most one training step plus the upload. This
runs the real `trainer train` on photo-like JPEGs (random weights: no ImageNet download here),
waits until a phase has committed its first periodic backup (so training is under way), sends
SIGTERM, and reads the trainer's own "preemption backup committed N s after SIGTERM" line:
  head_cached    the seed's head phase on cached features (the default, --feature_cache=auto)
  head_streaming --feature_cache=off: every step runs the frozen VGG16 forward pass
Each case is --rounds runs; the median and the maximum are reported. Results: OUTPUT/sigterm.json.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from bench import common


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def measure(args, job_dir, log_path, timeout=1800):
    """Starts training, SIGTERMs it once its first backup is committed; returns (seconds, exit code)."""
    with open(log_path, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", f"--job_dir={job_dir}", *args],
                                   stdout=output, stderr=subprocess.STDOUT)
        committed = os.path.join(job_dir, "backup", "head", "checkpoint")
        deadline = time.monotonic() + timeout
        while not os.path.exists(committed) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is not None or not os.path.exists(committed):
            process.kill()
            process.wait()
            tail = "".join(open(log_path).readlines()[-30:])
            raise SystemExit(f"training ended (exit {process.returncode}) or stalled before its first backup:\n{tail}")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=600)
    text = open(log_path).read()
    marker = "preemption backup committed "
    if marker not in text:
        raise SystemExit(f"no committed backup after SIGTERM (exit {code}); see {log_path}")
    return float(text.split(marker, 1)[1].split(" s", 1)[0]), code


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench_output", help="folder for sigterm.json")
    parser.add_argument("--images", type=common.positive_int, default=800, help="photo-like JPEGs, all splits")
    parser.add_argument("--rounds", type=common.positive_int, default=3, help="runs per case")
    parser.add_argument("--work_dir", default=None, help="where the temporary images, shards and jobs go")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone and sizes, for the test suite")
    options = parser.parse_args()
    if options.smoke:
        options.images, options.rounds = 60, 1
        model = ["--backbone=tiny", "--weights=none", "--image_size=32", "--batch_size=8", "--dense_units=16"]
    else:
        model = ["--backbone=vgg16", "--weights=none", "--image_size=150", "--batch_size=64"]
    with tempfile.TemporaryDirectory(prefix="bench-sigterm-", dir=options.work_dir) as work:
        log(f"writing {options.images} photo-like JPEGs and preparing them")
        common.write_split_folders(os.path.join(work, "images"), options.images)
        from trainer.prepare.run import prepare_dataset

        prepare_dataset(os.path.join(work, "images"), os.path.join(work, "data"), num_shards=2)
        data = os.path.join(work, "data", "dataset.json")
        # Many epochs: the run must still be training when the signal comes.
        common_args = [f"--data={data}", *model, "--epochs=1000", "--backup_every_steps=1", "--cpu_replicas=2"]
        cases = {"head_cached": ["--feature_cache=on"], "head_streaming": ["--feature_cache=off"]}
        results = {}
        for name, extra in cases.items():
            seconds = []
            for round_index in range(options.rounds):
                job_dir = os.path.join(work, f"job-{name}-{round_index}")
                elapsed, code = measure([*common_args, *extra], job_dir, os.path.join(work, f"{name}.log"))
                if code != 75:
                    raise SystemExit(f"{name}: exit code {code}, expected 75")
                seconds.append(elapsed)
                log(f"{name} round {round_index + 1}: backup committed {elapsed:.2f} s after SIGTERM")
            results[name] = {"seconds": seconds, "median": statistics.median(seconds), "max": max(seconds)}
    summary = {"machine": common.describe_machine(), "model": model, "results": results,
               "spot_notice_seconds": 15}
    common.write_json(os.path.join(options.output, "sigterm.json"), summary)
    for name, result in results.items():
        print(f"{name:<15} SIGTERM -> committed backup: median {result['median']:.2f} s, max {result['max']:.2f} s "
              f"(Spot notice: 15 s)")


if __name__ == "__main__":
    main()
