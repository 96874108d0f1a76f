"""CAGrad: the update that maximises the worst task's improvement within a ball around the
average gradient, g = g₀ + (√φ / ‖g_w‖) g_w with φ = c² ‖g₀‖².

Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021 (Algorithm 1; c = 0.4 as the paper's NYUv2 runs). ``rescale`` divides by
1 + c², as the official code does by default. TorchJD's ``CAGradWeighting`` solves the dual
on the Gramian (cvxpy).
"""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import CAGradWeighting

from mtl.methods.base import Stateless, StepInputs


class CAGrad(Stateless):
    needs_gram = True

    def __init__(self, c: float = 0.4, rescale: bool = True) -> None:
        self.c, self.rescale = c, rescale
        self.weighting = CAGradWeighting(c=c)

    def weights(self, inputs: StepInputs) -> Tensor:
        assert inputs.gram is not None
        weights = self.weighting(inputs.gram.double()).to(inputs.gram)
        return weights / (1 + self.c**2) if self.rescale else weights
