"""Losses: per-task and per-domain losses, and their scalarization.

Everything returns scalar tensors attached to the graph and never calls ``.backward()`` or
``.item()``: the engine owns backward, and host syncs happen only when logging.
"""

from __future__ import annotations

from mtl.losses.routing import load_balance_loss, mutual_info_loss
from mtl.losses.scalarization import normalize_weights, scalarize
from mtl.losses.task import IGNORE_INDEX, domain_counts, head_loss, per_sample_loss, task_losses

__all__ = [
    "IGNORE_INDEX",
    "domain_counts",
    "head_loss",
    "load_balance_loss",
    "mutual_info_loss",
    "normalize_weights",
    "per_sample_loss",
    "scalarize",
    "task_losses",
]
