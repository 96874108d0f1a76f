"""Fixing InterroGate: the pruned static model equals the binarised gated model, drops exactly
the unread filters, costs what hard sharing / single-task networks cost at the extremes, and
exports with torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl.config import ModelConfig
from mtl.models import build_model
from mtl.models.interrogate import InterroGate
from mtl.prune import (
    PruneVerificationError,
    count_flops,
    count_params,
    fix_interrogate,
    verify_fixed,
)
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

TASKSET = TaskSet(
    "toy",
    (
        TaskSpec("left", CLASSIFICATION, 10, "accuracy", True),
        TaskSpec("semseg", DENSE_CLASSIFICATION, 11, "miou", True),
        TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),
    ),
    1,
    16,
)
# depth 3 at width 8: blocks 8->8 (identity shortcut), 8->16 (projection), 16->16
SIZES = {"width": 8, "depth": 3, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def gated(backbone: str = "resnet", seed: int = 0) -> InterroGate:
    """A gated model with distinct task blocks, random β and non-trivial BatchNorm stats."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="interrogate", backbone=backbone, **SIZES), TASKSET)
    with torch.no_grad():
        for p in model.task_blocks.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for beta in model.beta:
            beta.normal_()
    model.train()
    for _ in range(3):
        model(torch.rand(4, 1, 16, 16))
    return model.eval()


def set_gates(model: InterroGate, pattern: list[torch.Tensor]) -> None:
    """Binary pattern per layer, ``(T, C_l)`` bool, True = shared feature."""
    with torch.no_grad():
        for alpha, shared in zip(model.alpha, pattern, strict=True):
            alpha.copy_(torch.where(shared, 1.0, -1.0))


def random_pattern(model: InterroGate, p_shared: float, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(a.shape, generator=gen) < p_shared for a in model.alpha]


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_fixed_equals_binarised_gated_model(backbone: str) -> None:
    model = gated(backbone)
    pattern = random_pattern(model, 0.5)
    pattern[1][0] = True  # left: layer 1 fully shared, its task block is removed
    pattern[0][1] = False  # semseg: layer 0 fully task-specific, it reads no shared channel
    set_gates(model, pattern)
    fixed = fix_interrogate(model)
    assert fixed.layers[1].streams["left"].block is None
    assert not fixed.layers[0].streams["semseg"].reads_shared
    x = torch.rand(5, 1, 16, 16)
    assert verify_fixed(model, fixed, x, atol=1e-5) <= 1e-5
    with torch.no_grad():
        expected, actual = model(x), fixed(x)
    for task in expected:
        torch.testing.assert_close(actual[task], expected[task], atol=1e-5, rtol=0)
    assert model.alpha[0].grad is None  # fixing leaves the gated model alone


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_layer_where_every_task_is_specific_drops_the_shared_block(backbone: str) -> None:
    model = gated(backbone, seed=1)
    pattern = random_pattern(model, 0.5, seed=1)
    pattern[1][:] = False
    set_gates(model, pattern)
    fixed = fix_interrogate(model)
    assert fixed.layers[1].shared is None
    assert not fixed.layers[0].mixes  # nothing reads x_s^0 any more
    verify_fixed(model, fixed, torch.rand(3, 1, 16, 16), atol=1e-5)


def test_pruning_removes_exactly_the_unread_filters() -> None:
    model = gated("resnet")
    set_gates(model, random_pattern(model, 0.6, seed=2))
    fixed = fix_interrogate(model)
    for layer, shared in enumerate(model.binary_gates()):
        fixed_layer = fixed.layers[layer]
        for i, task in enumerate(model.task_blocks):
            block = fixed_layer.streams[task].block
            n_specific = int((~shared[i]).sum())
            assert (0 if block is None else block.conv2.out_channels) == n_specific
            if block is not None:
                assert block.conv1.out_channels == shared.shape[1]  # conv2 reads all of h
        n_taken = int(shared.any(dim=0).sum())
        assert fixed_layer.shared.conv2.out_channels == n_taken


def test_vit_prunes_the_last_mlp_rows() -> None:
    model = gated("vit")
    set_gates(model, random_pattern(model, 0.6, seed=3))
    fixed = fix_interrogate(model)
    for layer, shared in enumerate(model.binary_gates()):
        for i, task in enumerate(model.task_blocks):
            block = fixed.layers[layer].streams[task].block
            n_specific = int((~shared[i]).sum())
            if block is None:
                assert n_specific == 0
            elif n_specific < shared.shape[1]:
                assert block.fc2.out_features == n_specific


def flops(model: nn.Module) -> int:
    return count_flops(model, torch.rand(1, 1, 16, 16))


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_flops_at_the_extremes(backbone: str) -> None:
    model = gated(backbone)
    cfg = ModelConfig(backbone=backbone, **SIZES)
    set_gates(model, [torch.ones_like(a, dtype=torch.bool) for a in model.alpha])
    hard = flops(build_model(cfg, TASKSET))
    assert abs(flops(fix_interrogate(model)) - hard) <= 0.05 * hard
    set_gates(model, [torch.zeros_like(a, dtype=torch.bool) for a in model.alpha])
    singles = [build_model(cfg, TASKSET.subset([h.name])) for h in TASKSET.heads]
    stem = flops(model.stem)  # the fixed model runs the shared stem once, not T times
    expected = sum(flops(m) for m in singles) - (len(singles) - 1) * stem
    assert flops(fix_interrogate(model)) == pytest.approx(expected, rel=0.01)


def test_flops_grow_with_open_task_channels() -> None:
    """Opening task channels one by one (in random order) never lowers the FLOPs while some
    task still takes every shared channel. (Closing the last user of a shared channel can
    lower them: the shared block's whole first conv goes once its last channel does.)"""
    model = gated("resnet")
    slots = [
        (layer, i, c)
        for layer, a in enumerate(model.alpha)
        for i in range(2)
        for c in range(a.shape[1])
    ]
    order = torch.randperm(len(slots), generator=torch.Generator().manual_seed(0)).tolist()
    pattern = [torch.ones_like(a, dtype=torch.bool) for a in model.alpha]
    history = []
    for k, slot in enumerate(order):
        layer, i, c = slots[slot]
        pattern[layer][i, c] = False
        if k % 6 == 0 or k == len(order) - 1:
            set_gates(model, pattern)
            history.append(flops(fix_interrogate(model)))
    assert history == sorted(history) and history[-1] > history[0]


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_fixed_model_is_plain_and_exports(backbone: str) -> None:
    model = gated(backbone)
    set_gates(model, random_pattern(model, 0.5, seed=4))
    fixed = fix_interrogate(model)
    assert not isinstance(fixed, InterroGate)
    names = [n for n, _ in [*fixed.named_parameters(), *fixed.named_buffers()]]
    assert not [n for n in names if any(w in n.lower() for w in ("gate", "alpha", "beta"))]
    assert count_params(fixed) < count_params(model)
    x = torch.rand(2, 1, 16, 16)
    program = torch.export.export(fixed, (x,))
    exported, direct = program.module()(x), fixed(x)
    assert list(exported) == list(direct)
    for task in direct:
        torch.testing.assert_close(exported[task], direct[task])


def test_verify_fixed_raises_on_a_tampered_model() -> None:
    model = gated("resnet")
    set_gates(model, random_pattern(model, 0.5, seed=5))
    fixed = fix_interrogate(model)
    with torch.no_grad():
        fixed.heads["semseg"].proj.bias.add_(1e-2)
    with pytest.raises(PruneVerificationError, match="semseg"):
        verify_fixed(model, fixed, torch.rand(2, 1, 16, 16), atol=1e-4)
