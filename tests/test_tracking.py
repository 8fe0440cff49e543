"""Experiment tracking against a real MLflow tracking server on loopback: a run's parameters, its
metrics per epoch and at the end, read back with MLflow's client; a server that is down or stalls
never stops or holds up training beyond a bounded time."""

import logging

import pytest
from faultproxy import FaultProxy
from helpers import TINY_JOB, prepare_stripes, train_in_process

from trainer.infra import storage, tracking

EPOCHS, FINE_TUNE_EPOCHS = 2, 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_stripes(tmp_path_factory.mktemp("tracking-data"), per_class=20, num_shards=1)


def train(dataset, job_dir, *extra):
    train_in_process(f"--data={dataset}", f"--job_dir={job_dir}", *TINY_JOB, "--batch_size=8",
                     f"--epochs={EPOCHS}", f"--fine_tune_epochs={FINE_TUNE_EPOCHS}", "--fine_tune_from=block3_conv1",
                     "--learning_rate=1e-3", *extra)


def test_a_run_logs_its_parameters_and_metrics_to_mlflow(dataset, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    job_dir = str(tmp_path / "job")
    train(dataset, job_dir, f"--tracking_uri={mlflow_server}", "--experiment=pets")
    record = storage.read_json(f"{job_dir}/{tracking.RECORD}")
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(record["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "pets"
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["backbone"] == "tiny"
    assert run.data.tags["job_dir"] == job_dir and run.data.tags["dataset_digest"]
    history = storage.read_json(f"{job_dir}/history.json")
    for phase in history["phases"]:
        logged = client.get_metric_history(run.info.run_id, f"{phase['name']}_loss")
        assert [(metric.step, metric.value) for metric in logged] == [
            (entry["epoch"], pytest.approx(entry["loss"])) for entry in phase["epochs"]]
        rates = client.get_metric_history(run.info.run_id, f"{phase['name']}_learning_rate")
        assert len(rates) == len(phase["epochs"])
    last = history["phases"][-1]["epochs"][-1]
    assert run.data.metrics["final_val_accuracy"] == pytest.approx(last["val_accuracy"])


@pytest.mark.parametrize("fault", ["down", "stall"])
def test_a_tracking_server_that_fails_never_stops_training(dataset, tmp_path, mlflow_server, caplog, monkeypatch,
                                                          fault):
    proxy = FaultProxy(mlflow_server)
    proxy.mode = "refuse" if fault == "down" else "stall"
    monkeypatch.setattr(tracking, "CALL_SECONDS", 2.0)  # the bound; 10 s in real runs
    try:
        with caplog.at_level(logging.WARNING, logger="absl"):
            train(dataset, str(tmp_path / "job"), f"--tracking_uri={proxy.url}")
    finally:
        proxy.close()
    assert storage.exists(str(tmp_path / "job" / "DONE"))
    warnings = [record.getMessage() for record in caplog.records if "experiment tracking" in record.getMessage()]
    assert len(warnings) == 1 and "training goes on without it" in warnings[0], warnings
    if fault == "stall":
        assert "no answer within 2 s" in warnings[0]
