"""A stored loss curve of a deterministic CPU run pins the step's behaviour.

Any change to data, model, losses or the step that moves these numbers fails here; when the
change is intended, regenerate with ``MTL_REGEN_LOSS_CURVE=1 pytest tests/train/test_loss_curve.py``
and commit the new curve with the change that caused it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mtl.config import load_config
from mtl.data import load_splits, make_loader
from mtl.losses import normalize_weights
from mtl.models import build_model
from mtl.train.loop import active_taskset
from mtl.train.step import compute_loss

EXPECTED = Path(__file__).with_name("expected_loss_curve.json")
STEPS = 12


def _curve(cache_dir: Path) -> list[float]:
    cfg = load_config(
        None,
        [
            "model.width=8",
            "model.depth=2",
            "data.train_size=256",
            "data.val_size=32",
            f"data.cache_dir={cache_dir}",
        ],
    )
    taskset = active_taskset(cfg)
    weights = normalize_weights({}, taskset.loss_keys)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: reductions in a fixed order
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, taskset)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        train, _ = load_splits(cfg.data, taskset)
        losses = []
        for batch in make_loader(train, 16, train=True, seed=0):
            loss, _ = compute_loss(model, batch, taskset, weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == STEPS:
                return losses
    finally:
        torch.set_num_threads(threads)
    raise AssertionError("not enough batches")


def test_loss_curve_matches_the_stored_one(cache_dir):
    losses = _curve(cache_dir)
    if os.environ.get("MTL_REGEN_LOSS_CURVE"):
        EXPECTED.write_text(json.dumps({"steps": STEPS, "losses": losses}, indent=1))
    expected = json.loads(EXPECTED.read_text())["losses"]
    # Loose enough for another CPU's vector width, tight enough to catch a real change.
    assert losses == pytest.approx(expected, rel=2e-3)
    assert losses[-1] < losses[0]
