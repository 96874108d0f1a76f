"""UW: uncertainty weighting, L = Σ_k L_k / (2 σ_k²) + log σ_k with learned s_k = log σ_k².

Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018 (eq. 7; s_k starts at -0.5 as in LibMTL).

The weights are w_k = exp(-s_k) / 2. The s_k live here, not in the model (so the exported
model has none): their gradient, ∂L/∂s_k = 1/2 - L_k exp(-s_k) / 2, is computed in closed
form from the step's losses averaged over micro-batches and ranks — exactly what autograd
would give, but independent of DeepSpeed's loss scaling and gradient partitioning. Adam
updates them at the model's current learning rate times ``tasks.uw.lr_scale``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.methods.base import StepInputs, optimizer_state

S_INIT = -0.5  # LibMTL's initial log-variance


def log_variance_grad(log_var: Tensor, losses: Tensor) -> Tensor:
    """∂/∂s_k of Σ_k L_k / (2 exp(s_k)) + s_k / 2: what autograd gives LibMTL's ``loss_scale``."""
    return 0.5 - 0.5 * losses * torch.exp(-log_var)


class UncertaintyWeighting:
    needs_gram = False
    needs_global_losses = False  # the weights do not depend on this batch's losses
    needs_step_losses = True
    wants_losses_after_step = False

    def __init__(self, num_keys: int, lr_scale: float = 1.0) -> None:
        self.lr_scale = lr_scale
        self.log_var = torch.full((num_keys,), S_INIT, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_var], lr=1e-3)

    def weights(self, inputs: StepInputs) -> Tensor:
        return (0.5 * torch.exp(-self.log_var.detach())).to(inputs.losses)

    def end_step(self, losses: Tensor, lr: float, after: Tensor | None) -> None:
        self.log_var.grad = log_variance_grad(self.log_var.detach(), losses.detach().cpu().float())
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"log_var": self.log_var.detach().clone(), "adam": optimizer_state(self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_var.copy_(state["log_var"])
        self.optimizer.load_state_dict(state["adam"])
