"""MLflow tracking on a real SQLite store: URI resolution, fast failure, one run per job."""

from __future__ import annotations

import socket

import pytest

from mtl.config import load_config
from mtl.tracking import (
    RunLogger,
    TrackingError,
    check_reachable,
    finish_run,
    resolve_tracking_uri,
    start_run,
)


def test_default_uri_is_an_absolute_sqlite_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri("") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"


def test_unreachable_server_fails_fast_with_the_fix():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError, match="unreachable.*mlflow server"):
        check_reachable(f"http://127.0.0.1:{port}", timeout_s=2)


def test_sqlite_in_missing_directory_is_refused(tmp_path):
    with pytest.raises(TrackingError, match="does not exist"):
        check_reachable(f"sqlite:///{tmp_path}/nope/mlflow.db")


def test_run_holds_params_config_and_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["tracking.experiment=unit", "tasks.weights.left=1"])
    run_id = start_run(cfg, uri)
    RunLogger(uri, run_id).log_metrics({"val/left/accuracy": 0.5, "weight/left": 1.0}, step=3)
    finish_run(uri, run_id, ok=True)
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["tasks.weights.left"] == "1.0"
    assert run.data.metrics["val/left/accuracy"] == 0.5
    assert run.info.status == "FINISHED"
    assert start_run(cfg, uri, run_id) == run_id  # resume reopens, never duplicates
    assert len(MlflowClient(uri).search_runs([run.info.experiment_id])) == 1
