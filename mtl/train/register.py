"""From a finished run to a registered fixed inference model (driver side, never in workers).

First the run's validation metrics must pass the registration floors
(``registration_gate``): every one finite, every ``tracking.register_if`` floor beaten and,
with ``tracking.register_above_chance``, every classification accuracy above 1 / classes;
else ``RegistrationRefused`` (the driver then ends the run FAILED with that reason). Then the
trained weights are consolidated from the run's DeepSpeed checkpoint, the learned choices
are fixed (``FIXERS``), the fixed model is verified against the trained one on a held-out
batch, measured (FLOPs, parameters, CPU latency) and registered in MLflow with alias
``candidate``.

A model that routes by domain (the task-expert MoE on a multi-domain set, ``DOMAIN_ROUTED``)
is registered with two inputs, ``{"image": (B, C, H, W) float32, "domain": (B,) int64}``,
and verified on the held-out batch's own domains and on every domain in turn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl.baselines import baseline_values, load_baseline
from mtl.config import Config, from_dict, to_dict
from mtl.data import benchmark_taskset, load_splits, make_loader
from mtl.metrics import delta_mtl
from mtl.models import build_model
from mtl.models.flops import count_flops, count_params
from mtl.prune import PruneVerificationError, fix_interrogate, fix_moe, verify_fixed
from mtl.tasks import CLASSIFICATION
from mtl.tracking import policy
from mtl.train.engine import consolidated_weights, read_state
from mtl.train.loop import active_taskset
from mtl.tune.space import LOWER_IS_BETTER, reported_metrics

# model.name -> the static module that serves it. Hard sharing is static already.
FIXERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "hard_sharing": lambda model: model,
    "interrogate": fix_interrogate,
    "moe": fix_moe,
}
# Model families whose fixed model reads the domain on a multi-domain set (its route); the
# others ignore it, so their entries take images only.
DOMAIN_ROUTED = frozenset({"moe"})
REASONS_SHOWN = 4  # refusal reasons named in the one-line message (the rest are counted)


class RegistrationRefused(RuntimeError):
    """The run's validation metrics do not pass the registration floors; nothing is
    registered and the driver ends the run FAILED with this message."""


def check_register_floors(cfg: Config) -> None:
    """Preflight: every ``tracking.register_if`` metric, and ``tracking.auto_promote``, is
    one this run reports.

    Raises:
        ValueError: An unknown metric name; the message lists the ones there are.
    """
    floors, promote_on = cfg.tracking.register_if, cfg.tracking.auto_promote
    if not floors and not promote_on:
        return
    reported = reported_metrics(active_taskset(cfg), bool(cfg.tasks.baseline))
    if promote_on and promote_on not in reported:
        hint = " (delta_mtl needs tasks.baseline)" if promote_on == "delta_mtl" else ""
        raise ValueError(
            f"tracking.auto_promote={promote_on!r} is not a metric this run reports{hint}; "
            f"choose from {sorted(reported)} (validation metrics without the val/ prefix), "
            "or leave it empty to move champion only by hand"
        )
    unknown = sorted(set(floors) - reported)
    if unknown:
        hint = " (delta_mtl needs tasks.baseline)" if "delta_mtl" in unknown else ""
        raise ValueError(
            f"tracking.register_if names {unknown}, which this run does not report{hint}; "
            f"choose from {sorted(reported)} (validation metrics without the val/ prefix)"
        )


def _beats(name: str, value: float, floor: float) -> bool:
    lower = name.rsplit("/", 1)[-1] in LOWER_IS_BETTER
    return value < floor if lower else value > floor


def refusal_reasons(cfg: Config, metrics: dict[str, float]) -> list[str]:
    """Why the run's validation metrics (``val/...`` keys of ``metrics``) bar registration:
    non-finite values, floors of ``tracking.register_if`` not beaten, and, with
    ``tracking.register_above_chance``, classification accuracies not above chance."""
    val = {k.removeprefix("val/"): float(v) for k, v in metrics.items() if k.startswith("val/")}
    if not val:
        return ["the run reported no validation metrics"]
    reasons = [f"val/{k}={v} is not finite" for k, v in sorted(val.items()) if not math.isfinite(v)]
    for name, floor in sorted(cfg.tracking.register_if.items()):
        value = val.get(name)
        if value is None:
            reasons.append(f"val/{name} was not reported (tracking.register_if)")
        elif math.isfinite(value) and not _beats(name, value, floor):
            side = "below" if name.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "above"
            reasons.append(f"val/{name}={value:.4g} is not {side} {floor:g} (tracking.register_if)")
    if cfg.tracking.register_above_chance:
        taskset = active_taskset(cfg)
        for spec in (h for h in taskset.heads if h.kind == CLASSIFICATION):
            chance = 1.0 / spec.num_outputs
            for prefix in taskset.domains or (spec.name,):
                value = val.get(f"{prefix}/accuracy")
                if value is not None and math.isfinite(value) and not value > chance:
                    reasons.append(
                        f"val/{prefix}/accuracy={value:.4g} is not above chance {chance:.4g} "
                        "(tracking.register_above_chance)"
                    )
    return reasons


def registration_gate(cfg: Config, metrics: dict[str, float]) -> None:
    """Raises ``RegistrationRefused`` naming every failed floor (``refusal_reasons``)."""
    reasons = refusal_reasons(cfg, metrics)
    if reasons:
        more = len(reasons) - REASONS_SHOWN
        shown = "; ".join(reasons[:REASONS_SHOWN]) + (f"; and {more} more" if more > 0 else "")
        raise RegistrationRefused(f"not registered: {shown}")


def _tolerance(cfg: Config) -> float:
    """The allowed fixed-vs-trained output difference of the model family."""
    return cfg.model.moe.prune_atol if cfg.model.name == "moe" else cfg.model.interrogate.prune_atol


def registration_refusal(cfg: Config) -> str | None:
    """Why a run of ``cfg`` has no fixed model to register, or None if it has one."""
    if cfg.model.name == "moe" and cfg.model.moe.routing == "token":
        return (
            "model.moe.routing=token routes each token on its own, so there is no fixed "
            "per-task route to register; use its checkpoint (or model.moe.routing=task)"
        )
    return None


def load_trained(checkpoint: Path) -> tuple[Config, nn.Module]:
    """The run's config and its trained model (fp32, CPU, eval mode) from a checkpoint."""
    cfg = from_dict(read_state(checkpoint)["config"])
    refusal = registration_refusal(cfg)
    if refusal:
        raise PruneVerificationError(refusal)
    # The checkpoint holds every weight: the pretrained file is not read (nor needed) again.
    model = build_model(dataclasses.replace(cfg.model, pretrained=""), active_taskset(cfg))
    model.load_state_dict(consolidated_weights(checkpoint))
    return cfg, model.eval()


@dataclasses.dataclass
class Fixed:
    """A checkpoint's config, trained model, verified fixed model and held-out batch."""

    cfg: Config
    model: nn.Module
    fixed: nn.Module
    x: torch.Tensor  # held-out images (B, C, H, W)
    domain: torch.Tensor | None  # their domains (B,) when the fixed model reads them


def fix_checkpoint(checkpoint: Path) -> Fixed:
    """Load, fix and verify the model of a checkpoint.

    Raises:
        PruneVerificationError: The fixed model differs from the binarised trained one.
    """
    cfg, model = load_trained(checkpoint)
    taskset = active_taskset(cfg)
    _, val = load_splits(cfg.data, taskset)
    batch = next(iter(make_loader(val, 64, train=False)))  # held-out images
    x = batch["image"]
    by_domain = taskset.multi_domain and cfg.model.name in DOMAIN_ROUTED
    domain = batch["domain"].long() if by_domain else None
    fixed = FIXERS[cfg.model.name](model)
    if fixed is not model:
        verify_fixed(model, fixed, x, _tolerance(cfg), domain)
        for d in range(len(taskset.domains) if by_domain else 0):  # every route, same images
            verify_fixed(model, fixed, x, _tolerance(cfg), torch.full_like(domain, d))
    return Fixed(cfg, model, fixed, x, domain)


def fixed_model(checkpoint: Path) -> tuple[Config, nn.Module, nn.Module, torch.Tensor]:
    """(config, trained model, verified fixed model, held-out images) of a checkpoint
    (``fix_checkpoint`` without the domains).

    Raises:
        PruneVerificationError: The fixed model differs from the binarised trained one.
    """
    out = fix_checkpoint(checkpoint)
    return out.cfg, out.model, out.fixed, out.x


@torch.no_grad()
def latency_ms(model: nn.Module, *inputs: torch.Tensor, repeats: int = 20) -> float:
    """Median CPU wall time of one forward pass ``model(*inputs)``, in milliseconds."""
    model(*inputs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _structure_picture(model: nn.Module, title: str) -> Any:
    """InterroGate: its gate pattern; task-expert MoE: each task's expert route."""
    from mtl.tracking.pictures import gate_pattern_figure, routes_figure

    if hasattr(model, "gate_pattern"):
        return gate_pattern_figure(model.gate_pattern(), f"{title}: task-specific channels")
    if hasattr(model, "routes"):
        return routes_figure(model.routes(), model.num_experts, f"{title}: experts per task")
    return None


def cost(model: nn.Module, x: torch.Tensor, domain: torch.Tensor | None = None) -> dict[str, float]:
    """Inference cost of ``model``: FLOPs per image, parameters, CPU latency at batch ``x``
    (with its ``domain`` for a model that reads it: FLOPs of the mixed-domain batch per image)."""
    inputs = (x,) if domain is None else (x, domain)
    # Every distinct domain route runs on the whole batch, so the mixed batch is what counts.
    flops = count_flops(model, x[:1]) if domain is None else count_flops(model, *inputs) // len(x)
    return {
        "flops_per_image": flops,
        "parameters": count_params(model),
        "latency_ms": latency_ms(model, *inputs),
    }


def identity(cfg: Config) -> dict[str, str]:
    """What a model trained with ``cfg`` predicts from what (``mtl.tracking.policy``)."""
    taskset = active_taskset(cfg)
    routed = cfg.model.name in DOMAIN_ROUTED and taskset.multi_domain
    return policy.identity(taskset, policy.data_source(cfg.data), with_domain=routed)


def model_name(cfg: Config) -> str:
    """``tracking.model_name``, else ``<benchmark>[-<source>][-<tasks>]-<model>``."""
    if cfg.tracking.model_name:
        return cfg.tracking.model_name
    taskset, full = active_taskset(cfg), benchmark_taskset(cfg.data)
    return policy.default_name(
        taskset.name, cfg.data, taskset.loss_keys, full.loss_keys, cfg.model.name
    )


def check_model_name(cfg: Config, uri: str) -> None:
    """Preflight: the run's registered name is free or stands for this run's kind of model.

    Raises:
        NameTaken: It stands for another data source, task set or input (the message says
            which and how to name this run's model).
    """
    from mlflow.tracking import MlflowClient

    if cfg.tracking.register and registration_refusal(cfg) is None:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        policy.check_name(client, model_name(cfg), identity(cfg))


def _tags(cfg: Config, metrics: dict[str, float], out: Fixed) -> dict[str, str]:
    x = out.x
    measured = cost(out.fixed, x, out.domain)
    return {
        **_run_tags(cfg, metrics),
        "flops_per_image": str(measured["flops_per_image"]),
        "parameters": str(measured["parameters"]),
        f"latency_ms_batch{len(x)}_cpu": f"{measured['latency_ms']:.2f}",
    }


def _run_tags(cfg: Config, metrics: dict[str, float]) -> dict[str, str]:
    """Version tags from the run: identity, evaluation data, model, config, metrics."""
    taskset = active_taskset(cfg)
    tags = {
        **identity(cfg),
        "eval_data": policy.eval_data(cfg.data, cfg.train.val_batches),
        "model": cfg.model.name,
        "backbone": cfg.model.backbone,
        "config": json.dumps(to_dict(cfg), sort_keys=True),
    }
    for key in taskset.loss_keys:
        metric, _ = taskset.primary(key)
        if f"val/{metric}" in metrics:
            tags[f"metric/{metric}"] = f"{metrics[f'val/{metric}']:.4f}"
    if cfg.tasks.baseline and Path(cfg.tasks.baseline).is_file():
        plain = {k.removeprefix("val/"): v for k, v in metrics.items()}
        values = baseline_values(load_baseline(cfg.tasks.baseline))
        tags["delta_mtl"] = f"{delta_mtl(plain, values, taskset):.2f}"
    return tags


def register_checkpoint(
    checkpoint: Path | str, uri: str, run_id: str, metrics: dict[str, float], name: str = ""
) -> Any:
    """Check the floors, then fix, verify, measure and register the model of ``checkpoint``;
    returns the version.

    Args:
        checkpoint: The run's checkpoint folder (its config gives the floors), local or an
            ``s3://`` URI (downloaded to a temporary folder, verified there, then read).
        uri: Tracking and registry URI.
        run_id: The MLflow run the model is logged into.
        metrics: The run's final metrics (``val/...`` keys are checked).
        name: Registered model name; default ``model_name(config)``.

    Raises:
        RegistrationRefused: The validation metrics fail a floor (``registration_gate``).
        PruneVerificationError: The fixed model's outputs differ from the trained model's
            (binarised) outputs beyond ``model.interrogate.prune_atol``, or the model has no
            fixed form (``registration_refusal``); nothing is registered.
    """
    from mtl import storage

    with storage.local_copy(str(checkpoint)) as local:
        return _register_local(local, str(checkpoint), uri, run_id, metrics, name)


def _register_local(
    checkpoint: Path, source: str, uri: str, run_id: str, metrics: dict[str, float], name: str
) -> Any:
    from mtl.tracking.registry import register_fixed_model

    saved = from_dict(read_state(checkpoint)["config"])
    registration_gate(saved, metrics)
    if saved.model.name == "single_gate":
        return _register_single_gate(checkpoint, source, uri, run_id, metrics, name)
    out = fix_checkpoint(checkpoint)
    cfg, taskset = out.cfg, active_taskset(out.cfg)
    name = name or model_name(cfg)
    tags = {**_tags(cfg, metrics, out), "source_run": run_id, "checkpoint": source}
    picture = _structure_picture(out.model, name)
    return register_fixed_model(
        uri, run_id, out.fixed, out.x, taskset, name=name, tags=tags, picture=picture,
        domain=out.domain, max_rows=cfg.tracking.serve_max_rows, identity=identity(cfg),
    )  # fmt: skip


SINGLE_GATE_BATCHES = 8  # held-out batches of 64 that measure the exit rate and assignment


def _register_single_gate(
    checkpoint: Path, source: str, uri: str, run_id: str, metrics: dict[str, float], name: str
) -> Any:
    """The single-gated MoE's entry: a front program and one program per expert, verified
    against the trained model (``mtl.tracking.single_gate_registry``)."""
    from itertools import islice

    from mtl.tracking.single_gate_registry import register_single_gate

    stage = read_state(checkpoint)["progress"].get("stage")
    if stage != "experts":
        raise PruneVerificationError(
            f"{checkpoint} is from the single-gated MoE's stage {stage!r}, before its experts "
            "trained: resume the run to finish stage 3, then register its last checkpoint"
        )
    cfg, model = load_trained(checkpoint)
    model.set_stage("experts")
    taskset = active_taskset(cfg)
    _, val = load_splits(cfg.data, taskset)
    batches = list(islice(make_loader(val, 64, train=False), SINGLE_GATE_BATCHES))
    name = name or model_name(cfg)
    tags = {**_run_tags(cfg, metrics), "source_run": run_id, "checkpoint": source}
    version = register_single_gate(
        uri, run_id, model.eval(), batches[0]["image"], taskset, name=name, tags=tags,
        identity=identity(cfg), max_rows=cfg.tracking.serve_max_rows, assignment_batches=batches,
    )  # fmt: skip
    _log_threshold_sweep(cfg, model, batches, uri, run_id)
    return version


# Exit thresholds of the sweep logged with every single-gate registration (1 = never exit).
SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def _log_threshold_sweep(
    cfg: Config, model: nn.Module, batches: list, uri: str, run_id: str
) -> None:
    """Metrics against expected FLOPs per image at each exit threshold, on the held-out
    batches the entry was measured on: ``threshold_sweep/rows.json`` and a figure per
    metric (Δ_MTL with a baseline, else the mean accuracy) in the run."""
    from mtl.single_gate_eval import sweep_figure, threshold_sweep
    from mtl.tracking import log_dict, log_figure

    taskset = active_taskset(cfg)
    baseline = None
    if cfg.tasks.baseline and Path(cfg.tasks.baseline).is_file():
        values = baseline_values(load_baseline(cfg.tasks.baseline))
        baseline = {k: values[k] for k in taskset.loss_keys if k in values}
    from mtl.models.single_gate import CONFIDENT_KINDS

    can_exit = any(h.kind in CONFIDENT_KINDS for h in taskset.heads)
    thresholds = SWEEP_THRESHOLDS if can_exit else (1.0,)  # no confidence: it never exits
    rows = threshold_sweep(model, batches, taskset, thresholds, baseline)
    log_dict(uri, run_id, {"thresholds": list(thresholds), "rows": rows},
             "threshold_sweep/rows.json")  # fmt: skip
    for metric in ("delta_mtl", "mean_accuracy"):
        if all(metric in row for row in rows):
            log_figure(uri, run_id, sweep_figure(rows, metric), f"threshold_sweep/{metric}.png")
