"""Token-routed ViT experts, sharded across workers by DeepSpeed's MoE (DESIGN.md §4.4, "for
scale"): ``model.name=moe`` with ``model.moe.routing=token``.

The ViT of ``hard_sharing`` keeps its patch embedding, attention and heads; the MLP of every
block in ``model.moe.moe_layers`` (all if empty) becomes ``deepspeed.moe.layer.MoE``: a gate
(one linear layer over the token) picks each token's top-k of E experts, each a copy of the
block's MLP. With ``ep_size`` = P, each of the P workers of an expert-parallel group holds
E / P experts, and two all-to-alls per layer send every token to the worker of its expert and
back. Expert-parallel groups are consecutive ranks (DeepSpeed's default layout), so rank r
holds global experts ``(r % P) · E/P ...``; experts are data-parallel across groups.

Routing choices, and why:
    - no dropped tokens (``drop_tokens=False``): each expert's capacity is its busiest load
      over the group (an all-reduce of the max), so no token silently skips its MLP, routes
      do not depend on the batch's other tokens, and ranks whose last validation batch is
      smaller still exchange equally shaped buffers (for top_k >= 2; DeepSpeed's top-1 gate
      caps the capacity at the rank's own token count, so with top_k = 1 and unequal batches
      a gate sending nearly every token to one expert could make the shapes differ: keep
      ``data.val_size`` a multiple of the workers there);
    - no sampled second expert (``top2_2nd_expert_sampling=False``): the top-2 route is
      deterministic, so evaluation routes like training;
    - multi-domain task sets add a learned domain embedding (one per MoE layer, zero at
      start) to every token fed to the layer, so the gate (and the experts) can tell domains
      apart. A multi-task set has one token stream that every head reads, so its tokens carry
      no task: the gate routes on the token alone.

Auxiliary loss: DeepSpeed's balance loss ``l_aux`` of each layer (Switch/GShard, 1 when
balanced), averaged over layers, times ``model.moe.load_balance_weight``, as ``load_balance``
(logged as ``train/loss/aux/load_balance``). ``mutual_info_weight`` does not apply.

This module imports DeepSpeed (for ``MoE``), so it lives outside the pure core; the worker
builds the model here. There is no fixed per-task route to register (routes depend on the
tokens), so the driver does not register these models (``mtl.train.register``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtl.config import ModelConfig
from mtl.models import build_backbone, build_heads
from mtl.models.backbones import ViT
from mtl.tasks import TaskSet


def is_token_moe(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` asks for this module's model instead of ``mtl.models.MODELS``."""
    return cfg.name == "moe" and cfg.moe.routing == "token"


class TokenMoEViT(nn.Module):
    """A ViT whose MLPs are token-routed DeepSpeed MoE layers, one head per task.

    Args:
        backbone: The ViT; the ``mlp`` of its MoE blocks is already a DeepSpeed ``MoE``.
        heads: Head name -> head, called as ``head(features, size)``.
        taskset: The tasks; a multi-domain set needs ``domain_embeds``.
        domain_embeds: One ``Embedding(domains, dim)`` per MoE block, or None.
        load_balance_weight: Weight of the mean ``l_aux``.
    """

    def __init__(
        self,
        backbone: ViT,
        heads: nn.ModuleDict,
        taskset: TaskSet,
        domain_embeds: nn.ModuleList | None = None,
        load_balance_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self._heads = [h.name for h in taskset.heads]
        if sorted(heads) != sorted(self._heads):
            raise ValueError(f"heads {list(heads)} do not match the task set's {self._heads}")
        self.moe_blocks = [i for i, b in enumerate(backbone.blocks) if _is_moe(b.mlp)]
        if not self.moe_blocks:
            raise ValueError("need >= 1 block whose mlp is a DeepSpeed MoE layer")
        if domain_embeds is not None and len(domain_embeds) != len(self.moe_blocks):
            raise ValueError("need one domain embedding per MoE block")
        self.taskset = taskset
        self.backbone = backbone
        self.heads = heads
        self.domain_embeds = domain_embeds
        self.num_experts = backbone.blocks[self.moe_blocks[0]].mlp.num_experts
        self.load_balance_weight = load_balance_weight
        self._l_aux: list[Tensor] = []  # the last forward's, one per MoE layer
        self._counts: list[Tensor] = []  # tokens per expert, this rank, the last forward

    def __getstate__(self) -> dict[str, Any]:
        # The last forward's losses hold autograd history, which deepcopy and pickle cannot copy.
        return {**self.__dict__, "_l_aux": [], "_counts": []}

    def forward_features(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Shared features ``(B, D, h, w)``; ``domain`` ``(B,)`` for a multi-domain set."""
        vit = self.backbone
        if self.domain_embeds is not None and domain is None:
            raise ValueError("this model embeds the domain of each sample: pass domain (B,)")
        t = vit.patch_embed(x)  # (B, D, h, w)
        B, D, h, w = t.shape
        if (h, w) != tuple(vit.grid):
            raise ValueError(f"vit was built for {vit.grid[0]}x{vit.grid[1]} patches, got {h}x{w}")
        t = t.flatten(2).transpose(1, 2) + vit.pos_embed  # (B, N, D)
        self._l_aux, self._counts = [], []
        for block in vit.blocks:
            t = t + block.attn(block.norm1(t))
            u = block.norm2(t)  # (B, N, D)
            if _is_moe(block.mlp):
                if self.domain_embeds is not None:
                    u = u + self.domain_embeds[len(self._l_aux)](domain)[:, None, :]
                y, l_aux, counts = block.mlp(u)  # every token to its top-k experts and back
                self._l_aux.append(l_aux)
                self._counts.append(counts)
            else:
                y = block.mlp(u)
            t = t + y
        t = vit.norm(t)
        return t.transpose(1, 2).reshape(B, D, h, w)

    def forward_head(self, features: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """Every head on the shared features; ``size`` is the input's ``(H, W)``."""
        return {name: self.heads[name](features, size) for name in self._heads}

    def forward(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        """Predict every head: images ``(B, C, H, W)``, domains ``(B,)`` (multi-domain)."""
        size = (x.shape[-2], x.shape[-1])
        return self.forward_head(self.forward_features(x, domain), size)

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """The weighted mean DeepSpeed balance loss of the last forward pass."""
        if not self._l_aux:
            raise RuntimeError("auxiliary_losses() reads the last forward pass: run one first")
        balance = torch.stack([a.float() for a in self._l_aux]).mean()
        return {"load_balance": self.load_balance_weight * balance}

    @torch.no_grad()
    def expert_usage(self) -> dict[str, list[list[float]]]:
        """``{"tokens": per MoE layer -> share of this rank's token routes per expert}``
        of the last forward pass (logged as ``experts/tokens/layer<i>/e<j>``)."""
        if not self._counts:
            return {}
        counts = torch.stack(self._counts).float()  # (L, E)
        return {"tokens": (counts / counts.sum(-1, keepdim=True).clamp(min=1)).tolist()}


def _is_moe(module: nn.Module) -> bool:
    # DeepSpeed's MoE layer, recognised by what it holds (its class lives in deepspeed).
    return hasattr(module, "deepspeed_moe")


def ep_rank(ep_size: int) -> int:
    """This worker's place in its expert-parallel group (consecutive ranks form a group)."""
    return dist.get_rank() % ep_size if dist.is_initialized() else 0


def _init_experts(experts: nn.ModuleList, first: int, seed: int) -> None:
    """Give local expert i the init of global expert ``first + i`` (seeded by it, not by the
    rank's RNG): DeepSpeed deep-copies one MLP into every slot, and identical experts
    would only diverge through routing."""
    for i, expert in enumerate(experts):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + first + i)
            for m in expert.modules():
                if isinstance(m, nn.Linear | nn.LayerNorm):
                    m.reset_parameters()


def token_moe_vit(cfg: ModelConfig, taskset: TaskSet, seed: int = 0) -> TokenMoEViT:
    """The token-routed, expert-parallel ViT from config (DeepSpeed must be importable with
    the right accelerator, see ``mtl.train.engine.import_deepspeed``)."""
    from deepspeed.moe.layer import MoE

    if cfg.backbone != "vit":
        raise ValueError(f"model.moe.routing=token needs model.backbone=vit, not {cfg.backbone!r}")
    m = cfg.moe
    backbone = build_backbone(cfg, taskset)
    layers = sorted(m.moe_layers) or list(range(len(backbone.blocks)))
    local = m.num_experts // m.ep_size
    first = ep_rank(m.ep_size) * local  # global id of this rank's first expert
    for n, i in enumerate(layers):
        block = backbone.blocks[i]
        block.mlp = MoE(
            hidden_size=cfg.width,
            expert=block.mlp,
            num_experts=m.num_experts,
            ep_size=m.ep_size,
            k=m.top_k,
            drop_tokens=False,
            top2_2nd_expert_sampling=False,
        )
        experts = block.mlp.deepspeed_moe.experts.deepspeed_experts
        _init_experts(experts, first, seed=seed + 1000 * (n + 1))
    embeds = None
    if taskset.multi_domain:
        embeds = nn.ModuleList(nn.Embedding(len(taskset.domains), cfg.width) for _ in layers)
        for e in embeds:
            nn.init.zeros_(e.weight)  # starts as plain token routing
    heads = build_heads(cfg, taskset, backbone)
    return TokenMoEViT(backbone, heads, taskset, embeds, m.load_balance_weight)
