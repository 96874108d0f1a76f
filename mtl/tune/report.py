"""After a sweep: the best trial, every trial's weight trajectory, the policy logs, MLflow.

The parent run gets the best trial's fitness and final weights as metrics, its weight
schedule (``best_schedule.json``), the trajectories of all trials as a table and a figure
(``weights/``) and Ray's PBT policy logs (``pbt/``, replayable with ``mtl tune --replay``).
The best trial's model is registered from its last checkpoint (alias ``candidate``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mtl.tracking import (
    RunLogger,
    child_runs,
    finish_run,
    log_artifact,
    log_dict,
    log_figure,
    log_text,
    metric_rows,
)
from mtl.tune.space import trial_index

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What a finished sweep leaves behind."""

    name: str
    best_trial: str
    fitness: float
    weights: dict[str, float]  # the best trial's final weights
    schedule: list[dict[str, Any]]  # its lineage: [{from_step, to_step, trial_id, weights}]
    checkpoint: str | None
    parent_run_id: str
    tracking_uri: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    trajectories: list[dict[str, Any]] = field(default_factory=list)  # see ``trajectories``
    policy_files: list[str] = field(default_factory=list)
    model_version: str | None = None


def _trials(grid: Any, runs: dict[str, str]) -> list[dict[str, Any]]:
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        trials.append(
            {
                "trial_id": trial_id,
                "status": "ERROR" if result.error else "TERMINATED",
                "error": error_line(result.error) if result.error else None,
                "stopped": stopped_reason(result.error),
                "fitness": float(metrics.get("fitness", math.nan)),
                "step": metrics.get("step"),
                "weights": _reported_weights(metrics),
                "checkpoint": _uri(result.checkpoint),
                "mlflow_run_id": runs.get(trial_id),
                "metrics": {k: v for k, v in metrics.items() if k.startswith("val/")},
            }
        )
    return trials


def _cause(error: BaseException) -> BaseException:
    """The trial's own exception inside Ray's wrappers (``RayTaskError.cause``)."""
    seen = {id(error)}
    while getattr(error, "cause", None) is not None and id(error.cause) not in seen:
        error = error.cause
        seen.add(id(error))
    return error


def stopped_reason(error: BaseException | None) -> str:
    """Why a guard stopped a trial (its ``TrainingStopped`` message), "" if none did."""
    from mtl.train.guards import TrainingStopped

    if error is None:
        return ""
    cause = _cause(error)
    return str(cause).strip() if isinstance(cause, TrainingStopped) else ""


def error_line(error: BaseException) -> str:
    """A trial's error in one line: its own exception's type and first line."""
    cause = _cause(error)
    text = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {text[0][:300]}" if text else type(cause).__name__


def _reported_weights(metrics: dict[str, Any]) -> dict[str, float]:
    """The weights a trial's last interval trained with (its report's ``weight/<key>``)."""
    return {k.removeprefix("weight/"): v for k, v in metrics.items() if k.startswith("weight/")}


def best_trial(trials: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The finished trial with the best last fitness. Raises ``RuntimeError`` if none."""
    done = [t for t in trials if t["status"] == "TERMINATED" and math.isfinite(t["fitness"])]
    if not done:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials if t["error"])
        raise RuntimeError(f"no trial finished with a finite fitness ({errors or 'no errors'})")
    sign = 1.0 if mode == "max" else -1.0
    return max(done, key=lambda t: sign * t["fitness"])


def trajectories(uri: str, runs: dict[str, str], keys: tuple[str, ...]) -> list[dict]:
    """Every interval of every trial, in the order trained: the step reached, the fitness,
    the checkpoint the interval started from (trial and step) and the weights it used.

    Read from the trials' MLflow runs (``segment_metrics``), which keep every interval even
    when Tune restarts a trial.
    """
    names = {trial_index(t): t for t in runs}
    columns = ["tune/fitness", "tune/from_trial", "tune/from_step"]
    columns += [f"tune/weight/{k}" for k in keys]
    rows = []
    for trial_id, run_id in sorted(runs.items()):
        for r in metric_rows(uri, run_id, columns):
            rows.append(
                {
                    "trial_id": trial_id,
                    "step": int(r["step"]),
                    "fitness": r["tune/fitness"],
                    "from_trial": names.get(int(r["tune/from_trial"]), ""),
                    "from_step": int(r["tune/from_step"]),
                    **{k: r[f"tune/weight/{k}"] for k in keys},
                }
            )
    return rows


def lineage(rows: list[dict[str, Any]], trial_id: str, keys: tuple[str, ...]) -> list[dict]:
    """The weight schedule a trial's final model was trained under, through its donors.

    Walks back from the trial's last report: each report covers the steps from the
    checkpoint it started from to the step it reached; after an exploit that checkpoint is
    the donor's, so the walk continues in the donor's reports. Reports a trial abandoned
    (it was exploited right after) are skipped because they end after the next start.

    Returns:
        ``[{from_step, to_step, trial_id, weights}]`` in training order; neighbouring
        segments with the same weights merged.
    """
    by_trial: dict[str, list[dict]] = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], []).append(r)
    segments: list[dict[str, Any]] = []
    current, upto = trial_id, math.inf
    for _ in range(len(rows)):  # every report is used at most once
        reached = [r for r in by_trial.get(current, []) if r["step"] <= upto]
        if not reached or upto <= 0:
            break
        r = reached[-1]  # the latest report that ends where the later segment starts
        weights = {k: r[k] for k in keys}
        segments.append({"from_step": r["from_step"], "to_step": r["step"], "weights": weights})
        segments[-1]["trial_id"] = current
        current, upto = r["from_trial"] or current, r["from_step"]
    merged: list[dict[str, Any]] = []
    for seg in reversed(segments):
        if merged and merged[-1]["weights"] == seg["weights"]:
            merged[-1]["to_step"] = seg["to_step"]
        else:
            merged.append(dict(seg))
    return merged


def trajectory_table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """The trajectories as a markdown table (one row per report)."""
    lines = [
        "| trial | step | fitness | started from | " + " | ".join(keys) + " |",
        "|---" * (4 + len(keys)) + "|",
    ]
    for r in rows:
        weights = " | ".join(f"{r[k]:.4f}" for k in keys)
        origin = f"{r['from_trial']}@{r['from_step']}" if r["from_trial"] else "start"
        lines.append(
            f"| {r['trial_id']} | {r['step']} | {r['fitness']:.4f} | {origin} | {weights} |"
        )
    return "\n".join(lines) + "\n"


def trajectory_figure(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> Figure:
    """One panel per weight: its value against the step, one line per trial; jumps are
    exploits (the trial continues from the donor's step with new weights)."""
    fig = Figure(figsize=(6, 2.2 * len(keys)))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    trials = sorted({r["trial_id"] for r in rows})
    for ax, key in zip(axes, keys, strict=True):
        for trial in trials:
            mine = [r for r in rows if r["trial_id"] == trial]
            ax.plot([r["step"] for r in mine], [r[key] for r in mine], "o-", label=trial)
        ax.set_ylabel(f"w[{key}]")
    axes[-1].set_xlabel("step")
    axes[0].legend(fontsize=7)
    return fig


def _uri(checkpoint: Any) -> str | None:
    """A reported checkpoint's path, as ``s3://...`` when it is in S3."""
    from mtl.storage import uri_of

    return uri_of(checkpoint.filesystem, checkpoint.path) if checkpoint else None


def _policy_files(grid: Any) -> list[str]:
    """The sweep's PBT policy files (local paths or ``s3://`` URIs)."""
    from mtl.storage import children, join, uri_of

    folder = uri_of(getattr(grid, "filesystem", None), str(grid.experiment_path))
    names = [n for n, is_dir in children(folder) if not is_dir]
    policies = sorted(n for n in names if n.startswith("pbt_policy_") and n.endswith(".txt"))
    return [join(folder, n) for n in [*policies, *(n for n in names if n == "pbt_global.txt")]]


def summarize(plan: Any, grid: Any, parent_run_id: str) -> SweepResult:
    """Pick the best trial, log the sweep to the parent run, register the best model."""
    uri, keys = plan.extras["tracking_uri"], plan.space.keys
    runs = child_runs(uri, parent_run_id)
    trials = _trials(grid, runs)
    for t in trials:  # a paused-then-errored (or killed) trial's run would stay RUNNING
        if t["mlflow_run_id"]:
            reason = f"training stopped: {t['stopped']}" if t["stopped"] else t["error"] or ""
            finish_run(uri, t["mlflow_run_id"], ok=t["status"] == "TERMINATED", reason=reason)
    try:
        best = best_trial(trials, plan.mode)
    except RuntimeError:  # every trial failed: say how each one did
        for line in trial_lines(trials):
            log.error("%s", line)
        raise
    policies = _policy_files(grid)
    rows = trajectories(uri, runs, keys)
    result = SweepResult(
        plan.name, best["trial_id"], best["fitness"], best["weights"],
        lineage(rows, best["trial_id"], keys), best["checkpoint"], parent_run_id, uri, trials,
        rows, [str(p) for p in policies],
    )  # fmt: skip
    _log(result, rows, keys, policies, best)
    for line in _lines(result, plan).splitlines():
        log.info("%s", line)
    if plan.cfg.tracking.register and best["checkpoint"] and best["mlflow_run_id"]:
        result.model_version = _register(result, best, plan.cfg.tracking.model_name)
        if result.model_version and plan.cfg.tracking.auto_promote:
            from mtl.train.launch import auto_promote

            auto_promote(plan.cfg, result.tracking_uri, result.parent_run_id)
    return result


def _log(result: SweepResult, rows: list, keys: tuple, policies: list, best: dict) -> None:
    uri, run_id = result.tracking_uri, result.parent_run_id
    logger = RunLogger(uri, run_id)
    metrics = {"best/fitness": result.fitness}
    metrics.update({f"best/weight/{k}": w for k, w in result.weights.items()})
    logger.log_metrics(metrics, int(best["step"] or 0))
    logger.set_tags({"mtl.best_trial": result.best_trial, "mtl.best_run": best["mlflow_run_id"]})
    log_dict(
        uri, run_id, {"schedule": result.schedule, "weights": result.weights}, "best_schedule.json"
    )
    log_dict(uri, run_id, {"trials": result.trials}, "trials.json")
    log_text(uri, run_id, trajectory_table(rows, keys), "weights/trajectories.md")
    log_dict(uri, run_id, {"rows": rows}, "weights/trajectories.json")
    if rows:
        log_figure(uri, run_id, trajectory_figure(rows, keys), "weights/trajectories.png")
    import tempfile

    from mtl.storage import is_remote, name, read_text

    for path in policies:
        if not is_remote(path):
            log_artifact(uri, run_id, path, "pbt")
            continue
        with tempfile.TemporaryDirectory() as tmp:  # a policy file in S3: via a local copy
            local = Path(tmp) / name(path)
            local.write_text(read_text(path))
            log_artifact(uri, run_id, str(local), "pbt")


def _register(result: SweepResult, best: dict[str, Any], name: str) -> str | None:
    from mtl.train.launch import FitResult, register

    fit = FitResult(
        best["trial_id"], best["metrics"], best["checkpoint"], best["mlflow_run_id"],
        result.tracking_uri,
    )  # fmt: skip
    version = register(fit, name)
    if version:
        RunLogger(result.tracking_uri, result.parent_run_id).set_tags(
            {"mtl.model_version": version}
        )
    return version


def trial_lines(trials: list[dict[str, Any]]) -> list[str]:
    """One line per trial: its status, last fitness and run; why it failed, if it did."""
    lines = []
    for t in trials:
        line = (
            f"trial {t['trial_id']} {t['status']}: fitness {t['fitness']:.4f} "
            f"at step {t['step']}, MLflow run {t['mlflow_run_id']}"
        )
        if t.get("stopped"):
            line += f"; stopped by a guard, never a PBT donor: {t['stopped']}"
        elif t.get("error"):
            line += f"; failed: {t['error']}"
        lines.append(line)
    return lines


def _lines(result: SweepResult, plan: Any) -> str:
    weights = ", ".join(f"{k}={w:.3f}" for k, w in result.weights.items())
    lines = [
        f"sweep {result.name}: best trial {result.best_trial} "
        f"{plan.fitness_key}={result.fitness:.4f}; final weights {weights}",
        "the weight schedule its model was trained under (steps: weights, by trial):",
    ]
    for seg in result.schedule:
        shown = ", ".join(f"{k}={w:.3f}" for k, w in seg["weights"].items())
        lines.append(f"  {seg['from_step']}-{seg['to_step']}: {shown} ({seg['trial_id']})")
    lines += trial_lines(result.trials)
    mine = [p for p in result.policy_files if Path(p).name == f"pbt_policy_{result.best_trial}.txt"]
    if mine:
        lines.append(f"replay the best schedule: mtl tune CONFIG --replay {mine[0]}")
    return "\n".join(lines)
