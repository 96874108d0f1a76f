"""From a finished run to a registered fixed inference model (driver side, never in workers).

The trained weights are consolidated from the run's DeepSpeed checkpoint, the learned
choices are fixed (``FIXERS``), the fixed model is verified against the trained one on a
held-out batch, measured (FLOPs, parameters, CPU latency) and registered in MLflow with alias
``candidate``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl.baselines import baseline_values, load_baseline
from mtl.config import Config, from_dict, to_dict
from mtl.data import load_splits, make_loader
from mtl.metrics import delta_mtl
from mtl.models import build_model
from mtl.models.flops import count_flops, count_params
from mtl.prune import PruneVerificationError, fix_interrogate, fix_moe, verify_fixed
from mtl.train.engine import consolidated_weights, read_state
from mtl.train.loop import active_taskset

# model.name -> the static module that serves it. Hard sharing is static already.
FIXERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "hard_sharing": lambda model: model,
    "interrogate": fix_interrogate,
    "moe": fix_moe,
}


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


def fixed_model(checkpoint: Path) -> tuple[Config, nn.Module, nn.Module, torch.Tensor]:
    """(config, trained model, verified fixed model, held-out batch) of a checkpoint.

    Raises:
        PruneVerificationError: The fixed model differs from the binarised trained one.
    """
    cfg, model = load_trained(checkpoint)
    _, val = load_splits(cfg.data, active_taskset(cfg))
    x = next(iter(make_loader(val, 64, train=False)))["image"]  # held-out images
    fixed = FIXERS[cfg.model.name](model)
    if fixed is not model:
        if active_taskset(cfg).multi_domain and hasattr(model, "routes"):
            _refuse_domain_routes(model)
        verify_fixed(model, fixed, x, _tolerance(cfg))
    return cfg, model, fixed, x


def _refuse_domain_routes(model: nn.Module) -> None:
    """The registered signature is images only; a multi-domain MoE whose domains take
    different routes needs the domain as a second input, which serving does not take yet."""
    routes = {str(r) for r in model.routes().values()}
    if len(routes) > 1:
        raise PruneVerificationError(
            "this multi-domain MoE routes domains differently, so its fixed model needs "
            "(images, domain); the registered signature takes images only. Its fixed model "
            "is verified by tests (fix_moe), but is not registered"
        )


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    """Median CPU wall time of one forward pass of batch ``x``, in milliseconds."""
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
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


def cost(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Inference cost of ``model``: FLOPs per image, parameters, CPU latency at batch ``x``."""
    return {
        "flops_per_image": count_flops(model, x[:1]),
        "parameters": count_params(model),
        "latency_ms": latency_ms(model, x),
    }


def _tags(
    cfg: Config, metrics: dict[str, float], fixed: nn.Module, x: torch.Tensor
) -> dict[str, str]:
    taskset = active_taskset(cfg)
    measured = cost(fixed, x)
    tags = {
        "benchmark": taskset.name,
        "task_set": ",".join(taskset.loss_keys),
        "model": cfg.model.name,
        "backbone": cfg.model.backbone,
        "flops_per_image": str(measured["flops_per_image"]),
        "parameters": str(measured["parameters"]),
        f"latency_ms_batch{len(x)}_cpu": f"{measured['latency_ms']:.2f}",
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
    checkpoint: Path, uri: str, run_id: str, metrics: dict[str, float], name: str = ""
) -> Any:
    """Fix, verify, measure and register the model of ``checkpoint``; returns the version.

    Raises:
        PruneVerificationError: The fixed model's outputs differ from the trained model's
            (binarised) outputs beyond ``model.interrogate.prune_atol``, or the model has no
            fixed form (``registration_refusal``); nothing is registered.
    """
    from mtl.tracking.registry import register_fixed_model

    cfg, model, fixed, x = fixed_model(checkpoint)
    taskset = active_taskset(cfg)
    name = name or f"{taskset.name}-{cfg.model.name}"
    tags = {**_tags(cfg, metrics, fixed, x), "source_run": run_id, "checkpoint": str(checkpoint)}
    picture = _structure_picture(model, name)
    return register_fixed_model(
        uri, run_id, fixed, x, taskset, name=name, tags=tags, picture=picture
    )
