"""What `trainer evaluate` costs after scoring, for many classes: metrics, pictures, report.html.

    python -m bench.evaluate_classes --output=bench_output               # 30, 150, 300, 1000 classes
    python -m bench.evaluate_classes --smoke --output=/tmp/bench         # tests: 40 classes

Each size runs in a process of its own (its peak memory is its own): predictions of a model that
is right about half the time on 10 test images per class, then `metrics.compute_metrics`,
`pictures.draw_pictures` (with training curves and a sheet of mistakes), `pictures.write_pictures`
and `page.write_html`, as `trainer evaluate` does after scoring. Reports wall seconds and peak RSS
per size (docs/benchmarks.md §9). Results: OUTPUT/evaluate_classes.json.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from bench import common


def one_size(classes, output):
    """Runs in the child process: draws and writes everything for `classes` classes."""
    import numpy as np

    from trainer.evaluate import metrics as metrics_lib
    from trainer.evaluate import page, pictures

    started = time.perf_counter()
    names = [f"class_{index:04d}" for index in range(classes)]
    rng = np.random.default_rng(0)
    labels = np.arange(10 * classes) % classes
    logits = rng.normal(size=(len(labels), classes))
    logits[np.arange(len(labels)), labels] += 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = {"split": "test", **metrics_lib.compute_metrics(labels, probabilities, names),
               "calibration": metrics_lib.calibration(labels, probabilities)}
    history = {"phases": [{"name": "head", "epochs": [
        {"epoch": epoch, "loss": 1 / epoch, "accuracy": 0.5, "val_loss": 1 / epoch, "val_accuracy": 0.5}
        for epoch in range(1, 11)]}]}
    mistakes = [{"index": index, "label": 0, "predicted": 1, "confidence": 0.9,
                 "image": np.zeros((32, 32, 3), np.uint8)} for index in range(16)]
    drawn = pictures.draw_pictures(metrics, history=history, mistakes=mistakes)
    pictures.write_pictures(output, drawn)
    page.write_html(output, metrics, drawn)
    print(json.dumps({"classes": classes, "seconds": round(time.perf_counter() - started, 2),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=common.positive_int, nargs="+", default=[30, 150, 300, 1000])
    parser.add_argument("--output", default="bench_output", help="folder for evaluate_classes.json")
    parser.add_argument("--work_dir", default=None, help="where the pictures go (a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests: 40 classes")
    parser.add_argument("--one_size", type=int, help=argparse.SUPPRESS)  # the child process
    options = parser.parse_args()
    if options.one_size:
        one_size(options.one_size, options.work_dir)
        return
    sizes = [40] if options.smoke else options.classes
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-", dir=options.work_dir) as work:
        for classes in sizes:
            child = subprocess.run([sys.executable, "-m", "bench.evaluate_classes", f"--one_size={classes}",
                                    f"--work_dir={os.path.join(work, str(classes))}"],
                                   capture_output=True, text=True, check=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{classes} classes: {runs[-1]['seconds']:.1f} s, peak {runs[-1]['peak_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
    os.makedirs(options.output, exist_ok=True)
    common.write_json(os.path.join(options.output, "evaluate_classes.json"),
                      {"benchmark": "evaluate_classes", "machine": common.describe_machine(), "runs": runs})


if __name__ == "__main__":
    main()
