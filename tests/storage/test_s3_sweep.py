"""A tiny PBT sweep stored in S3 (moto's server): 2 trials of 1 DeepSpeed worker, 4 steps,
perturbed at step 2, so the bottom trial continues from its donor's checkpoint in the bucket.
Afterwards the Train runs' folders are gone from the bucket, each trial keeps its newest
checkpoint, and the PBT policy files are read from the bucket into the sweep's MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl import storage
from mtl.config import load_config
from mtl.tune.driver import TRAIN_RUNS, tune_weights

pytestmark = pytest.mark.slow
SWEEP = "s3-pbt"


@pytest.fixture(scope="module")
def sweep(s3, tmp_path_factory, cache_dir, ray_session):
    tmp = tmp_path_factory.mktemp("s3sweep")
    root = s3.url("sweeps")
    cfg = load_config(
        None,
        [
            "model.width=8",
            "model.depth=2",
            "data.train_size=128",
            "data.val_size=32",
            f"data.cache_dir={cache_dir}",
            "tasks.baseline=",
            "tasks.names=[left,right]",
            "train.num_workers=1",
            "train.micro_batch_size=16",
            "train.max_steps=4",
            "train.log_every_steps=2",
            "train.val_every_steps=2",
            "train.checkpoint_every_steps=2",
            f"train.storage_path={root}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.register=false",
            "tune.population=2",
            "tune.max_concurrent_trials=2",
            "tune.perturbation_interval=2",
            "tune.interval_unit=steps",
            f"tune.name={SWEEP}",
            "tune.keep_checkpoints=1",
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)  # MLflow's ./mlruns artifacts
        return root, tune_weights(cfg)


def test_a_pbt_sweep_keeps_its_checkpoints_and_policies_in_the_bucket(sweep, s3):
    root, result = sweep
    assert result.checkpoint and result.checkpoint.startswith(f"{root}/{SWEEP}/trial_")
    assert storage.is_dir(result.checkpoint)
    keys = s3.keys(f"sweeps/{SWEEP}/")
    assert not [k for k in keys if f"/{TRAIN_RUNS}/" in k]  # every Train run's folder deleted
    kept: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) > 4 and parts[3].startswith("checkpoint_"):
            kept.setdefault(parts[2], set()).add(parts[3])
    assert len(kept) == 2 and all(len(c) == 1 for c in kept.values()), kept  # pruned to 1

    policies = [p for p in result.policy_files if Path(p).name.startswith("pbt_policy_")]
    assert policies and all(p.startswith(f"{root}/{SWEEP}/") for p in result.policy_files)
    assert all(storage.is_file(p) for p in result.policy_files)
    exploited = [t for t in result.trials if t["trial_id"] in Path(policies[0]).name]
    assert exploited, (policies, result.trials)

    from mlflow.tracking import MlflowClient

    logged = MlflowClient(result.tracking_uri).list_artifacts(result.parent_run_id, "pbt")
    assert {Path(a.path).name for a in logged} == {Path(p).name for p in result.policy_files}
