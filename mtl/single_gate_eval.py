"""Evaluation of a single-gated MoE (DESIGN.md §4.5): the exit-threshold trade-off, the gate's
assignment, and whether any expert collapsed.

What is measured, and how:

* **Exit-threshold sweep** (``threshold_sweep``). At threshold t a sample exits with the base's
  prediction when the base's confidence is at least t (``SingleGateMoE.exits``), else it gets
  the mean of the base's and its gated expert's outputs. Neither the base outputs, the gate's
  route, the confidence nor the ensemble depend on t, so one pass over the evaluation batches
  computes each once per batch and every threshold only picks, per sample, the base or the
  ensemble; each threshold fills its own ``MetricAccumulator``. Per threshold: the exit rate,
  the expected FLOPs per sample (``expected_flops`` of ``branch_flops``: the prefix and base
  always run, the gate and one expert for the samples that do not exit), their ratio to the
  base model alone, every validation metric and, with a baseline table, Δ_MTL. The reference
  is the model's own ``forward`` with ``model.threshold = t`` (tests check they agree).
* **Assignment** (``assignment``). The gate's expert per sample (``argmax`` of the gate on the
  pooled prefix features, what the fixed model routes by), counted per expert and per group:
  the domain of a multi-domain set, else the class label of the first classification head.
  From the counts: each expert's share of the samples and the normalised entropy of that
  usage distribution (1 = every expert equally used, 0 = one expert takes all); from the gate's
  softmax: the mean per-sample entropy, normalised the same way (0 = a sure gate, 1 = a gate
  that cannot tell the experts apart). An expert under ``min_share`` of the samples marks the
  mixture ``collapsed``.
* **Pictures**: the assignment as an experts × groups heatmap (``assignment_figure``), the
  sweep as a metric against expected FLOPs per sample with reference models as markers
  (``sweep_figure``). Bare Agg figures, as ``mtl.tracking.pictures``.

Pure PyTorch and matplotlib: no Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from mtl.metrics import MetricAccumulator, delta_mtl
from mtl.models.single_gate import (
    CONFIDENT_KINDS,
    SingleGateMoE,
    branch_flops,
    confidence,
    expected_flops,
    pool,
)
from mtl.tasks import CLASSIFICATION, TaskSet

Batch = dict[str, Any]
_REFERENCE_MARKERS = ("s", "^", "D", "v", "P", "X")


@contextmanager
def _eval_mode(model: SingleGateMoE) -> Iterator[None]:
    """Eval mode for the duration (no BatchNorm statistic moves), the old mode restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _image(model: SingleGateMoE, batch: Batch) -> Tensor:
    """The batch's images on the model's device, in its dtype."""
    param = next(model.parameters())
    return batch["image"].to(device=param.device, dtype=param.dtype)


def _check_thresholds(thresholds: Sequence[float], taskset: TaskSet) -> None:
    """The bounds ``SingleGateMoE`` puts on its own threshold, with the fix in each message."""
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        raise ValueError(f"thresholds {list(thresholds)}: give values in (0, 1] (1 = never exit)")
    if min(thresholds) < 1 and not any(h.kind in CONFIDENT_KINDS for h in taskset.heads):
        raise ValueError(
            f"task set {taskset.name!r} has no classification head, so the base has no "
            "confidence to exit on: sweep only threshold 1 (never exit)"
        )


def _outputs(
    model: SingleGateMoE, x: Tensor, taskset: TaskSet, with_confidence: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None]:
    """(base outputs, base-expert ensemble for every sample, base confidence or None).

    The ensemble is written out here rather than through the model's private ``_ensemble``:
    the sweep needs it for every sample (one pass serves every threshold), the forward pass
    only for the samples that do not exit; the tests hold the two to the same numbers. Outputs
    are fp32, as the metrics read them (the forward pass averages in the model's dtype).
    """
    size = (x.shape[-2], x.shape[-1])
    h = model.prefix(x)
    base = {name: value.float() for name, value in model.base(h, size).items()}
    route = model.gate(pool(h, model.channel_dim).float()).argmax(1)  # (B,)
    ensemble = {name: value.clone() for name, value in base.items()}
    for k, expert in enumerate(model.experts):
        rows = torch.nonzero(route == k).flatten()
        if rows.numel() == 0:
            continue
        for name, value in expert(h[rows], size).items():
            ensemble[name][rows] = (base[name][rows] + value.float()) / 2
    conf = confidence(base, taskset) if with_confidence else None
    return base, ensemble, conf


def _exits(conf: Tensor | None, threshold: float, batch_size: int) -> Tensor:
    """Which samples exit at ``threshold`` ``(B,)``, as ``SingleGateMoE.exits`` decides."""
    if threshold >= 1 or conf is None:
        return torch.zeros(batch_size, dtype=torch.bool)
    return (conf >= threshold).cpu()


def _merged(
    base: dict[str, Tensor], ensemble: dict[str, Tensor], exits: Tensor
) -> dict[str, Tensor]:
    """Base outputs where a sample exits, the ensemble's elsewhere."""
    out = {}
    for name, value in base.items():
        where = exits.to(value.device).view(-1, *([1] * (value.dim() - 1)))  # (B, 1, ...)
        out[name] = torch.where(where, value, ensemble[name])
    return out


@torch.no_grad()
def threshold_sweep(
    model: SingleGateMoE,
    batches: Iterable[Batch],
    taskset: TaskSet,
    thresholds: Sequence[float],
    baseline: dict[str, float] | None = None,
) -> list[dict[str, float]]:
    """Metrics and expected cost of the early exit at each threshold, from one pass.

    Args:
        model: A single-gated MoE in stage ``"experts"`` (trained or initialised experts);
            run in eval mode here, its mode, stage and ``threshold`` left as they were.
        batches: Evaluation batches (``"image"``, ``"targets"``, ``"domain"`` where
            multi-domain), iterated once.
        taskset: The evaluated task set.
        thresholds: Exit confidences in (0, 1]; 1 never exits.
        baseline: Loss key -> single-task value of its primary metric (a baseline table's
            values); adds ``"delta_mtl"`` to each row.

    Returns:
        One row per threshold, in the given order: ``threshold``, ``exit_rate``, ``flops``
        (expected FLOPs per sample), ``flops_ratio`` (to the base model alone, prefix and
        base branch), every metric ``MetricAccumulator.compute`` reports (``"left/accuracy"``,
        ``"mean_accuracy"`` ...) and ``delta_mtl`` with a baseline.

    Raises:
        ValueError: The model is not in stage ``"experts"``, a threshold is outside (0, 1]
            or below 1 for a task set without a confidence, or ``batches`` is empty.
    """
    if model.stage != "experts":
        raise ValueError(
            f"the model is in stage {model.stage!r}: its experts are not trained yet; "
            "call model.set_stage('experts') on a stage-3 model before sweeping"
        )
    _check_thresholds(thresholds, taskset)
    accumulators = [MetricAccumulator(taskset) for _ in thresholds]
    exited = [0] * len(thresholds)
    samples, parts = 0, None
    with _eval_mode(model):
        for batch in batches:
            x = _image(model, batch)
            if parts is None:  # the cost per sample, from any one image
                parts = branch_flops(model, x[:1])
                model.eval()  # branch_flops leaves the base and expert 0 in train mode
            base, ensemble, conf = _outputs(model, x, taskset, min(thresholds) < 1)
            for i, t in enumerate(thresholds):
                exits = _exits(conf, t, len(x))
                exited[i] += int(exits.sum())
                accumulators[i].update(_merged(base, ensemble, exits), batch)
            samples += len(x)
    if parts is None:
        raise ValueError("threshold_sweep got no batches")
    rows = []
    for t, n, acc in zip(thresholds, exited, accumulators, strict=True):
        flops = expected_flops(parts, n / samples)
        row = {"threshold": float(t), "exit_rate": n / samples, "flops": flops}
        row["flops_ratio"] = flops / parts["base"]
        metrics = acc.compute()
        row.update(metrics)
        if baseline:
            row["delta_mtl"] = delta_mtl(metrics, baseline, taskset)
        rows.append(row)
    return rows


def _grouping(taskset: TaskSet) -> tuple[str, str | None, int]:
    """(what groups are, the head whose label is the group or None, number of groups)."""
    if taskset.multi_domain:
        return "domain", None, len(taskset.domains)
    for spec in taskset.heads:
        if spec.kind == CLASSIFICATION:
            return f"{spec.name} label", spec.name, spec.num_outputs
    return "all samples", None, 1


def group_names(taskset: TaskSet) -> list[str]:
    """Names of ``assignment``'s groups, in column order: the domains, the class labels of
    the first classification head, or one group of all samples."""
    _, head, count = _grouping(taskset)
    if taskset.multi_domain:
        return list(taskset.domains)
    return [str(c) for c in range(count)] if head is not None else ["all"]


def _groups(batch: Batch, taskset: TaskSet, batch_size: int) -> Tensor:
    """Each sample's group ``(B,)`` on the CPU (an ignored label falls outside the range)."""
    _, head, _ = _grouping(taskset)
    if taskset.multi_domain:
        return batch["domain"].long().cpu()
    if head is not None:
        return batch["targets"][head].long().cpu()
    return torch.zeros(batch_size, dtype=torch.long)


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) along ``dim``; 0 · log 0 = 0."""
    return torch.special.entr(p).sum(dim)


@torch.no_grad()
def assignment(
    model: SingleGateMoE,
    batches: Iterable[Batch],
    taskset: TaskSet,
    min_share: float | None = None,
) -> dict[str, Any]:
    """How the gate spreads the samples over the experts, per group, and whether it collapsed.

    Args:
        model: A single-gated MoE after stage 2 (the gate is set); run in eval mode here.
        batches: Evaluation batches, iterated once.
        taskset: The evaluated task set: groups are its domains (multi-domain) or the class
            labels of its first classification head, else one group.
        min_share: An expert with a smaller share of the samples marks the mixture collapsed.
            Default ``1 / (4K)``, a quarter of the share a balanced gate gives (ours): loose
            enough that real, unequal clusters (one domain twice another's size) pass, tight
            enough to catch an expert the gate has all but stopped using.

    Returns:
        A plain (JSON-ready) dict: ``counts`` (K lists of G sample counts, expert × group;
        samples with an ignored label are left out), ``group_by``, ``samples``, ``usage``
        (samples per expert), ``share`` (its fraction), ``gate_entropy`` (mean per-sample
        entropy of the gate's softmax) and ``usage_entropy`` (of ``share``), both divided
        by log K so they lie in [0, 1], ``min_share`` and ``collapsed``.

    Raises:
        ValueError: ``batches`` is empty or ``min_share`` is outside [0, 1].
    """
    K = model.num_experts
    min_share = 1 / (4 * K) if min_share is None else min_share
    if not 0 <= min_share <= 1:
        raise ValueError(f"min_share={min_share} must be a fraction in [0, 1]")
    group_by, _, G = _grouping(taskset)
    counts = torch.zeros(K * G, dtype=torch.long)
    usage = torch.zeros(K, dtype=torch.long)
    entropy = 0.0
    with _eval_mode(model):
        for batch in batches:
            x = _image(model, batch)
            logits = model.gate(model.features(x)).float()  # (B, K), as model.assignment
            route = logits.argmax(1).cpu()
            entropy += float(_entropy(logits.softmax(1)).sum())
            usage += route.bincount(minlength=K)
            group = _groups(batch, taskset, len(x))
            known = (group >= 0) & (group < G)
            counts += (route[known] * G + group[known]).bincount(minlength=K * G)
    samples = int(usage.sum())
    if samples == 0:
        raise ValueError("assignment got no samples")
    share = usage.double() / samples
    return {
        "counts": counts.view(K, G).tolist(),
        "group_by": group_by,
        "samples": samples,
        "usage": usage.tolist(),
        "share": share.tolist(),
        "gate_entropy": entropy / samples / math.log(K),
        "usage_entropy": float(_entropy(share)) / math.log(K),
        "min_share": min_share,
        "collapsed": bool(share.min() < min_share),
    }


def assignment_figure(result: dict[str, Any], group_names: Sequence[str], title: str) -> Figure:
    """Heatmap of the gate's assignment: rows experts, columns groups, counts annotated.

    Args:
        result: What ``assignment`` returns.
        group_names: One name per group column (``group_names(taskset)``).
        title: Figure title, e.g. the registered model name and version.

    Raises:
        ValueError: ``group_names`` does not match the number of group columns.
    """
    counts = np.array(result["counts"], dtype=float)  # (K, G)
    K, G = counts.shape
    if len(group_names) != G:
        raise ValueError(f"{len(group_names)} group names for {G} group columns")
    fig = Figure(figsize=(1.6 + 0.55 * G, 1.2 + 0.45 * K), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max(counts.max(), 1.0)
    image = ax.imshow(counts, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    for (row, col), value in np.ndenumerate(counts):
        # Dark text on the bright end of viridis, light text elsewhere, so every label reads.
        ax.text(col, row, f"{int(value)}", ha="center", va="center", fontsize=8,
                color="black" if value > 0.6 * top else "white")  # fmt: skip
    ax.set_xticks(range(G), list(group_names))
    ax.set_yticks(range(K), [f"{k} ({s:.0%})" for k, s in enumerate(result["share"])])
    ax.set_xlabel(result["group_by"])
    ax.set_ylabel("expert (share)")
    flag = ", collapsed" if result["collapsed"] else ""
    ax.set_title(
        f"usage entropy {result['usage_entropy']:.2f}, gate entropy "
        f"{result['gate_entropy']:.2f}{flag}",
        fontsize="small",
    )
    fig.suptitle(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="samples")
    return fig


def sweep_figure(
    rows: Sequence[dict[str, float]],
    metric: str,
    references: dict[str, tuple[float, float]] | None = None,
) -> Figure:
    """One metric against expected FLOPs per sample: the sweep as a curve, each point
    annotated with its threshold, and reference models as labelled markers.

    Args:
        rows: What ``threshold_sweep`` returns.
        metric: A row key, e.g. ``"mean_accuracy"`` or ``"delta_mtl"``.
        references: Model name -> (FLOPs per sample, metric value), e.g. hard sharing or a
            task-level MoE measured on the same data.

    Raises:
        ValueError: No rows, or ``metric`` missing from a row.
    """
    if not rows or any(metric not in r for r in rows):
        known = sorted(rows[0]) if rows else []
        raise ValueError(f"metric {metric!r} is not in every sweep row (keys: {known})")
    curve = sorted(rows, key=lambda r: r["flops"])
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x, y = [r["flops"] for r in curve], [r[metric] for r in curve]
    ax.plot(x, y, "o-", label="single-gated MoE")
    for r in curve:
        ax.annotate(f"t={r['threshold']:g}", (r["flops"], r[metric]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))  # fmt: skip
    for i, (name, (flops, value)) in enumerate((references or {}).items()):
        marker = _REFERENCE_MARKERS[i % len(_REFERENCE_MARKERS)]
        ax.plot([flops], [value], marker, linestyle="none", label=name)
    ax.set_xlabel("expected FLOPs per sample")
    ax.set_ylabel(metric)
    ax.legend()
    return fig
