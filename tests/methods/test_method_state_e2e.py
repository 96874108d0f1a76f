"""The weighting method's state through Ray Train x DeepSpeed: saved in every checkpoint and
restored when training continues from one.

A resume hands the checkpoint to the workers as ``initial_checkpoint``, the same channel a
PBT exploit uses for its donor's checkpoint (``mtl.tune.driver``), so this also covers the
exploit's restore: ``train_worker`` cannot tell the two apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mtl.config import load_config
from mtl.train.engine import DS_SUBDIR, tensors_only_loads
from mtl.train.launch import fit

pytestmark = pytest.mark.slow


def _tiny(tmp: Path, cache_dir: Path, *extra: str):
    return load_config(
        None,
        [
            "model.width=8",
            "model.depth=2",
            "data.train_size=256",
            "data.val_size=32",
            f"data.cache_dir={cache_dir}",
            "tasks.baseline=",
            "tasks.method=uw",
            "train.num_workers=1",
            "train.micro_batch_size=16",
            "train.lr=0.05",
            "train.warmup_steps=1",
            "train.lr_schedule=constant",
            "train.log_every_steps=1",
            "train.val_every_steps=4",
            "train.checkpoint_every_steps=4",
            "tracking.register_above_chance=false",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            *extra,
        ],
    )


def _client_state(checkpoint: Path) -> dict:
    (states,) = (checkpoint / DS_SUBDIR).glob("*/mp_rank_00_model_states.pt")
    with tensors_only_loads(checkpoint):
        return torch.load(states, weights_only=True, map_location="cpu")["mtl"]


def test_uw_state_is_checkpointed_and_restored(tmp_path, cache_dir, ray_session):
    from mlflow.tracking import MlflowClient

    first = fit(_tiny(tmp_path, cache_dir, "train.max_steps=4"), run_name="uw")
    method = _client_state(Path(first.checkpoint))["method"]
    assert method["name"] == "uw" and method["keys"][0] == "left"
    saved = method["state"]["log_var"]  # after 4 Adam steps at lr 0.05, away from -0.5
    assert saved.shape == (5,) and float((saved + 0.5).abs().max()) > 0.05, saved

    resumed = fit(_tiny(tmp_path, cache_dir, "train.max_steps=6"), resume="uw")
    assert resumed.metrics["resumed_from_step"] == 4
    history = {
        m.step: m.value
        for m in MlflowClient(resumed.tracking_uri).get_metric_history(
            resumed.mlflow_run_id, "method/weight/left"
        )
    }
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    # Step 5's weight is read before step 5's update: exp(-s)/2 of the saved log-variance.
    continued = 0.5 * math.exp(-float(saved[0]))
    assert history[5] == pytest.approx(continued, rel=1e-5)
    assert abs(history[5] - 0.5 * math.exp(0.5)) > 0.01  # what a fresh start would log
    assert history[1] == pytest.approx(0.5 * math.exp(0.5), rel=1e-6)  # the run's own start
