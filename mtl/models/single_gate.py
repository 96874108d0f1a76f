"""Single-gated mixture of experts with an early-exit base branch (DESIGN.md §4.5; Royer et al.,
"Revisiting Single-gated Mixtures of Experts", 2023).

The trunk is cut at block ``branch_at``: the *prefix* (stem and blocks before it) is shared; the
*base branch* (the remaining blocks, the neck and one head per task) completes the base model.
K *expert branches* are copies of the base branch. One gate, a linear layer on the prefix's
pooled features, picks one expert per sample: a single gate for the whole task set, not one per
task, because one gate is what keeps inference at one extra branch per sample; per-task gates
would run up to T branches and give back the saving (ours, for the multi-task case; a
multi-domain set routes on the features too, which carry the domain).

Prediction of sample x (eval and the fixed model):
    conf(x) = confidence of the base prediction (``confidence``);
    conf(x) >= threshold: exit with the base prediction (cost: prefix + base branch);
    else: the mean of the base's and expert g(x)'s outputs, g(x) = argmax gate(pool(prefix(x)))
    (the base doubles as the ensemble member). ``threshold = 1`` never exits.

Training is asynchronous, in three stages (``STAGES``), each a separate training job:
    1. ``base``: train the prefix and the base branch alone (outputs are the base's).
    2. ``cluster``: k-means (K clusters) of the pooled prefix features of the training set;
       ``init_from_base(centroids)`` copies the trained base branch into every expert and sets
       the gate to the nearest-centroid rule (a linear rule: logits 2 c_k . z - |c_k|^2).
    3. ``experts``: each sample trains the expert of its cluster (nearest centroid, fixed
       during the stage, so no expert can collapse by winning the gate), through the
       base-expert ensemble; the gate learns the cluster assignment by cross entropy
       (``auxiliary_losses``). With ``freeze_base`` the prefix and base get no gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.tasks import BINARY, CLASSIFICATION, DENSE_CLASSIFICATION, TaskSet

STAGES = ("base", "cluster", "experts")
CONFIDENT_KINDS = (CLASSIFICATION, BINARY, DENSE_CLASSIFICATION)


def head_confidence(kind: str, output: Tensor) -> Tensor:
    """Per-sample confidence in [0, 1] of one head's output ``(B, ...)``.

    classification: the top softmax probability; binary: max(p, 1 - p) of the sigmoid;
    dense classification: the top softmax probability averaged over pixels (ours: one score
    per image, so the exit decision is per image).
    """
    if kind == CLASSIFICATION:
        return output.float().softmax(1).amax(1)
    if kind == BINARY:
        p = output.float().sigmoid()
        return torch.maximum(p, 1 - p).reshape(p.shape[0], -1).mean(1)
    if kind == DENSE_CLASSIFICATION:
        return output.float().softmax(1).amax(1).flatten(1).mean(1)
    raise ValueError(f"a {kind} head has no confidence; exits read {list(CONFIDENT_KINDS)}")


def confidence(outputs: dict[str, Tensor], taskset: TaskSet) -> Tensor:
    """The base prediction's confidence ``(B,)``: the least confident of the heads that have
    one (regression heads do not), so a sample exits only when every such head is sure."""
    scores = [
        head_confidence(spec.kind, outputs[spec.name])
        for spec in taskset.heads
        if spec.kind in CONFIDENT_KINDS
    ]
    if not scores:
        raise ValueError(f"task set {taskset.name!r} has no classification head to exit on")
    return torch.stack(scores).amin(0)


def pool(h: Tensor, channel_dim: int) -> Tensor:
    """Mean over every dim but the batch and the channels: ``(B, C)`` from a map or tokens."""
    dims = [d for d in range(1, h.dim()) if d != channel_dim]
    return h.mean(dims) if dims else h


class Branch(nn.Module):
    """Blocks, neck and heads after the cut: ``branch(h, size) -> {head: output}``."""

    def __init__(self, blocks: list[nn.Module], neck: nn.Module, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.neck = neck
        self.heads = heads

    def forward(self, h: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        features = self.neck(self.blocks(h))
        return {name: head(features, size) for name, head in self.heads.items()}


class SingleGateMoE(nn.Module):
    """Base model, K expert branches from block ``branch_at``, one gate, an early exit.

    Args:
        stem, blocks, neck: The trunk's parts (``backbone.parts()``).
        heads: One head per ``taskset.heads`` entry (the base's; experts get copies).
        taskset: The tasks; the exit reads its classification-type heads.
        branch_at: Index of the first block of the branches, in ``1 .. len(blocks) - 1``
            (at least one shared and one branched block).
        num_experts: K >= 2.
        threshold: Exit confidence in (0, 1]; 1 never exits.
        channel_dim: The stream's channel dim (``TrunkParts.channel_dim``), pooled for the gate.
        freeze_base: Stage 3 leaves the prefix and the base branch as stage 1 trained them.
        gate_weight: Weight of the gate's cross entropy in stage 3.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: list[nn.Module],
        neck: nn.Module,
        heads: nn.ModuleDict,
        taskset: TaskSet,
        *,
        branch_at: int,
        num_experts: int,
        threshold: float,
        channel_dim: int,
        freeze_base: bool = True,
        gate_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_single_gate(len(blocks), branch_at, num_experts, threshold)
        names = [h.name for h in taskset.heads]
        if sorted(heads) != sorted(names):
            raise ValueError(f"heads {list(heads)} do not match the task set's {names}")
        if threshold < 1 and not any(h.kind in CONFIDENT_KINDS for h in taskset.heads):
            raise ValueError(
                f"task set {taskset.name!r} has no classification head, so the base has no "
                "confidence to exit on: set model.single_gate.threshold=1 (never exit)"
            )
        self.taskset = taskset
        self.prefix = nn.Sequential(stem, *blocks[:branch_at])
        self.base = Branch(list(blocks[branch_at:]), neck, heads)
        self.experts = nn.ModuleList(copy.deepcopy(self.base) for _ in range(num_experts))
        self.gate = nn.Linear(_channels(self.prefix, taskset, channel_dim), num_experts)
        self.register_buffer("centroids", torch.zeros(num_experts, self.gate.in_features))
        self.num_experts = num_experts
        self.threshold = threshold
        self.channel_dim = channel_dim
        self.freeze_base = freeze_base
        self.gate_weight = gate_weight
        self.stage = STAGES[0]
        self._last: tuple[Tensor, Tensor] | None = None  # stage 3: (gate logits, clusters)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": None}  # autograd history cannot be deep-copied

    def set_stage(self, stage: str) -> None:
        """Which stage the forward pass trains; ``requires_grad`` follows it."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        self.stage = stage
        base = stage == "base" or not self.freeze_base
        for module, trains in ((self.prefix, base), (self.base, base)):
            module.requires_grad_(trains)
        for module in (self.experts, self.gate):
            module.requires_grad_(stage == "experts")

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the current stage trains (what its optimizer gets)."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Pooled prefix features ``(B, C)``: what stage 2 clusters and the gate reads."""
        return pool(self.prefix(x), self.channel_dim).float()

    @torch.no_grad()
    def init_from_base(self, centroids: Tensor) -> None:
        """Stage 2's outcome: every expert becomes a copy of the trained base branch, the gate
        the nearest-centroid rule over ``centroids`` ``(K, C)``."""
        if centroids.shape != self.centroids.shape:
            raise ValueError(
                f"centroids {tuple(centroids.shape)}, need {tuple(self.centroids.shape)}"
            )
        for expert in self.experts:
            expert.load_state_dict(self.base.state_dict())
        self.centroids.copy_(centroids)
        self.gate.weight.copy_(2 * centroids)
        self.gate.bias.copy_(-(centroids * centroids).sum(1))

    def clusters(self, z: Tensor) -> Tensor:
        """Nearest centroid of each pooled feature ``(B,)``: stage 3's fixed assignment."""
        return torch.cdist(z.float(), self.centroids.float()).argmin(1)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        """Predict every head. Stage 1 (and eval before stage 3) gives the base's outputs;
        stage 3 training routes by cluster and ensembles with the base; eval routes by the
        gate and exits where the base is confident."""
        del domain  # the gate reads the features, which carry the domain
        size = (x.shape[-2], x.shape[-1])
        h = self.prefix(x)
        base = self.base(h, size)
        if self.stage != "experts":
            return base
        z = pool(h, self.channel_dim)
        logits = self.gate(z.detach().float())
        if self.training:
            route = self.clusters(z.detach())
            self._last = (logits, route)
            return self._ensemble(h, base, route, torch.ones_like(route, dtype=torch.bool), size)
        route = logits.argmax(1)
        return self._ensemble(h, base, route, ~self.exits(base), size)

    def exits(self, base: dict[str, Tensor]) -> Tensor:
        """Which samples the base answers alone ``(B,)`` at ``threshold``."""
        if self.threshold >= 1:
            first = next(iter(base.values()))
            return torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
        return confidence(base, self.taskset) >= self.threshold

    def _ensemble(
        self, h: Tensor, base: dict[str, Tensor], route: Tensor, run: Tensor, size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Base outputs, replaced on the ``run`` samples by the mean of the base's and their
        expert's outputs; each expert runs once, on its own samples only."""
        out = {name: value.clone() for name, value in base.items()}
        for k in range(self.num_experts):
            rows = torch.nonzero(run & (route == k)).flatten()
            if rows.numel() == 0:
                if self.training:  # every rank must reduce the same gradients (see below)
                    out = _touch(out, self.experts[k])
                continue
            expert = self.experts[k](h[rows], size)
            for name, value in expert.items():
                out[name] = out[name].index_copy(0, rows, (base[name][rows] + value) / 2)
        return out

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Stage 3: the gate's cross entropy to the cluster assignment (weighted)."""
        if self.stage != "experts" or not self.training:
            return {}
        if self._last is None:
            raise RuntimeError("auxiliary_losses() reads the last forward pass: run one first")
        logits, route = self._last
        return {"gate": self.gate_weight * F.cross_entropy(logits, route)}

    @torch.no_grad()
    def assignment(self, x: Tensor) -> Tensor:
        """The gate's expert per sample ``(B,)`` (what the fixed model routes by)."""
        return self.gate(self.features(x)).argmax(1)


def from_backbone(
    backbone: nn.Module, heads: nn.ModuleDict, taskset: TaskSet, **options: Any
) -> SingleGateMoE:
    """A ``SingleGateMoE`` over any backbone of the contract (its ``parts()``)."""
    parts = backbone.parts()
    return SingleGateMoE(
        parts.stem, parts.blocks, parts.neck, heads, taskset, channel_dim=parts.channel_dim,
        **options,
    )  # fmt: skip


def check_single_gate(num_blocks: int, branch_at: int, num_experts: int, threshold: float) -> None:
    """The config's bounds, with the fix in each message."""
    if not 1 <= branch_at <= num_blocks - 1:
        raise ValueError(
            f"model.single_gate.branch_at={branch_at} is outside the trunk: its {num_blocks} "
            f"blocks allow 1..{num_blocks - 1} (at least one shared and one branched block)"
        )
    if num_experts < 2:
        raise ValueError(f"model.single_gate.num_experts={num_experts}: a mixture needs K >= 2")
    if not 0 < threshold <= 1:
        raise ValueError(
            f"model.single_gate.threshold={threshold} must be in (0, 1] (1 = never exit early)"
        )


def _channels(prefix: nn.Module, taskset: TaskSet, channel_dim: int) -> int:
    """Channels of the prefix's output, from one blank image in eval mode (so no BatchNorm
    statistic moves)."""
    mode = prefix.training
    prefix.eval()
    with torch.no_grad():
        h = prefix(torch.zeros(1, taskset.in_channels, *taskset.image_size))
    prefix.train(mode)
    return int(h.shape[channel_dim])


def kmeans_centroids(features: Tensor, num_clusters: int, seed: int = 0) -> Tensor:
    """Stage 2: k-means centroids ``(K, C)`` of pooled prefix features ``(N, C)``
    (scikit-learn's k-means++ and Lloyd iterations; one run per seed, ours)."""
    from sklearn.cluster import KMeans

    if features.shape[0] < num_clusters:
        raise ValueError(
            f"k-means needs at least K={num_clusters} samples, got {features.shape[0]}: "
            "cluster more of the training set (model.single_gate.cluster_samples)"
        )
    km = KMeans(num_clusters, n_init=1, random_state=seed).fit(features.double().cpu().numpy())
    return torch.as_tensor(km.cluster_centers_, dtype=torch.float32)


def branch_flops(model: SingleGateMoE, image: Tensor) -> dict[str, int]:
    """FLOPs per sample of each part, from one image ``(1, C, H, W)``: ``base`` (prefix and
    base branch, what an exit costs), ``gate`` and ``expert`` (one expert branch)."""
    from mtl.models.flops import count_flops

    size = (image.shape[-2], image.shape[-1])
    mode = model.training
    model.eval()
    with torch.no_grad():
        h = model.prefix(image)
    model.train(mode)
    base = count_flops(model.prefix, image) + count_flops(_Call(model.base, size), h)
    z = pool(h, model.channel_dim)
    return {
        "base": base,
        "gate": count_flops(model.gate, z),
        "expert": count_flops(_Call(model.experts[0], size), h),
    }


def expected_flops(parts: dict[str, int], exit_rate: float) -> float:
    """Expected FLOPs per sample when ``exit_rate`` of the samples exit at the base: the
    base always runs; the gate and one expert run for the rest."""
    return parts["base"] + (1.0 - exit_rate) * (parts["gate"] + parts["expert"])


def _touch(out: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """``out`` with zero times ``module``'s parameters added: an expert no sample of this
    batch chose still gets a (zero) gradient. Data-parallel workers all-reduce gradient
    buckets of fixed layout, so an expert used on one rank and not on another would leave the
    ranks reducing different tensors (DeepSpeed's ZeRO reads it as a collective mismatch)."""
    first = next(iter(out))
    zero = sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0
    return {**out, first: out[first] + zero}


class _Call(nn.Module):
    """``branch(h, size)`` as a one-input module, for the FLOP counter."""

    def __init__(self, branch: Branch, size: tuple[int, int]) -> None:
        super().__init__()
        self.branch, self.size = branch, size
        # A new module starts in train mode, and count_flops restores this wrapper's mode,
        # recursively: take the branch's own, so counting never switches its BatchNorms.
        self.train(branch.training)

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        return self.branch(h, self.size)
