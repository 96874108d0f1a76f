"""Task-expert mixture of experts: backbone blocks routed by task or domain (DESIGN.md §4.4).

Some blocks become MoE layers of E experts: whole residual blocks for a ResNet (ours, or
torchvision's basic and bottleneck blocks), the MLP of a transformer block for a ViT (ours,
or timm's; attention stays shared). Experts start as fresh copies of the block, or, with
``model.pretrained``, as exact copies of the pretrained block. A router decoupled from the backbone
("pre-gating") maps the task embedding (multi-task) or the domain embedding (multi-domain),
optionally plus a cheap embedding of the image, to every MoE layer's expert probabilities
r^l = softmax(router(e))^l over E before the backbone runs. Each layer keeps the top-k,
renormalised to weights w (by default), and outputs Σ_{e ∈ top-k} w_e · expert_e(x).

One image, several tasks: every task has its own route, so from the first MoE layer on there
is one stream per task, as in InterroGate. Streams whose routes agree (same experts, same
weights) at every layer so far hold the same values and are computed once. The executor works
on *rows*, one per distinct (stream, sample): ``ptr[t, b]`` is the row holding task t's
features of sample b. An MoE layer (``dispatch``)
    1. merges the (task, sample) pairs whose input row and route agree into one output row
       (``torch.unique`` over (row, expert ids, weight bits));
    2. groups the distinct (expert, input row) pairs by expert and runs each expert once on
       all of its rows (expert-aware execution: a loop over experts, none over samples);
    3. adds the weighted outputs into the output rows (``index_add``), in ascending expert
       order, the order in which the fixed model (``mtl.prune_moe``) sums.
A multi-domain task set has one head, so one stream (``ptr`` is ``(1, B)``), and the route
varies per sample with its domain: the same code groups the samples by expert.

Routing is deterministic (no noise), so training and eval route alike and eval is the "hard
top-k" routing that the fixed model reproduces. With ``top_k = 1`` and renormalisation the
weight is exactly 1: tasks picking the same expert share a stream, but no task-loss gradient
reaches the router, which then learns from the auxiliary losses only; ``renormalize=False``
(Switch: weight = probability) trains it from the task losses, and streams rarely merge.

Auxiliary losses over the routing decisions of the last forward pass (one decision per task
for task routing, per sample for domain or input routing), averaged over MoE layers:
    load balance (Switch): E · Σ_e f_e · P_e, f_e = share of the top-k assignments that go
        to expert e, P_e = mean probability of e: 1 when balanced, up to E when collapsed;
    mutual information (Mod-Squad): −I(key; expert), p(key, e) = p(key) · mean r(e | key):
        0 when every key routes alike, −log K when K <= E equally frequent keys use
        disjoint experts.

Token-level routing of the ViT's MLPs, with experts sharded across workers, is DeepSpeed's MoE
(``model.moe.routing=token``); it imports DeepSpeed, so it lives in
``mtl.train.expert_parallel``, outside this pure module.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from mtl.config import ModelConfig
from mtl.losses.routing import load_balance_loss, mutual_info_loss
from mtl.models.backbones import BasicBlock, TransformerBlock, block_type, block_type_name
from mtl.models.fused import use_triton
from mtl.models.router import InputEmbedding, Router, top_k_routes
from mtl.tasks import TaskSet


class MoEBlock(nn.Module):
    """An MoE layer: a shared part before the experts (``pre``), E experts, and a shared
    part after (``post``). There is no ``forward``: ``dispatch`` (routed) and the fixed
    model run ``pre``, the experts on grouped rows, then ``post``."""

    def __init__(self, experts: list[nn.Module]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def pre(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """(what ``post`` adds back, or None; the experts' input)."""
        raise NotImplementedError

    def post(self, residual: Tensor | None, mixed: Tensor) -> Tensor:
        """The layer output from ``Σ_e w_e · expert_e(h)``."""
        raise NotImplementedError

    def keep(self, experts: list[int]) -> MoEBlock:
        """A copy holding only ``experts`` (positions in the new block follow the list)."""
        raise NotImplementedError


class ConvMoEBlock(MoEBlock):
    """Experts are whole residual blocks: ``out = Σ_e w_e · block_e(x)``."""

    def pre(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        return None, x

    def post(self, residual: Tensor | None, mixed: Tensor) -> Tensor:
        return mixed

    def keep(self, experts: list[int]) -> ConvMoEBlock:
        return ConvMoEBlock([copy.deepcopy(self.experts[e]) for e in experts])


class TransformerMoEBlock(MoEBlock):
    """A pre-norm transformer block whose MLP is E experts: ``y = x + attn(ln1(x))``, then
    ``out = y + Σ_e w_e · mlp_e(ln2(y))`` (with Σ w = 1, the mix of E whole blocks)."""

    def __init__(
        self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, experts: list[nn.Module]
    ) -> None:
        super().__init__(experts)
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2

    def pre(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        y = x + self.attn(self.norm1(x))  # (R, N, D)
        return y, self.norm2(y)

    def post(self, residual: Tensor | None, mixed: Tensor) -> Tensor:
        return residual + mixed

    def keep(self, experts: list[int]) -> TransformerMoEBlock:
        shared = (copy.deepcopy(m) for m in (self.norm1, self.attn, self.norm2))
        return TransformerMoEBlock(*shared, [copy.deepcopy(self.experts[e]) for e in experts])


def fresh_copy(module: nn.Module) -> nn.Module:
    """An independently initialised copy, with the backbone's init (He-normal convolutions,
    PyTorch defaults elsewhere): identical experts would only diverge through routing."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear | nn.LayerNorm | nn.BatchNorm2d):
            m.reset_parameters()
    return out


def expert_copies(module: nn.Module, num_experts: int, fresh: bool) -> list[nn.Module]:
    """``module`` and E − 1 copies: freshly initialised, or exact copies of a pretrained
    block ("sparse upcycling", Komatsuzaki et al. 2022: routing and the tasks' gradients then
    split them, and every expert starts from the pretrained function)."""
    return [module] + [fresh_copy(module) if fresh else copy.deepcopy(module)
                       for _ in range(num_experts - 1)]  # fmt: skip


def conv_moe(block: nn.Module, num_experts: int, fresh: bool = True) -> ConvMoEBlock:
    """A residual block (ours, or torchvision's basic or bottleneck) as E experts."""
    return ConvMoEBlock(expert_copies(block, num_experts, fresh))


def transformer_moe(
    block: TransformerBlock, num_experts: int, fresh: bool = True
) -> TransformerMoEBlock:
    """A transformer block with its MLP as E experts."""
    experts = expert_copies(block.mlp, num_experts, fresh)
    return TransformerMoEBlock(block.norm1, block.attn, block.norm2, experts)


def timm_transformer_moe(block: nn.Module, num_experts: int, fresh: bool = True):
    """timm's ViT block with its MLP as E experts. Its layer scales (identity in ViT-S) go
    with the branch they scale: ``ls1`` after attention, ``ls2`` inside each expert."""
    experts = expert_copies(nn.Sequential(block.mlp, block.ls2), num_experts, fresh)
    attn = nn.Sequential(block.attn, block.ls1)
    return TransformerMoEBlock(block.norm1, attn, block.norm2, experts)


# Per block type (``block_type``), how it becomes an MoE layer.
MOE_BLOCKS = {
    block_type_name(BasicBlock): conv_moe,
    block_type_name(TransformerBlock): transformer_moe,
    "torchvision.models.resnet.BasicBlock": conv_moe,
    "torchvision.models.resnet.Bottleneck": conv_moe,
    "timm.models.vision_transformer.Block": timm_transformer_moe,
}


def _stacked_mlps(block: MoEBlock) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``(W1, b1, W2, b2)`` stacked over experts, ``(E, D, H)`` etc., when every expert is
    our ViT's ``Linear, GELU, Linear``; None for any other expert (the loop runs them)."""
    for e in block.experts:
        plain = isinstance(e, nn.Sequential) and len(e) == 3
        if not (plain and isinstance(e[1], nn.GELU) and e[1].approximate == "none"):
            return None
        if not all(isinstance(e[i], nn.Linear) and e[i].bias is not None for i in (0, 2)):
            return None
    ex = block.experts
    return (
        torch.stack([e[0].weight.t() for e in ex]), torch.stack([e[0].bias for e in ex]),
        torch.stack([e[2].weight.t() for e in ex]), torch.stack([e[2].bias for e in ex]),
    )  # fmt: skip


def _grouped_experts(block: MoEBlock, h: Tensor, pairs: Tensor, sizes: list[int]) -> Tensor | None:
    """Every expert's output on its rows (``pairs`` order) through kernels/grouped_mlp.py,
    one launch per layer; None when the experts are not plain MLPs."""
    weights = _stacked_mlps(block)
    if weights is None:
        return None
    from kernels.grouped_mlp import grouped_mlp

    rows = h[pairs % h.shape[0]]  # pair = expert * R + row
    tokens = rows.reshape(-1, rows.shape[-1])
    per_row = math.prod(rows.shape[1:-1])
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n * per_row)
    out = grouped_mlp(tokens, *weights, offsets)
    return out.view(*rows.shape[:-1], out.shape[-1])


def dispatch(
    block: MoEBlock, x: Tensor, ptr: Tensor, ids: Tensor, weights: Tensor, fused: bool = False
) -> tuple[Tensor, Tensor]:
    """One MoE layer over rows, each expert in one batched call (see the module docstring).

    Args:
        block: The layer.
        x: Input rows ``(R, ...)``.
        ptr: The input row of every (stream, sample), ``(S, B)``.
        ids: Their experts in ascending order, ``(S, B, k)``.
        weights: Their weights, ``(S, B, k)``.
        fused: Run plain-MLP experts through the grouped Triton kernel (``model.kernels``).

    Returns:
        Output rows ``(U, ...)`` and the new ``ptr`` ``(S, B)`` into them.
    """
    S, B, k = ids.shape
    R, E = x.shape[0], len(block.experts)
    # [1] One output row per distinct (input row, route).
    bits = weights.detach().float().view(torch.int32).long()
    key = torch.cat([ptr.unsqueeze(-1), ids, bits], dim=-1).reshape(S * B, 1 + 2 * k)
    unique, out_of = torch.unique(key, dim=0, return_inverse=True)  # (U, 1+2k), (S*B,)
    U = unique.shape[0]
    order = torch.arange(S * B, device=x.device)
    first = torch.full((U,), S * B, device=x.device).scatter_reduce(0, out_of, order, "amin")
    src = ptr.reshape(-1)[first]  # (U,) input row of each output row
    ids_u = ids.reshape(-1, k)[first]  # (U, k)
    w_u = weights.reshape(-1, k)[first].flatten()  # (U*k,) slot u*k + j
    # [2] Distinct (expert, input row) pairs, sorted so that each expert's are contiguous.
    pairs, pair_of = torch.unique((ids_u * R + src[:, None]).flatten(), return_inverse=True)
    slots = torch.argsort(pair_of, stable=True)  # slots grouped by expert like the pairs
    counts = torch.stack(
        [torch.bincount(pairs // R, minlength=E), torch.bincount(ids_u.flatten(), minlength=E)]
    ).tolist()  # every group size in one host sync
    residual, h = block.pre(x)
    grouped = _grouped_experts(block, h, pairs, counts[0]) if fused else None
    mixed: Tensor | None = None
    p0 = s0 = 0
    for e, (n_pairs, n_slots) in enumerate(zip(*counts, strict=True)):
        if n_slots == 0:
            continue
        if grouped is not None:
            y = grouped[p0 : p0 + n_pairs]
        else:
            y = block.experts[e](h[pairs[p0 : p0 + n_pairs] - e * R])  # one call per expert
        chosen = slots[s0 : s0 + n_slots]
        w = w_u[chosen].to(y.dtype).view(-1, *([1] * (y.ndim - 1)))
        # [3] Weighted outputs into their rows, experts in ascending order.
        mixed = y.new_zeros(U, *y.shape[1:]) if mixed is None else mixed
        mixed = mixed.index_add(0, chosen // k, w * y[pair_of[chosen] - p0])
        p0, s0 = p0 + n_pairs, s0 + n_slots
    out = block.post(None if residual is None else residual[src], mixed)
    return out, out_of.view(S, B)


class TaskMoE(nn.Module):
    """Backbone blocks as task- or domain-routed mixtures of experts (DESIGN.md §4.4).

    Args:
        stem: Shared stem, image ``(B, C_in, H, W)`` -> stream.
        blocks: The L blocks in order; ``MoEBlock``s are routed, the others shared.
        neck: Stream -> ``(B, C, h, w)`` feature map (shared; applied per stream).
        heads: Head name -> head, called as ``head(features, size)``.
        router: Over the keys (the heads; for a multi-domain set, its domains), with one
            layer per ``MoEBlock`` in order.
        taskset: The tasks; a multi-domain set routes by ``domain``.
        top_k: Experts per route and layer.
        renormalize: Renormalise the top-k probabilities to sum to 1.
        load_balance_weight: Weight of the Switch balance loss.
        mutual_info_weight: Weight of −I(key; expert).
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: list[nn.Module],
        neck: nn.Module,
        heads: nn.ModuleDict,
        router: Router,
        taskset: TaskSet,
        *,
        top_k: int,
        renormalize: bool = True,
        load_balance_weight: float = 0.0,
        mutual_info_weight: float = 0.0,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        self.kernels = kernels
        self._heads = [h.name for h in taskset.heads]
        if sorted(heads) != sorted(self._heads):
            raise ValueError(f"heads {list(heads)} do not match the task set's {self._heads}")
        self.keys = list(taskset.domains) if taskset.multi_domain else list(self._heads)
        moe = [b for b in blocks if isinstance(b, MoEBlock)]
        experts = {len(b.experts) for b in moe} | {router.num_experts}
        if not moe or len(experts) != 1 or router.num_layers != len(moe):
            raise ValueError("need >= 1 MoE block, all with the router's number of experts")
        if router.num_keys != len(self.keys) or not 1 <= top_k <= router.num_experts:
            raise ValueError(f"router needs {len(self.keys)} keys and 1 <= top_k <= experts")
        self.taskset = taskset
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck
        self.heads = heads
        self.router = router
        self.num_experts = router.num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.load_balance_weight = load_balance_weight
        self.mutual_info_weight = mutual_info_weight
        self._routing: tuple[Tensor, Tensor, Tensor] | None = None  # last forward's decisions

    def __getstate__(self) -> dict[str, Any]:
        # The last routing holds autograd history, which deepcopy and pickle cannot copy.
        return {**self.__dict__, "_routing": None}

    @property
    def by_domain(self) -> bool:
        return self.taskset.multi_domain

    def key_probs(self) -> Tensor:
        """Routing probabilities of every key on its own embedding, ``(K, L, E)`` (the
        routes of a model without input routing; what ``fix_moe`` freezes)."""
        keys = torch.arange(len(self.keys), device=self.router.proj.weight.device)
        return self.router(keys.view(-1, 1))[:, 0]

    def _route(self, x: Tensor, domain: Tensor | None) -> tuple[Tensor, Tensor]:
        """(probabilities ``(S, B' , L, E)``, key of each decision ``(S, B')``)."""
        if not self.by_domain:
            keys = torch.arange(len(self.keys), device=x.device).view(-1, 1)  # (T, 1)
            probs = self.router(keys, x)  # (T, 1 or B, L, E)
            return probs, keys.expand(probs.shape[:2])
        if domain is None:
            raise ValueError(f"this model routes by domain {self.keys}: pass domain (B,)")
        keys = domain.view(1, -1)  # (1, B): one stream, a route per sample
        if self.router.input_embed is not None:
            return self.router(keys, x), keys
        return self.key_probs()[domain].unsqueeze(0), keys  # same values as the fixed model

    def forward_features(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        """Each head's feature map ``(B, C, h, w)`` (multi-domain: the one head's)."""
        probs, keys = self._route(x, domain)
        ids, weights = top_k_routes(probs, self.top_k, self.renormalize)  # (S, B', L, k)
        self._routing = (probs, ids, keys)
        h = self.stem(x)
        S, B = probs.shape[0], x.shape[0]
        ptr = torch.arange(B, device=x.device).expand(S, B)  # every stream reads the stem
        layer, fused = 0, use_triton(self.kernels, h)
        for block in self.blocks:
            if isinstance(block, MoEBlock):
                route = (ids[:, :, layer].expand(S, B, -1), weights[:, :, layer].expand(S, B, -1))
                h, ptr = dispatch(block, h, ptr, *route, fused=fused)
                layer += 1
            else:
                h = block(h)
        features = self.neck(h)
        return {t: features[ptr[0 if self.by_domain else i]] for i, t in enumerate(self._heads)}

    def forward_head(self, features: dict[str, Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
        """Head t on feature map t; ``size`` is the input's ``(H, W)``."""
        return {t: self.heads[t](features[t], size) for t in self._heads}

    def forward(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        """Predict every head: images ``(B, C, H, W)``, domains ``(B,)`` (multi-domain)."""
        size = (x.shape[-2], x.shape[-1])
        return self.forward_head(self.forward_features(x, domain), size)

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Weighted load-balance and mutual-information losses of the last forward pass."""
        if self._routing is None:
            raise RuntimeError("auxiliary_losses() reads the last forward pass: run one first")
        probs, ids, keys = self._routing
        probs = probs.flatten(0, 1).float()  # (N, L, E), one row per routing decision
        balance = load_balance_loss(probs, ids.flatten(0, 1))
        info = mutual_info_loss(probs, keys.reshape(-1), len(self.keys))
        return {
            "load_balance": self.load_balance_weight * balance,
            "mutual_info": self.mutual_info_weight * info,
        }

    @torch.no_grad()
    def _usage(self) -> dict[str, Tensor]:
        """Key -> mean routing probability ``(L, E)``: the key's own route, or with input
        routing the mean over the last batch (keys absent from it are left out)."""
        if self.router.input_embed is None:
            return dict(zip(self.keys, self.key_probs().float(), strict=True))
        if self._routing is None:
            raise RuntimeError("with input routing, usage is read off the last forward pass")
        probs, _, keys = self._routing
        probs, keys = probs.detach().flatten(0, 1).float(), keys.reshape(-1)
        sums = probs.new_zeros(len(self.keys), *probs.shape[1:]).index_add(0, keys, probs)
        counts = torch.bincount(keys, minlength=len(self.keys)).tolist()
        return {k: sums[i] / n for i, (k, n) in enumerate(zip(self.keys, counts, strict=True)) if n}

    def expert_usage(self) -> dict[str, list[list[float]]]:
        """Task (or domain) -> per MoE layer -> per expert routing probability."""
        return {key: probs.tolist() for key, probs in self._usage().items()}

    def routes(self) -> dict[str, list[list[int]]]:
        """Task (or domain) -> per MoE layer -> its top-k expert ids (``routes_figure``)."""
        usage = self._usage()
        return {key: top_k_routes(p, self.top_k)[0].tolist() for key, p in usage.items()}


def moe(cfg: ModelConfig, taskset: TaskSet) -> TaskMoE:
    """TaskMoE from config: ``model.backbone`` is cut into stem, blocks and neck; the blocks
    in ``model.moe.moe_layers`` (all if empty) become MoE layers of ``num_experts``."""
    # Imported here because the package __init__, which holds the registries, imports us.
    from mtl.models import build_backbone, build_heads

    m = cfg.moe
    backbone = build_backbone(cfg, taskset)
    parts = backbone.parts()
    layers = sorted(m.moe_layers) or list(range(len(parts.blocks)))
    depth = len(parts.blocks)
    if not all(0 <= i < depth for i in layers):
        raise ValueError(
            f"model.moe.moe_layers={m.moe_layers}: {cfg.backbone} has blocks 0..{depth - 1}"
        )
    unknown = {block_type(parts.blocks[i]) for i in layers} - set(MOE_BLOCKS)
    if unknown:
        raise ValueError(f"no MoE form for {sorted(unknown)}: add one to mtl.models.moe.MOE_BLOCKS")
    fresh = not cfg.pretrained  # pretrained: experts start as copies of the pretrained block
    blocks = [
        MOE_BLOCKS[block_type(b)](b, m.num_experts, fresh) if i in layers else b
        for i, b in enumerate(parts.blocks)
    ]
    keys = len(taskset.domains) if taskset.multi_domain else len(taskset.heads)
    embed = InputEmbedding(taskset.in_channels, m.router_dim) if m.input_routing else None
    return TaskMoE(
        parts.stem,
        blocks,
        parts.neck,
        build_heads(cfg, taskset, backbone),
        Router(keys, len(layers), m.num_experts, m.router_dim, embed),
        taskset,
        top_k=m.top_k,
        renormalize=m.renormalize,
        load_balance_weight=m.load_balance_weight,
        mutual_info_weight=m.mutual_info_weight,
        kernels=cfg.kernels,
    )
