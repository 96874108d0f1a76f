"""The single-gated MoE's three stages inside one training run (``model.name=single_gate``).

One ``mtl train`` (one Ray Train job, one MLflow run, one checkpoint folder) runs:

1. ``base``: the prefix and the base branch train alone for ``base_fraction`` of the run's
   optimizer steps, with their own warm-up and cosine schedule;
2. ``cluster``: at the first step past the base's share, every worker pools the prefix
   features of up to ``cluster_samples / workers`` of its training samples; rank 0 runs
   k-means (K clusters) on all of them and broadcasts the centroids; every expert becomes a
   copy of the trained base branch and the gate the nearest-centroid rule;
3. ``experts``: a new DeepSpeed engine (its own optimizer and schedule, over the parameters
   this stage trains) trains the experts on their clusters' samples and the gate on the
   cluster assignment, the base frozen unless ``freeze_base=false``.

The stage is part of every checkpoint's progress (``Progress.stage``): a run resumed from a
stage-3 checkpoint builds the stage-3 engine before loading it, so it continues in the right
stage; one resumed from the base's last checkpoint clusters first. A checkpoint is always
written at the end of stage 1, so stage 3 never starts from an unsaved base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mtl.config import Config
from mtl.models.single_gate import SingleGateMoE, kmeans_centroids

log = logging.getLogger(__name__)

BASE, EXPERTS = "base", "experts"


@dataclass(frozen=True)
class StagePlan:
    """How the run's optimizer steps split between the base and the experts."""

    base_steps: int  # steps 1 .. base_steps train the base
    total: int

    @classmethod
    def of(cls, cfg: Config, total: int) -> StagePlan:
        if total < 2:
            raise ValueError(
                f"model.name=single_gate trains the base, then the experts: {total} optimizer "
                "step cannot hold both; raise train.max_steps or train.epochs"
            )
        base = min(total - 1, max(1, round(total * cfg.model.single_gate.base_fraction)))
        return cls(base, total)

    @property
    def expert_steps(self) -> int:
        return self.total - self.base_steps


def plan_for(cfg: Config, total: int) -> StagePlan | None:
    """The stage plan of a single-gate run, None for every other model."""
    return StagePlan.of(cfg, total) if cfg.model.name == "single_gate" else None


@torch.no_grad()
def local_features(
    module: SingleGateMoE, loader: Any, samples: int, to_device: Any
) -> torch.Tensor:
    """Pooled prefix features ``(n, C)`` of this rank's first ``samples`` training samples, in
    eval mode (BatchNorm statistics do not move), on the CPU."""
    mode = module.training
    module.eval()
    found, count = [], 0
    try:
        for batch in loader:
            z = module.features(to_device(batch)["image"]).cpu()
            found.append(z[: samples - count])
            count += len(found[-1])
            if count >= samples:
                break
    finally:
        module.train(mode)
    if not found:
        raise ValueError("stage 2 found no training samples to cluster")
    return torch.cat(found)


def shared_centroids(
    features: torch.Tensor, num_clusters: int, seed: int, rank: int, world: int
) -> torch.Tensor:
    """k-means centroids of every rank's ``features``: gathered to rank 0, clustered there,
    broadcast back, so every rank's experts and gate start the same."""
    if world > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, features)
        features = torch.cat(gathered)
    centroids = [kmeans_centroids(features, num_clusters, seed) if rank == 0 else None]
    if world > 1 and dist.is_initialized():
        dist.broadcast_object_list(centroids, src=0)
    if rank == 0:
        log.info(
            "stage 2: k-means of %d samples' features into %d clusters", len(features), num_clusters
        )
    return centroids[0]


def expert_model(cfg: Config, taskset: Any, trained: SingleGateMoE) -> SingleGateMoE:
    """A fresh module for stage 3's engine, holding ``trained``'s weights (the old engine's
    hooks stay on the old module's parameters)."""
    from mtl.models import build_model

    model = build_model(cfg.model, taskset)
    state = {k: v.detach().float() if v.is_floating_point() else v
             for k, v in trained.state_dict().items()}  # fmt: skip
    model.load_state_dict(state)
    model.set_stage(EXPERTS)
    return model
