"""Linear scalarization of per-task losses: L = Σ_k w_k · L_k (DESIGN.md §4.1).

Uniform weights (w_k = 1/T) are the default and a strong baseline. Weights are configuration
(``tasks.weights``), normalised to the simplex so that population-based search and the
uniform default live on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor

_FIX = (
    "set tasks.weights to a non-negative weight for every one of {keys}, "
    "or leave it empty for uniform weights"
)


def normalize_weights(weights: Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
    """Check the configured weights against the loss keys and scale them to sum to 1.

    Args:
        weights: Loss key -> non-negative weight (``tasks.weights``); empty means uniform.
        keys: The loss keys (``taskset.loss_keys``).

    Returns:
        Key -> weight, in the order of ``keys``, summing to 1.

    Raises:
        ValueError: An unknown or missing key, a negative or non-finite weight, or all
            weights zero. The message names ``tasks.weights`` and the valid keys.
    """
    keys = list(keys)
    fix = _FIX.format(keys=keys)
    if not keys:
        raise ValueError("there are no loss keys to weight: the task set is empty")
    if not weights:
        return {k: 1.0 / len(keys) for k in keys}
    unknown = [k for k in weights if k not in keys]
    if unknown:
        raise ValueError(
            f"tasks.weights names unknown key(s) {unknown}; valid keys: {keys}. "
            "Rename or remove them."
        )
    missing = [k for k in keys if k not in weights]
    if missing:
        raise ValueError(f"tasks.weights has no weight for {missing}: {fix}")
    bad = {k: w for k, w in weights.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise ValueError(f"tasks.weights has negative or non-finite weights {bad}: {fix}")
    total = float(sum(weights[k] for k in keys))
    if total <= 0:
        raise ValueError(
            f"tasks.weights are all zero: give at least one of {keys} a positive weight"
        )
    return {k: float(weights[k]) / total for k in keys}


def scalarize(losses: Mapping[str, Tensor], weights: Mapping[str, float | Tensor]) -> Tensor:
    """The weighted sum Σ_k w_k · L_k over the loss keys.

    Args:
        losses: Loss key -> scalar loss.
        weights: Loss key -> weight (usually from ``normalize_weights``); may be tensors,
            e.g. domain fractions of the batch, to avoid a host sync.

    Raises:
        KeyError: ``losses`` and ``weights`` do not have the same keys.
    """
    if set(losses) != set(weights):
        raise KeyError(
            f"loss keys {sorted(losses)} and weight keys {sorted(weights)} differ; "
            "normalize tasks.weights against taskset.loss_keys first"
        )
    if not losses:
        raise KeyError("no losses to scalarize")
    terms = [losses[k] * weights[k] for k in losses]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
