"""The task MoE's expert MLPs over all experts at once: a grouped matmul, one launch per layer.

What it computes: tokens ``x`` ``(M, D)`` sorted by expert, expert e owning rows
``offsets[e] : offsets[e + 1]`` (any sizes, empty groups too), and per-expert weights
``W1 (E, D, H), b1 (E, H), W2 (E, H, D), b2 (E, D)``::

    y[rows of e] = GELU(x[rows of e] @ W1[e] + b1[e]) @ W2[e] + b2[e]

the ViT expert MLP (``Linear, GELU, Linear``) of every expert. ``grouped_matmul`` does each
``@ W[e] + b[e]`` for all experts in one launch (the eager model loops over experts in Python,
one call per expert); GELU stays in PyTorch between the two.

Work and traffic per grouped matmul ``(M, K) @ (E, K, N)``: 2·M·K·N flops; it reads x once per
N tile and each expert's weight once per M tile of that expert, and writes y once. Programs
map to (M tile, N tile) pairs, every M tile inside one expert's rows: a table built on the
host from the group sizes (the caller already knows them) says which expert and rows each
tile covers, so an empty group costs nothing.

Backward: ``dx = dy @ W[e]ᵀ`` is the same kernel on the weight's transposed strides;
``dW[e] = x_eᵀ @ dy_e`` a second kernel, one program per (expert, K tile, N tile) walking the
expert's rows; ``db[e]`` the row sum of ``dy_e`` (``index_add``).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # the reference below is the fallback wherever Triton is missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (triton ships with torch on Linux)
    triton = None


# -- the PyTorch reference (also the CPU fallback) --------------------------------------------
def grouped_matmul_ref(x: Tensor, w: Tensor, b: Tensor | None, offsets: list[int]) -> Tensor:
    """``x[rows of e] @ w[e] + b[e]`` per expert, a loop over experts (the eager model's)."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    for e in range(w.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        out[lo:hi] = x[lo:hi] @ w[e] + (0 if b is None else b[e])
    return out


def grouped_mlp_ref(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                    offsets: list[int]) -> Tensor:  # fmt: skip
    """The expert MLPs, one ``torch.matmul`` per expert and layer."""
    h = torch.nn.functional.gelu(grouped_matmul_ref(x, w1, b1, offsets))
    return grouped_matmul_ref(h, w2, b2, offsets)


# -- the kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _grouped_mm(
        x_ptr, w_ptr, b_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, tile_end_ptr,
        K, N, stride_we, stride_wk, stride_wn,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # y[rows, n tile] = x[rows] @ w[e][:, n tile] (+ b[e]); rows = this tile's, all of expert e.
        tile = tl.program_id(0)
        e = tl.load(tile_expert_ptr + tile)
        m = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
        row_end = tl.load(tile_end_ptr + tile)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + m[:, None] * K + k[None, :],
                        mask=(m[:, None] < row_end) & (k[None, :] < K), other=0.0)  # fmt: skip
            b = tl.load(w_ptr + e * stride_we + k[:, None] * stride_wk + n[None, :] * stride_wn,
                        mask=(k[:, None] < K) & (n[None, :] < N), other=0.0)  # fmt: skip
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * N + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < row_end) & (n[None, :] < N))  # fmt: skip

    @triton.jit
    def _grouped_weight_grad(
        x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, N,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # dw[e][k tile, n tile] = x[rows of e, k tile]ᵀ @ dy[rows of e, n tile]; zero when empty.
        e = tl.program_id(0)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        lo, hi = tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(lo, hi, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            xt = tl.load(x_ptr + m[None, :] * K + k[:, None],
                         mask=(m[None, :] < hi) & (k[:, None] < K), other=0.0)  # fmt: skip
            dy = tl.load(dy_ptr + m[:, None] * N + n[None, :],
                         mask=(m[:, None] < hi) & (n[None, :] < N), other=0.0)  # fmt: skip
            acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
        mask = (k[:, None] < K) & (n[None, :] < N)
        tl.store(dw_ptr + e * K * N + k[:, None] * N + n[None, :],
                 acc.to(dw_ptr.dtype.element_ty), mask=mask)  # fmt: skip


BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32  # tl.dot needs >= 16; tuned on no GPU yet (ours)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep fp32 products (no TF32) so the kernel matches torch.matmul's default.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tiles(offsets: list[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per M tile: its expert, first row and the expert's end row (empty groups: none)."""
    experts, rows, ends = [], [], []
    for e in range(len(offsets) - 1):
        for start in range(offsets[e], offsets[e + 1], BLOCK_M):
            experts.append(e), rows.append(start), ends.append(offsets[e + 1])
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(experts), as_tensor(rows), as_tensor(ends)


def _matmul(x: Tensor, w: Tensor, b: Tensor | None, tiles, n: int) -> Tensor:
    """``x @ w[e] (+ b[e])`` per tile; ``w`` is any strided ``(E, K, N)`` view."""
    y = x.new_empty(x.shape[0], n)
    if tiles[0].numel() == 0 or n == 0:
        return y.zero_()
    grid = (tiles[0].numel(), triton.cdiv(n, BLOCK_N))
    _grouped_mm[grid](
        x, w, b if b is not None else w, y, *tiles, x.shape[1], n, *w.stride(),
        HAS_BIAS=b is not None, PRECISION=_precision(x.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y


# -- the launcher -----------------------------------------------------------------------------
class GroupedMatmul(torch.autograd.Function):
    """``grouped_matmul_ref`` forward and backward through the two kernels above."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, offsets: list[int]) -> Tensor:
        x, w = x.contiguous(), w.contiguous()
        b = b.contiguous() if b is not None else None
        tiles = _tiles(offsets, x.device)
        ctx.save_for_backward(x, w)
        ctx.tiles, ctx.offsets, ctx.has_bias = tiles, offsets, b is not None
        return _matmul(x, w, b, tiles, w.shape[2])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        E, K, N = w.shape
        dx = _matmul(dy, w.transpose(1, 2), None, ctx.tiles, K)  # dy @ w[e]ᵀ, no copy of w
        dw = torch.empty_like(w)
        offsets = torch.tensor(ctx.offsets, dtype=torch.int32, device=x.device)
        grid = (E, triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
        _grouped_weight_grad[grid](
            x, dy, dw, offsets, K, N, PRECISION=_precision(x.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )  # fmt: skip
        db = None
        if ctx.has_bias:
            sizes = torch.diff(offsets).long()
            expert_of = torch.repeat_interleave(torch.arange(E, device=x.device), sizes)
            db = dy.new_zeros(E, N, dtype=torch.float32).index_add_(0, expert_of, dy.float())
            db = db.to(dy.dtype)
        return dx, dw, db, None


def grouped_matmul(x: Tensor, w: Tensor, b: Tensor | None, offsets: list[int]) -> Tensor:
    """``grouped_matmul_ref`` through Triton (CUDA, or ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("grouped_matmul needs triton; use grouped_matmul_ref")
    if len(offsets) != w.shape[0] + 1 or offsets[0] != 0 or offsets[-1] != x.shape[0]:
        raise ValueError(f"offsets {offsets[:4]}...: need E + 1 = {w.shape[0] + 1} "
                         f"ascending row offsets from 0 to {x.shape[0]}")  # fmt: skip
    return GroupedMatmul.apply(x, w, b, list(offsets))


def grouped_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                offsets: list[int]) -> Tensor:  # fmt: skip
    """``grouped_mlp_ref`` with both layers as grouped matmuls (one launch each)."""
    h = torch.nn.functional.gelu(grouped_matmul(x, w1, b1, offsets))
    return grouped_matmul(h, w2, b2, offsets)


# -- benchmark --------------------------------------------------------------------------------
def _bench() -> None:
    """TFLOP/s of the expert MLPs' grouped matmuls vs a per-expert ``torch.matmul`` loop and
    ``torch.nn.functional.grouped_mm`` where this PyTorch and device have it."""
    from torch.utils import benchmark

    device, dtype = "cuda", torch.bfloat16
    E, D, H = 8, 384, 1536
    torch.manual_seed(0)
    sizes = torch.randint(0, 2 * 4096 // E, (E,)).tolist()
    sizes[1] = 0  # an empty group
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    M = offsets[-1]
    x = torch.randn(M, D, device=device, dtype=dtype)
    w = torch.randn(E, D, H, device=device, dtype=dtype) / D**0.5
    flops = 2 * M * D * H
    cases = {
        "torch loop": lambda: grouped_matmul_ref(x, w, None, offsets),
        "triton": lambda: grouped_matmul(x, w, None, offsets),
    }
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is not None:
        offs = torch.tensor(offsets[1:], dtype=torch.int32, device=device)
        cases["F.grouped_mm"] = lambda: grouped_mm(x, w, offs=offs)
    for label, fn in cases.items():
        try:
            seconds = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(
                min_run_time=1.0
            )
        except RuntimeError as err:  # grouped_mm needs a recent GPU (sm90+)
            print(f"{label:12s} unavailable: {str(err).splitlines()[0]}")
            continue
        print(f"{label:12s} {flops / seconds.median / 1e12:7.2f} TFLOP/s  (M={M}, E={E})")


if __name__ == "__main__":
    _bench()
