"""Auxiliary losses of routed mixtures of experts (DESIGN.md §4.4), over N routing decisions.

One decision is one (task or domain, sample) route: ``probs`` ``(N, L, E)`` holds the router's
probabilities over E experts at each of L layers, ``ids`` ``(N, L, k)`` the experts chosen.
Both losses are averaged over layers and are differentiable in ``probs`` only.

    load balance: Fedus et al., "Switch Transformers", JMLR 2022, eq. 4;
    mutual information: Chen et al., "Mod-Squad: Designing Mixtures of Experts As Modular
        Multi-Task Learners", CVPR 2023 (the task–expert MI term, here also over domains).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load_balance_loss(probs: Tensor, ids: Tensor) -> Tensor:
    """Switch Transformer balance loss ``E · Σ_e f_e P_e``, mean over layers: f_e is the
    share of the N·k assignments that go to expert e, P_e the mean probability of e. It is
    1 whenever f or P is uniform, and E when everything collapses onto one expert.

    Args:
        probs: Routing probabilities of N decisions, ``(N, L, E)``.
        ids: The experts chosen, ``(N, L, k)``.
    """
    E, k = probs.shape[-1], ids.shape[-1]
    chosen = torch.zeros_like(probs).scatter_(-1, ids, 1.0)  # (N, L, E)
    share = chosen.mean(dim=0) / k  # f, (L, E), sums to 1 per layer; no gradient
    return E * (share * probs.mean(dim=0)).sum(dim=-1).mean()


def mutual_info_loss(probs: Tensor, keys: Tensor, num_keys: int) -> Tensor:
    """``−I(key; expert)`` per layer, mean over layers, with p(key, e) = (1/N) Σ_{n: key_n =
    key} r_n(e): 0 when every key routes alike; at best −H(key) (−log K for equally
    frequent keys, if K <= E), when no expert has probability under two keys.

    Args:
        probs: Routing probabilities of N decisions, ``(N, L, E)``.
        keys: The task or domain of each decision, ``(N,)``; p(key) is its share of N.
        num_keys: K.
    """
    onehot = F.one_hot(keys, num_keys).to(probs.dtype)  # (N, K)
    joint = torch.einsum("nk,nle->lke", onehot, probs) / probs.shape[0]  # (L, K, E)
    p_key, p_expert = joint.sum(dim=-1, keepdim=True), joint.sum(dim=-2, keepdim=True)
    tiny = torch.finfo(probs.dtype).tiny  # absent keys have p = 0 and contribute 0
    log_ratio = joint.clamp_min(tiny).log() - p_key.clamp_min(tiny).log()
    log_ratio = log_ratio - p_expert.clamp_min(tiny).log()
    return -(joint * log_ratio).sum(dim=(-2, -1)).mean()
