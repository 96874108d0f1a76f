"""What every weighting method provides, and the few helpers they share.

A method turns this step's per-key losses (and, for gradient methods, the Gramian of the
per-key gradients) into one weight per loss key. It never calls ``.backward()``: the
``Combiner`` (``mtl.methods.combine``) builds the one loss the engine back-propagates.
Everything a method receives is already averaged over the ranks, so every rank computes the
same weights (DESIGN.md §4.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class StepInputs:
    """What a method may read to weigh one micro-batch (all averaged over the ranks).

    Attributes:
        losses: ``(T,)`` detached losses of this micro-batch, in ``loss_keys`` order. Global
            (all-reduced) only for methods with ``needs_global_losses``; else this rank's.
        gram: ``(T, T)`` Gramian of the per-key gradients (gradient methods), else None.
        step: Optimizer steps taken before this one.
        epoch: The epoch this micro-batch belongs to.
    """

    losses: Tensor
    gram: Tensor | None
    step: int
    epoch: int


class Method(Protocol):
    """A loss-weighting (``needs_gram = False``) or gradient-balancing method."""

    needs_gram: bool  # True: weights come from the per-key gradients' Gramian
    needs_global_losses: bool  # True: ``StepInputs.losses`` must be all-reduced first
    needs_step_losses: bool  # True: ``end_step`` reads the step's (all-reduced) losses
    wants_losses_after_step: bool  # True: ``end_step`` reads the batch re-evaluated

    def weights(self, inputs: StepInputs) -> Tensor:
        """``(T,)`` weights of this micro-batch's losses (detached, on the losses' device)."""
        ...

    def end_step(self, losses: Tensor, lr: float, after: Tensor | None) -> None:
        """After the optimizer step: ``losses`` ``(T,)`` are the step's losses averaged over
        its micro-batches and the ranks; ``lr`` the model's current learning rate; ``after``
        the last micro-batch's global losses recomputed after the step (only for a method
        whose ``wants_losses_after_step`` is True), else None."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: it is saved in every checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stateless:
    """Mixin for methods without state (EW, RLW and most gradient methods)."""

    needs_gram = False
    needs_global_losses = False
    needs_step_losses = False
    wants_losses_after_step = False

    def end_step(self, losses: Tensor, lr: float, after: Tensor | None) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def world_size() -> int:
    """Ranks of the default process group (1 outside a distributed run)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` over the ranks (``x`` itself outside a distributed run)."""
    world = world_size()
    if world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world


def seeded(seed: int, step: int) -> torch.Generator:
    """A CPU generator that every rank seeds alike for ``step`` (and a resume re-creates)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's state with tensors detached to the CPU (safe for weights-only loads)."""
    state = optimizer.state_dict()
    return {
        "state": {
            k: {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }
