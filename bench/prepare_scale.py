"""Prepare-throughput benchmark: `trainer prepare` from object storage, on Beam, and after a kill.

    python -m bench.prepare_scale --output=bench_output            # 1,000 images (2,000 for Beam)
    python -m bench.prepare_scale --smoke --output=/tmp/bench       # tests: 60 images

Photo-like JPEGs (random crops of scikit-image's sample photos, ~500 x 375, each image different)
in Kaggle's layout (`cat.N.jpg`, `dog.N.jpg` in one folder), on local disk and on fake-gcs-server
behind `bench/latency_proxy.py` (+20 ms a request, as real object storage answers). Every run is
the real command in a subprocess (`python -m trainer.cli prepare`, all cores), to a local output,
interleaved over --rounds rounds; the medians are compared:

  local            SRC on local disk, the local runner
  gcs_20ms         SRC on the GCS server at +20 ms a request, the local runner. The server and the
                   proxy run on the same cores as prepare (their CPU seconds are reported), which a
                   real object store does not
  *_pinned         the same with one worker process on CPU 0, and (gcs) the server and proxy on
                   CPU 1: prepare has the same core in both, and the server does not take it
  *_half           the same on the first half of the images: the time the second half added gives
                   the rate per added image, start-up (imports, worker processes, listing) aside
  ceiling_memory   the work prepare must do per image (trainer.formats.imagefiles: one full decode, re-encoding
                   where it must) on the same bytes already in memory, on a pool of as many
                   processes as cores: the in-memory limit
  beam_direct      SRC on local disk, Beam's DirectRunner with one worker process per core
  rerun_after_kill an uninterrupted run's time vs a rerun's after a SIGKILL at half the shards
  listing          listing 20,000 objects in 20 class folders on the GCS server at +20 ms a request:
                   one listing (pages of 1,000 in a row) vs trainer.infra.storage's, folder by folder

Goals (issue 12): gcs_20ms / local >= 0.8 (also per added image), local / ceiling_memory
>= 0.8, rerun <= 0.6 of a full run.
Beam / local is reported (no goal). Results: OUTPUT/prepare_scale.json.
"""

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

BEAM_ARGUMENTS = ["--runner=DirectRunner", "--", "--direct_running_mode=multi_processing", "--direct_num_workers=0"]


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def write_kaggle_folder(folder, count, seed=0):
    """`count` different photo-like JPEGs as folder/cat.N.jpg and folder/dog.N.jpg; returns their bytes."""
    rng = np.random.default_rng(seed)
    photos = common.load_photos()
    os.makedirs(folder, exist_ok=True)
    images = []
    for index in range(count):
        data = common.make_jpeg(photos, rng)
        with open(os.path.join(folder, f"{common.CLASSES[index % 2].rstrip('s')}.{index}.jpg"), "wb") as file:
            file.write(data)
        images.append(data)
    return images


def prepare(source, output, *arguments, env=None, cpus=None):
    """Runs the real command (on the CPUs `cpus` only, if given); returns its wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "prepare", f"--source={source}",
                             f"--output={output}", "--overwrite", *arguments],
                            capture_output=True, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if result.returncode != 0:
        raise RuntimeError(f"trainer prepare exited {result.returncode}: {result.stderr[-2000:]}")
    return time.perf_counter() - started


def _encode(data):
    from trainer.formats import imagefiles

    return "skip" not in imagefiles.encode_or_skip(data)


def ceiling(images, processes):
    """Seconds for the per-image work on bytes in memory, on `processes` processes (pool start excluded)."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_encode, images[:processes])  # start and import everything first
        started = time.perf_counter()
        assert all(pool.map(_encode, images, chunksize=8))
        return time.perf_counter() - started


def killed_then_rerun(source, output, arguments):
    """Seconds of a rerun after the command was SIGKILLed once half its shards had committed."""
    from trainer.prepare import shards

    process = subprocess.Popen([sys.executable, "-m", "trainer.cli", "prepare", f"--source={source}",
                                f"--output={output}", "--overwrite", *arguments],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(output, shards.STATE_FOLDER)
    while process.poll() is None:
        plan = os.path.join(state, shards.PLAN_NAME)
        if os.path.exists(plan):
            planned = open(plan, "rb").read().count(b"\n")
            if len([name for name in os.listdir(state) if name.endswith(".json")]) * 2 >= planned:
                break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "prepare", f"--source={source}",
                             f"--output={output}", *arguments], capture_output=True, text=True)
    if result.returncode != 0 or "resuming" not in result.stderr:
        raise RuntimeError(f"the rerun did not resume: {result.stderr[-2000:]}")
    return time.perf_counter() - started


def pin_server(store, cpus):
    """Runs the GCS server and the latency proxy on `cpus` only (all CPUs for None)."""
    import psutil

    cpus = sorted(cpus) if cpus else list(range(os.cpu_count()))
    for pid in (store.proxy.pid, store.server._process.pid):
        process = psutil.Process(pid)
        for member in [process, *process.children(recursive=True)]:
            member.cpu_affinity(cpus)
        for thread in process.threads():  # each thread carries its own affinity (new ones inherit it)
            try:
                os.sched_setaffinity(thread.id, cpus)
            except ProcessLookupError:  # ended meanwhile
                pass


def server_seconds(store):
    """CPU seconds the GCS server and the latency proxy have used so far."""
    import psutil

    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in (store.proxy.pid, store.server._process.pid))


def time_listing(store, count, class_folders):
    """Seconds to list `count` objects in `class_folders` folders at +20 ms a request: one listing
    (pages of 1,000 in a row) vs `folders.list_files` (folder by folder, side by side)."""
    import fsspec

    from trainer.infra import folders

    store.set_delay(0)
    filesystem = fsspec.filesystem("gs")
    filesystem.pipe({f"bench/listing/class{index % class_folders:03d}/{index:08d}.jpg": b"x" for index in range(count)})
    store.set_delay(20)
    started = time.perf_counter()
    one = filesystem.find("bench/listing")
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    parallel = folders.list_files("gs://bench/listing", with_md5=True)
    if len(one) != count or len(parallel) != count:
        raise RuntimeError(f"listed {len(one)} and {len(parallel)} of {count} objects")
    return {"objects": count, "folders": class_folders, "one_listing": sequential,
            "folder_by_folder": time.perf_counter() - started}


def run(count, beam_count, rounds, num_shards, output, work_dir=None, listing_count=20000):
    from bench.input_pipeline import ObjectStore

    started = time.perf_counter()
    cores = os.cpu_count() or 1
    results = {"benchmark": "prepare_scale", "command": " ".join(["python -m bench.prepare_scale", *sys.argv[1:]]),
               "machine": common.describe_machine(),
               "config": {"images": count, "beam_images": beam_count, "rounds": rounds, "num_shards": num_shards}}
    store = ObjectStore()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-prepare-scale-", dir=work_dir) as temporary:
            source, beam_source = os.path.join(temporary, "kaggle"), os.path.join(temporary, "kaggle_beam")
            images = write_kaggle_folder(source, count)
            write_kaggle_folder(beam_source, beam_count, seed=1)
            import fsspec

            from trainer.infra import folders

            fsspec.filesystem("gs").mkdir("bench")
            folders.copy_tree(source, "gs://bench/kaggle")
            half = os.path.join(temporary, "kaggle_half")  # the first half of the same images
            os.makedirs(half)
            for name in sorted(os.listdir(source), key=lambda name: int(name.split(".")[1]))[:count // 2]:
                os.link(os.path.join(source, name), os.path.join(half, name))
            folders.copy_tree(half, "gs://bench/kaggle_half")
            log(f"{count} images ({sum(map(len, images)) / len(images) / 1024:.0f} KiB mean) on disk and on the "
                "GCS server")
            shard_arguments = [f"--num_shards={num_shards}"]
            env = {"STORAGE_EMULATOR_HOST": store.proxy_url}
            seconds = {name: [] for name in ("local", "gcs_20ms", "local_half", "gcs_20ms_half", "local_pinned",
                                             "gcs_20ms_pinned", "ceiling_memory", "beam_direct", "local_beam_set")}
            server_cpu = []
            for round_index in range(rounds):
                store.set_delay(20)
                before = server_seconds(store)
                seconds["gcs_20ms"].append(prepare("gs://bench/kaggle", os.path.join(temporary, "out"),
                                                   *shard_arguments, env=env))
                server_cpu.append(server_seconds(store) - before)
                seconds["local"].append(prepare(source, os.path.join(temporary, "out"), *shard_arguments))
                seconds["gcs_20ms_half"].append(prepare("gs://bench/kaggle_half", os.path.join(temporary, "out"),
                                                        *shard_arguments, env=env))
                seconds["local_half"].append(prepare(half, os.path.join(temporary, "out"), *shard_arguments))
                if cores >= 2:  # one core for prepare, another for the server, as a remote store would be
                    pin_server(store, {1})
                    seconds["gcs_20ms_pinned"].append(prepare("gs://bench/kaggle", os.path.join(temporary, "out"),
                                                              *shard_arguments, "--workers=1", env=env, cpus={0}))
                    pin_server(store, None)
                    seconds["local_pinned"].append(prepare(source, os.path.join(temporary, "out"), *shard_arguments,
                                                           "--workers=1", cpus={0}))
                seconds["ceiling_memory"].append(ceiling(images, cores))
                seconds["beam_direct"].append(prepare(beam_source, os.path.join(temporary, "beam"),
                                                      *shard_arguments, *BEAM_ARGUMENTS))
                seconds["local_beam_set"].append(prepare(beam_source, os.path.join(temporary, "beam"),
                                                         *shard_arguments))
                log(f"round {round_index + 1}: " + ", ".join(f"{name} {values[-1]:.1f} s"
                                                            for name, values in seconds.items()))
            full = prepare(source, os.path.join(temporary, "killed"), *shard_arguments)
            rerun = killed_then_rerun(source, os.path.join(temporary, "killed"), shard_arguments)
            listing = time_listing(store, listing_count, class_folders=20)
    finally:
        store.stop()
    median = {name: statistics.median(values) for name, values in seconds.items() if values}
    counts = {"beam_direct": beam_count, "local_beam_set": beam_count, "local_half": count // 2,
              "gcs_20ms_half": count // 2}
    rate = {name: counts.get(name, count) / value for name, value in median.items()}
    # Per image, start-up aside: the second half of the images over the time it added.
    # (None when the noise of a tiny run leaves no added time to divide by.)
    marginal = {name: (count - count // 2) / added if (added := median[name] - median[f"{name}_half"]) > 0 else None
                for name in ("local", "gcs_20ms")}
    ratios = [
        {"name": "gcs_20ms / local (img/s)", "value": rate["gcs_20ms"] / rate["local"], "goal": 0.8},
        {"name": "gcs_20ms / local, per added image (start-up aside)",
         "value": marginal["gcs_20ms"] / marginal["local"] if None not in marginal.values() else None, "goal": None},
        *([{"name": "gcs_20ms_pinned / local_pinned (one core each for prepare and the server)",
            "value": rate["gcs_20ms_pinned"] / rate["local_pinned"], "goal": 0.8}] if "local_pinned" in rate else []),
        {"name": "local / ceiling_memory (img/s)", "value": rate["local"] / rate["ceiling_memory"], "goal": 0.8},
        {"name": "local per added image / ceiling_memory",
         "value": marginal["local"] / rate["ceiling_memory"] if marginal["local"] else None, "goal": None},
        {"name": "rerun after a kill at 50% / uninterrupted (s)", "value": rerun / full, "goal": 0.6,
         "lower_is_better": True},
        {"name": "beam_direct / local on the same images (img/s)",
         "value": rate["beam_direct"] / rate["local_beam_set"], "goal": None},
    ]
    for ratio in ratios:
        ratio["value"] = None if ratio["value"] is None else round(ratio["value"], 3)
        ratio["pass"] = None if ratio["goal"] is None else (
            ratio["value"] <= ratio["goal"] if ratio.get("lower_is_better") else ratio["value"] >= ratio["goal"])
    results.update({"loaders": {name: {"median_seconds": round(median[name], 2),
                                       "images_per_second": round(rate[name], 1),
                                       "seconds": [round(value, 2) for value in seconds[name]]} for name in median},
                    "rerun": {"uninterrupted_seconds": round(full, 2), "rerun_seconds": round(rerun, 2)},
                    "listing": {key: round(value, 3) for key, value in listing.items()},
                    "gcs_server_and_proxy_cpu_seconds": round(statistics.median(server_cpu), 2),
                    "per_added_image_images_per_second": {name: value and round(value, 1)
                                                          for name, value in marginal.items()},
                    "ratios": ratios, "seconds": round(time.perf_counter() - started, 1)})
    common.write_json(os.path.join(output, "prepare_scale.json"), results)
    for name in median:
        print(f"{name:<16} {rate[name]:>8.1f} img/s  (median of {rounds}: {median[name]:.2f} s)")
    print(f"GCS server and proxy CPU during gcs_20ms: {statistics.median(server_cpu):.1f} s")
    print(f"listing {listing['objects']} objects in {listing['folders']} folders at +20 ms: one listing "
          f"{listing['one_listing']:.2f} s, folder by folder {listing['folder_by_folder']:.2f} s")
    for ratio in ratios:
        verdict = "" if ratio["goal"] is None else ("PASS" if ratio["pass"] else "MISS")
        sign = "<=" if ratio.get("lower_is_better") else ">="
        goal = "" if ratio["goal"] is None else f" (goal {sign} {ratio['goal']})"
        value = "-" if ratio["value"] is None else f"{ratio['value']:.3f}"
        print(f"{ratio['name']:<50} {value:>7}{goal} {verdict}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=common.positive_int, default=1000)
    parser.add_argument("--beam_images", type=common.positive_int, default=2000)
    parser.add_argument("--rounds", type=common.positive_int, default=3)
    parser.add_argument("--num_shards", type=common.positive_int, default=8, help="shards per split")
    parser.add_argument("--output", default="bench_output", help="folder for prepare_scale.json")
    parser.add_argument("--work_dir", default=None, help="where the temporary images and shards go")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests: 60 images, 1 round")
    options = parser.parse_args(argv)
    if options.smoke:
        options.images, options.beam_images, options.rounds, options.num_shards = 60, 60, 1, 2
    os.makedirs(options.output, exist_ok=True)
    run(options.images, options.beam_images, options.rounds, options.num_shards, options.output, options.work_dir,
        listing_count=200 if options.smoke else 20000)


if __name__ == "__main__":
    main()
