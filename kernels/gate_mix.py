"""InterroGate's gate mix for one layer, all T task streams and the shared stream in one pass.

What it computes (DESIGN.md §4.3), per task t and channel c, for features laid out as
``(P, C, Q)`` (a feature map ``(B, C, H, W)`` is ``P = B, Q = H·W``; tokens ``(B, N, D)`` are
``P = B·N, C = D, Q = 1``)::

    out[t]  = g[t, c] · φ_s + (1 − g[t, c]) · φ_t[t]      the task streams
    shared  = Σ_t w[t, c] · out[t]                         the next shared stream

``g = G(α)`` are the gates after the gate function and ``w = softmax_t(β)`` the shared
stream's weights; both are tiny ``(T, C)`` tensors, so the gate function and the softmax stay
in PyTorch and autograd carries their gradients to α and β from ``dg`` and ``dw`` here.

Memory traffic (elements of the feature maps, N = P·C·Q): the fused forward reads φ_s once
and the T task maps once and writes T task streams and the shared one, (2T + 2)·N; the eager
reference makes one pass per elementwise op, about 4T·N reads and 2T·N writes more. The
backward reads φ_s, the T task maps, the T output gradients and the shared gradient and
writes dφ_s and the T dφ_t, (3T + 3)·N, with ``dg`` and ``dw`` reduced in registers and added
to a ``(T, C)`` buffer once per program.

The task maps come stacked, ``(T, P, C, Q)``: one tensor, so the kernel needs one pointer
whatever T is.
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
def gate_mix_ref(
    g: Tensor, w: Tensor | None, phi_s: Tensor, phi_t: Tensor
) -> tuple[Tensor, Tensor | None]:
    """``(out, shared)`` as the eager model computes them; ``w=None`` skips the shared stream
    (the last layer has none). ``g, w``: ``(T, C)``; ``phi_s``: ``(P, C, Q)``; ``phi_t``:
    ``(T, P, C, Q)``."""
    gate = g[:, None, :, None]
    out = gate * phi_s + (1 - gate) * phi_t
    if w is None:
        return out, None
    weight = w[:, None, :, None]
    shared = weight[0] * out[0]
    for t in range(1, out.shape[0]):
        shared = shared + weight[t] * out[t]
    return out, shared


# -- the kernels ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _forward(
        g_ptr, w_ptr, s_ptr, t_ptr, out_ptr, shared_ptr,
        T, P, C, Q,
        HAS_SHARED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):  # fmt: skip
        # One program: ROWS rows of P, a BLOCK_C x BLOCK_Q tile of (C, Q).
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        tile = c[:, None] * Q + q[None, :]
        mask = (c[:, None] < C) & (q[None, :] < Q)
        for r in range(ROWS):
            p = tl.program_id(0) * ROWS + r
            rows = mask & (p < P)
            base = p * C * Q
            phi_s = tl.load(s_ptr + base + tile, mask=rows, other=0.0).to(tl.float32)
            shared = tl.zeros((BLOCK_C, BLOCK_Q), dtype=tl.float32)
            for t in range(T):
                gate = tl.load(g_ptr + t * C + c, mask=c < C, other=0.0).to(tl.float32)[:, None]
                task = base + t * P * C * Q + tile
                phi_t = tl.load(t_ptr + task, mask=rows, other=0.0).to(tl.float32)
                out = gate * phi_s + (1 - gate) * phi_t
                tl.store(out_ptr + task, out.to(out_ptr.dtype.element_ty), mask=rows)
                if HAS_SHARED:
                    weight = tl.load(w_ptr + t * C + c, mask=c < C, other=0.0).to(tl.float32)
                    shared += weight[:, None] * out
            if HAS_SHARED:
                tl.store(shared_ptr + base + tile, shared.to(shared_ptr.dtype.element_ty),
                         mask=rows)  # fmt: skip

    @triton.jit
    def _backward(
        g_ptr, w_ptr, s_ptr, t_ptr, dout_ptr, dshared_ptr,
        ds_ptr, dt_ptr, dg_ptr, dw_ptr,
        T, P, C, Q,
        HAS_SHARED: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):  # fmt: skip
        # G_t = dout_t + w_t · dshared is the gradient reaching out_t; then
        # dφ_s = Σ_t g_t G_t, dφ_t = (1 − g_t) G_t, dg_t = Σ_pq G_t (φ_s − φ_t),
        # dw_t = Σ_pq dshared · out_t (out_t recomputed, not stored).
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        tile = c[:, None] * Q + q[None, :]
        mask = (c[:, None] < C) & (q[None, :] < Q)
        for t in range(T):
            # dφ_t, dg and dw of task t over this program's rows; dφ_s is summed below.
            gate = tl.load(g_ptr + t * C + c, mask=c < C, other=0.0).to(tl.float32)[:, None]
            if HAS_SHARED:
                weight = tl.load(w_ptr + t * C + c, mask=c < C, other=0.0)
                weight = weight.to(tl.float32)[:, None]
            dg = tl.zeros((BLOCK_C,), dtype=tl.float32)
            dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for r in range(ROWS):
                p = tl.program_id(0) * ROWS + r
                rows = mask & (p < P)
                base = p * C * Q
                task = base + t * P * C * Q + tile
                phi_s = tl.load(s_ptr + base + tile, mask=rows, other=0.0).to(tl.float32)
                phi_t = tl.load(t_ptr + task, mask=rows, other=0.0).to(tl.float32)
                grad = tl.load(dout_ptr + task, mask=rows, other=0.0).to(tl.float32)
                if HAS_SHARED:
                    dshared = tl.load(dshared_ptr + base + tile, mask=rows, other=0.0)
                    dshared = dshared.to(tl.float32)
                    grad += weight * dshared
                    out = gate * phi_s + (1 - gate) * phi_t
                    dw += tl.sum(dshared * out, axis=1)
                tl.store(dt_ptr + task, ((1 - gate) * grad).to(dt_ptr.dtype.element_ty),
                         mask=rows)  # fmt: skip
                dg += tl.sum(grad * (phi_s - phi_t), axis=1)
            tl.atomic_add(dg_ptr + t * C + c, dg, mask=c < C)
            if HAS_SHARED:
                tl.atomic_add(dw_ptr + t * C + c, dw, mask=c < C)
        for r in range(ROWS):
            p = tl.program_id(0) * ROWS + r
            rows = mask & (p < P)
            base = p * C * Q
            if HAS_SHARED:
                dshared = tl.load(dshared_ptr + base + tile, mask=rows, other=0.0)
                dshared = dshared.to(tl.float32)
            ds = tl.zeros((BLOCK_C, BLOCK_Q), dtype=tl.float32)
            for t in range(T):
                gate = tl.load(g_ptr + t * C + c, mask=c < C, other=0.0).to(tl.float32)[:, None]
                grad = tl.load(dout_ptr + base + t * P * C * Q + tile, mask=rows, other=0.0)
                grad = grad.to(tl.float32)
                if HAS_SHARED:
                    weight = tl.load(w_ptr + t * C + c, mask=c < C, other=0.0).to(tl.float32)
                    grad += weight[:, None] * dshared
                ds += gate * grad
            tl.store(ds_ptr + base + tile, ds.to(ds_ptr.dtype.element_ty), mask=rows)


def _blocks(P: int, C: int, Q: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, BLOCK_Q): tiles of about 1024 elements; a program walks ROWS rows of P
    so that tokens (Q = 1) still give each program a few thousand elements (ours)."""
    block_q = min(triton.next_power_of_2(Q), 256)
    block_c = min(triton.next_power_of_2(C), max(1, 1024 // block_q))
    rows = max(1, min(16, 4096 // (block_c * block_q)))
    return rows, block_c, block_q


def _grid(P: int, C: int, Q: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    rows, block_c, block_q = _blocks(P, C, Q)
    return (triton.cdiv(P, rows), triton.cdiv(C, block_c), triton.cdiv(Q, block_q)), (
        rows, block_c, block_q,
    )  # fmt: skip


# -- the launcher -----------------------------------------------------------------------------
class GateMix(torch.autograd.Function):
    """Forward and backward of ``gate_mix_ref`` through the two kernels above."""

    @staticmethod
    def forward(ctx, g: Tensor, w: Tensor | None, phi_s: Tensor, phi_t: Tensor):
        T, P, C, Q = phi_t.shape
        phi_s, phi_t, g = phi_s.contiguous(), phi_t.contiguous(), g.contiguous()
        has_shared = w is not None
        w_in = w.contiguous() if has_shared else g  # any (T, C) pointer; never read
        out = torch.empty_like(phi_t)
        shared = torch.empty_like(phi_s) if has_shared else out  # never written without w
        grid, (rows, block_c, block_q) = _grid(P, C, Q)
        _forward[grid](
            g, w_in, phi_s, phi_t, out, shared, T, P, C, Q,
            HAS_SHARED=has_shared, ROWS=rows, BLOCK_C=block_c, BLOCK_Q=block_q,
        )  # fmt: skip
        ctx.save_for_backward(g, w_in, phi_s, phi_t)
        ctx.has_shared = has_shared
        return out, (shared if has_shared else None)

    @staticmethod
    def backward(ctx, dout: Tensor | None, dshared: Tensor | None):
        g, w, phi_s, phi_t = ctx.saved_tensors
        T, P, C, Q = phi_t.shape
        dout = torch.zeros_like(phi_t) if dout is None else dout.contiguous()
        has_shared = ctx.has_shared
        if has_shared:
            dshared = torch.zeros_like(phi_s) if dshared is None else dshared.contiguous()
        else:
            dshared = dout  # never read
        ds, dt = torch.empty_like(phi_s), torch.empty_like(phi_t)
        dg = torch.zeros(T, C, dtype=torch.float32, device=g.device)
        dw = torch.zeros(T, C, dtype=torch.float32, device=g.device)
        grid, (rows, block_c, block_q) = _grid(P, C, Q)
        _backward[grid](
            g, w, phi_s, phi_t, dout, dshared, ds, dt, dg, dw, T, P, C, Q,
            HAS_SHARED=has_shared, ROWS=rows, BLOCK_C=block_c, BLOCK_Q=block_q,
        )  # fmt: skip
        return dg.to(g.dtype), (dw.to(w.dtype) if has_shared else None), ds, dt


def gate_mix(
    g: Tensor, w: Tensor | None, phi_s: Tensor, phi_t: Tensor
) -> tuple[Tensor, Tensor | None]:
    """``gate_mix_ref`` through the Triton kernels (on CUDA, or anywhere under
    ``TRITON_INTERPRET=1``); shapes as there."""
    if triton is None:
        raise RuntimeError("gate_mix needs triton; use gate_mix_ref")
    return GateMix.apply(g, w, phi_s, phi_t)


# -- benchmark --------------------------------------------------------------------------------
def _bench() -> None:
    """GB/s of the forward and backward vs the eager reference, ``torch.compile`` of it, and
    a device-to-device copy of the same bytes, on one feature-map size."""
    from torch.utils import benchmark

    device = "cuda"
    T, B, C, H = 5, 32, 128, 56
    P, Q = B, H * H
    torch.manual_seed(0)
    g = torch.rand(T, C, device=device, requires_grad=True)
    w = torch.softmax(torch.randn(T, C, device=device), 0).requires_grad_()
    phi_s = torch.randn(P, C, Q, device=device, requires_grad=True)
    phi_t = torch.randn(T, P, C, Q, device=device, requires_grad=True)
    n = P * C * Q * phi_s.element_size()
    fwd_bytes, bwd_bytes = (2 * T + 2) * n, (3 * T + 3) * n
    compiled = torch.compile(gate_mix_ref)
    src = torch.empty(fwd_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def timed(stmt: str, **scope) -> float:
        timer = benchmark.Timer(stmt=stmt, globals=scope)
        return timer.blocked_autorange(min_run_time=1.0).median

    copy_s = timed("dst.copy_(src)", dst=dst, src=src)  # reads and writes fwd_bytes in all
    print(f"copy: {fwd_bytes / copy_s / 1e9:8.1f} GB/s")
    for label, fn in (("eager", gate_mix_ref), ("compile", compiled), ("triton", gate_mix)):
        out, shared = fn(g, w, phi_s, phi_t)
        grads = (torch.randn_like(out), torch.randn_like(shared))
        fwd = timed("fn(g, w, s, t)", fn=fn, g=g, w=w, s=phi_s, t=phi_t)
        bwd = timed(
            "torch.autograd.grad((o, sh), (g, w, s, t), grads, retain_graph=True)",
            torch=torch, o=out, sh=shared, g=g, w=w, s=phi_s, t=phi_t, grads=grads,
        )  # fmt: skip
        print(
            f"{label:8s} forward {fwd_bytes / fwd / 1e9:8.1f} GB/s "
            f"({fwd_bytes / fwd / (fwd_bytes / copy_s):.0%} of copy)   "
            f"backward {bwd_bytes / bwd / 1e9:8.1f} GB/s "
            f"({bwd_bytes / bwd / (fwd_bytes / copy_s):.0%} of copy)"
        )


if __name__ == "__main__":
    _bench()
