"""MGDA-UB: the minimum-norm point of the convex hull of the task gradients (Frank-Wolfe).

Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
The paper's upper bound (UB) takes the gradients w.r.t. the shared representation, one
backward through the trunk: ``tasks.gradients: representation``; with ``params`` this is
MGDA on the shared parameters. The weights are convex (they sum to 1). TorchJD's
``MGDAWeighting`` runs the Frank-Wolfe solver on the Gramian.
"""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import MGDAWeighting

from mtl.methods.base import Stateless, StepInputs


class MGDAUB(Stateless):
    needs_gram = True

    def __init__(self) -> None:
        self.weighting = MGDAWeighting()

    def weights(self, inputs: StepInputs) -> Tensor:
        assert inputs.gram is not None
        return self.weighting(inputs.gram.double()).to(inputs.gram)
