"""kernels/gate_mix.py against its PyTorch reference: forward and every gradient at odd sizes.

On a machine without CUDA the kernels run under Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), fp32 only. Tolerance: the kernel adds the T weighted streams with
fused multiply-adds in fp32 where the reference rounds each product, and it sums ``dg`` / ``dw``
over P·Q in another order (per tile, then atomically), so results differ by a few ulps times
the reduction length; 1e-5 relative to the largest value (and 1e-6 absolute) bounds that with
room and still catches a wrong term, which is of the order of the values themselves.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.gate_mix import gate_mix, gate_mix_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

# (T, P, C, Q): maps (P = batch, Q = H·W) and tokens (Q = 1), non-powers of two, batch 1
SIZES = [
    (1, 1, 3, 5 * 7),
    (2, 3, 5, 9 * 11),
    (7, 2, 6, 3),
    (3, 5, 13, 1),  # tokens: (B·N, D, 1)
    (4, 1, 37, 17),
]


def _inputs(T, P, C, Q, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()

    g = torch.rand(T, C, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = torch.softmax(torch.randn(T, C, generator=gen), 0).to(DEVICE, dtype).requires_grad_()
    return g, w, rand(P, C, Q), rand(T, P, C, Q)


def _close(got, want, rel=1e-5):
    scale = want.abs().max().item()
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= max(1e-6, rel * scale), f"max diff {diff:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_shared", [True, False], ids=["shared", "last-layer"])
def test_forward_and_gradients_match_the_reference(size, with_shared):
    g, w, phi_s, phi_t = _inputs(*size)
    w = w if with_shared else None
    inputs = [x for x in (g, w, phi_s, phi_t) if x is not None]
    got = gate_mix(g, w, phi_s, phi_t)
    want = gate_mix_ref(g, w, phi_s, phi_t)
    _close(got[0], want[0])
    if with_shared:
        _close(got[1], want[1])
    else:
        assert got[1] is None and want[1] is None
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(x.shape, generator=gen).to(DEVICE) for x in want if x is not None]
    outs_got = [x for x in got if x is not None]
    outs_want = [x for x in want if x is not None]
    grads_got = torch.autograd.grad(outs_got, inputs, upstream)
    grads_want = torch.autograd.grad(outs_want, inputs, upstream)
    names = ["g", "w", "phi_s", "phi_t"] if with_shared else ["g", "phi_s", "phi_t"]
    for name, a, b in zip(names, grads_got, grads_want, strict=True):
        try:
            _close(a, b)
        except AssertionError as err:
            raise AssertionError(f"d{name}: {err}") from None


def test_binary_gates_select_exactly_one_stream():
    """Pruning relies on g ∈ {0, 1} giving exactly φ_s or φ_t, bit for bit."""
    g, w, phi_s, phi_t = _inputs(3, 2, 5, 7)
    hard = (torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    out, _ = gate_mix(hard.to(DEVICE), w, phi_s, phi_t)
    pick = hard[:, None, :, None].bool().to(DEVICE)
    assert torch.equal(out, torch.where(pick, phi_s.expand_as(phi_t), phi_t))


def test_only_the_shared_gradient_or_only_the_task_gradient_flows():
    """A loss on the task streams alone (or the shared stream alone) is still exact: the
    missing upstream gradient counts as zero."""
    g, w, phi_s, phi_t = _inputs(2, 2, 4, 6)
    for pick in (0, 1):
        got = gate_mix(g, w, phi_s, phi_t)[pick].square().sum()
        want = gate_mix_ref(g, w, phi_s, phi_t)[pick].square().sum()
        inputs = (g, w, phi_s, phi_t)
        grads_want = torch.autograd.grad(want, inputs, allow_unused=True)  # w: unused by out
        for x, a, b in zip(inputs, torch.autograd.grad(got, inputs), grads_want, strict=True):
            _close(a, torch.zeros_like(x) if b is None else b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a CUDA device")
def test_bf16_on_the_gpu_matches_the_fp32_reference():
    """bf16 storage, fp32 arithmetic inside: within bf16's rounding of the result (2^-8)."""
    g, w, phi_s, phi_t = _inputs(5, 8, 96, 28 * 28, dtype=torch.bfloat16)
    got = gate_mix(g, w, phi_s, phi_t)
    want = gate_mix_ref(*(x.detach().float() for x in (g, w, phi_s, phi_t)))
    for a, b in zip(got, want, strict=True):
        _close(a, b, rel=2**-7)
