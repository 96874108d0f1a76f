"""A real ``mlflow server`` that goes away and comes back: rank 0's logger survives it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mtl.config import load_config
from mtl.tracking import RunLogger, start_run

pytestmark = pytest.mark.slow
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on a fixed port and SQLite store, stopped and started at will."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port, self.proc = tmp, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> None:
        cmd = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
               "1", "--backend-store-uri", f"sqlite:///{self.tmp / 'store.db'}",
               "--default-artifact-root", str(self.tmp / "artifacts")]  # fmt: skip
        log = open(self.tmp / "server.log", "a")  # noqa: SIM115 - the child writes it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: {(self.tmp / 'server.log').read_text()}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_logger_buffers_through_an_outage_and_delivers_every_metric(server):
    from mlflow.tracking import MlflowClient

    cfg = load_config(None, ["tracking.experiment=outage"])
    run_id = start_run(cfg, server.uri)
    logger = RunLogger(server.uri, run_id, timeout_s=1.0, max_backoff_s=1.0)
    for step in range(5):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    server.stop()
    slowest = 0.0
    for step in range(5, 15):  # the server is gone: nothing raises, no call blocks for long
        t = time.monotonic()
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
        slowest = max(slowest, time.monotonic() - t)
    assert logger.pending, "the failed batches are kept"
    assert slowest < 3.0, slowest
    server.start()
    for step in range(15, 20):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    assert logger.flush(timeout_s=30) == 0
    history = MlflowClient(server.uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(20))


def test_values_beyond_the_buffer_are_dropped_counted_and_reported(server):
    from mlflow.tracking import MlflowClient

    run_id = start_run(load_config(None, ["tracking.experiment=outage"]), server.uri)
    logger = RunLogger(server.uri, run_id, timeout_s=1.0, max_backoff_s=1.0, max_pending=4)
    server.stop()
    for step in range(10):
        logger.log_metrics({"a": step, "b": step}, step)
    server.start()
    assert logger.flush(timeout_s=30) == 16  # the newest 2 batches of 2 kept, 16 dropped
    run = MlflowClient(server.uri).get_run(run_id)
    assert run.data.tags["mtl.tracking.dropped_metrics"] == "16"
    assert run.data.metrics["tracking/dropped_metrics"] == 16
    assert sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "a")) == [
        8,
        9,
    ]


def test_training_goes_on_through_a_server_restart_and_its_metrics_arrive(
    tmp_path, server, cache_dir, ray_session
):
    """A tiny run on Ray logs to the server; the server is killed and restarted mid-run.

    Training (~10 s) ends before the restarted server answers (~15 s); rank 0's logger
    delivers its backlog when the worker's training function returns (the logger's bounded
    final flush)."""
    import threading

    from mlflow.tracking import MlflowClient

    from mtl.train.launch import fit

    cfg = load_config(
        "configs/tiny.yaml",
        [
            "tasks.names=[left,right]",
            f"data.cache_dir={cache_dir}",
            "train.num_workers=1",
            "train.max_steps=240",
            "train.log_every_steps=2",
            "train.val_every_steps=120",
            "train.checkpoint_every_steps=120",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri={server.uri}",
            "tracking.register=false",
        ],
    )
    events = []

    def restart_mid_run() -> None:
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                experiment = client.get_experiment_by_name(cfg.tracking.experiment)
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                    break
            except Exception:  # noqa: BLE001 - the store is still being set up
                pass
            time.sleep(0.5)
        server.stop()
        events.append(("down", time.monotonic()))
        time.sleep(2)
        server.start()
        events.append(("up", time.monotonic()))

    watcher = threading.Thread(target=restart_mid_run)
    watcher.start()
    result = fit(cfg, run_name="outage")
    finished = time.monotonic()
    watcher.join()
    assert [e for e, _ in events] == ["down", "up"] and events[1][1] < finished, events
    history = MlflowClient(server.uri).get_metric_history(result.mlflow_run_id, "train/loss")
    run = MlflowClient(server.uri).get_run(result.mlflow_run_id)
    assert result.metrics["step"] == 240 and run.info.status == "FINISHED"
    dropped = int(run.data.tags.get("mtl.tracking.dropped_metrics", "0"))
    assert dropped > 0 or sorted(m.step for m in history) == list(range(2, 241, 2))
