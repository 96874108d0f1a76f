"""`ray job submit` of jobs/train.py to a real `ray start --head` on loopback, token auth on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(url: str, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering (401 without a token): it is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} did not come up")


@pytest.fixture
def ray_head():
    """A separate head node in its own session, so killing it leaves other Ray instances alone."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths are capped
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        # The test session's own Ray instance already holds the agents' default ports; a
        # head whose agent cannot bind them accepts no job ("No available agent").
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)


def _submit(url: str, args: list[str], token: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_AUTH_MODE", None)
    if token:
        env["RAY_AUTH_MODE"] = "token"
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        *args,
    ]
    deadline = time.time() + 90
    while True:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
        # The dashboard answers before the head's job agent has registered; Ray then asks
        # the client to try again later.
        if "No available agent" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(3)


def test_job_submit_trains_on_a_token_auth_cluster(ray_head, tmp_path, cache_dir, data_root):
    overrides = [
        "train.num_workers=1",
        "train.max_steps=4",
        "train.checkpoint_every_steps=4",
        "data.train_size=128",
        "data.val_size=32",
        f"data.cache_dir={cache_dir}",
        f"data.root={data_root}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    denied = subprocess.run(
        [RAY, "job", "list", "--address", ray_head],
        env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert denied.returncode != 0  # token auth is on: no token, no access
    done = _submit(ray_head, ["jobs/train.py", "configs/tiny.yaml", *overrides], token=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr)
    assert '"step": 4' in done.stdout
    assert list((tmp_path / "runs").glob("*/checkpoint_00000004"))


def test_job_submit_runs_a_pbt_sweep(ray_head, tmp_path, cache_dir, data_root):
    """jobs/tune.py on the cluster: 2 trials of 1 worker, perturbed once at step 2 of 4."""
    overrides = [
        "tasks.names=[left,right]",
        "train.num_workers=1",
        "train.max_steps=4",
        "train.checkpoint_every_steps=2",
        "train.val_every_steps=2",
        "data.train_size=128",
        "data.val_size=32",
        f"data.cache_dir={cache_dir}",
        f"data.root={data_root}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tune.population=2",
        "tune.perturbation_interval=2",
        "tune.interval_unit=steps",
        "tune.synch=true",
        "tune.metric=left/accuracy",
        "tune.name=job-pbt",
        "tracking.register=false",
    ]
    done = _submit(ray_head, ["jobs/tune.py", "configs/tiny.yaml", *overrides], token=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith('{"sweep"')))
    assert summary["sweep"] == "job-pbt" and set(summary["weights"]) == {"left", "right"}
    assert (tmp_path / "runs" / "job-pbt" / "pbt_global.txt").read_text().strip()  # an exploit
