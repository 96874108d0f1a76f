"""InterroGate: learned per-channel sharing between a shared and per-task backbones.

DESIGN.md §4.3. Every backbone block l has a shared block f_s^l and, per task t, a task
block f_t^l of the same shape. With gates g = G(α) ∈ [0, 1]^C (1 = shared feature):

    φ_s^l = f_s^l(x_s^{l-1}),   φ_t^l = f_t^l(x_t^{l-1})
    x_t^l = g_t^l ⊙ φ_s^l + (1 − g_t^l) ⊙ φ_t^l                 (task stream)
    x_s^l = Σ_t β_t^l ⊙ x_t^l,  β^l = softmax over tasks (ours)  (shared stream)

x_s^0 = x_t^0 is the shared stem's output, and head t reads its own stream x_t^L. The
channel is dim 1 of a conv feature map and the embedding dim of ViT tokens. A hinge on each
task's rate of task-specific compute r_t keeps compute within a budget.

r_t counts what pruning will really keep (ours). A task block computes only its open
channels' rows of its *last* layer (conv2 and a projection shortcut; a transformer's fc2),
but the layers before run whole as soon as one channel is open (``mtl.prune``). So each
block's FLOPs F_l = A_l + R_l split into an all-or-nothing part A_l and a per-row part R_l:

    r_t = Σ_l (A_l · open_t^l + R_l · mean_c(1 − g_{t,c}^l)) / Σ_l F_l

where open_t^l is 1 if any channel is task-specific. Its value is read off the binarised
gates (the cost the fixed model will have) and its gradient is that of mean_c(1 − g), so the
penalty presses on every channel of an open block (straight through).

Gates exist per *head*. A multi-domain task set has one head, so the model has one task
stream that is also the shared stream (β = 1): each layer then mixes two parallel blocks per
channel, and the domain is ignored, as in hard sharing.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from mtl.config import ModelConfig
from mtl.models.backbones import BasicBlock, TransformerBlock, block_type, block_type_name
from mtl.models.flops import count_flops_by_module
from mtl.models.fused import KERNELS, use_triton
from mtl.models.gates import binarize, build_gate
from mtl.tasks import TaskSet


def per_channel(values: Tensor, ndim: int, channel_dim: int) -> Tensor:
    """Reshape ``(..., C)`` so that it broadcasts over a stream of ``ndim`` dims on its
    channel dim, e.g. ``(T, C) -> (T, 1, C, 1, 1)`` for ``(B, C, h, w)`` feature maps."""
    shape = [values.shape[-1] if i == channel_dim else 1 for i in range(ndim)]
    return values.reshape(*values.shape[:-1], *shape)


def gate_mix(gate: Tensor, phi_shared: Tensor, phi_task: Tensor) -> Tensor:
    """``g ⊙ φ_s + (1 − g) ⊙ φ_t``; with g ∈ {0, 1} this is exactly one of the two (the
    form ``φ_t + g ⊙ (φ_s − φ_t)`` would round), which is what pruning reproduces."""
    return gate * phi_shared + (1 - gate) * phi_task


def mix_shared(weights: Tensor, streams: list[Tensor]) -> Tensor:
    """``Σ_t w_t ⊙ x_t`` for ``weights`` of shape ``(T, *broadcastable)`` (no (T, ...) stack
    is materialised). The fixed model calls the same function, so both round alike."""
    out = weights[0] * streams[0]
    for w, x in zip(weights[1:], streams[1:], strict=True):
        out = out + w * x
    return out


# Per block type (``block_type``), the submodules whose output rows pruning slices per open
# channel; the rest of the block runs whole while any channel is open (see ``mtl.prune``).
ROW_SLICED: dict[str, tuple[str, ...]] = {
    block_type_name(BasicBlock): ("conv2", "shortcut"),
    block_type_name(TransformerBlock): ("mlp.2",),
    "torchvision.models.resnet.BasicBlock": ("conv2", "downsample"),
    "torchvision.models.resnet.Bottleneck": ("conv3", "downsample"),
    "timm.models.vision_transformer.Block": ("mlp.fc2",),
}


class InterroGate(nn.Module):
    """Shared and task blocks mixed per channel by learned gates (DESIGN.md §4.3).

    Args:
        stem: Shared stem, image ``(B, C_in, H, W)`` -> stream.
        shared_blocks: The L shared blocks, stream -> stream.
        task_blocks: Head name -> its L task blocks, each shaped like the shared one.
        necks: Head name -> stream-to-feature-map module read by that head.
        heads: Head name -> head, called as ``head(features, size)``.
        gate: Gate function (see ``mtl.models.gates``), ``gate(alpha) -> g``.
        taskset: The tasks; gates exist per head, in ``taskset.heads`` order.
        channel_dim: The stream dim that gates act on (1 for maps, 2 for tokens).
        tau: Head name -> target rate τ_t of task-specific compute, in [0, 1].
        lambda_s: Weight λ_s of the budget hinge.
        gate_init: Initial gate logit α for every gate (> 0 starts shared).
    """

    def __init__(
        self,
        stem: nn.Module,
        shared_blocks: list[nn.Module],
        task_blocks: dict[str, list[nn.Module]],
        necks: dict[str, nn.Module],
        heads: nn.ModuleDict,
        gate: nn.Module,
        taskset: TaskSet,
        *,
        channel_dim: int,
        tau: dict[str, float],
        lambda_s: float = 1.0,
        gate_init: float = 1.0,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"model.kernels={kernels!r}: use one of {KERNELS}")
        self.kernels = kernels
        self._order = [h.name for h in taskset.heads]
        for what, keys in (("heads", heads), ("task_blocks", task_blocks), ("necks", necks)):
            if sorted(keys) != sorted(self._order):
                raise ValueError(f"{what} {list(keys)} do not match the task set's {self._order}")
        if any(len(task_blocks[t]) != len(shared_blocks) for t in self._order):
            raise ValueError("every task needs as many task blocks as there are shared blocks")
        if sorted(tau) != sorted(self._order) or not all(0 <= v <= 1 for v in tau.values()):
            raise ValueError(f"tau must give every head in {self._order} a rate in [0, 1]: {tau}")
        if lambda_s < 0:
            raise ValueError(f"model.interrogate.lambda_s={lambda_s} must be >= 0")
        self.taskset = taskset
        self.stem = stem
        self.shared_blocks = nn.ModuleList(shared_blocks)
        self.task_blocks = nn.ModuleDict({t: nn.ModuleList(task_blocks[t]) for t in self._order})
        self.necks = nn.ModuleDict({t: necks[t] for t in self._order})
        self.heads = heads
        self.gate = gate
        self.channel_dim = channel_dim
        self.lambda_s = lambda_s
        channels, self.block_flops, row_flops = self._probe(taskset)
        T, L = len(self._order), len(shared_blocks)
        self.alpha = nn.ParameterList(nn.Parameter(torch.full((T, c), gate_init)) for c in channels)
        # x_s^L is read by nothing, so the last layer has no β (it would get no gradient).
        self.beta = nn.ParameterList(nn.Parameter(torch.zeros(T, c)) for c in channels[: L - 1])
        total = sum(self.block_flops)
        # Normalised weights A_l / Σ F and R_l / Σ F rather than raw FLOPs: they survive a
        # cast to bf16.
        whole = torch.tensor(
            [(f - r) / total for f, r in zip(self.block_flops, row_flops, strict=True)]
        )
        rows = torch.tensor([r / total for r in row_flops])
        self.register_buffer("whole_weights", whole, persistent=False)  # (L,)
        self.register_buffer("row_weights", rows, persistent=False)  # (L,)
        self.register_buffer("tau", torch.tensor([tau[t] for t in self._order]), persistent=False)

    @torch.no_grad()
    def _probe(self, taskset: TaskSet) -> tuple[list[int], list[int], list[int]]:
        """Channels, FLOPs and row-sliced FLOPs (``ROW_SLICED``; for one image) of every
        block, from a dummy forward pass."""
        param = next(self.stem.parameters())  # probe where (and in what dtype) the stem lives
        shape = (1, taskset.in_channels, *taskset.image_size)
        x = torch.zeros(shape, device=param.device, dtype=param.dtype)
        was_training = self.stem.training
        h = self.stem.eval()(x)
        self.stem.train(was_training)
        channels, flops, rows = [], [], []
        for block in self.shared_blocks:
            by_module = count_flops_by_module(block, h)
            flops.append(by_module[""])
            if block_type(block) not in ROW_SLICED:
                raise TypeError(
                    f"InterroGate cannot gate a {block_type(block)}: add its row-sliced "
                    "submodules to mtl.models.interrogate.ROW_SLICED and a pruner to "
                    "mtl.prune.PRUNERS"
                )
            sliced = ROW_SLICED[block_type(block)]
            rows.append(sum(by_module.get(name, 0) for name in sliced))
            block_training = block.training
            h = block.eval()(h)
            block.train(block_training)
            channels.append(h.shape[self.channel_dim])
        return channels, flops, rows

    def _per_channel(self, values: Tensor, stream: Tensor) -> Tensor:
        return per_channel(values, stream.ndim, self.channel_dim)

    def gate_values(self) -> list[Tensor]:
        """G(α) per layer, each ``(T, C_l)``: differentiable in training, binary in eval."""
        return [self.gate(alpha) for alpha in self.alpha]

    def forward_features(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        """Each head's feature map ``(B, C, h, w)`` from its own task stream."""
        del domain  # gates are per head; see the module docstring for multi-domain sets
        shared = self.stem(x)
        streams = {t: shared for t in self._order}
        fused = use_triton(self.kernels, shared)
        for layer, gates in enumerate(self.gate_values()):
            phi_s = self.shared_blocks[layer](shared)
            if fused:
                tasks = [self.task_blocks[t][layer](streams[t]) for t in self._order]
                beta = torch.softmax(self.beta[layer], 0) if layer < len(self.beta) else None
                mixed, next_shared = self._fused_mix(gates, beta, phi_s, tasks)
                streams = dict(zip(self._order, mixed, strict=True))
                shared = next_shared if next_shared is not None else shared
                continue
            g = self._per_channel(gates, phi_s)  # (T, 1, C, 1, 1) or (T, 1, 1, D)
            streams = {
                t: gate_mix(g[i], phi_s, self.task_blocks[t][layer](streams[t]))
                for i, t in enumerate(self._order)
            }
            if layer < len(self.beta):
                beta = self._per_channel(torch.softmax(self.beta[layer], dim=0), phi_s)
                shared = mix_shared(beta, list(streams.values()))
        return {t: self.necks[t](streams[t]) for t in self._order}

    def _fused_mix(
        self, gates: Tensor, beta: Tensor | None, phi_s: Tensor, tasks: list[Tensor]
    ) -> tuple[list[Tensor], Tensor | None]:
        """One layer's ``gate_mix`` of every task stream and ``mix_shared`` through the
        Triton kernel (kernels/gate_mix.py) on a ``(P, C, Q)`` view of the streams."""
        from kernels.gate_mix import gate_mix as fused_gate_mix

        shape, cd = phi_s.shape, self.channel_dim
        P, C = math.prod(shape[:cd]), shape[cd]
        view = (P, C, math.prod(shape[cd + 1 :]))
        stacked = torch.stack(tasks).reshape(len(tasks), *view)  # one copy of the T maps
        out, shared = fused_gate_mix(gates, beta, phi_s.reshape(view), stacked)
        streams = [o.view(shape) for o in out]
        return streams, (shared.view(shape) if shared is not None else None)

    def forward_head(self, features: dict[str, Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
        """Head t on feature map t; ``size`` is the input's ``(H, W)``."""
        return {t: self.heads[t](features[t], size) for t in self._order}

    def forward(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        """Predict every head: images ``(B, C, H, W)`` -> head name -> output."""
        size = (x.shape[-2], x.shape[-1])
        return self.forward_head(self.forward_features(x, domain), size)

    def set_progress(self, fraction: float) -> None:
        """Training progress (step / total steps) in [0, 1]; drives the gate anneal."""
        self.gate.set_progress(fraction)

    def _rates(self) -> Tensor:
        """r_t for every task, ``(T,)`` (the formula is in the module docstring).

        The value is always that of the *binarised* gates, i.e. the cost the fixed model
        will have; the gradient is that of the mean of the training gates (straight
        through). With soft gates a max over channels would read ~1 for every block until
        all of its gates saturate, and the hinge would close everything.
        """
        soft = torch.stack([(1 - g).mean(dim=1) for g in self.gate_values()])  # (L, T)
        hard = [(alpha <= 0).to(soft.dtype) for alpha in self.alpha]  # 1 = task-specific
        surrogate = soft - soft.detach()  # 0 forward, the soft mean's gradient backward
        open_ = torch.stack([h.amax(dim=1) for h in hard]) + surrogate
        rows = torch.stack([h.mean(dim=1) for h in hard]) + surrogate
        whole_w = self.whole_weights.to(soft.dtype)[:, None]
        rows_w = self.row_weights.to(soft.dtype)[:, None]
        return (whole_w * open_ + rows_w * rows).sum(dim=0)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate logits α and mixing logits β (the optimizer gives them their own
        learning rate and no weight decay: ``model.interrogate.gate_lr_scale``)."""
        return [*self.alpha, *self.beta]

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """``{"sparsity": λ_s · Σ_t max(0, r_t − τ_t)}``, differentiable in α."""
        excess = torch.relu(self._rates() - self.tau.to(self.alpha[0].dtype))
        return {"sparsity": self.lambda_s * excess.sum()}

    def task_rates(self) -> dict[str, Tensor]:
        """Head name -> r_t (detached, for logging)."""
        rates = self._rates().detach()
        return {t: rates[i] for i, t in enumerate(self._order)}

    @torch.no_grad()
    def gate_pattern(self) -> dict[str, list[float]]:
        """Head name -> per layer, the fraction of channels using the task-specific feature
        under the binarised gates (0 = fully shared layer, 1 = fully task-specific)."""
        closed = [(1 - binarize(alpha)).mean(dim=1).tolist() for alpha in self.alpha]  # L x T
        return {t: [layer[i] for layer in closed] for i, t in enumerate(self._order)}

    @torch.no_grad()
    def binary_gates(self) -> list[Tensor]:
        """Binarised gates per layer, each ``(T, C_l)`` bool, True = shared feature."""
        return [alpha > 0 for alpha in self.alpha]

    @torch.no_grad()
    def mix_weights(self) -> list[Tensor]:
        """β^l after the softmax, each ``(T, C_l)``, for layers 0 .. L-2."""
        return [torch.softmax(beta, dim=0) for beta in self.beta]

    def load_task_blocks(self, state_dicts: dict[str, dict[str, Tensor]]) -> None:
        """Start task blocks from single-task backbones (DESIGN.md §4.3).

        ``state_dicts[t]`` is a single-task model's *backbone* state dict (for
        ``HardSharing``, ``model.backbone.state_dict()``) of the same backbone config. Key
        mapping: ``blocks.<l>.<rest>`` -> ``task_blocks[t][l].<rest>``; any other key that
        names a tensor of task t's neck (ViT: ``norm.*``) -> ``necks[t]``; the stem's keys
        (``stem.*``; ViT ``patch_embed.*``, ``pos_embed``) are ignored, as the stem is shared.

        Raises:
            KeyError: A task that is not a head, or a block missing some of its keys.
        """
        for task, state in state_dicts.items():
            if task not in self.task_blocks:
                raise KeyError(f"load_task_blocks: {task!r} is not a head of {self._order}")
            blocks = self.task_blocks[task]
            per_block = _split_block_keys(state, len(blocks), task)
            for layer, block in enumerate(blocks):
                missing = set(block.state_dict()) - set(per_block[layer])
                if missing:
                    raise KeyError(f"load_task_blocks[{task!r}]: blocks.{layer} lacks {missing}")
                block.load_state_dict(per_block[layer])
            neck_keys = set(self.necks[task].state_dict())
            self.necks[task].load_state_dict({k: v for k, v in state.items() if k in neck_keys})


def _split_block_keys(state: dict[str, Tensor], depth: int, task: str) -> list[dict[str, Tensor]]:
    """``blocks.<l>.<rest>`` keys of a backbone state dict, grouped per block as ``<rest>``."""
    per_block: list[dict[str, Tensor]] = [{} for _ in range(depth)]
    for key, value in state.items():
        parts = key.split(".", 2)
        if parts[0] != "blocks" or len(parts) != 3:
            continue
        if int(parts[1]) >= depth:
            raise KeyError(f"load_task_blocks[{task!r}]: {key} but the model has {depth} blocks")
        per_block[int(parts[1])][parts[2]] = value
    return per_block


def interrogate(cfg: ModelConfig, taskset: TaskSet) -> InterroGate:
    """InterroGate from config: ``model.backbone`` is cut into a shared stem and blocks;
    every head gets copies of the blocks (the shared initialisation) and of the neck.

    ``model.interrogate.init_from`` is not read here (the pure core does no checkpoint I/O):
    whoever loads single-task checkpoints passes them to ``load_task_blocks``.
    """
    # Imported here because the package __init__, which holds the registries, imports us.
    from mtl.models import build_backbone, build_heads

    icfg = cfg.interrogate
    names = [h.name for h in taskset.heads]
    unknown = sorted(set(icfg.tau_per_task) - set(names))
    if unknown:
        raise ValueError(f"model.interrogate.tau_per_task: {unknown} are not heads of {names}")
    backbone = build_backbone(cfg, taskset)
    parts = backbone.parts()
    return InterroGate(
        parts.stem,
        parts.blocks,
        {t: [copy.deepcopy(b) for b in parts.blocks] for t in names},
        {t: copy.deepcopy(parts.neck) for t in names},
        build_heads(cfg, taskset, backbone),
        build_gate(icfg),
        taskset,
        channel_dim=parts.channel_dim,
        tau={t: icfg.tau_per_task.get(t, icfg.tau) for t in names},
        lambda_s=icfg.lambda_s,
        gate_init=icfg.gate_init,
        kernels=cfg.kernels,
    )
