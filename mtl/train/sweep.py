"""The Δ_MTL-vs-FLOPs trade-off: InterroGate at several budgets τ against its references.

``mtl sweep-budget CONFIG tau=0.05,0.1,0.25`` trains one InterroGate model per τ with the
config's budget, plus hard sharing with the same backbone and budget; single-task models
are the Δ_MTL reference (0 by definition) at the sum of their FLOPs. The table and the
figure go to one MLflow run of their own (DESIGN.md §2, §4.3).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from matplotlib.figure import Figure

from mtl import storage
from mtl.config import Config
from mtl.models import build_model
from mtl.models.flops import count_flops
from mtl.tracking import finish_run, log_dict, log_figure, log_text, resolve_tracking_uri, start_run
from mtl.train.launch import fit
from mtl.train.loop import active_taskset
from mtl.train.register import cost, fixed_model


def _point(label: str, result: Any) -> dict[str, Any]:
    with storage.local_copy(result.checkpoint) as local:  # an s3:// run: downloaded first
        _, _, fixed, x = fixed_model(local)
    measured = cost(fixed, x)
    return {
        "model": label,
        "delta_mtl": result.metrics.get("val/delta_mtl"),
        "gflops": measured["flops_per_image"] / 1e9,
        "parameters": measured["parameters"],
        "latency_ms": measured["latency_ms"],
        "mlflow_run": result.mlflow_run_id,
    }


def single_task_point(cfg: Config) -> dict[str, Any]:
    """T single-task models: Δ_MTL = 0 by definition, FLOPs summed (no training needed)."""
    import torch

    taskset = active_taskset(cfg)
    x = torch.zeros(1, taskset.in_channels, *taskset.image_size)
    plain = dataclasses.replace(cfg.model, name="hard_sharing", pretrained="")  # FLOPs only
    flops = sum(
        count_flops(build_model(plain, taskset.subset([k])).eval(), x) for k in taskset.loss_keys
    )
    return {
        "model": f"{len(taskset.loss_keys)} single-task models",
        "delta_mtl": 0.0,
        "gflops": flops / 1e9,
    }


def _with(cfg: Config, name: str, tau: float | None = None) -> Config:
    model = dataclasses.replace(cfg.model, name=name)
    if name != "interrogate":  # single-task initialisation is InterroGate's alone
        model = dataclasses.replace(
            model, interrogate=dataclasses.replace(model.interrogate, init_from="")
        )
    if tau is not None:
        model = dataclasses.replace(
            model, interrogate=dataclasses.replace(model.interrogate, tau=tau)
        )
    tracking = dataclasses.replace(cfg.tracking, register=False)
    return dataclasses.replace(cfg, model=model, tracking=tracking)


def sweep_budget(cfg: Config, taus: list[float]) -> list[dict[str, Any]]:
    """Train hard sharing and one InterroGate model per τ; log the table and the figure."""
    if not cfg.tasks.baseline:
        raise ValueError("sweep-budget reports Δ_MTL: set tasks.baseline (see `mtl baseline`)")
    if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
        raise ValueError(f"tau={taus}: give budgets in [0, 1], e.g. tau=0.05,0.25,1.0")
    rows = [single_task_point(cfg)]
    stamp = time.strftime("%Y%m%d-%H%M%S")  # run names are unique: fit refuses to reuse one
    hard = fit(_with(cfg, "hard_sharing"), run_name=f"sweep-{stamp}-hard-sharing")
    rows.append(_point("hard sharing", hard))
    for tau in taus:
        result = fit(_with(cfg, "interrogate", tau), run_name=f"sweep-{stamp}-tau{tau:g}")
        rows.append({**_point(f"InterroGate tau={tau:g}", result), "tau": tau})
    _log(cfg, rows)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | Δ_MTL (%) | GFLOPs/image | parameters | latency (ms, batch 64) |"]
    lines.append("|---|---|---|---|---|")
    for r in rows:
        delta = "n/a" if r.get("delta_mtl") is None else f"{r['delta_mtl']:+.2f}"
        params = r.get("parameters", "")
        latency = f"{r['latency_ms']:.1f}" if "latency_ms" in r else ""
        lines.append(f"| {r['model']} | {delta} | {r['gflops']:.4f} | {params} | {latency} |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, Any]]) -> Figure:
    """Δ_MTL against FLOPs: single-task and hard-sharing points, the InterroGate curve."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    curve = sorted((r for r in rows if "tau" in r), key=lambda r: r["gflops"])
    ax.plot(
        [r["gflops"] for r in curve], [r["delta_mtl"] for r in curve], "o-", label="InterroGate"
    )
    for r in curve:
        ax.annotate(f"τ={r['tau']:g}", (r["gflops"], r["delta_mtl"]), fontsize=8)
    for r, marker in zip(rows[:2], ("s", "^"), strict=True):
        ax.plot([r["gflops"]], [r["delta_mtl"]], marker, label=r["model"])
    ax.set_xlabel("inference GFLOPs per image (fixed model)")
    ax.set_ylabel("Δ_MTL (%)")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.legend()
    return fig


def _log(cfg: Config, rows: list[dict[str, Any]]) -> None:
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    named = dataclasses.replace(
        cfg, tracking=dataclasses.replace(cfg.tracking, run_name="sweep-budget")
    )
    run_id = start_run(named, uri)
    log_text(uri, run_id, table(rows), "tradeoff/table.md")
    log_dict(uri, run_id, {"rows": rows}, "tradeoff.json")
    log_figure(uri, run_id, figure(rows), "tradeoff/delta_mtl_vs_flops.png")
    finish_run(uri, run_id, ok=True)
    print(table(rows), flush=True)
