"""EW: equal weights, w_k = 1/T — linear scalarization, the strong baseline (DESIGN.md §4.1).

With ``tasks.weights`` the configured weights act as the priors every method applies
(``mtl.methods.combine``), so EW is exactly today's fixed scalarization Σ_k w_k L_k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.methods.base import Stateless, StepInputs


class EqualWeighting(Stateless):
    def __init__(self, num_keys: int) -> None:
        self.num_keys = num_keys

    def weights(self, inputs: StepInputs) -> Tensor:
        return torch.full_like(inputs.losses, 1.0 / self.num_keys)
