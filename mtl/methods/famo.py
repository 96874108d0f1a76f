"""FAMO: fast adaptive multitask optimisation — one backward, weights from log-loss progress.

Liu, Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
(Algorithm 1; lr 0.025 and weight decay γ = 1e-3 for the logits as LibMTL's defaults).

Logits ξ give z = softmax(ξ). The model descends Σ_k z_k log(L_k + ε) / c with c = Σ_k z_k /
(L_k + ε); its gradient is Σ_k w_k ∇L_k with w_k = z_k / (c (L_k + ε)), so the weights sum
to 1 and the engine back-propagates Σ_k w_k L_k. After the step, ξ moves along
J_softmax(ξ)ᵀ δ with δ_k = log(L_k before) - log(L_k after). "After" is the same batch
re-evaluated (``tasks.famo.update: same_batch``, the paper's, one extra forward per step) or
the next step's first batch (``next_batch``: no extra forward, a noisier δ).

The weights read this batch's losses, so they are averaged over the ranks first
(``needs_global_losses``): every rank, and one worker with the whole batch, weighs alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.methods.base import StepInputs, optimizer_state

EPS = 1e-8  # the paper's ε (the official code's min_losses are 0)


class FAMO:
    needs_gram = False
    needs_global_losses = True
    needs_step_losses = False

    def __init__(
        self, num_keys: int, lr: float = 0.025, gamma: float = 1e-3, update: str = "same_batch"
    ) -> None:
        self.update = update
        self.wants_losses_after_step = update == "same_batch"
        self.logits = torch.zeros(num_keys, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=gamma)
        self.before: Tensor | None = None  # the losses the last step descended
        self.pending = False  # next_batch: an update waits for the next step's losses

    def weights(self, inputs: StepInputs) -> Tensor:
        losses = inputs.losses.detach().cpu().float()
        if self.pending:  # next_batch: this step's first losses are the last step's "after"
            self._update(losses)
        self.before = losses
        z = torch.softmax(self.logits.detach(), dim=0)
        inverse = z / (losses + EPS)
        return (inverse / inverse.sum()).to(inputs.losses)

    def end_step(self, losses: Tensor, lr: float, after: Tensor | None) -> None:
        if self.update == "same_batch":
            if after is not None:
                self._update(after.detach().cpu().float())
        else:
            self.pending = self.before is not None

    def _update(self, after: Tensor) -> None:
        assert self.before is not None
        delta = torch.log(self.before + EPS) - torch.log(after + EPS)
        with torch.enable_grad():
            z = torch.softmax(self.logits, dim=0)
            (grad,) = torch.autograd.grad(z, self.logits, grad_outputs=delta)
        self.logits.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.detach().clone(),
            "adam": optimizer_state(self.optimizer),
            "before": None if self.before is None else self.before.clone(),
            "pending": self.pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["adam"])
        self.before, self.pending = state["before"], bool(state["pending"])
