"""Nash-MTL: the Nash bargaining solution, weights α > 0 with (G Gᵀ) α = 1 / α.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022 (Algorithm 1: a sequence of convex approximations, 20 of them,
on the Gramian normalised by its norm; the update's norm is clipped to ``max_norm`` = 1;
weights recomputed every ``update_every`` steps, 1 here and the paper's 25 for speed).

TorchJD's ``NashMTL`` reads only G Gᵀ, so it is handed a T×T factor of the Gramian (not the
T×d gradients, which the representation variant never holds on one rank). The clipping is
done here on the Gramian (‖αᵀG‖² = αᵀ G Gᵀ α); the solver's warm start α is the method's
state, saved in the checkpoint.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchjd.aggregation import NashMTL as _TorchJDNash

from mtl.methods.base import StepInputs


def gram_factor(gram: Tensor) -> Tensor:
    """A T×T matrix M with M Mᵀ = ``gram`` (symmetric square root; negative rounding → 0)."""
    values, vectors = torch.linalg.eigh(gram.double())
    return vectors * values.clamp_min(0).sqrt()


class NashMTL:
    needs_gram = True
    needs_global_losses = False
    needs_step_losses = False
    wants_losses_after_step = False

    def __init__(
        self, num_keys: int, max_norm: float = 1.0, update_every: int = 1, optim_niter: int = 20
    ) -> None:
        self.max_norm, self.update_every = max_norm, update_every
        self.solver = _TorchJDNash(
            n_tasks=num_keys, max_norm=0.0, update_weights_every=1, optim_niter=optim_niter
        )
        self.alpha: Tensor | None = None  # the last solution (reused between updates)

    def weights(self, inputs: StepInputs) -> Tensor:
        assert inputs.gram is not None
        gram = inputs.gram.double()
        if self.alpha is None or inputs.step % self.update_every == 0:
            # The aggregator's own weighting gives α (the aggregator would return αᵀM). cvxpy
            # warns that the problem is not DPP (no compile cache) and on inexact solves,
            # every step; the stop criterion of the paper's algorithm already covers those.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                alpha = self.solver.weighting(gram_factor(gram))
            self.alpha = alpha.detach().cpu().double()
        alpha = self.alpha.to(gram)
        if self.max_norm > 0:
            norm = torch.sqrt(alpha @ gram @ alpha)
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha.to(inputs.gram)

    def end_step(self, losses: Tensor, lr: float, after: Tensor | None) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": None if self.alpha is None else self.alpha.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = state["alpha"]
        if self.alpha is not None:  # the solver's warm start; a fresh solver builds from it
            self.solver.weighting.prvs_alpha = self.alpha.numpy().astype("float32")
