"""The combiner: a micro-batch's per-key losses -> the one loss the engine back-propagates.

    losses L_k --(× T·p_k, the tasks.weights priors)--> L̃_k
    loss methods:      w = method(L̃)          backward  Σ_k w_k L̃_k
    gradient methods:  w = method(Gramian)     backward  Σ_k L̃_k, with head k's input scaled
                                               by w_k on the way back (multi-task), or
                                               Σ_k w_k L̃_k (multi-domain: no per-key heads)

The engine owns backward; nothing here calls ``.backward()``. With uniform priors EW gives
w = 1/T, today's scalarization. The combiner also reports the objective Σ_k p_k L_k (the
same number for every method, so guards and logs compare runs), keeps the step's losses for
the method's update after the optimizer step, and holds the method's checkpointed state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl.methods.base import Method, StepInputs, all_reduce_mean
from mtl.methods.gradients import (
    HeadTaps,
    parameter_gram,
    representation_gram,
    shared_parameters,
)


class Combiner:
    """Applies one method to one model's per-key losses, micro-batch by micro-batch.

    Args:
        method: The method (``mtl.methods.build_method``).
        name: Its registry name (kept in the checkpoint to refuse another method's state).
        keys: The loss keys, in order (``taskset.loss_keys``).
        priors: Normalised ``tasks.weights`` per key (uniform when none are set).
        model: The module whose heads and parameters the gradient methods read.
        gradients: "params" or "representation" (gradient methods only).
        multi_domain: The keys are domains that share every head.
    """

    def __init__(
        self,
        method: Method,
        name: str,
        keys: Sequence[str],
        priors: Mapping[str, float],
        model: nn.Module,
        gradients: str = "params",
        multi_domain: bool = False,
    ) -> None:
        self.method, self.name, self.keys = method, name, tuple(keys)
        self.priors = torch.tensor([float(priors[k]) for k in self.keys])
        self.scale = self.priors * len(self.keys)  # T·p_k: 1 for every key when uniform
        self.gradients, self.multi_domain = gradients, multi_domain
        self.taps: HeadTaps | None = None
        self.shared: list[Tensor] = []
        if method.needs_gram:
            self.taps = HeadTaps(model, self.keys, scale=not multi_domain)
            if gradients == "params":
                self.shared = shared_parameters(model, multi_domain)
        self._sum = torch.zeros(len(self.keys))  # this step's detached L̃, summed
        self._micro = 0
        self._weights_sum = torch.zeros(len(self.keys))  # for the logged mean weights
        self._weights_n = 0
        self.last_weights = torch.full((len(self.keys),), 1.0 / len(self.keys))

    def combine(
        self,
        losses: Mapping[str, Tensor],
        step: int,
        epoch: int,
        head_losses: Callable[[dict[str, Tensor]], Mapping[str, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns the loss to back-propagate and the objective Σ_k p_k L_k (both scalars).

        ``head_losses`` maps head outputs to per-key losses (the batch's loss function);
        gradient methods need it to recompute the losses from the heads alone.
        """
        raw = torch.stack([losses[k] for k in self.keys])  # (T,), attached to the graph
        scaled = raw * self.scale.to(raw)
        objective = (raw * self.priors.to(raw)).sum()
        seen = scaled.detach().float()
        self._sum = self._sum.to(seen.device) + seen
        self._micro += 1
        if self.method.needs_global_losses:
            seen = all_reduce_mean(seen)
        gram = self._gram(head_losses) if self.method.needs_gram else None
        weights = self.method.weights(StepInputs(seen, gram, step, epoch)).detach()
        self._record(weights)
        if self.taps is not None and not self.multi_domain:
            # In place: the scaling ops of this forward hold this tensor; the engine's
            # backward reads it.
            self.taps.scales.copy_(weights.to(self.taps.scales))
            return scaled.sum(), objective
        return (weights.to(scaled) * scaled).sum(), objective

    def _gram(self, head_losses: Callable | None) -> Tensor:
        assert self.taps is not None
        if head_losses is None:
            raise ValueError(f"tasks.method={self.name} needs the batch's head_losses function")
        # The per-key losses again, from a second pass through the heads only, so that no
        # backward but the engine's own goes through the engine's outputs.
        again = head_losses(self.taps.recompute())
        scale = self.scale.to(again[self.keys[0]])
        per_key = [again[k] * scale[i] for i, k in enumerate(self.keys)]
        if self.gradients == "representation":
            return representation_gram(per_key, self.taps.common_input())
        return parameter_gram(per_key, self.shared)

    def _record(self, weights: Tensor) -> None:
        # Kept on the weights' device: no host sync until the weights are logged.
        weights = weights.float() * self.scale.to(weights.device)
        self.last_weights = weights
        self._weights_sum = self._weights_sum.to(weights.device) + weights
        self._weights_n += 1

    def end_step(self, lr: float, recompute: Callable[[], Mapping[str, Tensor]] | None) -> None:
        """After each optimizer step: hand the method the step's global losses (and, when it
        asks, the last micro-batch's losses recomputed by ``recompute`` after the step)."""
        method = self.method
        losses = self._sum / max(self._micro, 1)
        if method.needs_step_losses:
            losses = all_reduce_mean(losses)
        after = None
        if method.wants_losses_after_step and recompute is not None:
            with torch.no_grad():
                again = recompute()
                after = all_reduce_mean(
                    torch.stack([again[k] for k in self.keys]).float() * self.scale.to(losses)
                )
        method.end_step(losses.cpu(), lr, None if after is None else after.cpu())
        self._sum, self._micro = torch.zeros_like(self._sum), 0

    def mean_weights(self) -> dict[str, float]:
        """Each key's effective weight (w_k · T·p_k), averaged since the last call."""
        mean = self._weights_sum / max(self._weights_n, 1)
        if not self._weights_n:
            mean = self.last_weights
        self._weights_sum, self._weights_n = torch.zeros_like(self._weights_sum), 0
        return {k: float(v) for k, v in zip(self.keys, mean.cpu().tolist(), strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "keys": list(self.keys), "state": self.method.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Restore the method's state; False (nothing loaded) when it belongs to another
        method or key set, e.g. a checkpoint of an EW run resumed with ``tasks.method=uw``."""
        if state.get("name") != self.name or list(state.get("keys", ())) != list(self.keys):
            return False
        self.method.load_state_dict(dict(state["state"]))
        return True
