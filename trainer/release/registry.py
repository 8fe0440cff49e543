"""A promotion's registry step: once production's LATEST serves the new version, that version is
registered in MLflow's Model Registry as a new version of one model, with the alias `champion`
moved to it and tags carrying its model id, production version and dataset digest.

  --registry=mlflow://HOST:PORT/MODEL        (the tracking server over http)
  --registry=mlflow+https://HOST/MODEL       (over https)

The GCS switch stays the serving pointer and happens first: a registry that fails afterwards is
reported (exit 75) with the command that registers it, and production is never rolled back for it.
Registering is idempotent: a version already registered for the same model id only gets the alias.
"""

import os
import re

from absl import logging

from trainer.errors import RetryableError, UserError

ALIAS = "champion"
_FORM = re.compile(r"mlflow(\+https?)?://([^/]+)/([^/]+)")


def parse(registry):
    """`(tracking_uri, model_name)` of a --registry value; raises UserError for any other form."""
    match = _FORM.fullmatch(registry or "")
    if not match:
        raise UserError(f"--registry={registry!r}: expected mlflow://HOST:PORT/MODEL or mlflow+https://HOST/MODEL")
    scheme = (match.group(1) or "+http")[1:]
    return f"{scheme}://{match.group(2)}", match.group(3)


def register(registry, record, metrics, retry_command):
    """Registers the production version `record` (LATEST's record) and moves `champion` to it.

    Returns:
      The registry's version number (a string).

    Raises:
      RetryableError: the registry failed; the message names `retry_command`.
    """
    tracking_uri, name = parse(registry)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        try:
            client.create_registered_model(name, description="image-transfer-trainer production versions")
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = [version for version in client.search_model_versions(f"name='{name}'")
                    if version.tags.get("model_id") == record["model_id"]]
        if existing:
            version = existing[0]
        else:
            tags = {"model_id": record["model_id"], "production_version": record["version"],
                    "dataset_digest": (metrics.get("dataset") or {}).get("digest", ""),
                    "accuracy": str(record.get("accuracy")), "candidate": record.get("candidate", "")}
            version = client.create_model_version(name, source=record["source"], tags=tags,
                                                  description=f"production version {record['version']}")
        client.set_registered_model_alias(name, ALIAS, version.version)
    except Exception as error:  # noqa: BLE001 - any registry failure: production already switched
        raise RetryableError(f"production now serves {record['version']}, but registering it in {registry} failed "
                             f"({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}); production "
                             f"stays as it is. Register it by running the promotion again: {retry_command}") from error
    logging.info("registry: %s version %s is %r (%s)", name, version.version, ALIAS, tracking_uri)
    return version.version
