"""MLflow tracking: the only module that imports ``mlflow``.

The driver creates one MLflow run per training job (``start_run``) and passes its id to the
workers; only rank 0 logs into it (``RunLogger``), so there is exactly one run per job however
many workers train, and a job resumed after a failure keeps logging into the same run. A
population-based sweep is one parent run with one child run per Tune trial
(``start_child_run``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mtl.config import Config, flatten, to_dict

DEFAULT_DB = "mlflow.db"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message says how to fix it."""


def resolve_tracking_uri(configured: str = "") -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``; SQLite made absolute.

    Workers run in other directories than the driver, so a relative SQLite path must be
    pinned to the driver's working directory before it travels.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def ui_command(uri: str) -> str:
    """The command that opens this store in the MLflow UI."""
    return f"mlflow ui --backend-store-uri {uri}"


def check_reachable(uri: str, timeout_s: int = 5) -> None:
    """Fail fast (before Ray starts) when the store cannot be written or reached."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.is_dir():
            raise TrackingError(f"MLflow store {uri}: directory {path.parent} does not exist")
        try:
            sqlite3.connect(path).close()
        except sqlite3.Error as err:
            raise TrackingError(f"MLflow store {uri} cannot be opened: {err}") from None
        return
    if parsed.scheme in ("http", "https"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any failure means unusable; say which
            raise TrackingError(
                f"MLflow server {uri} is unreachable ({type(err).__name__}). Start it "
                f"(`mlflow server`), fix tracking.tracking_uri / $MLFLOW_TRACKING_URI, or "
                f"leave both empty for a local SQLite file."
            ) from None
        return
    if parsed.scheme not in ("", "file", "databricks", "postgresql", "mysql", "mssql"):
        raise TrackingError(f"MLflow tracking URI {uri!r} has an unknown scheme {parsed.scheme!r}")


def start_run(cfg: Config, uri: str, run_id: str | None = None) -> str:
    """Create the job's MLflow run (or reopen ``run_id`` on resume); returns its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if run_id is None:
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(cfg.tracking.experiment)
        run = client.create_run(experiment.experiment_id, run_name=cfg.tracking.run_name or None)
        run_id = run.info.run_id
        params = flatten(to_dict(cfg))
        # MLflow caps param values at 6000 characters; the full config goes in as an artifact.
        client.log_batch(run_id, params=[_param(k, v[:6000]) for k, v in params.items()])
        log_dict(uri, run_id, to_dict(cfg), "config.json")
    else:
        client.update_run(run_id, status="RUNNING")
        log_dict(uri, run_id, to_dict(cfg), "config_resume.json")
    return run_id


def start_child_run(uri: str, parent_run_id: str, cfg: Config, trial_id: str, name: str) -> str:
    """The run of one Tune trial under the sweep's run; reopened when the trial restarts.

    PBT restarts a trial's function after every exploit, so the run is found again by its
    ``mtl.trial_id`` tag instead of being created twice. ``tasks.weights`` is left out of
    the params because PBT changes it (MLflow refuses a param whose value changes); the
    training loop logs the weights as metrics, ``weight/<key>``, at every logged step.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    existing = child_runs(uri, parent_run_id).get(trial_id)
    if existing is not None:
        client.update_run(existing, status="RUNNING")
        return existing
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, "mtl.trial_id": trial_id}
    run = client.create_run(parent.info.experiment_id, run_name=name, tags=tags)
    params = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith("tasks.weights")}
    client.log_batch(run.info.run_id, params=[_param(k, v[:6000]) for k, v in params.items()])
    return run.info.run_id


def child_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """Trial id -> run id of the sweep's child runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    return {
        r.data.tags["mtl.trial_id"]: r.info.run_id for r in runs if "mtl.trial_id" in r.data.tags
    }


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value)


def log_dict(uri: str, run_id: str, data: dict[str, Any], name: str) -> None:
    """Store ``data`` as a JSON artifact of the run (``name`` may include folders)."""
    from mlflow.tracking import MlflowClient

    folder = str(Path(name).parent)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        path.write_text(json.dumps(data, indent=2, default=str))
        MlflowClient(uri).log_artifact(run_id, str(path), None if folder == "." else folder)


def finish_run(uri: str, run_id: str, ok: bool) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


class RunLogger:
    """Logs metrics into one existing run; used by rank 0 and by the driver."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


def metric_rows(uri: str, run_id: str, keys: list[str]) -> list[dict[str, float]]:
    """Metrics logged together (one ``log_metrics`` call each) as rows in logging order:
    the ``step`` and the value of every key; rows missing a key are left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    order = lambda m: (m.timestamp, m.step)  # noqa: E731
    histories = {
        k: sorted(client.get_metric_history(run_id, _metric_key(k)), key=order) for k in keys
    }
    count = min((len(h) for h in histories.values()), default=0)
    rows = []
    for i in range(count):
        row = {"step": histories[keys[0]][i].step}
        row.update({k: h[i].value for k, h in histories.items()})
        rows.append(row)
    return rows


def _metric_key(key: str) -> str:
    # MLflow keys allow "/" but not every character a task name might hold.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def log_figure(uri: str, run_id: str, figure: Any, name: str) -> None:
    """Store a matplotlib figure as a PNG artifact of the run."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_figure(run_id, figure, name)


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, folder: str = "") -> None:
    """Store the file at ``path`` as an artifact of the run, under ``folder``."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_artifact(run_id, str(path), folder or None)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    """Store ``text`` as an artifact file of the run."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_text(run_id, text, name)
