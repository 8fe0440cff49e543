"""The memory and speed of `trainer prepare`'s planning (no image is read), for large image sets.

    python -m bench.prepare_plan --output=bench_output                 # 100k and 1M entries
    python -m bench.prepare_plan --smoke --output=/tmp/bench            # tests: 2k and 20k

The listing is fabricated: `synthetic://N` is an fsspec filesystem that answers the listing calls
prepare makes (folder by folder) with N objects of photo-like sizes and MD5s in class folders of
FOLDER_SIZE, as a GCS bucket does, without any request or file. (Folders of a fixed size: the
listing holds a few folders at a time, so its memory follows the folder size, not the total.)
Each size is planned in its own process, from the listing to the stored plan
(`trainer.prepare.run.plan_dataset` and `store_plan`, the functions prepare runs): listing,
layout, labels, splits by content digest, duplicates, class checks, stratified shards, and
OUTPUT/.prepare/plan.jsonl written to a temporary folder. The process's peak RSS (getrusage) less
that of the same process before planning gives the planner's memory; the slope between two sizes
is bytes per listed image; entries/s is on one core (the planner is single-threaded).
Results: OUTPUT/prepare_plan.json. Issue 24's goals: <= 100 bytes per image and <= 1 GiB at 10
million in the launcher, >= 50,000 entries/s.
"""

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import time

from bench import common

FOLDER_SIZE = 1000  # images per class folder (ImageNet's classes hold about 1,300)
GOAL_BYTES_PER_IMAGE = 100
GOAL_ENTRIES_PER_SECOND = 50_000


def register_synthetic_filesystem():
    """`synthetic://N/` lists N objects in class folders of FOLDER_SIZE (sizes and MD5s as GCS reports)."""
    import fsspec
    from fsspec.spec import AbstractFileSystem

    class SyntheticListing(AbstractFileSystem):
        protocol = "synthetic"

        def _count(self, path):
            return int(self._strip_protocol(path).split("/", 1)[0])

        def ls(self, path, detail=True, **kwargs):
            path = self._strip_protocol(path).rstrip("/")
            parts = path.split("/")
            count = int(parts[0])
            classes = max(2, count // FOLDER_SIZE)
            if len(parts) == 1:  # the class folders
                entries = [{"name": f"{path}/class_{index:05d}", "type": "directory", "size": 0}
                           for index in range(classes)]
            else:  # one class folder's objects
                label = int(parts[1].split("_")[1])
                entries = []
                for index in range(label, count, classes):
                    digest = base64.b64encode(hashlib.md5(f"{index}".encode()).digest()).decode()  # noqa: S324
                    entries.append({"name": f"{path}/img_{index:09d}.jpg", "type": "file",
                                    "size": 40_000 + (index * 7919) % 160_000, "md5Hash": digest})
            return entries if detail else [entry["name"] for entry in entries]

        def info(self, path, **kwargs):
            path = self._strip_protocol(path).rstrip("/")
            return {"name": path, "type": "directory" if path.count("/") < 2 else "file", "size": 0}

    fsspec.register_implementation("synthetic", SyntheticListing, clobber=True)


def plan_in_this_process(entries):
    """Plans `synthetic://entries/` here; returns its figures (run in a child process per size)."""
    import resource
    import tempfile

    register_synthetic_filesystem()
    from trainer.prepare import catalog
    from trainer.prepare import run as prepare

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started, cpu = time.perf_counter(), time.process_time()
    source = f"synthetic://{entries}"
    with tempfile.TemporaryDirectory() as output, catalog.Catalog(source, 0) as table:
        planned = prepare.plan_dataset(table, source, output, None, "auto", 0.15, 0.15, 0)
        plan_entries, _ = prepare.store_plan(table, output, planned["classes"], 0, 100.0, None, None)
        plan_bytes = sum(length for *_, length in plan_entries)
        table_bytes = os.path.getsize(os.path.join(table.folder, "plan.sqlite"))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"entries": entries, "planned": sum(planned["counts"].values()), "shards": len(plan_entries),
            "plan_bytes": plan_bytes, "table_bytes": table_bytes, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "rss_before": before, "rss_peak": peak, "planner_bytes": peak - before}


def run(sizes, output):
    results = []
    for entries in sizes:
        child = subprocess.run([sys.executable, "-m", "bench.prepare_plan", f"--child={entries}"],
                               capture_output=True, text=True, check=False)
        if child.returncode:
            raise SystemExit(f"planning {entries} entries failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"[bench] {entries:>9,} entries: {results[-1]['seconds']:.1f} s, planner "
              f"{results[-1]['planner_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    small, large = results[0], results[-1]
    per_image = (large["planner_bytes"] - small["planner_bytes"]) / (large["entries"] - small["entries"])
    rate = large["entries"] / large["cpu_seconds"]
    at_10m = large["rss_peak"] + per_image * (10_000_000 - large["entries"])
    summary = {
        "benchmark": "prepare_plan", "command": " ".join(["python -m bench.prepare_plan", *sys.argv[1:]]),
        "machine": common.describe_machine(), "sizes": results,
        "bytes_per_image": round(per_image), "entries_per_cpu_second": round(rate),
        "peak_at_10_million_gib_extrapolated": round(at_10m / 2**30, 2),
        "ratios": [{"name": "planner bytes per listed image", "value": round(per_image), "goal": GOAL_BYTES_PER_IMAGE,
                    "pass": per_image <= GOAL_BYTES_PER_IMAGE},
                   {"name": "entries planned per CPU second", "value": round(rate), "goal": GOAL_ENTRIES_PER_SECOND,
                    "pass": rate >= GOAL_ENTRIES_PER_SECOND}]}
    common.write_json(os.path.join(output, "prepare_plan.json"), summary)
    print(f"{'entries':>10} {'seconds':>8} {'planner MiB':>12} {'plan MiB':>9}")
    for result in results:
        print(f"{result['entries']:>10,} {result['seconds']:>8.1f} {result['planner_bytes'] / 2**20:>12.0f} "
              f"{result['plan_bytes'] / 2**20:>9.1f}")
    print(f"{per_image:.0f} bytes per listed image (goal <= {GOAL_BYTES_PER_IMAGE}), {rate:,.0f} entries/s on one "
          f"core (goal >= {GOAL_ENTRIES_PER_SECOND:,}); extrapolated peak at 10 million: {at_10m / 2**30:.1f} GiB")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench_output", help="folder for prepare_plan.json")
    parser.add_argument("--sizes", default="100000,1000000", help="listing sizes, comma-separated, smallest first")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for tests")
    parser.add_argument("--work_dir", default=None, help="unused: planning writes no file (the other benches' flag)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        print(json.dumps(plan_in_this_process(options.child)))
        return
    sizes = [2000, 20000] if options.smoke else [int(size) for size in options.sizes.split(",")]
    run(sizes, options.output)


if __name__ == "__main__":
    main()
