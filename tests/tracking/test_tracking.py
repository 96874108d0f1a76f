"""MLflow tracking on a real SQLite store: URI resolution, fast failure, one run per job."""

from __future__ import annotations

import os
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


def test_reachability_check_leaves_mlflow_retry_settings_alone(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with pytest.raises(TrackingError, match="unreachable"):
        check_reachable(f"http://127.0.0.1:{port}", timeout_s=1)
    # The workers Ray starts inherit this environment: it must keep MLflow's retries.
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_a_file_that_is_not_an_mlflow_store_is_refused(tmp_path):
    (tmp_path / "junk.db").write_text("not a database\n" * 100)
    with pytest.raises(TrackingError, match="junk.db"):
        check_reachable(f"sqlite:///{tmp_path}/junk.db")


def _create_store_and_run(uri: str, barrier, results) -> None:
    try:
        barrier.wait()
        from mlflow.tracking import MlflowClient

        check_reachable(uri)  # creates the store under its lock
        MlflowClient(uri).create_run("0")
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - the parent asserts on it
        results.put(f"{type(err).__name__}: {err}")


@pytest.mark.slow
def test_several_runs_starting_together_on_a_fresh_sqlite_store_all_succeed(tmp_path):
    """Without the lock, 4 of 4 such starts had a process fail (alembic's 'Online migration
    expected to match one row' or 'no such column'), measured the same way."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    uri = f"sqlite:///{tmp_path}/fresh.db"
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_create_store_and_run, args=(uri, barrier, results)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    assert outcomes == ["ok"] * 4
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient(uri).search_runs(["0"])) == 4


def test_run_dir_tag_identifies_the_run_folder(tmp_path):
    from mtl.tracking import owner_mismatch

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["tracking.experiment=unit"])
    run_id = start_run(cfg, uri, run_dir="/runs/a")
    assert owner_mismatch(uri, run_id, "/runs/a") == ""
    assert "belongs to run folder /runs/a" in owner_mismatch(uri, run_id, "/elsewhere/a")
    assert "is not in" in owner_mismatch(uri, "0" * 32, "/runs/a")


def test_failed_run_carries_its_reason(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_run(load_config(None, ["tracking.experiment=unit"]), uri)
    finish_run(uri, run_id, ok=False, reason="registration failed: boom\nsecond line")
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mtl.failure"] == "registration failed: boom"
