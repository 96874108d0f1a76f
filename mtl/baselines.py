"""Single-task baseline tables: the reference values Δ_MTL is measured against (DESIGN.md §2).

A table is JSON: ``{"benchmark": str, "tasks": {key: {"metric": str, "value": float,
"higher_is_better": bool}}, "config": dict}``, written by ``mtl baseline`` from single-task
runs and named by ``tasks.baseline``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NoReturn

from mtl.tasks import TaskSet


def _fail(source: str, message: str) -> NoReturn:
    raise ValueError(f"{source}: {message}")


def validate_baseline(table: Any, source: str = "baseline table") -> None:
    """Check the layout ``{"benchmark": str, "tasks": {key: {"metric": str, "value":
    float, "higher_is_better": bool}}, "config": dict}``; raises ``ValueError``."""
    if not isinstance(table, dict):
        _fail(source, f"expected a JSON object, got {type(table).__name__}")
    for field, kind in (("benchmark", str), ("tasks", dict), ("config", dict)):
        if not isinstance(table.get(field), kind):
            _fail(source, f"field {field!r} is missing or not a {kind.__name__}")
    if not table["tasks"]:
        _fail(source, "'tasks' is empty: add one entry per loss key")
    for key, entry in table["tasks"].items():
        where = f"tasks.{key}"
        if not isinstance(entry, dict):
            _fail(source, f"{where} must be an object with metric, value, higher_is_better")
        if not isinstance(entry.get("metric"), str):
            _fail(source, f"{where}.metric must be a metric key such as '{key}/accuracy'")
        value = entry.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(source, f"{where}.value must be a number, got {value!r}")
        if not math.isfinite(value):
            _fail(source, f"{where}.value must be finite, got {value!r}")
        if not isinstance(entry.get("higher_is_better"), bool):
            _fail(source, f"{where}.higher_is_better must be true or false")


def check_baseline(table: dict, taskset: TaskSet) -> None:
    """Check that a (valid) baseline table fits ``taskset``: same benchmark, and for every
    loss key the same primary metric and direction. Raises ``ValueError``."""
    if table["benchmark"] != taskset.name:
        raise ValueError(
            f"the baseline table is for benchmark {table['benchmark']!r}, not {taskset.name!r}"
        )
    missing = [k for k in taskset.loss_keys if k not in table["tasks"]]
    if missing:
        raise ValueError(f"the baseline table has no entry for {missing}")
    for key in taskset.loss_keys:
        entry, (metric, higher) = table["tasks"][key], taskset.primary(key)
        if (entry["metric"], entry["higher_is_better"]) != (metric, higher):
            raise ValueError(
                f"baseline tasks.{key} scores {entry['metric']!r} "
                f"(higher_is_better={entry['higher_is_better']}), expected {metric!r} "
                f"(higher_is_better={higher})"
            )


def baseline_table(
    taskset: TaskSet, metrics: dict[str, float], config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A baseline table from single-task metrics (merged over the single-task runs)."""
    tasks = {}
    for key in taskset.loss_keys:
        metric, higher = taskset.primary(key)
        tasks[key] = {"metric": metric, "value": metrics[metric], "higher_is_better": higher}
    return {"benchmark": taskset.name, "tasks": tasks, "config": dict(config or {})}


def baseline_values(table: dict[str, Any]) -> dict[str, float]:
    """Loss key -> baseline value of its primary metric."""
    return {key: float(entry["value"]) for key, entry in table["tasks"].items()}


def save_baseline(path: str | os.PathLike, table: dict[str, Any]) -> None:
    """Validate ``table`` and write it as JSON (creating parent folders)."""
    path = Path(path)
    validate_baseline(table, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a baseline table. Raises ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"baseline table {str(path)!r} does not exist (tasks.baseline)")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    validate_baseline(table, str(path))
    return table
