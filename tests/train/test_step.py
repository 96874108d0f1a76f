"""The pure training step on real benchmark batches, without Ray or DeepSpeed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtl.config import load_config
from mtl.data import load_splits, make_loader
from mtl.losses import normalize_weights
from mtl.models import build_model
from mtl.train.loop import active_taskset
from mtl.train.step import compute_loss, evaluate


def _setup(cache_dir, *overrides):
    cfg = load_config(
        None,
        [
            "model.width=8",
            "model.depth=2",
            "data.train_size=64",
            "data.val_size=32",
            f"data.cache_dir={cache_dir}",
            *overrides,
        ],
    )
    taskset = active_taskset(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, taskset)
    train, val = load_splits(cfg.data, taskset)
    return cfg, taskset, model, train, val


def test_multitask_loss_is_the_weighted_sum(cache_dir):
    cfg, taskset, model, train, _ = _setup(
        cache_dir, "tasks.weights={left: 3, right: 1}", "tasks.names=[left,right]"
    )
    weights = normalize_weights(cfg.tasks.weights, taskset.loss_keys)
    batch = next(iter(make_loader(train, 16, train=True)))
    total, losses = compute_loss(model, batch, taskset, weights)
    torch.testing.assert_close(total, 0.75 * losses["left"] + 0.25 * losses["right"])
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sampling_weighting_pools_every_sample_equally(cache_dir):
    cfg, taskset, model, train, _ = _setup(
        cache_dir, "data.benchmark=digits", "data.image_size=28", "tasks.weighting=sampling"
    )
    weights = normalize_weights({}, taskset.loss_keys)
    loader = make_loader(
        train, 32, train=True, domain_weights={"mnist": 0.6, "mnist_m": 0.3, "optdigits": 0.1}
    )
    batch = next(iter(loader))
    total, losses = compute_loss(model, batch, taskset, weights, weighting="sampling")
    pooled = F.cross_entropy(
        model(batch["image"], batch["domain"])["digit"], batch["targets"]["digit"]
    )
    torch.testing.assert_close(total, pooled)
    assert set(losses) == {"mnist", "mnist_m", "optdigits"}


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_evaluate_fills_every_task_metric(cache_dir, backbone):
    _, taskset, model, _, val = _setup(cache_dir, f"model.backbone={backbone}", "model.width=16")
    metrics = evaluate(
        model, make_loader(val, 16, train=False), taskset, torch.device("cpu")
    ).compute()
    for key in taskset.loss_keys:
        metric, _ = taskset.primary(key)
        assert 0 <= metrics[metric] < float("inf")
    assert model.training  # evaluate restores the mode it found
