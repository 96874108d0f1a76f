"""Faults on a cluster of separate network hosts (tests/multinode/harness.py), each during a
tiny 2-worker training job submitted with ``ray job submit`` (one worker per worker node,
checkpoints in the S3 API server, metrics to the head's ``mlflow server``):

- a worker node killed (every process of its namespace, SIGKILL) once the first checkpoint is
  in the bucket, and ``ray start`` again there: Ray Train (``train.max_failures``) restarts the
  workers from the last checkpoint in S3 and the job finishes;
- the S3 server down across a checkpoint and back (objects kept, as a real store's restart):
  the upload fails, the workers are restarted, and what the bucket then holds is either a
  complete checkpoint that verifies or one that a resume refuses, never one it loads half;
- the MLflow server killed and started again: training goes on, rank 0 buffers the metrics
  and sends them once the server is back (or counts what it dropped in
  ``mtl.tracking.dropped_metrics``).

Each case prints its numbers: the steps lost against the checkpoint interval, and what S3 and
MLflow hold afterwards.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.multinode.harness import REPO, VENV_BIN

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

STEPS, EVERY = 40, 4  # optimizer steps, checkpoint interval (node and S3 faults)
# The MLflow outage (a restart takes the server seconds) must fall inside the run.
MLFLOW_STEPS, MLFLOW_EVERY = 120, 40
JOB_TIMEOUT_S = 420
STEP_LINE = re.compile(r"\[mtl\] step (\d+)/")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def s3_env(cluster, monkeypatch):
    """This process reads the bucket through mtl.storage, as a resume would."""
    for key, value in cluster.s3.env().items():
        monkeypatch.setenv(key, value)


def start_job(cluster, cache, name: str, steps: int, every: int) -> None:
    args = [
        str(REPO / "configs" / "tiny.yaml"),
        "train.num_workers=2",
        "train.cpus_per_worker=2",  # a whole worker node each: one worker per node
        "train.micro_batch_size=16",
        "data.train_size=768",
        "data.val_size=32",
        f"data.cache_dir={cache}",
        f"train.max_steps={steps}",
        f"train.checkpoint_every_steps={every}",
        "train.log_every_steps=1",
        f"train.val_every_steps={steps}",
        "train.keep_checkpoints=10",  # all of them stay: what the bucket holds is checked
        "train.max_failures=3",
        f"train.storage_path={cluster.s3.url('faults')}",
        f"tracking.tracking_uri={cluster.mlflow_uri}",
        "tracking.register=false",
        "--name",
        name,
    ]
    argv = [str(VENV_BIN / "python"), str(REPO / "jobs" / "train.py"), *args]
    done = cluster.submit(argv, name, timeout=120, no_wait=True)
    assert done.returncode == 0, done.stdout + done.stderr


def checkpoints(cluster, run: str) -> list[int]:
    """Steps of the checkpoint folders in the bucket that both ranks finished writing."""
    keys = cluster.s3.keys(f"faults/{run}/")
    found: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) > 3 and parts[2].startswith("checkpoint_"):
            found.setdefault(parts[2], set()).add(parts[-1])
    done = [c for c, f in found.items() if {"manifest.rank0.json", "manifest.rank1.json"} <= f]
    return sorted(int(c.split("_")[1]) for c in done)


def wait_for(what: str, check, timeout_s: float, cluster=None, job: str = ""):
    """Poll ``check`` (cheap: a listing or the driver's log file) until it holds; the job's
    status (a CLI call, seconds on a busy machine) only every 10 s."""
    deadline = time.monotonic() + timeout_s
    asked = time.monotonic()
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if job and time.monotonic() - asked > 10:
            asked = time.monotonic()
            if cluster.job_status(job) in ("SUCCEEDED", "FAILED", "STOPPED"):
                pytest.fail(f"job {job} ended before {what}:\n{cluster.job_logs(job)[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {what} after {timeout_s:.0f}s")


def last_step(logs: str) -> int:
    steps = [int(s) for s in STEP_LINE.findall(logs)]
    return max(steps, default=0)


def finish(cluster, job: str) -> tuple[str, str]:
    status = cluster.wait_job(job, JOB_TIMEOUT_S)
    logs = cluster.job_logs(job)
    (cluster.log_dir / f"{job}.log").write_text(logs)
    return status, logs


def mlflow_run(cluster, logs: str):
    from mlflow.tracking import MlflowClient

    run_id = re.search(r"MLflow run ([0-9a-f]{32})", logs).group(1)
    client = MlflowClient(cluster.mlflow_uri)
    return client, client.get_run(run_id)


def logged_steps(client, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def verify_all(cluster, run: str) -> dict[int, str]:
    """Every checkpoint folder in the bucket, verified as a resume would (download, checksums):
    step -> "ok" or the refusal."""
    from mtl import storage
    from mtl.train.engine import CheckpointError
    from mtl.train.launch import verified_state

    out = {}
    for path in storage.checkpoints(f"{cluster.s3.url('faults')}/{run}"):
        step = int(storage.name(path).split("_")[1])
        try:
            verified_state(path)
            out[step] = "ok"
        except CheckpointError as err:
            out[step] = f"refused: {str(err)[:160]}"
    return out


def test_a_worker_node_killed_and_restarted_resumes_from_s3(cluster, cache, s3_env):
    job = "fault-node"
    start_job(cluster, cache, job, STEPS, EVERY)
    first = wait_for("checkpoint in S3", lambda: checkpoints(cluster, job), 300, cluster, job)
    reached = last_step(cluster.job_logs(job))
    cluster.kill_node("w1")
    killed_at = time.monotonic()
    print(f"\n[node] first checkpoint(s) {first}; w1 killed at step {reached}")
    time.sleep(5)
    cluster.restart_node("w1")
    print(f"[node] w1 back after {time.monotonic() - killed_at:.1f}s")
    status, logs = finish(cluster, job)
    assert status == "SUCCEEDED", logs[-5000:]

    unregistered = re.findall(r"(checkpoint_\d+) is complete in storage but was not yet", logs)
    client, run = mlflow_run(cluster, logs)
    steps = logged_steps(client, run.info.run_id)
    held = checkpoints(cluster, job)
    verified = verify_all(cluster, job)
    before, resumed_from = _restart_point(logs)
    lost = before - resumed_from
    print(
        f"[node] trained to step {before} (log seen at the kill: {reached}), resumed from "
        f"step {resumed_from} (checkpoint interval {EVERY}); steps lost "
        f"{lost}; checkpoints in S3 {held}; verified {verified}; MLflow {run.info.status}, "
        f"train/loss at {len(steps)} of {STEPS} steps; newer than Ray's: {unregistered}"
    )
    assert 0 <= lost <= EVERY
    assert resumed_from in first or resumed_from in held
    assert held == list(range(EVERY, STEPS + 1, EVERY))  # nothing lost from the bucket
    assert set(verified.values()) == {"ok"}
    assert run.info.status == "FINISHED"
    assert steps == list(range(1, STEPS + 1))  # nothing lost from MLflow


def _restart_point(logs: str) -> tuple[int, int]:
    """(the last step trained before the kill, the step the restarted workers continued
    from): rank 0 prints every step, and ``resumed from step N`` when it restores."""
    found = re.search(r"\[mtl\] resumed from step (\d+)", logs)
    if found is None:  # restarted from scratch (no checkpoint handed over)
        steps = [int(s) for s in STEP_LINE.findall(logs)]
        again = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
        assert again is not None, f"no restart in the step lines {steps}"
        return steps[again - 1], steps[again] - 1
    return last_step(logs[: found.start()]), int(found.group(1))


def test_the_s3_server_down_across_a_checkpoint_never_leaves_a_loadable_half(
    cluster, cache, s3_env
):
    from mtl.train.engine import CheckpointError
    from mtl.train.launch import latest_checkpoint

    job = "fault-s3"
    start_job(cluster, cache, job, STEPS, EVERY)
    first = wait_for("checkpoint in S3", lambda: checkpoints(cluster, job), 300, cluster, job)
    cluster.s3.down(keep_objects=True)
    down_at, reached = time.monotonic(), last_step(cluster.job_logs(job))
    # Down until an upload has failed (or the job has been at the next checkpoint a while).
    target = (reached // EVERY + 1) * EVERY

    def upload_failed() -> bool:
        logs = cluster.job_logs(job)
        return "AWS Error" in logs or last_step(logs) >= target

    try:
        wait_for("a failed upload", upload_failed, 120)
        time.sleep(3)
    finally:
        seen = cluster.job_logs(job)
        cluster.s3.up()
    print(
        f"\n[s3] down at step {reached} (checkpoints {first}) for "
        f"{time.monotonic() - down_at:.1f}s, the job reached step {last_step(seen)}; "
        f"upload error seen: {'AWS Error' in seen}"
    )
    status, logs = finish(cluster, job)
    failed = "Traceback" in logs[len(seen) :] or "failed" in logs[len(seen) :].lower()
    verified = verify_all(cluster, job)
    try:
        latest, refusal = latest_checkpoint(f"{cluster.s3.url('faults')}/{job}"), ""
    except CheckpointError as err:
        latest, refusal = None, str(err)
    steps = sorted({int(s) for s in STEP_LINE.findall(logs)})
    print(
        f"[s3] job {status}; worker failure seen after the outage: {failed}; checkpoints in S3 "
        f"verified {verified}; resume would start from "
        f"{latest['progress']['step'] if latest else refusal[:200]}"
    )
    # Either the job went on (the upload retried, or the workers restarted from the last
    # complete checkpoint) and finished, or it failed with a reason; never a silent half.
    assert status in ("SUCCEEDED", "FAILED"), logs[-4000:]
    if status == "SUCCEEDED":
        assert verified.get(STEPS) == "ok" and steps[-1] == STEPS
    else:
        assert "failed" in logs.lower(), logs[-4000:]
    if latest is not None:  # a resume loads only a checkpoint that verified complete
        assert verified[latest["progress"]["step"]] == "ok"
    else:
        assert "refusing to resume" in refusal and "Nothing was loaded" in refusal
    client, run = mlflow_run(cluster, logs)
    print(f"[s3] MLflow run {run.info.status}, tags {run.data.tags.get('mtl.failure', '')!r}")
    assert run.info.status == ("FINISHED" if status == "SUCCEEDED" else "FAILED")


def test_the_mlflow_server_restarted_mid_run_loses_no_metrics(cluster, cache):
    from mtl.tracking import DROPPED_TAG

    job = "fault-mlflow"
    start_job(cluster, cache, job, MLFLOW_STEPS, MLFLOW_EVERY)
    first = wait_for("checkpoint in S3", lambda: checkpoints(cluster, job), 300, cluster, job)
    reached = last_step(cluster.job_logs(job))
    cluster.restart_mlflow(down_s=6)
    back = last_step(cluster.job_logs(job))
    print(f"\n[mlflow] down from step {reached} (checkpoints {first}) to step {back}")
    status, logs = finish(cluster, job)
    assert status == "SUCCEEDED", logs[-4000:]
    client, run = mlflow_run(cluster, logs)
    steps = logged_steps(client, run.info.run_id)
    dropped = int(run.data.tags.get(DROPPED_TAG, "0") or 0)
    # Every key of the per-step train log (val/ is logged at the end only): expected at
    # every step; what is not there must be what the logger counted as dropped.
    keys = [k for k in run.data.metrics if not k.startswith(("val/", "tracking/", "guard/"))]
    missing = sum(MLFLOW_STEPS - len(logged_steps(client, run.info.run_id, k)) for k in keys)
    buffered = "buffering metrics and retrying" in logs
    print(
        f"[mlflow] steps trained during the outage: {back - reached}; buffered: {buffered}; "
        f"train/loss logged at {len(steps)} of {MLFLOW_STEPS} steps; values missing over "
        f"{len(keys)} per-step keys: {missing}; dropped tag: {dropped}; run {run.info.status}"
    )
    assert run.info.status == "FINISHED"
    assert last_step(logs) == MLFLOW_STEPS  # training went on
    assert missing == dropped  # every value is in MLflow, or counted as dropped
