"""IMTL-G: the update whose projections onto every unit task gradient are equal.

Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021 (the gradient part, IMTL-G, §3.2; weights sum to 1). TorchJD's
``IMTLGWeighting`` solves it on the Gramian.
"""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import IMTLGWeighting

from mtl.methods.base import Stateless, StepInputs


class IMTLG(Stateless):
    needs_gram = True

    def __init__(self) -> None:
        self.weighting = IMTLGWeighting()

    def weights(self, inputs: StepInputs) -> Tensor:
        assert inputs.gram is not None
        return self.weighting(inputs.gram.double()).to(inputs.gram)
