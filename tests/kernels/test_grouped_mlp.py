"""kernels/grouped_mlp.py against its per-expert ``torch.matmul`` reference: forward and the
gradients of x, every weight and bias, with variable and empty groups.

Under Triton's interpreter (no CUDA) in fp32; the kernel keeps fp32 products (no TF32) and
accumulates over K (forward, dx) or over the expert's rows (dW) in tiles of 32, another order
than torch's, so values differ by a few ulps times the reduction length: 1e-5 relative to the
largest value (1e-6 absolute) bounds that and fails on a wrong term or a wrong row.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.grouped_mlp import grouped_matmul, grouped_matmul_ref, grouped_mlp, grouped_mlp_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

# (group sizes, D, H): odd sizes, empty groups (first, middle, last), one expert, one row
CASES = [
    ([5, 0, 37, 1], 24, 40),
    ([0, 33, 0], 17, 19),
    ([1], 8, 16),
    ([3, 70, 0, 2, 0], 33, 65),
]


def _close(got, want, rel=1e-5):
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    assert diff <= max(1e-6, rel * scale), f"max diff {diff:.3g} at scale {scale:.3g}"


def _inputs(sizes, D, H, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, M = len(sizes), sum(sizes)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE).requires_grad_()

    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    params = [rand(E, D, H, scale=D**-0.5), rand(E, H), rand(E, H, D, scale=H**-0.5), rand(E, D)]
    return rand(M, D), params, offsets


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[0])) + f"_{c[1]}x{c[2]}")
def test_the_expert_mlps_and_their_gradients_match_the_reference(case):
    x, params, offsets = _inputs(*case)
    got = grouped_mlp(x, *params, offsets)
    want = grouped_mlp_ref(x, *params, offsets)
    _close(got, want)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs = [x, *params]
    names = ["x", "w1", "b1", "w2", "b2"]
    for name, a, b in zip(
        names,
        torch.autograd.grad(got, inputs, upstream),
        torch.autograd.grad(want, inputs, upstream),
        strict=True,
    ):
        try:
            _close(a, b)
        except AssertionError as err:
            raise AssertionError(f"d{name}: {err}") from None


def test_an_empty_expert_gets_zero_weight_gradients():
    x, (w1, b1, _, _), offsets = _inputs([4, 0, 3], 16, 16)
    dw, db = torch.autograd.grad(grouped_matmul(x, w1, b1, offsets).sum(), (w1, b1))
    assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(db[1]) == 0
    assert torch.count_nonzero(dw[0]) > 0 and torch.count_nonzero(dw[2]) > 0


def test_bad_offsets_are_refused():
    x, (w1, b1, _, _), _ = _inputs([4, 3], 16, 16)
    with pytest.raises(ValueError, match="offsets"):
        grouped_matmul(x, w1, b1, [0, 4])  # E + 1 = 3 offsets needed
    with pytest.raises(ValueError, match="offsets"):
        grouped_matmul(x, w1, b1, [0, 4, 6])  # does not end at M = 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a CUDA device")
def test_bf16_on_the_gpu_matches_the_fp32_reference():
    """bf16 inputs, fp32 accumulation: within bf16's rounding of inputs and result."""
    x, params, offsets = _inputs([64, 0, 200, 7], 96, 384)
    got = grouped_matmul(x.bfloat16(), params[0].bfloat16(), params[1].bfloat16(), offsets)
    want = grouped_matmul_ref(x.detach(), params[0].detach(), params[1].detach(), offsets)
    _close(got, want, rel=2e-2)
