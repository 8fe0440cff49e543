"""The benchmarks run end to end at a tiny size (--smoke): no timing is asserted, only that every
loader ran and the results are complete, so `make bench` cannot rot between real runs."""

import json
import os
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(module, output, timeout=600):
    """Runs `python -m bench.<module> --smoke`; returns its results JSON as a dict."""
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--smoke", f"--output={output}", f"--work_dir={output}"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"bench.{module} exited {result.returncode}:\n{result.stderr[-5000:]}"
    with open(os.path.join(output, f"{module}.json")) as file:
        return json.load(file), result.stdout


def check_ratios(results):
    for ratio in results["ratios"]:
        # (a ratio without a goal may have no value in a tiny run: bench.prepare_scale's per added image)
        assert (ratio["value"] is None and ratio["goal"] is None) or ratio["value"] > 0, ratio
        assert isinstance(ratio["pass"], bool) or ratio["goal"] is None, ratio


@pytest.mark.timeout(600)
def test_input_pipeline_smoke(tmp_path):
    results, table = run_bench("input_pipeline", tmp_path)

    expected = {"keras_generator", "keras_dataset", "shards_local", "shards_gcs", "shards_gcs_20ms",
                "objects_gcs", "objects_gcs_20ms", "objects_gcs_20ms_32threads", "ceiling_memory",
                "shards_max_side"}
    assert set(results["loaders"]) == expected
    config = results["config"]
    assert config["epochs"] == 2
    for name, loader in results["loaders"].items():
        # Every loader read the whole train split, `epochs` times per round (the per-object ones once).
        epochs = config["epochs_per_object_loader"] if name.startswith("objects") else config["epochs"]
        assert loader["images"] == config["train_images"] * epochs, name
        assert len(loader["rates"]) == results["config"]["rounds"] and loader["median"] > 0, name
    assert [ratio["goal"] for ratio in results["ratios"]] == [2.0, 0.9, 2.5, 10.0]
    check_ratios(results)
    assert os.path.getsize(tmp_path / "input_pipeline.png") > 1000
    assert "PASS" in table or "MISS" in table
    # The temporary images and shards are gone.
    assert sorted(os.listdir(tmp_path)) == ["input_pipeline.json", "input_pipeline.png"]


@pytest.mark.timeout(600)
def test_train_step_smoke(tmp_path):
    results, _ = run_bench("train_step", tmp_path)

    assert set(results["loaders"]) == {"synthetic", "reader", "reader_cached"}
    for loader in results["loaders"].values():
        assert len(loader["rates"]) == 1 and loader["median"] > 0
    assert results["ratios"][0]["goal"] == 0.95
    check_ratios(results)


@pytest.mark.timeout(600)
def test_prepare_memory_smoke(tmp_path):
    results, _ = run_bench("prepare_memory", tmp_path)

    assert set(results["loaders"]) == {"local 200", "local 400", "DirectRunner 200", "DirectRunner 400"}
    for run in results["loaders"].values():
        # The sampled tree is the command plus its worker processes, and it held real memory.
        assert run["processes"] >= 2 and run["peak_tree_rss"] >= run["peak_main_rss"] > 20 * 2**20
    check_ratios(results)


def test_prepare_scale_smoke(tmp_path):
    results, _ = run_bench("prepare_scale", tmp_path)

    pinned = {"local_pinned", "gcs_20ms_pinned"} if (os.cpu_count() or 1) >= 2 else set()
    assert set(results["loaders"]) == {"local", "gcs_20ms", "local_half", "gcs_20ms_half", "ceiling_memory",
                                       "beam_direct", "local_beam_set", *pinned}
    assert results["rerun"]["rerun_seconds"] > 0 and results["listing"]["objects"] == 200
    assert results["gcs_server_and_proxy_cpu_seconds"] > 0  # the reads really went to the server
    check_ratios(results)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers, name", [(1, "feature_cache.json"), (2, "feature_cache_2workers.json")])
def test_feature_cache_smoke(tmp_path, workers, name):
    result = subprocess.run([sys.executable, "-m", "bench.feature_cache", "--smoke", f"--output={tmp_path}",
                             f"--workers={workers}"], cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    with open(tmp_path / name) as file:
        results = json.load(file)
    assert set(results["runs"]) == {"off", "on"} and results["workers"] == workers
    for run in results["runs"].values():
        assert run["seconds"] > 0 and run["phase_seconds"] > 0 and 0 <= run["test_accuracy"] <= 1
    assert results["speedup"] > 0 and f"feature cache ({workers} worker(s)):" in result.stdout


@pytest.mark.parametrize("module, flag", [("input_pipeline", "--epochs=0"), ("train_step", "--model_threads=-1"),
                                          ("feature_cache", "--per_class=x")])
def test_bad_counts_are_one_line_usage_errors(module, flag):
    result = subprocess.run([sys.executable, "-m", f"bench.{module}", flag], cwd=REPOSITORY, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: argument {flag.split('=')[0]}: invalid positive_int value" in result.stderr.splitlines()[-1]


@pytest.mark.timeout(600)
def test_sigterm_smoke(tmp_path):
    results, table = run_bench("sigterm", tmp_path)
    assert set(results["results"]) == {"head_cached", "head_streaming"}
    for result in results["results"].values():
        assert result["seconds"] and all(seconds >= 0 for seconds in result["seconds"])
    assert "SIGTERM -> committed backup" in table


def test_evaluate_classes_smoke(tmp_path):
    results, table = run_bench("evaluate_classes", tmp_path)
    [run] = results["runs"]
    assert run["classes"] == 40 and run["seconds"] > 0 and run["peak_rss_bytes"] > 20 * 2**20
    assert "40 classes:" in table


@pytest.mark.timeout(600)
def test_gpu_node_smoke_measures_every_figure_within_its_budget_on_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_node", "--smoke", f"--output={tmp_path}", f"--work_dir={tmp_path}",
         "--budget_seconds=400", "--min_seconds=1"], cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    with open(os.path.join(tmp_path, "gpu_node.json")) as file:
        results = json.load(file)
    trained = ["seed_fp32", "seed_mixed", "seed_jit", "seed_mixed_jit", "fine_tune", "modern_mixed"]
    expected = ["reader_full_size", "reader_max_side", *[name for base in trained[:4] for name in
                                                         (base, f"{base}_synthetic")],
                "extract", "cached_head", "fine_tune", "fine_tune_synthetic", "modern_mixed", "modern_mixed_synthetic"]
    measured = {entry["name"]: entry for entry in results["measurements"]}
    assert list(measured) == expected
    # Every figure was measured (the budget left room for each) and each training figure has its
    # input-bound ratio; on CPU there is no GPU figure, and no error for it.
    for entry in measured.values():
        assert entry.get("images_per_second", 0) > 0 and "skipped" not in entry, entry
        assert not any(key.startswith("gpu_") for key in entry), entry
    for name in trained:
        assert measured[name]["input_bound_ratio"] > 0
    assert results["gpus"] == {"count": 0, "names": [], "driver": None, "memory_mib": None}
    assert results["replicas"] == 1 and results["tensorflow"] and results["cores_per_gpu"]["value"] > 0
    assert results["budget_seconds"] == 400 and results["seconds"] > 0
    assert "CPU cores one GPU needs" in result.stdout and "modern_mixed" in result.stdout


@pytest.mark.timeout(600)
def test_prepare_plan_smoke_plans_a_fabricated_listing_in_a_process_per_size(tmp_path):
    results, table = run_bench("prepare_plan", tmp_path)
    assert [size["entries"] for size in results["sizes"]] == [2000, 20000]
    for size in results["sizes"]:
        # Every listed image is planned (no image read), into shards whose plan lines were written.
        assert size["planned"] == size["entries"] and size["shards"] >= 3 and size["plan_bytes"] > 0
        assert size["planner_bytes"] > 0 and size["table_bytes"] > size["entries"] * 50  # the rows are on disk
    assert isinstance(results["bytes_per_image"], int) and results["entries_per_cpu_second"] > 0
    check_ratios(results)
    assert "bytes per listed image" in table


@pytest.mark.timeout(600)
def test_predict_scale_smoke_scores_the_bucket_three_ways(tmp_path):
    results, table = run_bench("predict_scale", tmp_path)
    assert set(results["loaders"]) == {"local_0ms", "local_20ms", "direct_20ms"}
    assert all(loader["images_per_second"] > 0 for loader in results["loaders"].values())
    check_ratios(results)
    assert "local_20ms / local_0ms" in table
