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

Either way the per-key losses are recomputed by a second pass through the heads alone, on
the inputs the heads were called with (``HeadTaps.recompute``): DeepSpeed hooks the engine's
outputs to run its own backward prologue and gradient reduction, so no extra backward may go
through them. The heads' batch-norm statistics are restored after that pass. The weights then
enter one ordinary ``engine.backward`` (``mtl.methods.combine``).
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
    """Forward pre-hooks on a model's heads: record each head's call and, for a multi-task
    model, scale what flows back from head k into the shared part by weight k.

    So one backward of Σ_k L_k gives the shared parameters Σ_k w_k ∇L_k (the method's
    combination) while each head keeps its own unweighted gradient, as in the papers,
    LibMTL and TorchJD's ``mtl_backward``.
    """

    def __init__(self, model: nn.Module, keys: Sequence[str], scale: bool) -> None:
        heads = getattr(model, "heads", None)
        if not isinstance(heads, nn.ModuleDict):
            raise TypeError(f"{type(model).__name__} has no `heads` ModuleDict to weigh")
        self.heads = heads
        self.index = {k: i for i, k in enumerate(keys)}
        self.scales = torch.ones(len(keys))
        self.scale = scale
        self.paused = False
        self.calls: dict[str, tuple] = {}  # head -> the arguments it was last called with
        self._handles = [
            head.register_forward_pre_hook(self._hook(name)) for name, head in heads.items()
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self.paused or not torch.is_grad_enabled():  # evaluation: nothing to weigh
                return None
            self.calls[name] = args
            if not self.scale:
                return None
            x = args[0]
            if self.scales.device != x.device:
                self.scales = self.scales.to(x.device)
            return (_ScaleGrad.apply(x, self.scales, self.index[name]), *args[1:])

        return hook

    def recompute(self) -> dict[str, Tensor]:
        """Every head's output again, from the inputs of its last call (a graph of its own
        from there on). Batch norms normalise by the batch as in training but leave their
        running statistics alone: the first pass already updated them, and its backward
        still needs them unmodified."""
        norms = [
            m
            for m in self.heads.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        self.paused = True
        for m in norms:
            m.track_running_stats = False
        try:
            return {name: self.heads[name](*args) for name, args in self.calls.items()}
        finally:
            self.paused = False
            for m in norms:
                m.track_running_stats = True

    def common_input(self) -> Tensor:
        """The one tensor every head read (hard sharing), or a clear error."""
        inputs = {id(args[0]): args[0] for args in self.calls.values()}
        if len(inputs) != 1:
            raise ValueError(
                "tasks.gradients=representation needs one representation that every head "
                "reads (hard sharing); this model's heads read different tensors: use "
                "tasks.gradients=params"
            )
        return next(iter(inputs.values()))

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


def representation_gram(losses: Sequence[Tensor], representation: Tensor) -> Tensor:
    """Gramian of the per-key gradients w.r.t. ``representation`` (the heads' common input),
    over all ranks. The backward of each key stops there: it never enters the trunk."""
    rows = [
        torch.autograd.grad(loss, representation, retain_graph=True)[0].reshape(-1).float()
        for loss in losses
    ]
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
