"""Fixed inference architectures from trained InterroGate gates (DESIGN.md §4.3).

``fix_interrogate`` turns a gated model into one static module, with no gate or β left,
that predicts every task in one pass and equals the *binarised* gated model (eval mode).
The task-expert MoE's fixer, ``fix_moe``, lives in ``mtl.prune_moe`` and is re-exported here.

What is read, with binary gates (g = 1: shared feature):
    * head t reads every channel of x_t^L; x_t^l reads channel c of φ_s^l where g = 1, of
      φ_t^l where g = 0; the shared block l + 1 reads all of x_s^l = Σ_t β_t x_t^l, and
      β > 0 (a softmax), so it reads every task stream. Block inputs are read in full
      (convolutions and norms mix channels). Hence every task stream is computed at every
      layer, and at layer l:
    * task block t computes only its channels with g = 0, and is removed if there are none;
    * the shared block computes only the channels some task takes (g = 1 for some t), and
      is removed if there are none; x_s^l is then not mixed at all, since nothing reads it.

How a block computes a subset S of its output channels, exactly:
    * ResNet basic block, ``relu(bn2(conv2(h)) + shortcut(x))``: conv2, bn2 and a projection
      shortcut keep only rows S (an identity shortcut becomes a channel select); conv1 and
      bn1 stay whole because conv2 reads all of h. torchvision's basic and bottleneck
      blocks alike, on their last conv and BN (conv2/bn2, conv3/bn3) and ``downsample``.
    * Transformer block, ``y = x + attn(ln1(x))``, ``out = y + fc2(gelu(fc1(ln2(y))))``:
      ln2 normalises over all of y, so attention and fc1 stay whole; fc2 keeps rows S and
      the residual adds ``y[..., S]``. Only fc2 (and, with no channel left, the whole
      block) is saved: anything more would change the arithmetic. timm's block alike, with
      its MLP's ``fc2`` and the layer scale ``ls2`` sliced.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtl.models.backbones import BasicBlock, TransformerBlock, block_type, block_type_name
from mtl.models.flops import count_flops, count_params
from mtl.models.interrogate import InterroGate, mix_shared, per_channel
from mtl.prune_moe import FixedMoE, fix_moe, moe_flops


class PruneVerificationError(AssertionError):
    """The fixed model's outputs differ from the binarised gated model's."""


class ChannelSelect(nn.Module):
    """``x.index_select(dim, index)``: an identity shortcut restricted to kept channels."""

    def __init__(self, index: Tensor, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(self.dim, self.index)


def _slice_rows(layer: nn.Conv2d | nn.Linear, keep: Tensor) -> nn.Conv2d | nn.Linear:
    """The same convolution or linear layer computing only output channels ``keep``."""
    out = copy.deepcopy(layer)
    out.weight = nn.Parameter(layer.weight.detach()[keep].clone())
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if isinstance(out, nn.Conv2d):
        out.out_channels = len(keep)
    else:
        out.out_features = len(keep)
    return out


def _slice_bn(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    """The same BatchNorm (affine and running statistics) on channels ``keep``."""
    out = copy.deepcopy(bn)
    out.num_features = len(keep)
    for name in ("weight", "bias"):
        if getattr(bn, name) is not None:
            setattr(out, name, nn.Parameter(getattr(bn, name).detach()[keep].clone()))
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            setattr(out, name, getattr(bn, name)[keep].clone())
    return out


def prune_basic_block(block: BasicBlock, keep: Tensor) -> BasicBlock:
    """A ``BasicBlock`` computing only output channels ``keep`` (see the module docstring)."""
    out = copy.deepcopy(block)
    out.conv2 = _slice_rows(block.conv2, keep)
    out.bn2 = _slice_bn(block.bn2, keep)
    if isinstance(block.shortcut, nn.Identity):
        out.shortcut = ChannelSelect(keep, dim=1)
    else:
        conv, bn = block.shortcut
        out.shortcut = nn.Sequential(_slice_rows(conv, keep), _slice_bn(bn, keep))
    return out


class PrunedTransformerBlock(nn.Module):
    """A ``TransformerBlock`` computing only embedding channels ``keep``: ``(B, N, D) ->
    (B, N, |keep|)``; attention and the first MLP layer stay whole (ln2 reads all of y)."""

    def __init__(self, block: TransformerBlock, keep: Tensor) -> None:
        super().__init__()
        self.norm1 = copy.deepcopy(block.norm1)
        self.attn = copy.deepcopy(block.attn)
        self.norm2 = copy.deepcopy(block.norm2)
        self.fc1 = copy.deepcopy(block.mlp[0])
        self.act = copy.deepcopy(block.mlp[1])
        self.fc2 = _slice_rows(block.mlp[2], keep)
        self.register_buffer("keep", keep.clone())

    def forward(self, x: Tensor) -> Tensor:
        y = x + self.attn(self.norm1(x))  # (B, N, D)
        return y.index_select(2, self.keep) + self.fc2(self.act(self.fc1(self.norm2(y))))


def prune_torchvision_block(block: nn.Module, keep: Tensor, last: str) -> nn.Module:
    """torchvision's ``BasicBlock`` (``last="2"``) or ``Bottleneck`` (``"3"``) computing
    only output channels ``keep``: its last conv and BN and its ``downsample`` keep rows
    ``keep``; without a downsample, the identity becomes a channel select. torchvision's own
    ``forward`` then runs unchanged."""
    out = copy.deepcopy(block)
    setattr(out, f"conv{last}", _slice_rows(getattr(block, f"conv{last}"), keep))
    setattr(out, f"bn{last}", _slice_bn(getattr(block, f"bn{last}"), keep))
    if block.downsample is None:
        out.downsample = ChannelSelect(keep, dim=1)
    else:
        conv, bn = block.downsample
        out.downsample = nn.Sequential(_slice_rows(conv, keep), _slice_bn(bn, keep))
    return out


class PrunedTimmBlock(nn.Module):
    """timm's ViT ``Block`` computing only embedding channels ``keep`` (as
    ``PrunedTransformerBlock``; its layer scale ``ls2`` keeps entries ``keep`` too)."""

    def __init__(self, block: nn.Module, keep: Tensor) -> None:
        super().__init__()
        self.norm1 = copy.deepcopy(block.norm1)
        self.attn = copy.deepcopy(block.attn)
        self.ls1 = copy.deepcopy(block.ls1)
        self.norm2 = copy.deepcopy(block.norm2)
        mlp = block.mlp
        self.hidden = nn.Sequential(*(copy.deepcopy(m) for m in (mlp.fc1, mlp.act, mlp.norm)))
        self.fc2 = _slice_rows(mlp.fc2, keep)
        self.ls2 = copy.deepcopy(block.ls2)
        if hasattr(self.ls2, "gamma"):  # a LayerScale: one factor per channel
            self.ls2.gamma = nn.Parameter(block.ls2.gamma.detach()[keep].clone())
        self.register_buffer("keep", keep.clone())

    def forward(self, x: Tensor) -> Tensor:
        y = x + self.ls1(self.attn(self.norm1(x)))  # (B, N, D)
        return y.index_select(2, self.keep) + self.ls2(self.fc2(self.hidden(self.norm2(y))))


# Per block type (``block_type``), how it computes a subset of its output channels.
PRUNERS: dict[str, Callable[[nn.Module, Tensor], nn.Module]] = {
    block_type_name(BasicBlock): prune_basic_block,
    block_type_name(TransformerBlock): PrunedTransformerBlock,
    "torchvision.models.resnet.BasicBlock": lambda b, k: prune_torchvision_block(b, k, "2"),
    "torchvision.models.resnet.Bottleneck": lambda b, k: prune_torchvision_block(b, k, "3"),
    "timm.models.vision_transformer.Block": PrunedTimmBlock,
}


def prune_block(block: nn.Module, keep: Tensor, channels: int) -> nn.Module | None:
    """``block`` computing only output channels ``keep`` (sorted) of ``channels``; None if
    ``keep`` is empty, an unchanged copy if it is full."""
    if len(keep) == 0:
        return None
    if len(keep) == channels:
        return copy.deepcopy(block)
    if block_type(block) not in PRUNERS:
        raise TypeError(f"no channel pruner for {block_type(block)}; add one to PRUNERS")
    device = next(block.parameters()).device  # index buffers must live beside the weights
    return PRUNERS[block_type(block)](block, keep.to(device))


class FixedStream(nn.Module):
    """Task t's stream at one layer: its pruned block (or none) and which computed channel
    lands where: ``x_t = cat([φ_s[S_s] if read, φ_t[S_t]])[:, index]`` on the channel dim.

    Args:
        block: Task block computing channels S_t (g = 0), or None if S_t is empty.
        reads_shared: Whether some channel takes the shared feature (g = 1).
        index: Position of every channel c in the concatenation, ``(C,)``; None when it is
            the identity (no permutation needed).
        channel_dim: Channel dim of the stream.
    """

    def __init__(
        self, block: nn.Module | None, reads_shared: bool, index: Tensor | None, channel_dim: int
    ) -> None:
        super().__init__()
        self.block = block
        self.reads_shared = reads_shared
        self.permute = index is not None
        self.channel_dim = channel_dim
        self.register_buffer(
            "index", index if index is not None else torch.zeros(0, dtype=torch.long)
        )

    def forward(self, phi_shared: Tensor | None, x: Tensor) -> Tensor:
        parts = [phi_shared] if self.reads_shared else []
        if self.block is not None:
            parts.append(self.block(x))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.channel_dim)
        return out.index_select(self.channel_dim, self.index) if self.permute else out


class FixedLayer(nn.Module):
    """One layer of the fixed model: the pruned shared block (or none), each task's stream,
    and the shared-stream mix with constant β (only if the next shared block exists)."""

    def __init__(
        self,
        shared: nn.Module | None,
        streams: dict[str, FixedStream],
        mix: Tensor | None,
        channel_dim: int,
    ) -> None:
        super().__init__()
        self.shared = shared
        self.streams = nn.ModuleDict(streams)
        self.mixes = mix is not None
        self.channel_dim = channel_dim
        self.register_buffer("mix", mix if mix is not None else torch.zeros(0))  # (T, C)

    def forward(self, x_shared: Tensor, streams: dict[str, Tensor]) -> tuple[Tensor, dict]:
        phi_s = self.shared(x_shared) if self.shared is not None else None
        out = {t: stream(phi_s, streams[t]) for t, stream in self.streams.items()}
        if not self.mixes:
            return x_shared, out  # nothing reads the shared stream after this layer
        first = next(iter(out.values()))
        weights = per_channel(self.mix, first.ndim, self.channel_dim)
        return mix_shared(weights, list(out.values())), out


class FixedInterroGate(nn.Module):
    """The static multi-task network read off a gated model: stem, fixed layers, per-task
    necks and heads. ``forward(x, domain=None) -> {head: output}`` like every model."""

    def __init__(
        self, stem: nn.Module, layers: list[FixedLayer], necks: nn.ModuleDict, heads: nn.ModuleDict
    ) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.necks = necks
        self.heads = heads

    def forward(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        del domain
        size = (x.shape[-2], x.shape[-1])
        shared = self.stem(x)
        streams = {t: shared for t in self.heads}
        for layer in self.layers:
            shared, streams = layer(shared, streams)
        return {t: head(self.necks[t](streams[t]), size) for t, head in self.heads.items()}


def _stream_index(takes_shared: Tensor, shared_keep: Tensor) -> Tensor | None:
    """Where each channel sits in ``cat([φ_s[shared_keep] if any taken, φ_t[~taken]])``."""
    C = takes_shared.numel()
    rank = torch.full((C,), -1, dtype=torch.long)
    rank[shared_keep] = torch.arange(len(shared_keep))
    index = torch.empty(C, dtype=torch.long)
    offset = len(shared_keep) if bool(takes_shared.any()) else 0
    index[takes_shared] = rank[takes_shared]
    index[~takes_shared] = offset + torch.arange(int((~takes_shared).sum()))
    total = offset + int((~takes_shared).sum())
    return None if total == C and torch.equal(index, torch.arange(C)) else index


def _fix_layer(model: InterroGate, layer: int, gates: Tensor, mix: Tensor | None) -> FixedLayer:
    """Prune layer ``layer`` for binary ``gates`` ``(T, C)`` (True = shared)."""
    gates = gates.cpu()
    C = gates.shape[1]
    shared_keep = gates.any(dim=0).nonzero().flatten()
    shared = prune_block(model.shared_blocks[layer], shared_keep, C)
    streams = {}
    for i, task in enumerate(model.task_blocks):
        takes = gates[i]
        block = prune_block(model.task_blocks[task][layer], (~takes).nonzero().flatten(), C)
        index = _stream_index(takes, shared_keep)
        device = model.alpha[layer].device
        streams[task] = FixedStream(
            block,
            bool(takes.any()),
            None if index is None else index.to(device),
            model.channel_dim,
        )
    return FixedLayer(shared, streams, mix, model.channel_dim)


@torch.no_grad()
def fix_interrogate(model: InterroGate) -> FixedInterroGate:
    """The static, pruned network equal to ``model`` in eval mode (binarised gates).

    The gated model is not modified; the result is in eval mode, on the same device.
    """
    gates = model.binary_gates()  # per layer (T, C_l), True = shared
    mixes = model.mix_weights()  # per layer 0 .. L-2, (T, C_l)
    layers = []
    for layer, layer_gates in enumerate(gates):
        next_shared = layer + 1 < len(gates) and bool(gates[layer + 1].any())
        mix = mixes[layer].clone() if next_shared else None
        layers.append(_fix_layer(model, layer, layer_gates, mix))
    heads = nn.ModuleDict({t: copy.deepcopy(model.heads[t]) for t in model.task_blocks})
    fixed = FixedInterroGate(copy.deepcopy(model.stem), layers, copy.deepcopy(model.necks), heads)
    return fixed.eval()


@torch.no_grad()
def verify_fixed(
    gated: nn.Module, fixed: nn.Module, batch_x: Tensor, atol: float, domain: Tensor | None = None
) -> float:
    """Max absolute output difference between the binarised gated model and ``fixed``.

    Both run in eval mode (their modes are restored afterwards) on ``(batch_x, domain)``;
    ``gated`` is any trained model with a fixer: an InterroGate, or a routed ``TaskMoE``
    (eval routing is its hard top-k), which routes by ``domain`` on a multi-domain set.

    Raises:
        PruneVerificationError: Different head names, or a difference above ``atol``
            (or not finite); the message names the task and the difference.
    """
    modes = (gated.training, fixed.training)
    try:
        expected, actual = gated.eval()(batch_x, domain), fixed.eval()(batch_x, domain)
    finally:
        gated.train(modes[0])
        fixed.train(modes[1])
    if list(expected) != list(actual):
        raise PruneVerificationError(
            f"fixed model predicts {list(actual)}, the gated model {list(expected)}"
        )
    diffs = {t: (expected[t] - actual[t]).abs().max().item() for t in expected}
    task = max(diffs, key=lambda t: diffs[t] if diffs[t] == diffs[t] else float("inf"))
    if not diffs[task] <= atol:  # also catches NaN
        raise PruneVerificationError(
            f"fixed model differs from the binarised gated model on task {task!r}: "
            f"max |difference| = {diffs[task]:.3g} > atol = {atol:g}"
        )
    return max(diffs.values())


__all__ = [
    "PRUNERS",
    "ChannelSelect",
    "FixedInterroGate",
    "FixedLayer",
    "FixedMoE",
    "FixedStream",
    "PruneVerificationError",
    "PrunedTimmBlock",
    "PrunedTransformerBlock",
    "count_flops",
    "count_params",
    "fix_interrogate",
    "fix_moe",
    "moe_flops",
    "prune_basic_block",
    "prune_block",
    "prune_torchvision_block",
    "verify_fixed",
]
