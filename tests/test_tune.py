"""Hyperparameter tuning: one search space, rendered for Vertex AI (checked with
google-cloud-aiplatform's own proto) and for Katib (its OpenAPI schema, the trial as a real Job);
bad search spaces are one-line errors; a trial reports its metric in both services' formats."""

import json
import os
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from helpers import TINY_JOB, closed, prepare_stripes, train_in_process

from trainer.infra import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNE = [sys.executable, os.path.join(ROOT, "k8s", "tune.py"), "--image=r.example/t:1", "--set=data=gs://b/d.json",
        "--set=job_dir=gs://b/tune/pets"]
SPACE = yaml.safe_load(open(os.path.join(ROOT, "configs", "search_space.yaml")))  # noqa: SIM115
# Katib's StdOut collector's default filter (pkg/metricscollector/v1beta1/common: DefaultFilter).
KATIB_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"


def render(*args):
    result = subprocess.run([*TUNE, *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_vertex_rendering_is_a_hyperparameter_tuning_job_of_the_search_space():
    from google.cloud.aiplatform_v1.types import HyperparameterTuningJob

    spec = render("--target=vertex")
    job = HyperparameterTuningJob.from_json(json.dumps({"displayName": "t", **spec}))  # unknown fields refused
    assert job.max_trial_count == SPACE["max_trials"] and job.parallel_trial_count == SPACE["parallel_trials"]
    assert [p.parameter_id for p in job.study_spec.parameters] == [p["flag"] for p in SPACE["parameters"]]
    (metric,) = job.study_spec.metrics
    assert metric.metric_id == SPACE["metric"]["name"] and metric.goal.name == "MAXIMIZE"
    (pool,) = job.trial_job_spec.worker_pool_specs
    args = list(pool.container_spec.args)
    # Each trial: the trainer with --tuning_metric, its job_dir Vertex's per-trial folder under JOB_DIR.
    assert "--tuning_metric=val_accuracy" in args and not any(arg.startswith("--job_dir=") for arg in args)
    assert job.trial_job_spec.base_output_directory.output_uri_prefix == "gs://b/tune/pets"
    # Whole numbers go as categories: Vertex would pass a discrete 128 as `--dense_units=128.0`.
    dense = next(p for p in job.study_spec.parameters if p.parameter_id == "dense_units")
    assert list(dense.categorical_value_spec.values) == ["128", "256", "512"]
    from google.protobuf.json_format import ParseError

    with pytest.raises(ParseError, match="no field named"):
        HyperparameterTuningJob.from_json(json.dumps({**spec, "studySpecs": {}}))


@pytest.mark.parametrize("version", ["1.32", kubernetes_validate.latest_version()])
def test_katib_rendering_is_an_experiment_whose_trial_is_this_projects_job(version):
    import jsonschema

    experiment = render("--target=katib", "--name=tune-pets")
    schema = closed(json.load(open(os.path.join(ROOT, "tests", "schemas", "katib",  # noqa: SIM115
                                                "experiment-v1beta1-v0.19.0.json"))))
    jsonschema.validate(experiment, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**experiment, "spec": {**experiment["spec"], "objectives": {}}}, schema)
    spec = experiment["spec"]
    assert [p["name"] for p in spec["parameters"]] == [p["flag"] for p in SPACE["parameters"]]
    assert spec["objective"] == {"type": "maximize", "objectiveMetricName": "val_accuracy"}
    trial = spec["trialTemplate"]["trialSpec"]
    kubernetes_validate.validate({**trial, "metadata": {"name": "trial"}}, version, strict=True)
    (container,) = trial["spec"]["template"]["spec"]["containers"]
    assert container["name"] == spec["trialTemplate"]["primaryContainerName"] and container["command"] == ["trainer"]
    args = container["args"]
    assert args[0] == "train" and "--job_dir=gs://b/tune/pets/${trialParameters.trialName}" in args
    references = {parameter["name"] for parameter in spec["trialTemplate"]["trialParameters"]}
    for name in re.findall(r"\$\{trialParameters\.(\w+)\}", " ".join(args)):
        assert name in references, name


@pytest.mark.parametrize("parameter, message", [
    ({"flag": "learning_rat", "type": "double", "min": 1e-5, "max": 1e-3},
     "'learning_rat' is not a `trainer train` flag"),
    ({"flag": "dropout", "type": "double", "min": 0.5, "max": 0.5}, "an empty range (min 0.5, max 0.5)"),
    ({"flag": "learning_rate", "type": "double", "min": 0.0, "max": 1e-3, "scale": "log"},
     "a log scale needs a positive range, got min 0.0"),
    ({"flag": "head", "type": "categorical", "values": []}, "`values` must list distinct values"),
    ({"flag": "dropout", "type": "normal", "min": 0.1, "max": 0.2}, "type 'normal'"),
])
def test_bad_search_spaces_are_one_line_errors(tmp_path, parameter, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"metric": {"name": "val_accuracy", "goal": "maximize"}, "parameters": [parameter]}))
    for target in ("vertex", "katib"):
        result = subprocess.run([*TUNE, f"--target={target}", f"--search_space={path}"], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("tune: ") and message in line, line


def test_a_trial_reports_its_metric_for_katib_and_vertex(tmp_path, capsys, monkeypatch):
    metrics_file = tmp_path / "hypertune" / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metrics_file))
    monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "7")
    data = prepare_stripes(tmp_path / "data", per_class=16, num_shards=1)
    job_dir = str(tmp_path / "job")
    train_in_process(f"--data={data}", f"--job_dir={job_dir}", *TINY_JOB, "--batch_size=8", "--epochs=2",
                     "--fine_tune_epochs=0", "--learning_rate=1e-3", "--tuning_metric=val_accuracy")
    expected = storage.read_json(f"{job_dir}/history.json")["phases"][-1]["epochs"][-1]["val_accuracy"]
    reported = dict((name, value) for name, value, *_ in re.findall(KATIB_FILTER, capsys.readouterr().out))
    assert float(reported["val_accuracy"]) == pytest.approx(expected, abs=1e-6)  # Katib's StdOut collector
    (line,) = metrics_file.read_text().splitlines()  # cloudml-hypertune's file, which Vertex AI reads
    entry = json.loads(line)
    assert entry["trial"] == "7" and float(entry["val_accuracy"]) == pytest.approx(expected)
