"""Per-task (multi-task) and per-domain (multi-domain) losses, keyed by ``taskset.loss_keys``.

Choices **(ours)**: cross-entropy for classification, per-pixel cross-entropy for dense
classification (pixels labelled ``IGNORE_INDEX`` do not count), and mean squared error over
every pixel and channel for dense regression. Losses are scalars still attached to the graph;
nothing here calls ``.backward()`` or ``.item()``, so the engine owns backward and no host
sync happens in the step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

IGNORE_INDEX = -100  # label of pixels (or samples) without ground truth; torch's default


def head_loss(spec: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
    """The mean loss of one head over a whole batch.

    Args:
        spec: The head's task.
        output: ``(B, K)`` logits, ``(B, K, H, W)`` logits, or ``(B, C, H, W)`` values.
        target: ``(B,)`` or ``(B, H, W)`` int64 labels, or ``(B, C, H, W)`` float values.
    """
    if spec.kind in (CLASSIFICATION, DENSE_CLASSIFICATION):
        return F.cross_entropy(output, target, ignore_index=IGNORE_INDEX)
    if spec.kind == DENSE_REGRESSION:
        return F.mse_loss(output, target)
    raise ValueError(f"no loss for task kind {spec.kind!r} of head {spec.name!r}")


def per_sample_loss(spec: TaskSpec, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Summed loss per sample and the number of loss terms per sample.

    Dividing the sums of a group of samples by the sum of their counts gives that group's
    mean loss with the same normalisation as ``head_loss`` (e.g. per valid pixel).

    Returns:
        ``(sums, counts)``, both ``(B,)`` float.
    """
    if spec.kind in (CLASSIFICATION, DENSE_CLASSIFICATION):
        terms = F.cross_entropy(output, target, ignore_index=IGNORE_INDEX, reduction="none")
        valid = (target != IGNORE_INDEX).to(terms.dtype)
        # (B,) for classification; (B, H, W) -> (B,) for dense classification
        return terms.reshape(len(terms), -1).sum(1), valid.reshape(len(valid), -1).sum(1)
    if spec.kind == DENSE_REGRESSION:
        terms = F.mse_loss(output, target, reduction="none").flatten(1)  # (B, C*H*W)
        return terms.sum(1), torch.full_like(terms[:, 0], terms.shape[1])
    raise ValueError(f"no loss for task kind {spec.kind!r} of head {spec.name!r}")


def _domain_losses(
    outputs: dict[str, Tensor], batch: dict[str, Any], taskset: TaskSet
) -> dict[str, Tensor]:
    """One mean loss per domain over that domain's samples in the batch."""
    spec = taskset.heads[0]  # multi-domain sets share one head
    sums, counts = per_sample_loss(spec, outputs[spec.name], batch["targets"][spec.name])
    domain = batch["domain"]
    losses: dict[str, Tensor] = {}
    for index, name in enumerate(taskset.domains):
        mask = (domain == index).to(sums.dtype)  # (B,)
        # An absent domain gives 0 / 1 = 0 that is still a function of the outputs, so every
        # parameter gets a (zero) gradient, as DeepSpeed ZeRO's bucketing requires.
        losses[name] = (sums * mask).sum() / (counts * mask).sum().clamp(min=1)
    return losses


def task_losses(
    outputs: dict[str, Tensor], batch: dict[str, Any], taskset: TaskSet
) -> dict[str, Tensor]:
    """Scalar losses keyed by ``taskset.loss_keys``.

    Multi-task: one loss per head, the mean over the batch (``head_loss``). Multi-domain:
    one loss per domain, the mean over the samples of that domain in the batch; a domain
    absent from the batch gets a zero that stays connected to the graph.

    Args:
        outputs: Head name -> model output.
        batch: Has ``"targets"`` (head name -> target) and, for multi-domain sets,
            ``"domain"``: int64 ``(B,)`` indexes into ``taskset.domains``.
        taskset: The task set the model trains on.

    Raises:
        KeyError: A head's output or target, or the batch's ``"domain"``, is missing.
    """
    _check_present(outputs, batch, taskset)
    if taskset.multi_domain:
        return _domain_losses(outputs, batch, taskset)
    return {
        spec.name: head_loss(spec, outputs[spec.name], batch["targets"][spec.name])
        for spec in taskset.heads
    }


def domain_counts(batch: dict[str, Any], taskset: TaskSet) -> dict[str, Tensor]:
    """Samples per domain in the batch, as int64 scalar tensors keyed by domain name.

    Used by ``tasks.weighting: sampling``, where pooling every sample equally means weighting
    domain ``d``'s mean loss by ``n_d / B``. Stays on the batch's device (no host sync).
    """
    if not taskset.multi_domain:
        raise ValueError(f"{taskset.name} is a multi-task set: it has no domains to count")
    counts = torch.bincount(batch["domain"], minlength=len(taskset.domains))
    return {name: counts[i] for i, name in enumerate(taskset.domains)}


def _check_present(outputs: dict[str, Tensor], batch: dict[str, Any], taskset: TaskSet) -> None:
    for spec in taskset.heads:
        if spec.name not in outputs:
            raise KeyError(f"the model gave no output for head {spec.name!r}: {list(outputs)}")
        if spec.name not in batch["targets"]:
            raise KeyError(f"the batch has no target for head {spec.name!r}")
    if taskset.multi_domain and "domain" not in batch:
        raise KeyError(f"{taskset.name} is multi-domain: the batch needs a 'domain' tensor")
