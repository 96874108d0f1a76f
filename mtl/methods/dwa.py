"""DWA: dynamic weight average, w_k ∝ exp(r_k / τ) with r_k = L_k(e-1) / L_k(e-2).

Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (eq. 1;
τ = 2; L_k(e) is task k's mean training loss over epoch e; uniform weights for the first two
epochs). The paper's weights sum to T; ours sum to 1, like every method here (a constant
factor, the same as EW's 1/T against LibMTL's 1).

The running sums add each step's losses already averaged over the ranks, so every rank weighs
alike; they are in the checkpoint, so a resume mid-epoch loses nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.methods.base import StepInputs


class DynamicWeightAverage:
    needs_gram = False
    needs_global_losses = False
    needs_step_losses = True
    wants_losses_after_step = False

    def __init__(self, num_keys: int, temperature: float = 2.0) -> None:
        self.num_keys, self.temperature = num_keys, temperature
        self.epoch = 0  # the epoch the running sums belong to
        self.sums = torch.zeros(num_keys, dtype=torch.float64)
        self.count = 0
        self.history: list[list[float]] = []  # mean losses of the last two closed epochs

    def weights(self, inputs: StepInputs) -> Tensor:
        if inputs.epoch != self.epoch:
            self._close(inputs.epoch)
        if len(self.history) < 2:
            return torch.full_like(inputs.losses, 1.0 / self.num_keys)
        before, last = (torch.tensor(h, dtype=torch.float64) for h in self.history)
        ratio = last / before.clamp_min(1e-12)
        return torch.softmax(ratio / self.temperature, dim=0).to(inputs.losses)

    def end_step(self, losses: Tensor, lr: float, after: Tensor | None) -> None:
        self.sums += losses.detach().cpu().double()
        self.count += 1

    def _close(self, epoch: int) -> None:
        if self.count:
            self.history = [*self.history, (self.sums / self.count).tolist()][-2:]
        self.epoch, self.sums, self.count = epoch, torch.zeros_like(self.sums), 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "sums": self.sums.clone(),
            "count": self.count,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.count = int(state["epoch"]), int(state["count"])
        self.sums = state["sums"].double().clone()
        self.history = [list(h) for h in state["history"]]
