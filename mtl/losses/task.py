"""Per-task (multi-task) and per-domain (multi-domain) losses, keyed by ``taskset.loss_keys``.

Every kind reduces to per-element loss terms and per-element weights (1 for a term that
counts, 0 for an unlabelled sample or pixel); a head's loss is ``Σ terms / max(Σ weights, 1)``,
so a batch with nothing labelled gives a zero that is still a function of the outputs (every
parameter gets a gradient, as DeepSpeed ZeRO's bucketing requires). Choices **(ours)**:

* ``classification`` / ``dense_classification``: cross-entropy; label ``IGNORE_INDEX``
  does not count.
* ``dense_regression``: squared error, mean over every pixel and channel.
* ``binary``: BCE with logits; a target < 0 is unlabelled.
* ``depth``: L1 over pixels with a measurement (target > 0), as LibMTL.
* ``normals``: 1 − cos(prediction, target) per pixel, both L2-normalised (LibMTL normalises
  only the prediction; for unit targets this is the same); an all-zero target is unlabelled.
* ``saliency``: BCE with logits; a target outside [0, 1] (e.g. 255) is unlabelled.

Losses are scalars still attached to the graph; nothing here calls ``.backward()`` or
``.item()``, and nothing indexes with a boolean mask, so the engine owns backward and no host
sync happens in the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
    TaskSet,
    TaskSpec,
)

IGNORE_INDEX = -100  # label of pixels (or samples) without ground truth; torch's default


def _cross_entropy_terms(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    terms = F.cross_entropy(output, target, ignore_index=IGNORE_INDEX, reduction="none")
    return terms, (target != IGNORE_INDEX).to(terms.dtype)  # (B,) or (B, H, W)


def _squared_error_terms(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    terms = F.mse_loss(output, target, reduction="none")  # (B, C, H, W)
    return terms, torch.ones_like(terms)


def _bce_terms(output: Tensor, target: Tensor, labelled: Tensor) -> tuple[Tensor, Tensor]:
    weight = labelled.to(output.dtype)
    # The clamp keeps the (weight-0) terms of unlabelled values finite, e.g. 255 or -1.
    bce = F.binary_cross_entropy_with_logits(output, target.clamp(0, 1), reduction="none")
    return bce * weight, weight


def _binary_terms(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    return _bce_terms(output, target, target >= 0)  # (B,)


def _saliency_terms(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    return _bce_terms(output, target, (target >= 0) & (target <= 1))  # (B, 1, H, W)


def _depth_terms(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    valid = target > 0  # 0 = no measurement (so is NaN, which would poison a product)
    weight = valid.to(output.dtype)
    return (output - torch.where(valid, target, 0.0)).abs() * weight, weight  # (B, 1, H, W)


def _normals_terms(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    weight = (target.abs().sum(1) > 0).to(output.dtype)  # (B, H, W); all-zero = unlabelled
    cosine = (F.normalize(output, dim=1) * F.normalize(target, dim=1)).sum(1)  # (B, H, W)
    return (1 - cosine) * weight, weight


# kind -> (output, target) -> (loss terms, weights), same shape, batch first
LOSS_TERMS: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    CLASSIFICATION: _cross_entropy_terms,
    DENSE_CLASSIFICATION: _cross_entropy_terms,
    DENSE_REGRESSION: _squared_error_terms,
    BINARY: _binary_terms,
    DEPTH: _depth_terms,
    NORMALS: _normals_terms,
    SALIENCY: _saliency_terms,
}


def _terms(spec: TaskSpec, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if spec.kind not in LOSS_TERMS:
        raise ValueError(f"no loss for task kind {spec.kind!r} of head {spec.name!r}")
    return LOSS_TERMS[spec.kind](output, target)


def head_loss(spec: TaskSpec, output: Tensor, target: Tensor) -> Tensor:
    """The mean loss of one head over the labelled samples or pixels of a batch.

    Args:
        spec: The head's task.
        output: The head's output, of the shape ``mtl.tasks`` gives for its kind.
        target: The batch's target for the head, of the shape and dtype of its kind.

    Returns:
        A scalar; 0 (still attached to the graph) when nothing in the batch is labelled.
    """
    terms, weight = _terms(spec, output, target)
    return terms.sum() / weight.sum().clamp(min=1)


def per_sample_loss(spec: TaskSpec, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Summed loss per sample and the number of loss terms per sample.

    Dividing the sums of a group of samples by the sum of their counts gives that group's
    mean loss with the same normalisation as ``head_loss`` (e.g. per valid pixel).

    Returns:
        ``(sums, counts)``, both ``(B,)`` float.
    """
    terms, weight = _terms(spec, output, target)
    B = terms.shape[0]
    return terms.reshape(B, -1).sum(1), weight.reshape(B, -1).sum(1)


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
