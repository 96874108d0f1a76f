"""``model.kernels``: InterroGate through the Triton gate-mix kernel (kernels/gate_mix.py,
under Triton's interpreter on this CPU) against the eager path, forward and every gradient,
and its fixed (pruned) model.

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
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


def _close(got, want, what, rel=1e-5):
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= max(1e-6, rel * scale), f"{what}: max diff {diff:.3g} at scale {scale:.3g}"


@pytest.fixture
def launches(monkeypatch):
    """How many times the Triton gate mix ran (so a test cannot pass on the eager path)."""
    import kernels.gate_mix

    calls = []
    real = kernels.gate_mix.gate_mix
    monkeypatch.setattr(kernels.gate_mix, "gate_mix", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_the_kernel_path_trains_like_the_eager_one(backbone, launches):
    eager = diversify(make(backbone))
    with torch.no_grad():
        for beta in eager.beta:
            beta.copy_(torch.randn(beta.shape, generator=torch.Generator().manual_seed(5)))
    fused = copy.deepcopy(eager)
    eager.kernels, fused.kernels = "torch", "triton"
    x = torch.randn(2, TASKSET.in_channels, *TASKSET.image_size)
    outs = [m(x) for m in (eager, fused)]
    assert len(launches) == len(fused.alpha)  # one launch per layer, the kernel path only
    for head in outs[0]:
        _close(outs[1][head], outs[0][head], f"output {head}")
    losses = [sum(o.square().mean() for o in out.values()) for out in outs]
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(eager.named_parameters(), fused.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        _close(b.grad, a.grad, f"grad {name}")


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
