"""One training or evaluation step, in pure PyTorch.

Nothing here knows about Ray, DeepSpeed or MLflow: the engine owns ``backward`` and the
optimizer, the loop owns distribution. Keeping the step pure lets the throughput benchmark
run the very same code in a plain single-process loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mtl.losses import domain_counts, scalarize, task_losses
from mtl.metrics import MetricAccumulator
from mtl.tasks import TaskSet

Batch = dict[str, Any]


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype = torch.float32) -> Batch:
    """Move a batch (nested dicts of tensors) to ``device``; the image is cast to ``dtype``."""
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        else:
            out[key] = value.to(device, non_blocking=True)
    out["image"] = out["image"].to(dtype)
    return out


def cast_outputs(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Losses and metrics run in fp32 even when the model runs in bf16/fp16."""
    return {k: v.float() for k, v in outputs.items()}


def forward_losses(model: nn.Module, batch: Batch, taskset: TaskSet) -> dict[str, Tensor]:
    """Forward pass: the per-key losses (attached), then the model's auxiliary losses under
    ``aux/<name>`` (InterroGate's compute budget, MoE balance), which add unweighted."""
    outputs = cast_outputs(model(batch["image"], batch.get("domain")))
    losses = task_losses(outputs, batch, taskset)
    auxiliary = getattr(model, "auxiliary_losses", None)
    for name, value in (auxiliary() if auxiliary is not None else {}).items():
        losses[f"aux/{name}"] = value
    return losses


def sampling_total(losses: dict[str, Tensor], batch: Batch, taskset: TaskSet) -> Tensor:
    """``tasks.weighting: sampling``: every sample counts equally (the weights already acted
    as domain sampling probabilities), so domain d's loss counts by its share of the batch."""
    counts = domain_counts(batch, taskset)
    n = batch["image"].shape[0]
    return sum(losses[k] * (counts[k] / n) for k in taskset.loss_keys)


def compute_loss(
    model: nn.Module,
    batch: Batch,
    taskset: TaskSet,
    weights: dict[str, float],
    weighting: str = "loss",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward pass and scalarized loss.

    Args:
        model: Maps ``(image, domain)`` to a dict of head outputs.
        batch: A batch in the data contract of ``mtl.data``.
        taskset: The task set the model trains on.
        weights: Normalised weight per loss key (``taskset.loss_keys``).
        weighting: "loss" sums ``w_k * L_k``; "sampling" (multi-domain) pools every sample
            equally, because the weights already acted as domain sampling probabilities.

    Returns:
        The scalar total loss and the per-key losses (still attached to the graph), plus
        the model's auxiliary losses under ``aux/<name>``.
    """
    losses = forward_losses(model, batch, taskset)
    task = {k: losses[k] for k in taskset.loss_keys}
    total = sampling_total(task, batch, taskset) if weighting == "sampling" else None
    total = scalarize(task, weights) if total is None else total
    # Regularisers add to the scalarized task loss, unweighted (their weights live in config).
    return total + auxiliary_total(losses), losses


def auxiliary_total(losses: dict[str, Tensor]) -> Tensor | float:
    """The sum of the ``aux/<name>`` losses (0 without any)."""
    return sum(v for k, v in losses.items() if k.startswith("aux/"))


@torch.no_grad()
def gradient_norm(model: nn.Module) -> Tensor:
    """L2 norm of every gradient of ``model`` (0 without any), on device, no host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Any,
    taskset: TaskSet,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int = 0,
) -> MetricAccumulator:
    """Run the model over ``batches`` and return the filled (local) metric accumulator."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(taskset)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = to_device(batch, device, dtype)
        acc.update(cast_outputs(model(batch["image"], batch.get("domain"))), batch)
    model.train(was_training)
    return acc
