"""Fixing a trained single-gated MoE for inference: exportable parts and the exit rule.

The early exit is data-dependent control flow (which samples run which expert), which
``torch.export`` cannot trace into one static graph without guarding on data-dependent sizes.
So the fixed model is K + 1 static programs and a few lines of dispatch around them:

    front(x)    -> {head: base output}, confidence (B,), route (B,), h (the prefix's stream)
    expert_k(h) -> {head: expert output}
    run(x): the samples with confidence >= threshold keep the base's outputs; the others get
            (base + expert_route) / 2, each expert running once on its own samples.

Each program exports with a dynamic batch dim, so a batch of any size (and an empty batch for
an expert nobody was routed to, which ``run`` skips) needs no retracing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtl.models.single_gate import SingleGateMoE, confidence, pool


class Front(nn.Module):
    """Prefix, base branch, confidence and gate of a ``SingleGateMoE`` in one program."""

    def __init__(self, model: SingleGateMoE, size: tuple[int, int]) -> None:
        super().__init__()
        self.prefix, self.base, self.gate = model.prefix, model.base, model.gate
        self.taskset, self.channel_dim, self.size = model.taskset, model.channel_dim, size
        self.never_exit = model.threshold >= 1

    def forward(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        h = self.prefix(x)
        base = self.base(h, self.size)
        if self.never_exit:  # a task set without a classification head has no confidence
            conf = torch.zeros(x.shape[0], device=x.device)
        else:
            conf = confidence(base, self.taskset)
        route = self.gate(pool(h, self.channel_dim).float()).argmax(1)
        return base, conf, route, h


class Expert(nn.Module):
    """One expert branch on the prefix's stream, at a fixed output size."""

    def __init__(self, branch: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.branch, self.size = branch, size

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        return self.branch(h, self.size)


class FixedSingleGate:
    """The fixed model: ``front`` and ``experts`` are modules or exported programs' modules.

    Args:
        front: ``front(x) -> (base outputs, confidence, route, h)``.
        experts: ``experts[k](h) -> outputs``.
        threshold: Exit confidence; 1 never exits.
    """

    def __init__(self, front: Callable, experts: list[Callable], threshold: float) -> None:
        self.front, self.experts, self.threshold = front, experts, threshold

    @torch.no_grad()
    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        out, exits, _ = self.run(x)
        del exits
        return out

    @torch.no_grad()
    def run(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """(outputs, which samples exited (B,), the gate's expert per sample (B,))."""
        base, conf, route, h = self.front(x)
        exits = (
            conf >= self.threshold
            if self.threshold < 1
            else torch.zeros_like(route, dtype=torch.bool)
        )
        out = {name: value.clone() for name, value in base.items()}
        for k, expert in enumerate(self.experts):
            rows = torch.nonzero(~exits & (route == k)).flatten()
            if rows.numel() == 0:
                continue
            for name, value in expert(h[rows]).items():
                out[name][rows] = (base[name][rows] + value) / 2
        return out, exits, route


def fix_single_gate(model: SingleGateMoE, size: tuple[int, int]) -> FixedSingleGate:
    """Eval-mode copies of the model's parts as a ``FixedSingleGate`` (eager modules)."""
    model = copy.deepcopy(model).cpu().eval()
    front = Front(model, size).eval()
    experts = [Expert(branch, size).eval() for branch in model.experts]
    return FixedSingleGate(front, experts, model.threshold)


def export_single_gate(fixed: FixedSingleGate, example: Tensor) -> FixedSingleGate:
    """The same model over ``torch.export`` programs (dynamic batch dim), checked equal to the
    eager parts on ``example`` (atol 1e-5).

    Raises:
        ValueError: An exported program differs from its module.
    """
    trace = example if example.shape[0] > 1 else example.expand(2, *example.shape[1:])
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        front = torch.export.export(fixed.front, (trace,), dynamic_shapes=({0: batch},))
        h = fixed.front(trace)[3]
        experts = [
            torch.export.export(e, (h,), dynamic_shapes=({0: batch},)) for e in fixed.experts
        ]
    exported = FixedSingleGate(front.module(), [e.module() for e in experts], fixed.threshold)
    want, got = fixed(example), exported(example)
    for head, value in want.items():
        if not torch.allclose(value, got[head], atol=1e-5, rtol=0):
            raise ValueError(f"the exported single-gate model differs on head {head!r}")
    return exported
