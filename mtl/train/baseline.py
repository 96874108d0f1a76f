"""Single-task baselines for Δ_MTL: every task (or domain) trained alone, same backbone.

DESIGN.md §2: the baseline table is produced by the project and stored with the benchmark;
an epoch-0 result is never a baseline.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mtl.baselines import save_baseline
from mtl.config import Config, to_dict
from mtl.train.launch import fit
from mtl.train.loop import active_taskset


def run_baselines(cfg: Config, out: Path) -> dict[str, Any]:
    """Train one single-task model per loss key with ``cfg``'s budget; write the table."""
    taskset = active_taskset(cfg)
    table: dict[str, Any] = {
        "benchmark": taskset.name,
        "tasks": {},
        "config": to_dict(cfg),
        "runs": {},
    }
    for key in taskset.loss_keys:
        # A reference, not a product: it is not registered (it would otherwise become the
        # ``candidate`` of the multi-task model's registry name).
        single = dataclasses.replace(
            cfg,
            tasks=dataclasses.replace(cfg.tasks, names=[key], weights={}, baseline=""),
            tracking=dataclasses.replace(cfg.tracking, register=False),
        )
        result = fit(single, run_name=f"baseline-{taskset.name}-{key}")
        metric, higher = taskset.primary(key)
        table["tasks"][key] = {
            "metric": metric,
            "value": float(result.metrics[f"val/{metric}"]),
            "higher_is_better": higher,
        }
        table["runs"][key] = result.mlflow_run_id
    out.parent.mkdir(parents=True, exist_ok=True)
    save_baseline(out, table)
    return table
