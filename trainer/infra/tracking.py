"""Experiment tracking: a training run's parameters, per-epoch metrics and final figures in an
MLflow tracking server (`--tracking_uri=http://...`, `--experiment=NAME`).

Tracking must never cost a run: every call to the server is bounded (CALL_SECONDS, no client
retries), and the first failure (the server down, a refused request) is logged once as a warning
and turns tracking off for the rest of the run, which goes on. A restarted run continues the same
MLflow run: its id is kept in job_dir (`tracking.json`, written by the chief).
"""

import os
import threading
import time

from absl import logging

from trainer.infra import storage

CALL_SECONDS = 10.0  # the longest one tracking call may hold training up
RECORD = "tracking.json"  # in job_dir: {"tracking_uri", "experiment", "run_id"}


class Tracker:
    """One training run's MLflow run; every method is a no-op once tracking failed or was off."""

    def __init__(self, tracking_uri, experiment, job_url):
        self.uri, self.experiment, self.job_url = tracking_uri, experiment or "image-transfer-trainer", job_url
        self.client = self.run_id = None
        self.on = bool(tracking_uri)
        if self.on:
            # MLflow's HTTP client retries for minutes by default: bounded here instead.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(CALL_SECONDS)))

    def _call(self, what, function):
        if not self.on:
            return None
        outcome = {}

        def run():
            try:
                outcome["value"] = function()
            except Exception as error:  # noqa: BLE001 - any failure of tracking is reported, never raised
                outcome["error"] = error

        worker = threading.Thread(target=run, name="tracking", daemon=True)
        worker.start()
        worker.join(CALL_SECONDS)
        problem = None
        if worker.is_alive():
            problem = f"no answer within {CALL_SECONDS:g} s"
        elif "error" in outcome:
            error = outcome["error"]
            problem = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        if problem:
            logging.warning("experiment tracking at %s failed to %s (%s): training goes on without it", self.uri,
                            what, problem)
            self.on = False
            return None
        return outcome.get("value")

    def start(self, params, tags):
        """Creates (or, for a restart, reopens) the MLflow run and logs the parameters."""
        record_url = storage.join(self.job_url, RECORD)

        def start():
            from mlflow.entities import Param  # the mlflow-skinny client
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            recorded = storage.read_json(record_url) if storage.exists(record_url) else {}
            if recorded.get("tracking_uri") == self.uri and recorded.get("run_id"):
                self.run_id = recorded["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=tags.get("job_dir")).info.run_id
            self.client.log_batch(self.run_id, params=[Param(key, str(value)[:6000])
                                                       for key, value in sorted(params.items())])
            storage.write_json(record_url, {"tracking_uri": self.uri, "experiment": self.experiment,
                                            "run_id": self.run_id})

        self._call("start a run", start)
        if self.on:
            logging.info("tracking: MLflow run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)

    def log_metrics(self, metrics, step):
        """Logs `{name: number}` at `step` (the optimizer step or the epoch)."""
        def log():
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(name, float(value), stamp, int(step))
                                                        for name, value in metrics.items()])

        self._call("log metrics", log)

    def finish(self, status="FINISHED"):
        """Marks the run FINISHED (or FAILED, KILLED)."""
        self._call("end the run", lambda: self.client.set_terminated(self.run_id, status))
