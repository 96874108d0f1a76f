"""A run's life on the driver: claimed once, never left RUNNING, resumable as advised."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtl.config import load_config
from mtl.tracking import start_run
from mtl.train.engine import CheckpointError
from mtl.train.guards import RunFailed
from mtl.train.launch import claim_run, fit


def _claim_and_hold(run_dir: str, uri: str, barrier, results) -> None:
    barrier.wait()
    try:
        with claim_run(Path(run_dir), uri, resume=False):
            results.put("claimed")
            time.sleep(3)
    except ValueError as err:
        results.put(str(err))


@pytest.mark.slow  # spawned drivers import torch: ~20 s on 2 cores
def test_one_run_name_claimed_by_several_drivers_at_once_starts_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    args = (str(tmp_path / "runs" / "same"), f"sqlite:///{tmp_path / 'm.db'}", barrier, results)
    procs = [ctx.Process(target=_claim_and_hold, args=args) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert outcomes.count("claimed") == 1, outcomes
    for refused in (o for o in outcomes if o != "claimed"):
        assert "is being trained right now by another driver" in refused


def test_a_run_folder_that_exists_is_refused_with_the_resume_hint(tmp_path):
    run_dir = tmp_path / "runs" / "old"
    (run_dir / "checkpoint_00000004").mkdir(parents=True)
    with pytest.raises(ValueError, match="already exists.*--resume old"):
        with claim_run(run_dir, f"sqlite:///{tmp_path / 'm.db'}", resume=False):
            pass
    with claim_run(run_dir, f"sqlite:///{tmp_path / 'm.db'}", resume=True):
        pass  # a resume may claim it


HOLDER = """
import sys, time
from pathlib import Path
from mtl.train.launch import claim_run
with claim_run(Path(sys.argv[1]), sys.argv[2], resume=False) as claim:
    claim.record(sys.argv[3])
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_the_run_of_a_driver_killed_by_sigkill_is_ended_by_the_next_start(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run_id = start_run(load_config(None, ["tracking.experiment=unit"]), uri)
    run_dir = tmp_path / "runs" / "killed"
    driver = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), uri, run_id], stdout=subprocess.PIPE, text=True
    )
    assert driver.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match="being trained right now"):
        with claim_run(run_dir, uri, resume=True):
            pass
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"  # what a SIGKILL leaves
    with claim_run(run_dir, uri, resume=True):
        run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert "died without ending the run" in run.data.tags["mtl.failure"]


def test_workers_failing_beyond_max_failures_name_the_resume_command():
    from ray.train import WorkerGroupError

    from mtl.train.launch import _failure_reason

    cfg = load_config(None, ["train.max_failures=2"])
    err = WorkerGroupError("...383 lines...", {0: RuntimeError("Traceback\n...\nOOM at step 7")})
    reason = _failure_reason(err, "tiny", cfg)
    assert "beyond train.max_failures=2 (rank 0: RuntimeError: OOM at step 7)" in reason
    assert "`mtl train CONFIG --resume tiny`" in reason
    assert "`python jobs/train.py CONFIG --resume tiny`" in reason


# --- end to end on Ray: a failed run, resumed; a corrupt checkpoint; a copied folder ---


def tiny(tmp: Path, cache_dir: Path, *extra: str):
    return load_config(
        "configs/tiny.yaml",
        [
            "tasks.names=[left,right]",
            "data.train_size=256",
            f"data.cache_dir={cache_dir}",
            "train.num_workers=1",
            "train.max_steps=8",
            "train.log_every_steps=2",
            "train.val_every_steps=4",
            "train.checkpoint_every_steps=2",
            "train.keep_checkpoints=4",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.register=false",
            *extra,
        ],
    )


def _run(result_or_uri, run_id=None):
    from mlflow.tracking import MlflowClient

    if run_id is None:
        return MlflowClient(result_or_uri.tracking_uri).get_run(result_or_uri.mlflow_run_id)
    return MlflowClient(result_or_uri).get_run(run_id)


@pytest.mark.slow
def test_spent_retries_fail_the_run_with_the_resume_command_and_resume_finishes_it(
    tmp_path, cache_dir, ray_session, monkeypatch
):
    monkeypatch.setenv("MTL_TEST_FAULTS", "1")
    monkeypatch.setenv("MTL_FAIL_AT_STEP", "5")
    monkeypatch.setenv("MTL_FAIL_MARKER", str(tmp_path / "crashed"))
    cfg = tiny(tmp_path, cache_dir, "train.max_failures=0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RunFailed, match=r"run t1 .*max_failures=0.*--resume t1") as failed:
        fit(cfg, run_name="t1")
    assert len(str(failed.value).splitlines()) == 1
    run_id = str(failed.value).split("MLflow run ")[1].split(")")[0]
    run = _run(uri, run_id)
    assert run.info.status == "FAILED" and "--resume t1" in run.data.tags["mtl.failure"]
    result = fit(cfg, resume="t1")  # the advice, followed
    assert result.mlflow_run_id == run_id and result.metrics["step"] == 8
    assert _run(result).info.status == "FINISHED"


@pytest.mark.slow
def test_corrupt_checkpoint_advice_works_and_a_copied_folder_gets_its_own_mlflow_run(
    tmp_path, cache_dir, ray_session
):
    cfg = tiny(tmp_path, cache_dir)
    first = fit(cfg, run_name="t2")
    latest = Path(first.checkpoint)
    victim = next(p for p in sorted(latest.rglob("*")) if p.is_file() and p.stat().st_size > 64)
    victim.write_bytes(victim.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(CheckpointError, match=f"Delete {latest} to resume from the previous"):
        fit(cfg, resume="t2")
    shutil.rmtree(latest)  # as printed
    again = fit(cfg, resume="t2")
    assert again.metrics["resumed_from_step"] == 6 and again.metrics["step"] == 8
    assert again.mlflow_run_id == first.mlflow_run_id
    # The run folder copied to another storage root names the original's MLflow run: a resume
    # there must not reopen it.
    shutil.copytree(tmp_path / "runs" / "t2", tmp_path / "copy" / "t2")
    copied = fit(tiny(tmp_path, cache_dir, f"train.storage_path={tmp_path / 'copy'}"), resume="t2")
    assert copied.mlflow_run_id != first.mlflow_run_id
    assert _run(first).data.tags["mtl.run_dir"] == str(tmp_path / "runs" / "t2")
    assert _run(copied).data.tags["mtl.run_dir"] == str(tmp_path / "copy" / "t2")


@pytest.mark.slow
def test_a_registration_error_fails_the_run_with_its_reason(
    tmp_path, cache_dir, ray_session, monkeypatch
):
    import mtl.train.register

    def broken(*args, **kwargs):
        raise OSError("disk full while exporting")

    monkeypatch.setattr(mtl.train.register, "register_checkpoint", broken)
    cfg = tiny(tmp_path, cache_dir, "tracking.register=true", "train.max_steps=2")
    with pytest.raises(RunFailed, match="registration failed: OSError: disk full") as failed:
        fit(cfg, run_name="t3")
    run_id = str(failed.value).split("MLflow run ")[1].split(")")[0]
    run = _run(f"sqlite:///{tmp_path / 'mlflow.db'}", run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mtl.failure"].startswith("RuntimeError: registration failed: OSError")
