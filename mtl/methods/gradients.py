"""Per-key gradients for the gradient methods, reduced to their Gramian over all ranks.

Two variants (``tasks.gradients``):

* ``params``: the gradient of each key's loss w.r.t. the shared parameters (all but the
  heads for a multi-task model, all of them for a multi-domain one): one backward per key.
  The T×d gradients are averaged over the ranks *before* the Gramian, so the method combines
  the averaged gradients, not each rank's own.
* ``representation``: the gradient w.r.t. the heads' common input (the trunk's output, hard
  sharing only): one backward through the heads per key, none through the trunk. The
  representation of the global batch is the ranks' representations stacked, so its Gramian
  is the sum of the ranks' Gramians, each scaled by 1/R² (each rank's loss is 1/R of the mean).

Either way the weights then enter one ordinary backward (``mtl.methods.combine``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtl.methods.base import all_reduce_mean, world_size


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scales[index]`` as it is then."""

    @staticmethod
    def forward(ctx, x: Tensor, scales: Tensor, index: int) -> Tensor:
        ctx.scales, ctx.index = scales, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad * ctx.scales[ctx.index].to(grad.dtype), None, None


class HeadTaps:
    """Forward pre-hooks on a model's heads: record each head's input and, for a multi-task
    model, scale what flows back from head k into the shared part by weight k.

    So one backward of Σ_k L_k gives the shared parameters Σ_k w_k ∇L_k (the method's
    combination) while each head keeps its own unweighted gradient, as in the papers,
    LibMTL and TorchJD's ``mtl_backward``.
    """

    def __init__(self, model: nn.Module, keys: Sequence[str], scale: bool) -> None:
        heads = getattr(model, "heads", None)
        if not isinstance(heads, nn.ModuleDict):
            raise TypeError(f"{type(model).__name__} has no `heads` ModuleDict to weigh")
        self.index = {k: i for i, k in enumerate(keys)}
        self.scales = torch.ones(len(keys))
        self.scale = scale
        self.raw: dict[str, Tensor] = {}  # head -> the tensor it was called with
        self.inputs: dict[str, Tensor] = {}  # head -> what it read (after the scale)
        self._handles = [
            head.register_forward_pre_hook(self._hook(name)) for name, head in heads.items()
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not torch.is_grad_enabled():  # evaluation: nothing to weigh or keep
                return None
            x = self.raw[name] = args[0]
            if self.scale:
                if self.scales.device != x.device:
                    self.scales = self.scales.to(x.device)
                x = _ScaleGrad.apply(x, self.scales, self.index[name])
            self.inputs[name] = x
            return (x, *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _flat(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, like, strict=True)
        ]
    )


def parameter_gram(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> Tensor:
    """Gramian of the per-key gradients on ``shared``, averaged over the ranks first."""
    rows = [
        _flat(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), shared)
        for loss in losses
    ]
    jacobian = all_reduce_mean(torch.stack(rows))  # (T, d)
    return jacobian @ jacobian.T


def representation_gram(
    losses: Sequence[Tensor], keys: Sequence[str], taps: HeadTaps, multi_domain: bool
) -> Tensor:
    """Gramian of the per-key gradients w.r.t. the heads' common input, over all ranks."""
    if len({id(x) for x in taps.raw.values()}) != 1:
        raise ValueError(
            "tasks.gradients=representation needs one representation that every head reads "
            "(hard sharing); this model's heads read different tensors: use "
            "tasks.gradients=params"
        )
    rows = []
    for key, loss in zip(keys, losses, strict=True):
        if multi_domain:  # every head serves every domain: the gradient at the shared input
            (grad,) = torch.autograd.grad(loss, next(iter(taps.raw.values())), retain_graph=True)
        else:  # only head k reads its (scaled) copy of the representation
            (grad,) = torch.autograd.grad(loss, taps.inputs[key], retain_graph=True)
        rows.append(grad.reshape(-1).float())
    local = torch.stack(rows)  # (T, B * features) of this rank's samples
    gram = local @ local.T
    world = world_size()
    if world > 1:
        dist.all_reduce(gram)
        gram = gram / world**2
    return gram


def shared_parameters(model: nn.Module, multi_domain: bool) -> list[Tensor]:
    """Parameters more than one loss key trains: all but the heads (multi-task), or all."""
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and (multi_domain or not name.startswith("heads."))
    ]
