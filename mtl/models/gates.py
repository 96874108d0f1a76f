"""Gate functions G(α) for InterroGate (DESIGN.md §4.3): gate logits to gates in [0, 1].

A gate g = 1 selects the shared feature, g = 0 the task-specific one. Every gate function
trains with a differentiable surrogate and binarises at inference: in eval mode
``g = 1[α > 0]``, so the "binarised gated model" that pruning must reproduce is simply the
gated model in eval mode.

Registry signature: ``GATES[name](cfg: InterroGateConfig) -> gate``, where ``gate`` is an
``nn.Module`` with ``gate(alpha) -> g`` (same shape) and ``gate.set_progress(fraction)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from mtl.config import InterroGateConfig


class GateFn(Protocol):
    """What InterroGate needs from a gate function."""

    training: bool

    def __call__(self, alpha: Tensor) -> Tensor: ...

    def set_progress(self, fraction: float) -> None: ...


def binarize(alpha: Tensor) -> Tensor:
    """The inference gate ``1[α > 0]`` in ``alpha``'s dtype (1 = shared feature)."""
    return (alpha > 0).to(alpha.dtype)


class StraightThroughGate(nn.Module):
    """Hard step forward, sigmoid gradient backward (the straight-through estimator).

    Training sees exactly the gates inference will use, so there is no train/test gap in the
    forward pass; the gradient is that of ``sigmoid(α)``, as if the step were a sigmoid.
    """

    def forward(self, alpha: Tensor) -> Tensor:
        hard = binarize(alpha)
        if not self.training:
            return hard
        soft = torch.sigmoid(alpha)
        # soft - soft.detach() is exactly 0 forward, so g == hard bit for bit (unlike
        # soft + (hard - soft).detach(), which rounds), while its gradient is sigmoid'(α).
        return hard + (soft - soft.detach())

    def set_progress(self, fraction: float) -> None:
        """No schedule: the straight-through gate is already hard."""
        del fraction


class AnnealedSigmoidGate(nn.Module):
    """``sigmoid(α / T)`` with T annealed geometrically from ``start`` to ``end`` (ours).

    ``T = start · (end / start) ** progress``: a geometric schedule spends as many steps
    between 1 and 0.1 as between 0.1 and 0.01, so the gates harden gradually instead of
    snapping shut in the last few steps as a linear schedule towards a small T would.

    Args:
        temperature_start: T at progress 0; > 0.
        temperature_end: T at progress 1; > 0.
    """

    def __init__(self, temperature_start: float = 1.0, temperature_end: float = 0.01) -> None:
        super().__init__()
        if temperature_start <= 0 or temperature_end <= 0:
            raise ValueError(
                "model.interrogate.temperature_start and temperature_end must be > 0, got "
                f"{temperature_start} and {temperature_end}"
            )
        self.temperature_start = temperature_start
        self.temperature_end = temperature_end
        # A buffer, not a float, so that a compiled forward does not recompile every step;
        # non-persistent because the training loop sets it again after a restore.
        self.register_buffer("temperature", torch.tensor(temperature_start), persistent=False)

    def set_progress(self, fraction: float) -> None:
        """Set T for training progress ``fraction`` in [0, 1] (clamped)."""
        p = min(max(float(fraction), 0.0), 1.0)
        log_t = (1 - p) * math.log(self.temperature_start) + p * math.log(self.temperature_end)
        self.temperature.fill_(math.exp(log_t))

    def forward(self, alpha: Tensor) -> Tensor:
        if not self.training:
            return binarize(alpha)
        return torch.sigmoid(alpha / self.temperature)


def straight_through(cfg: InterroGateConfig) -> StraightThroughGate:
    """The straight-through gate (it has no settings)."""
    del cfg
    return StraightThroughGate()


def annealed_sigmoid(cfg: InterroGateConfig) -> AnnealedSigmoidGate:
    """The annealed sigmoid from ``temperature_start`` and ``temperature_end``."""
    return AnnealedSigmoidGate(cfg.temperature_start, cfg.temperature_end)


GATES: dict[str, Callable[[InterroGateConfig], nn.Module]] = {
    "straight_through": straight_through,
    "annealed_sigmoid": annealed_sigmoid,
}


def build_gate(cfg: InterroGateConfig) -> nn.Module:
    """The gate function named by ``model.interrogate.gate``."""
    if cfg.gate not in GATES:
        raise ValueError(f"model.interrogate.gate={cfg.gate!r} is not one of {sorted(GATES)}")
    return GATES[cfg.gate](cfg)
