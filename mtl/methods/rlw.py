"""RLW: random loss weighting, w = softmax(z) with z ~ N(0, I) drawn afresh every step.

Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
Learning", TMLR 2022 (the normal-distribution variant, as LibMTL's default).
The draw is seeded by (train.seed, step): every rank, and a resumed run, draws the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.methods.base import Stateless, StepInputs, seeded


class RandomWeighting(Stateless):
    def __init__(self, num_keys: int, seed: int) -> None:
        self.num_keys, self.seed = num_keys, seed

    def weights(self, inputs: StepInputs) -> Tensor:
        z = torch.randn(self.num_keys, generator=seeded(self.seed, inputs.step))
        return torch.softmax(z, dim=0).to(inputs.losses)
