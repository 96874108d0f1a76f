"""Per-task metrics from running sums, Δ_MTL, and single-task baseline tables (DESIGN.md §2).

Metrics are computed from additive sums (correct counts, per-class intersections, squared
errors), never from per-batch averages, so that sums from several ranks can be added
(all-reduced) and give exactly the metric of the whole evaluation set.

Metric keys (primary first; for a multi-domain set the prefix is the domain name):

* classification, binary: ``"{task}/accuracy"`` (a binary logit > 0 predicts 1).
* dense classification: ``"{task}/miou"``, ``"{task}/pixel_accuracy"``.
* dense regression: ``"{task}/rmse"``, ``"{task}/mae"``.
* depth, over pixels with a measurement (target > 0): ``"{task}/abs_err"`` (mean |pred − gt|)
  and ``"{task}/rel_err"`` (mean |pred − gt| / gt), as LibMTL and MTAN report them. **(ours)**
  Pooled over every valid pixel of the set; LibMTL averages per-batch means weighted by
  batch size, which differs only when batches hold different numbers of valid pixels.
* normals, over labelled pixels (target not all zero), with the angle between prediction and
  target in degrees: ``"{task}/mean_angle"``, ``"{task}/median_angle"`` and the fractions
  ``"{task}/within_11.25"``, ``"{task}/within_22.5"``, ``"{task}/within_30"`` (angle
  strictly below). The median is read off a histogram of ``ANGLE_BINS`` bins over
  [0°, 180°], interpolated within its bin, so it is within ``180 / ANGLE_BINS`` = 0.1° of the
  exact (lower) median.
* saliency, over pixels with a target in [0, 1]: ``"{task}/max_f"``, the largest F-measure
  (β² = 0.3) over the thresholds ``SALIENCY_THRESHOLDS`` (0.05, 0.10, ..., 0.95) on the
  sigmoid, from TP/FP/FN pooled over the set, as Vandenhende et al.'s ``SaliencyMeter``;
  and ``"{task}/iou"``, TP / (TP + FP + FN) at threshold 0.5.

``"mean_accuracy"`` is the mean accuracy over the classification and binary tasks (or the
domains). A group with no samples (or no labelled pixels) reads NaN and is left out of the
mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.losses import IGNORE_INDEX
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

ANGLE_BINS = 1800  # normals: 0.1° histogram bins over [0°, 180°] for the median angle
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)  # normals: "within" thresholds, degrees
_SALIENCY_STEPS = 20  # saliency thresholds k / 20 for k = 1 .. 19, as Vandenhende et al.


def _saliency_thresholds(device: torch.device | str = "cpu") -> Tensor:
    # Built where it is used: an arange on the GPU, rather than a host-to-device copy
    return torch.arange(1, _SALIENCY_STEPS, dtype=torch.float32, device=device) / _SALIENCY_STEPS


SALIENCY_THRESHOLDS = _saliency_thresholds()  # 0.05, 0.10, ..., 0.95
SALIENCY_BETA2 = 0.3  # β² of the saliency F-measure, as the saliency literature uses
_SALIENCY_IOU_AT = SALIENCY_THRESHOLDS.tolist().index(0.5)  # saliency IoU at threshold 0.5


def _classification_stats(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """[correct, labelled] over samples; ``valid`` (B,) marks the samples that count."""
    valid = valid & (target != IGNORE_INDEX)
    correct = (output.argmax(1) == target) & valid
    return torch.stack([correct.sum(), valid.sum()]).to(torch.float64)


def _dense_classification_stats(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """[intersection (K), predicted (K), labelled (K)] pixel counts per class.

    Uses ``scatter_add`` with 0/1 weights rather than boolean indexing or ``bincount``,
    which would force a host sync on a GPU.
    """
    K = output.shape[1]
    pred = output.argmax(1).flatten()  # (B*H*W,)
    weight = (valid.view(-1, 1, 1) & (target != IGNORE_INDEX)).flatten().to(torch.float64)
    label = target.clamp(0, K - 1).flatten()  # ignored pixels point anywhere, with weight 0
    zeros = torch.zeros(K, dtype=torch.float64, device=output.device)
    hits = zeros.scatter_add(0, label, weight * (pred == label))
    predicted = zeros.scatter_add(0, pred, weight)
    labelled = zeros.scatter_add(0, label, weight)
    return torch.cat([hits, predicted, labelled])


def _dense_regression_stats(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """[sum of squared errors, sum of absolute errors, number of values]."""
    diff = (output - target).flatten(1).to(torch.float64)  # (B, C*H*W)
    weight = valid.to(torch.float64)  # (B,)
    sse = (diff.square().sum(1) * weight).sum()
    sae = (diff.abs().sum(1) * weight).sum()
    return torch.stack([sse, sae, weight.sum() * diff.shape[1]])


def _binary_stats(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """[correct, labelled] over samples; a target < 0 is unlabelled."""
    valid = valid & (target >= 0)
    correct = ((output > 0) == (target > 0.5)) & valid
    return torch.stack([correct.sum(), valid.sum()]).to(torch.float64)


def _pixel_weight(labelled: Tensor, valid: Tensor) -> Tensor:
    """float64 weights ``(B, ...)`` of the labelled pixels of the samples that count."""
    return (labelled & valid.view(-1, *([1] * (labelled.ndim - 1)))).to(torch.float64)


def _depth_stats(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """[Σ |pred − gt|, Σ |pred − gt| / gt, valid pixels] over pixels with target > 0."""
    labelled = target > 0
    weight = _pixel_weight(labelled, valid)  # (B, 1, H, W)
    gt = torch.where(labelled, target, 1.0).to(torch.float64)  # 1: no 0/0 where unlabelled
    err = (output.to(torch.float64) - gt).abs() * weight
    return torch.stack([err.sum(), (err / gt).sum(), weight.sum()])


def _normals_stats(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """[Σ angle, labelled pixels, pixels within each ``ANGLE_THRESHOLDS``, angle histogram
    (``ANGLE_BINS``)], angles in degrees; uses ``scatter_add``, no host sync."""
    weight = _pixel_weight(target.abs().sum(1) > 0, valid).flatten()  # (B*H*W,)
    pred = F.normalize(output.to(torch.float64), dim=1)
    gt = F.normalize(target.to(torch.float64), dim=1)
    cosine = (pred * gt).sum(1).clamp(-1, 1).flatten()  # (B*H*W,)
    angle = torch.rad2deg(torch.acos(cosine))
    within = [(weight * (angle < t)).sum() for t in ANGLE_THRESHOLDS]
    bins = (angle * (ANGLE_BINS / 180)).long().clamp(0, ANGLE_BINS - 1)
    hist = torch.zeros(ANGLE_BINS, dtype=torch.float64, device=output.device)
    hist = hist.scatter_add(0, bins, weight)
    head = torch.stack([(weight * angle).sum(), weight.sum(), *within])
    return torch.cat([head, hist])


def _saliency_stats(output: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """[TP (T), FP (T), FN (T)] per threshold of ``SALIENCY_THRESHOLDS`` (T of them).

    Each pixel falls into the bucket of how many thresholds its probability reaches
    (``bucketize``); a threshold's positives are the pixels in the buckets above it, so one
    pass of ``scatter_add`` serves every threshold, with no host sync.
    """
    thresholds = _saliency_thresholds(output.device)
    T = len(thresholds)
    weight = _pixel_weight((target >= 0) & (target <= 1), valid).flatten()
    gt = target.clamp(0, 1).flatten().to(torch.float64)  # soft targets count fractionally
    bucket = torch.bucketize(output.float().sigmoid().flatten(), thresholds, right=True)
    zeros = torch.zeros(T + 1, dtype=torch.float64, device=output.device)
    positive = zeros.scatter_add(0, bucket, weight * gt)  # (T + 1,)
    negative = zeros.scatter_add(0, bucket, weight * (1 - gt))
    tp = positive.flip(0).cumsum(0).flip(0)[1:]  # buckets above j: probability >= threshold j
    fp = negative.flip(0).cumsum(0).flip(0)[1:]
    return torch.cat([tp, fp, positive.sum() - tp])


def _safe_div(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _classification_metrics(s: list[float]) -> dict[str, float]:
    return {"accuracy": _safe_div(s[0], s[1])}


def _dense_classification_metrics(s: list[float]) -> dict[str, float]:
    K = len(s) // 3
    hits, predicted, labelled = s[:K], s[K : 2 * K], s[2 * K :]
    unions = [p + t - h for h, p, t in zip(hits, predicted, labelled, strict=True)]
    ious = [h / u for h, u in zip(hits, unions, strict=True) if u > 0]
    miou = sum(ious) / len(ious) if ious else math.nan
    return {"miou": miou, "pixel_accuracy": _safe_div(sum(hits), sum(labelled))}


def _dense_regression_metrics(s: list[float]) -> dict[str, float]:
    mse = _safe_div(s[0], s[2])
    return {"rmse": math.sqrt(mse) if mse == mse else math.nan, "mae": _safe_div(s[1], s[2])}


def _depth_metrics(s: list[float]) -> dict[str, float]:
    return {"abs_err": _safe_div(s[0], s[2]), "rel_err": _safe_div(s[1], s[2])}


def _normals_metrics(s: list[float]) -> dict[str, float]:
    n = len(ANGLE_THRESHOLDS)
    total, count, within, hist = s[0], s[1], s[2 : 2 + n], s[2 + n :]
    metrics = {"mean_angle": _safe_div(total, count), "median_angle": _histogram_median(hist)}
    for t, hits in zip(ANGLE_THRESHOLDS, within, strict=True):
        metrics[f"within_{t:g}"] = _safe_div(hits, count)
    return metrics


def _histogram_median(hist: list[float]) -> float:
    """The angle where the histogram's cumulative count reaches half, interpolated linearly
    within its bin: in the same bin as the exact median, so within one bin width of it."""
    half, below, width = sum(hist) / 2, 0.0, 180 / len(hist)
    if half <= 0:
        return math.nan
    for i, n in enumerate(hist):
        if n > 0 and below + n >= half:
            return (i + (half - below) / n) * width
        below += n
    return 180.0  # unreachable up to rounding


def _saliency_metrics(s: list[float]) -> dict[str, float]:
    T = len(SALIENCY_THRESHOLDS)
    tp, fp, fn = s[:T], s[T : 2 * T], s[2 * T :]
    b2 = SALIENCY_BETA2
    # (1 + β²) P R / (β² P + R) written with counts, so that P or R = 0/0 cannot occur
    f = [
        _safe_div((1 + b2) * t, (1 + b2) * t + b2 * n + p)
        for t, p, n in zip(tp, fp, fn, strict=True)
    ]
    f = [v for v in f if not math.isnan(v)]
    i = _SALIENCY_IOU_AT
    iou = _safe_div(tp[i], tp[i] + fp[i] + fn[i])
    return {"max_f": max(f) if f else math.nan, "iou": iou}


# kind -> (number of sums given the task's num_outputs, sums of a batch, metrics from sums)
_KINDS = {
    CLASSIFICATION: (lambda k: 2, _classification_stats, _classification_metrics),
    DENSE_CLASSIFICATION: (
        lambda k: 3 * k,
        _dense_classification_stats,
        _dense_classification_metrics,
    ),
    DENSE_REGRESSION: (lambda k: 3, _dense_regression_stats, _dense_regression_metrics),
    BINARY: (lambda k: 2, _binary_stats, _classification_metrics),
    DEPTH: (lambda k: 3, _depth_stats, _depth_metrics),
    NORMALS: (
        lambda k: 2 + len(ANGLE_THRESHOLDS) + ANGLE_BINS,
        _normals_stats,
        _normals_metrics,
    ),
    SALIENCY: (lambda k: 3 * len(SALIENCY_THRESHOLDS), _saliency_stats, _saliency_metrics),
}
# Kinds whose accuracy enters "mean_accuracy".
_ACCURACY_KINDS = (CLASSIFICATION, BINARY)


@dataclass(frozen=True)
class _Group:
    """One metric prefix: a head over all samples, or the shared head over one domain."""

    prefix: str
    spec: TaskSpec
    domain: int | None
    offset: int
    size: int


class MetricAccumulator:
    """Running metric sums over evaluation batches, kept as one float64 tensor.

    The sums stay on the device of the first outputs (no host sync per batch). ``totals()``
    exposes them for an all-reduce across ranks, and ``compute(totals)`` turns (reduced)
    sums into metrics.

    Args:
        taskset: The task set being evaluated.
    """

    def __init__(self, taskset: TaskSet) -> None:
        self.taskset = taskset
        self._groups: list[_Group] = []
        offset = 0
        if taskset.multi_domain:
            prefixes = [(name, taskset.heads[0], i) for i, name in enumerate(taskset.domains)]
        else:
            prefixes = [(spec.name, spec, None) for spec in taskset.heads]
        for prefix, spec, domain in prefixes:
            size = _KINDS[spec.kind][0](spec.num_outputs)
            self._groups.append(_Group(prefix, spec, domain, offset, size))
            offset += size
        self._size = offset
        self._state: Tensor | None = None

    def reset(self) -> None:
        """Forget every sum."""
        self._state = None

    @torch.no_grad()
    def update(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> None:
        """Add one batch: model outputs keyed by head name and the batch they predict."""
        if self._state is None:
            device = next(iter(outputs.values())).device
            self._state = torch.zeros(self._size, dtype=torch.float64, device=device)
        for g in self._groups:
            output = outputs[g.spec.name].detach()
            target = batch["targets"][g.spec.name].to(output.device)
            if g.domain is None:
                valid = torch.ones(len(output), dtype=torch.bool, device=output.device)
            else:
                valid = batch["domain"].to(output.device) == g.domain  # (B,)
            self._state[g.offset : g.offset + g.size] += _KINDS[g.spec.kind][1](
                output, target, valid
            )

    def totals(self) -> Tensor:
        """All running sums as a 1-D float64 tensor (a copy), additive across ranks."""
        if self._state is None:
            return torch.zeros(self._size, dtype=torch.float64)
        return self._state.clone()

    def compute(self, totals: Tensor | None = None) -> dict[str, float]:
        """Metrics from ``totals`` (e.g. all-reduced across ranks), else from local sums."""
        sums = self.totals() if totals is None else totals
        if sums.shape != (self._size,):
            raise ValueError(f"totals has shape {tuple(sums.shape)}, expected ({self._size},)")
        values = sums.detach().cpu().tolist()
        metrics: dict[str, float] = {}
        accuracies: list[float] = []
        for g in self._groups:
            group = _KINDS[g.spec.kind][2](values[g.offset : g.offset + g.size])
            metrics.update({f"{g.prefix}/{name}": v for name, v in group.items()})
            if g.spec.kind in _ACCURACY_KINDS and not math.isnan(group["accuracy"]):
                accuracies.append(group["accuracy"])
        if any(g.spec.kind in _ACCURACY_KINDS for g in self._groups):
            metrics["mean_accuracy"] = sum(accuracies) / len(accuracies) if accuracies else math.nan
        return metrics


def primary_metrics(metrics: dict[str, float], taskset: TaskSet) -> dict[str, float]:
    """Loss key -> value of its primary metric (``taskset.primary``)."""
    return {key: metrics[taskset.primary(key)[0]] for key in taskset.loss_keys}


def delta_mtl(metrics: dict[str, float], baseline: dict[str, float], taskset: TaskSet) -> float:
    """Δ_MTL (%) = 100/T · Σ_t (−1)^{l_t} (M_t − B_t) / B_t over ``taskset.loss_keys``.

    ``l_t = 1`` when the primary metric is lower-is-better, so a positive Δ_MTL always means
    the multi-task model beats the single-task baselines on average.

    Args:
        metrics: Metric key -> value (from ``MetricAccumulator.compute``).
        baseline: Loss key -> single-task baseline value of the primary metric
            (``baseline_values`` of a baseline table).
        taskset: The evaluated task set.

    Raises:
        ValueError: A task has no baseline or no metric, or a baseline value is zero.
    """
    keys = taskset.loss_keys
    missing = [k for k in keys if k not in baseline]
    if missing:
        raise ValueError(
            f"the baseline table has no value for {missing} (it has {sorted(baseline)}): "
            "train those tasks alone and add them to the table named by tasks.baseline"
        )
    unmeasured = [taskset.primary(k)[0] for k in keys if taskset.primary(k)[0] not in metrics]
    if unmeasured:
        raise ValueError(f"no metric values for {unmeasured}; cannot compute Δ_MTL")
    zero = [k for k in keys if baseline[k] == 0]
    if zero:
        raise ValueError(f"baseline values of {zero} are 0: Δ_MTL divides by the baseline")
    total = 0.0
    for key in keys:
        name, higher_is_better = taskset.primary(key)
        relative = (metrics[name] - baseline[key]) / baseline[key]
        total += relative if higher_is_better else -relative
    return 100.0 * total / len(keys)
