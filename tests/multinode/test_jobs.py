"""A training job and a PBT sweep submitted with ``ray job submit`` to a cluster of separate
network hosts (tests/multinode/harness.py): workers placed on both worker nodes, checkpoints
written to the S3 API server over the bridge, the runs logged to the head's ``mlflow server``.

Each worker needs train.cpus_per_worker=2, all of a worker node's CPUs, so two workers (or two
1-worker trials) can only run one per node; the test reads where they ran from Ray's state API.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.multinode.harness import REPO, VENV_BIN

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

JOB_TIMEOUT_S = 420


def tiny_overrides(cluster, cache_dir, *extra: str) -> list[str]:
    """A tiny run stored in the harness's bucket and logged to its MLflow server."""
    return [
        "train.num_workers=2",
        "train.cpus_per_worker=2",
        "train.micro_batch_size=16",
        "data.train_size=256",
        "data.val_size=32",
        f"data.cache_dir={cache_dir}",
        f"train.storage_path={cluster.s3.url('runs')}",
        f"tracking.tracking_uri={cluster.mlflow_uri}",
        *extra,
    ]


def submit_and_wait(cluster, script: str, args: list[str], job: str) -> tuple[str, str]:
    """Submit ``python <script> <args>``, wait for it; (final status, the job's logs)."""
    argv = [str(VENV_BIN / "python"), str(REPO / script), *args]
    done = cluster.submit(argv, job, timeout=JOB_TIMEOUT_S)
    status = cluster.wait_job(job, 60)
    logs = cluster.job_logs(job) or done.stdout + done.stderr
    (cluster.log_dir / f"{job}.log").write_text(logs)
    return status, logs


def job_id_of(cluster, submission_id: str) -> str:
    done = cluster.ray_cli("list", "jobs", "--format", "json", "--detail")
    return next(j["job_id"] for j in json.loads(done.stdout) if j["submission_id"] == submission_id)


def last_json(logs: str) -> dict:
    lines = [line for line in logs.splitlines() if line.startswith("{")]
    assert lines, logs[-3000:]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(cluster, cache):
    args = [
        str(REPO / "configs" / "tiny.yaml"),
        *tiny_overrides(
            cluster,
            cache,
            "train.max_steps=8",
            "train.checkpoint_every_steps=4",
            "train.val_every_steps=4",
            "train.log_every_steps=4",
            "tracking.register=true",
            "tracking.register_above_chance=false",  # 8 steps: the cluster path is under test
            "tracking.model_name=multinode-tiny",
        ),
        "--name",
        "job",
    ]
    status, logs = submit_and_wait(cluster, "jobs/train.py", args, "mtl-train-job")
    return status, logs, job_id_of(cluster, "mtl-train-job")


def test_a_training_job_runs_on_both_worker_nodes_and_stores_in_s3(cluster, trained):
    status, logs, job_id = trained
    assert status == "SUCCEEDED", logs[-4000:]
    placed = cluster.actor_nodes("RayTrainWorker", job_id)
    print(f"train workers ran on: {placed}")
    assert sorted(placed) == ["w1", "w2"], placed

    keys = cluster.s3.keys("runs/job/")
    named = (re.match(r"runs/job/(checkpoint_\d+)/", k) for k in keys)
    checkpoints = sorted({m.group(1) for m in named if m})
    assert checkpoints == ["checkpoint_00000004", "checkpoint_00000008"], keys
    for ckpt in checkpoints:
        names = [k for k in keys if f"/{ckpt}/" in k]
        # Both ranks' shards travelled to the bucket: one manifest per rank.
        assert any(k.endswith("manifest.rank0.json") for k in names), names
        assert any(k.endswith("manifest.rank1.json") for k in names), names
    print(f"objects in s3://{cluster.s3.bucket}/runs/job: {len(keys)}; checkpoints {checkpoints}")

    from mlflow.tracking import MlflowClient

    shown = last_json(logs)
    client = MlflowClient(cluster.mlflow_uri, registry_uri=cluster.mlflow_uri)
    run = client.get_run(shown["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [4, 8]
    assert run.data.tags["mtl.checkpoint"] == f"{cluster.s3.url('runs')}/job/checkpoint_00000008"
    version = client.get_model_version_by_alias("multinode-tiny", "candidate")
    assert version.run_id == run.info.run_id
    artifacts = cluster.s3.keys("mlartifacts/")  # the server's artifact store is the bucket
    assert any(run.info.run_id in k and k.endswith("config.json") for k in artifacts), artifacts
    # The registered model's files (an MLflow logged model) are objects in the bucket too.
    model_files = [k for k in artifacts if "/models/" in k]
    assert any(k.endswith("/MLmodel") for k in model_files), artifacts
    print(f"registered multinode-tiny v{version.version}: {len(model_files)} model objects")


def test_a_pbt_sweep_places_its_trials_on_both_worker_nodes(cluster, cache):
    args = [
        str(REPO / "configs" / "pbt_multimnist.yaml"),
        *tiny_overrides(
            cluster,
            cache,
            "train.num_workers=1",
            "model.width=8",
            "model.depth=2",
            "data.train_size=128",
            "tasks.baseline=",
            "tasks.names=[left,right]",
            "train.max_steps=4",
            "train.log_every_steps=2",
            "train.val_every_steps=2",
            "train.checkpoint_every_steps=2",
            "tracking.register=false",
            "tune.population=2",
            "tune.max_concurrent_trials=2",
            "tune.perturbation_interval=2",
            "tune.name=pbt",
            "tune.metric=mean_accuracy",
            "tune.keep_checkpoints=1",
        ),
    ]
    status, logs = submit_and_wait(cluster, "jobs/tune.py", args, "mtl-tune-job")
    assert status == "SUCCEEDED", logs[-4000:]
    placed = cluster.actor_nodes("RayTrainWorker", job_id_of(cluster, "mtl-tune-job"))
    print(f"trial workers ran on: {placed}")
    assert {"w1", "w2"} <= set(placed), placed

    keys = cluster.s3.keys("runs/pbt/")
    trials = sorted({m.group(1) for k in keys if (m := re.match(r"runs/pbt/(trial_[^/]+)/", k))})
    policies = [k for k in keys if re.search(r"pbt_policy_[^/]+\.txt$", k)]
    print(f"sweep objects: {len(keys)}; trials {trials}; policy files {policies}")
    assert len(trials) == 2, keys
    assert len(policies) >= 1, keys
    assert all(any(k.startswith(f"runs/pbt/{t}/checkpoint_") for k in keys) for t in trials)
    shown = last_json(logs)
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(cluster.mlflow_uri).get_run(shown["mlflow_parent_run"])
    assert parent.info.status == "FINISHED"
