"""``model.kernels``: InterroGate through the Triton gate-mix kernel (kernels/gate_mix.py) and
the ViT task MoE through the grouped expert MLPs (kernels/grouped_mlp.py), under Triton's
interpreter on this CPU, against the eager path: forward and every gradient, and the fixed
(pruned) models.

Tolerance 1e-5 relative to the largest value: the kernel's fused multiply-adds and its
per-tile reductions of the gate and β gradients round differently from the eager ops (a few
ulps, compounded over the layers), while a wrong term is of the order of the values.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from mtl.prune import fix_interrogate, verify_fixed
from tests.models.test_interrogate import TASKSET, diversify, make

pytestmark = pytest.mark.usefixtures("one_thread")
if os.environ.get("TRITON_INTERPRET") != "1":  # these models run on the CPU
    pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)


def _close(got, want, what, rel=1e-5):
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= max(1e-6, rel * scale), f"{what}: max diff {diff:.3g} at scale {scale:.3g}"


def _spy(monkeypatch, module, name):
    """Count the calls of ``module.name`` (so a test cannot pass on the eager path)."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture
def launches(monkeypatch):
    import kernels.gate_mix

    return _spy(monkeypatch, kernels.gate_mix, "gate_mix")


def _same_training_step(eager, fused, *inputs):
    outs = [m(*inputs) for m in (eager, fused)]
    for head in outs[0]:
        _close(outs[1][head], outs[0][head], f"output {head}")
    for out in outs:
        sum(o.square().mean() for o in out.values()).backward()
    for (name, a), b in zip(eager.named_parameters(), fused.parameters(), strict=True):
        if a.grad is None:  # an expert no row chose: the grouped path stacks every expert,
            assert b.grad is None or not b.grad.any(), name  # so its gradient is zeros
            continue
        _close(b.grad, a.grad, f"grad {name}")


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_the_kernel_path_trains_like_the_eager_one(backbone, launches):
    eager = diversify(make(backbone))
    with torch.no_grad():
        for beta in eager.beta:
            beta.copy_(torch.randn(beta.shape, generator=torch.Generator().manual_seed(5)))
    fused = copy.deepcopy(eager)
    eager.kernels, fused.kernels = "torch", "triton"
    x = torch.randn(2, TASKSET.in_channels, *TASKSET.image_size)
    _same_training_step(eager, fused, x)
    assert len(launches) == len(fused.alpha)  # one launch per layer, the kernel path only


def test_the_fixed_model_matches_the_kernel_path(launches):
    model = diversify(make("resnet"))
    model.kernels = "triton"
    x = torch.randn(3, TASKSET.in_channels, *TASKSET.image_size)
    assert verify_fixed(model, fix_interrogate(model), x, atol=1e-5) <= 1e-5
    assert launches  # the gated side ran through the kernel


def test_a_wrong_kernels_value_is_refused():
    from mtl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.kernels='cuda': use auto"):
        load_config(None, ["model.name=interrogate", "model.kernels=cuda"])


@pytest.mark.parametrize("kind", ["multi_task", "multi_domain"])
def test_the_vit_task_moe_runs_its_experts_grouped_like_the_loop(kind, monkeypatch):
    import kernels.grouped_mlp
    from tests.models.test_moe import TASKSETS, batch, routed

    grouped = _spy(monkeypatch, kernels.grouped_mlp, "grouped_mlp")
    eager = routed("vit", TASKSETS[kind]).train()
    fused = copy.deepcopy(eager)
    eager.kernels, fused.kernels = "torch", "triton"
    _same_training_step(eager, fused, *batch(TASKSETS[kind], 5, seed=3))
    moe_layers = sum(1 for b in fused.blocks if hasattr(b, "experts"))
    assert len(grouped) == moe_layers  # one grouped launch per MoE layer


def test_the_fixed_task_moe_matches_the_kernel_path(monkeypatch):
    import kernels.grouped_mlp
    from mtl.prune_moe import fix_moe
    from tests.models.test_moe import MULTI_TASK, batch, routed

    grouped = _spy(monkeypatch, kernels.grouped_mlp, "grouped_mlp")
    model = routed("vit", MULTI_TASK)
    model.kernels = "triton"
    x, _ = batch(MULTI_TASK, 4, seed=7)
    assert verify_fixed(model, fix_moe(model), x, atol=1e-5) <= 1e-5
    assert grouped
