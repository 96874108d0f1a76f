"""The pre-gating router of the task-expert MoE (DESIGN.md §4.4) and its top-k selection.

The router is decoupled from the backbone: it reads a task or domain embedding (optionally
plus a cheap embedding of the image) and gives every MoE layer's expert probabilities before
the backbone runs, so routes are known up front and batches can be grouped by expert.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class InputEmbedding(nn.Module):
    """A cheap image embedding for input-conditioned routing: ``(B, C, H, W) -> (B, dim)``,
    a 4x4 average pool and one linear layer (negligible next to the backbone)."""

    def __init__(self, in_channels: int, dim: int, grid: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Linear(in_channels * grid * grid, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(x).flatten(1))


class Router(nn.Module):
    """Every MoE layer's expert probabilities from a key (task or domain) embedding,
    optionally plus an image embedding: ``softmax(W · gelu(e_key [+ e_x]))``.

    Args:
        num_keys: Tasks or domains.
        num_layers: MoE layers routed.
        num_experts: Experts per layer.
        dim: Embedding width.
        input_embed: Image -> ``(B, dim)``, or None to route on the key alone.
    """

    def __init__(
        self,
        num_keys: int,
        num_layers: int,
        num_experts: int,
        dim: int,
        input_embed: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_keys, self.num_layers, self.num_experts = num_keys, num_layers, num_experts
        self.key_embed = nn.Embedding(num_keys, dim)
        self.input_embed = input_embed
        self.proj = nn.Linear(dim, num_layers * num_experts)

    def forward(self, keys: Tensor, x: Tensor | None = None) -> Tensor:
        """Keys ``(S, B')`` (long), images ``(B, C, H, W)`` if there is an input embedding
        -> probabilities ``(S, B' or B, L, E)``."""
        h = self.key_embed(keys)  # (S, B', dim)
        if self.input_embed is not None:
            if x is None:
                raise ValueError("this router reads the image (model.moe.input_routing)")
            h = h + self.input_embed(x)  # (S, B, dim)
        logits = self.proj(F.gelu(h)).unflatten(-1, (self.num_layers, self.num_experts))
        return logits.softmax(dim=-1)


def top_k_routes(probs: Tensor, k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Top-k experts of ``probs`` ``(..., E)``: ids ``(..., k)`` in ascending expert order
    (the order both executors sum in) and their weights ``(..., k)``."""
    weights, ids = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    ids, order = ids.sort(dim=-1)
    return ids, weights.gather(-1, order)
