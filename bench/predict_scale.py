"""Batch-prediction throughput: `trainer predict` here and on Beam's DirectRunner, from object storage.

    python -m bench.predict_scale --output=bench_output            # 1,000 images, 3 rounds
    python -m bench.predict_scale --smoke --output=/tmp/bench       # tests: 40 images, 1 round

Photo-like JPEGs (~500 x 375, bench.common) in a bucket of the GCS server behind
`bench/latency_proxy.py`, scored by a small export (the `tiny` backbone at 96 px, weights=None:
the pipeline's cost, not a backbone's) with the real command in a subprocess, to a local folder
of shards, interleaved over --rounds rounds; the medians are compared:

  local_0ms    the local runner, the server answering at once
  local_20ms   the same at +20 ms a request, as real object storage answers
  direct_20ms  Beam's DirectRunner (RunInference) on the same files at +20 ms

Goal (issue 24): local_20ms / local_0ms >= 0.85 (the latency hidden: reads run a batch ahead,
32 at once). direct_20ms / local_20ms is reported (no goal: DirectRunner is a test runner).
Results: OUTPUT/predict_scale.json.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

GOAL = 0.85


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def export_model(folder):
    from trainer.train import export, model

    classifier = model.build_model("tiny", 2, 96, weights=None, head="avgpool", dense_units=16)
    export.export_model(classifier, ["cat", "dog"], 96, folder, backbone="tiny")


def predict(model, source, output, *arguments, env=None):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "predict", f"--model={model}", f"--input={source}",
                             f"--output={output}", "--overwrite", "--num_shards=4", *arguments],
                            capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if result.returncode:
        raise SystemExit(f"predict failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def run(count, rounds, output, work_dir=None):
    from bench.input_pipeline import ObjectStore

    results = {"benchmark": "predict_scale", "command": " ".join(["python -m bench.predict_scale", *sys.argv[1:]]),
               "machine": common.describe_machine(), "config": {"images": count, "rounds": rounds}}
    store = ObjectStore()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-predict-scale-", dir=work_dir) as temporary:
            import fsspec

            from trainer.infra import storage

            photos, rng = common.load_photos(), np.random.default_rng(0)
            fsspec.filesystem("gs").mkdir("bench")
            for index in range(count):
                storage.write_bytes(f"gs://bench/photos/{index:06d}.jpg", common.make_jpeg(photos, rng))
            model = os.path.join(temporary, "model")
            export_model(model)
            env = {"STORAGE_EMULATOR_HOST": store.proxy_url}
            passes = {"local_0ms": (0, []), "local_20ms": (20, []),
                      "direct_20ms": (20, ["--runner=DirectRunner", "--", "--direct_num_workers=1"])}
            seconds = {name: [] for name in passes}
            for round_index in range(rounds):
                for name, (delay, arguments) in passes.items():
                    store.set_delay(delay)
                    seconds[name].append(predict(model, "gs://bench/photos", os.path.join(temporary, name),
                                                 *arguments, env=env))
                log(f"round {round_index + 1}: " + ", ".join(f"{name} {values[-1]:.1f} s"
                                                            for name, values in seconds.items()))
    finally:
        store.stop()
    rate = {name: count / statistics.median(values) for name, values in seconds.items()}
    ratios = [{"name": "local_20ms / local_0ms (img/s)", "value": round(rate["local_20ms"] / rate["local_0ms"], 3),
               "goal": GOAL},
              {"name": "direct_20ms / local_20ms (img/s)", "value": round(rate["direct_20ms"] / rate["local_20ms"], 3),
               "goal": None}]
    for ratio in ratios:
        ratio["pass"] = None if ratio["goal"] is None else ratio["value"] >= ratio["goal"]
    results.update({"loaders": {name: {"images_per_second": round(rate[name], 1),
                                       "seconds": [round(value, 2) for value in seconds[name]]} for name in seconds},
                    "ratios": ratios})
    common.write_json(os.path.join(output, "predict_scale.json"), results)
    print(f"{'pass':<12} {'img/s':>8}")
    for name in seconds:
        print(f"{name:<12} {rate[name]:>8.1f}")
    for ratio in ratios:
        verdict = "" if ratio["goal"] is None else f" (goal >= {ratio['goal']}: {'PASS' if ratio['pass'] else 'MISS'})"
        print(f"{ratio['name']}: {ratio['value']}{verdict}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench_output", help="folder for predict_scale.json")
    parser.add_argument("--images", type=common.positive_int, default=1000, help="images in the bucket")
    parser.add_argument("--rounds", type=common.positive_int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--smoke", action="store_true", help="40 images, one round, for tests")
    parser.add_argument("--work_dir", default=None, help="folder for temporary files")
    options = parser.parse_args(argv)
    count, rounds = (40, 1) if options.smoke else (options.images, options.rounds)
    run(count, rounds, options.output, options.work_dir)


if __name__ == "__main__":
    main()
