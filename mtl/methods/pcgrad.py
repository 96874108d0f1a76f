"""PCGrad: project each task gradient off the others it conflicts with, then sum.

Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020 (Algorithm 1). TorchJD's ``PCGradWeighting`` expresses the surgery as weights
on the original gradients, computed from their Gramian; its random projection order is drawn
from a generator seeded by (train.seed, step), so every rank projects in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import PCGradWeighting

from mtl.methods.base import Stateless, StepInputs


class PCGrad(Stateless):
    needs_gram = True

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.weighting = PCGradWeighting()

    def weights(self, inputs: StepInputs) -> Tensor:
        assert inputs.gram is not None
        # TorchJD draws the order with torch.randperm on the global CPU generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + inputs.step)
            return self.weighting(inputs.gram.double()).to(inputs.gram)
