"""PBT (or PB2) against uniform weights and a grid of fixed weights, at the compute each used.

For every seed this runs two sweeps through ``mtl tune`` on the same config: a grid sweep
(``tune.scheduler=grid``: the configured weights, normally uniform, then each weight times
each of ``tune.grid_factors``) and the config's own PBT/PB2 sweep. Uniform is the grid's first
trial, so it is trained once. Every trial is the same Ray Train x DeepSpeed job, so compute is
counted the same way for all: trial-epochs = the optimizer steps all trials trained / steps
per epoch. Fitness is the validation metric the sweeps rank by (``tune.metric``); the best of
a sweep is picked on it, so the grid's best (a max over more trials) is, if anything, the
optimistic side of the comparison.

    .venv/bin/python benchmarks/pbt_vs_grid.py CONFIG [key=value ...] --seeds 0,1,2

Prints one table (mean ± std over seeds) and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from mtl.config import load_config
from mtl.tune.driver import _steps_per_epoch, tune_weights
from mtl.tune.space import trial_index


def sweep(path: str, overrides: list[str], scheduler: str, seed: int, tag: str) -> dict:
    """One sweep; its fitness values, the uniform trial's and the compute it used."""
    name = f"{tag}-{scheduler}-s{seed}"
    cfg = load_config(
        path,
        [
            *overrides,
            f"tune.scheduler={scheduler}",
            f"tune.seed={seed}",
            f"train.seed={seed}",
            f"tune.name={name}",
            "tracking.register=false",  # a measurement, not a candidate for the registry
        ],
    )
    per_epoch, _ = _steps_per_epoch(cfg)
    finished = finished_sweep(cfg, name)
    if finished is not None:  # a rerun of the benchmark goes on where it stopped
        print(f"[bench] {name}: finished before, read back from MLflow", flush=True)
        trials, best, wall = finished
    else:
        start = time.perf_counter()
        result = tune_weights(cfg)
        wall = time.perf_counter() - start
        trials, best = result.trials, result.fitness
    done = [t for t in trials if t["status"] == "TERMINATED"]
    by_index = {trial_index(t["trial_id"]): t for t in done}
    return {
        "sweep": name,
        "best": best,
        "first": by_index[0]["fitness"] if 0 in by_index else None,  # the configured weights
        "trials": len(trials),
        "failed": len(trials) - len(done),
        "trial_epochs": sum(int(t["step"] or 0) for t in trials) / per_epoch,
        "wall_s": wall,
    }


def finished_sweep(cfg, name: str) -> tuple[list[dict], float, float] | None:
    """(trials, best fitness, wall seconds) of a sweep ``name`` that finished, from its
    MLflow parent run (``trials.json``, ``best/fitness``, start and end time); else None."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mtl.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`mtl.sweep` = '{name}' and attributes.status = 'FINISHED'",
    )
    if not runs:
        return None
    run = runs[0]
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="trials.json", tracking_uri=uri
    )
    trials = json.loads(Path(path).read_text())["trials"]
    wall = (run.info.end_time - run.info.start_time) / 1000
    return trials, run.data.metrics["best/fitness"], wall


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: list[dict], metric: str) -> str:
    grid = [r["grid"] for r in rows]
    pbt = [r["search"] for r in rows]
    scheduler = rows[0]["scheduler"].upper()
    lines = [
        f"| method | {metric} (mean ± std, {len(rows)} seeds) | trial-epochs | wall min |",
        "|---|---|---|---|",
    ]
    for label, values, runs in (
        ("uniform", [g["first"] for g in grid], None),
        (f"grid best of {grid[0]['trials']}", [g["best"] for g in grid], grid),
        (f"{scheduler}, population {pbt[0]['trials']}", [p["best"] for p in pbt], pbt),
    ):
        if runs is None:
            epochs, wall = grid[0]["trial_epochs"] / grid[0]["trials"], "–"
        else:
            epochs = statistics.mean(r["trial_epochs"] for r in runs)
            wall = f"{statistics.mean(r['wall_s'] for r in runs) / 60:.1f}"
        lines.append(f"| {label} | {_mean_std(values)} | {epochs:.1f} | {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tag", default="", help="sweep name prefix (default: benchmark)")
    parser.add_argument("--out", default="pbt_vs_grid.json")
    ns = parser.parse_args()
    cfg = load_config(ns.config, ns.overrides)  # bad input fails here, before any sweep
    tag = ns.tag or f"bench-{cfg.data.benchmark}"
    out, rows = Path(ns.out), []
    for seed in (int(s) for s in ns.seeds.split(",")):
        row = {"seed": seed, "scheduler": cfg.tune.scheduler}
        row["grid"] = sweep(ns.config, ns.overrides, "grid", seed, tag)
        row["search"] = sweep(ns.config, ns.overrides, cfg.tune.scheduler, seed, tag)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=2))  # keep what finished if a later seed fails
        print(json.dumps(row), flush=True)
    print(f"\n{cfg.data.benchmark}\n{table(rows, cfg.tune.metric)}")


if __name__ == "__main__":
    main()
