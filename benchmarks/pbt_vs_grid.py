"""PBT (or PB2) against uniform weights and a grid of fixed weights, at the compute each used.

For every seed this runs two sweeps through ``mtl tune`` on the same config: a grid sweep
(``tune.scheduler=grid``: the configured weights, normally uniform, then each weight times
each of ``tune.grid_factors``) and the config's own PBT/PB2 sweep. Uniform is the grid's first
trial, so it is trained once. Every trial is the same Ray Train x DeepSpeed job, so compute is
counted the same way for all: trial-epochs = the optimizer steps all trials trained / steps
per epoch. Fitness is the validation metric the sweeps rank by (``tune.metric``).

Selection and report use disjoint data. The validation split is cut in two: its first
``--select-batches`` batches are all that PBT ranks trials on (``train.val_batches``) and all
that each sweep picks its best trial on; the rest is held out. After a sweep every finished
trial's final checkpoint is scored on both parts, and the table reports the picked trial's
held-out fitness. A max over the grid's many trials on the data it was picked on would be
biased upwards, and more so the more trials there are. (Δ_MTL compares either part with
the baseline table's full-split values; the offset is the same for every method.)

    .venv/bin/python benchmarks/pbt_vs_grid.py CONFIG [key=value ...] --seeds 0,1,2

Prints one table (mean ± std over seeds) and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from mtl.config import Config, load_config


def sweep(
    path: str,
    overrides: list[str],
    scheduler: str,
    seed: int,
    tag: str,
    select_batches: int,
    variant: str = "",
) -> dict:
    """One sweep; its trials scored on the selection and held-out parts of the validation
    split, the picked trial's and the uniform trial's scores, and the compute it used."""
    name = f"{tag}-{scheduler}{variant}-s{seed}"
    cfg = load_config(
        path,
        [
            *overrides,
            f"tune.scheduler={scheduler}",
            f"tune.seed={seed}",
            f"train.seed={seed}",
            f"tune.name={name}",
            f"train.val_batches={select_batches}",  # PBT ranks on the selection part only
            "tracking.register=false",  # a measurement, not a candidate for the registry
        ],
    )
    from mtl.tune.driver import _steps_per_epoch, tune_weights
    from mtl.tune.space import trial_index

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
    scored = [{**t, **score(cfg, t["checkpoint"], select_batches)} for t in done]
    for t in scored:  # a trial that validated on the picking part reported its score there
        if t["trained_val_batches"] == select_batches and not math.isclose(
            t["select"], t["fitness"], rel_tol=1e-6, abs_tol=1e-6
        ):
            raise RuntimeError(
                f"{name} trial {t['trial_id']}: fitness {t['fitness']} on the first "
                f"{select_batches} val batches in training, {t['select']} here"
            )
    sign = 1.0 if _higher_is_better(cfg.tune.metric) else -1.0
    picked = max(scored, key=lambda t: sign * t["select"])
    by_index = {trial_index(t["trial_id"]): t for t in scored}
    first = by_index.get(0, {})  # the configured weights (uniform by default)
    return {
        "sweep": name,
        "reported_best": best,  # the sweep's own pick, on the data it ranked with
        "best": picked["held_out"],
        "best_select": picked["select"],
        "best_trial": picked["trial_id"],
        "best_weights": picked["weights"],
        "first": first.get("held_out"),
        "first_select": first.get("select"),
        "scores": [
            {k: t[k] for k in ("trial_id", "weights", "select", "held_out")} for t in scored
        ],
        "trials": len(trials),
        "failed": len(trials) - len(done),
        "trial_epochs": sum(int(t["step"] or 0) for t in trials) / per_epoch,
        "wall_s": wall,
    }


def _higher_is_better(metric: str) -> bool:
    from mtl.tune.space import LOWER_IS_BETTER

    return metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER


def score(cfg: Config, checkpoint: str, select_batches: int) -> dict[str, float]:
    """``tune.metric`` of a trial's final checkpoint on the first ``select_batches``
    validation batches ("select") and on the rest ("held_out"), on the CPU, and the
    ``train.val_batches`` it validated on in training."""
    import torch

    from mtl import storage
    from mtl.baselines import baseline_values, load_baseline
    from mtl.data import load_splits, make_loader
    from mtl.metrics import delta_mtl
    from mtl.train.loop import active_taskset
    from mtl.train.register import load_trained
    from mtl.train.step import evaluate

    with storage.local_copy(checkpoint) as local:  # a sweep stored in S3: downloaded first
        trained_cfg, model = load_trained(local)
    taskset = active_taskset(trained_cfg)
    _, val = load_splits(trained_cfg.data, taskset)
    batches = list(make_loader(val, trained_cfg.train.micro_batch_size, train=False))
    if not 0 < select_batches < len(batches):
        raise ValueError(f"--select-batches {select_batches}: the split has {len(batches)}")
    baseline = None
    if trained_cfg.tasks.baseline:
        values = baseline_values(load_baseline(trained_cfg.tasks.baseline))
        baseline = {k: values[k] for k in taskset.loss_keys}  # as the training loop reads it
    out = {"trained_val_batches": trained_cfg.train.val_batches}
    for part, chunk in (
        ("select", batches[:select_batches]),
        ("held_out", batches[select_batches:]),
    ):
        metrics = evaluate(model, chunk, taskset, torch.device("cpu")).compute()
        if baseline is not None:
            metrics["delta_mtl"] = delta_mtl(metrics, baseline, taskset)
        out[part] = metrics.get(cfg.tune.metric, math.nan)
    return out


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
    """Mean ± std over seeds of the picked trial's held-out fitness (and, for reference, its
    fitness on the selection part it was picked on), against the compute each used; then the
    search against uniform and the grid's best seed by seed, since seeds move all three
    together and the paired difference is what decides "at least matches"."""
    grid = [r["grid"] for r in rows]
    pbt = [r["search"] for r in rows]
    scheduler = rows[0]["scheduler"].upper()
    lines = [
        f"| method | {metric}, held out ({len(rows)} seeds) | on the selection part "
        "| trial-epochs | wall min |",
        "|---|---|---|---|---|",
    ]
    for label, held, picked, runs in (
        ("uniform", [g["first"] for g in grid], [g["first_select"] for g in grid], None),
        (
            f"grid best of {grid[0]['trials']}",
            [g["best"] for g in grid],
            [g["best_select"] for g in grid],
            grid,
        ),
        (
            f"{scheduler}, population {pbt[0]['trials']}",
            [p["best"] for p in pbt],
            [p["best_select"] for p in pbt],
            pbt,
        ),
    ):
        if runs is None:
            epochs, wall = grid[0]["trial_epochs"] / grid[0]["trials"], "–"
        else:
            epochs = statistics.mean(r["trial_epochs"] for r in runs)
            wall = f"{statistics.mean(r['wall_s'] for r in runs) / 60:.1f}"
        lines.append(
            f"| {label} | {_mean_std(held)} | {_mean_std(picked)} | {epochs:.1f} | {wall} |"
        )
    sign = 1.0 if _higher_is_better(metric) else -1.0
    lines += [
        "",
        f"| {scheduler} against | better by, held out (paired) | seeds better / tied / worse |",
        "|---|---|---|",
    ]
    for label, key in (("uniform", "first"), ("grid best", "best")):
        lines.append(f"| {label} | {paired(pbt, grid, key, sign)} |")
    return "\n".join(lines)


def paired(search: list[dict], grid: list[dict], key: str, sign: float) -> str:
    """How much better the search's pick is than the grid sweep's ``key`` trial, seed by
    seed: mean ± std of the differences and the count of seeds it is better, tied (within
    1e-9, e.g. the same untouched start trial) or worse."""
    diffs = [sign * (s["best"] - g[key]) for s, g in zip(search, grid, strict=True)]
    better = sum(d > 1e-9 for d in diffs)
    worse = sum(d < -1e-9 for d in diffs)
    return f"{_mean_std(diffs)} | {better} / {len(diffs) - better - worse} / {worse}"


def summary_table(methods: list[tuple[str, list[dict]]], metric: str) -> str:
    """The README's table over several searches of one benchmark: uniform and the grid's best
    (from the search with the most seeds; every search reuses the same grid sweeps), then each
    search, with its paired comparisons against the same seeds' uniform trial and grid pick
    and its held-out fitness per seed."""
    sign = 1.0 if _higher_is_better(metric) else -1.0
    digits = 2 if abs(methods[0][1][0]["grid"]["best"]) > 1.5 else 4

    def mean_std(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    def per_seed(values: list[float]) -> str:
        return " / ".join(f"{v:.{digits}f}" for v in values)

    def vs(search: list[dict], grid: list[dict], key: str) -> str:
        mean, counts = paired(search, grid, key, sign).split(" | ")
        if digits == 2:  # paired() prints 4 digits; Δ_MTL points read better with 2
            parts = [float(x) for x in mean.split(" ± ")]
            mean = " ± ".join(f"{x:+.2f}" if i == 0 else f"{x:.2f}" for i, x in enumerate(parts))
        return f"{mean} ({counts.replace(' ', '')})"

    reference = max((rows for _, rows in methods), key=len)
    grid = [r["grid"] for r in reference]
    lines = [
        "| method | seeds | held out | on the picking part | trial-epochs | better than uniform "
        "| better than grid best | per seed (held out) |",
        "|---|---|---|---|---|---|---|---|",
        f"| uniform | {len(grid)} | {mean_std([g['first'] for g in grid])} "
        f"| {mean_std([g['first_select'] for g in grid])} "
        f"| {grid[0]['trial_epochs'] / grid[0]['trials']:.0f} | | "
        f"| {per_seed([g['first'] for g in grid])} |",
        f"| grid best of {grid[0]['trials']} | {len(grid)} | {mean_std([g['best'] for g in grid])} "
        f"| {mean_std([g['best_select'] for g in grid])} "
        f"| {statistics.mean(g['trial_epochs'] for g in grid):.0f} "
        f"| {vs(grid, grid, 'first')} | | {per_seed([g['best'] for g in grid])} |",
    ]
    for label, rows in methods:
        search, grids = [r["search"] for r in rows], [r["grid"] for r in rows]
        lines.append(
            f"| {label} | {len(rows)} | {mean_std([s['best'] for s in search])} "
            f"| {mean_std([s['best_select'] for s in search])} "
            f"| {statistics.mean(s['trial_epochs'] for s in search):.0f} "
            f"| {vs(search, grids, 'first')} | {vs(search, grids, 'best')} "
            f"| {per_seed([s['best'] for s in search])} |"
        )
    return "\n".join(lines)


def merge_rows(paths: list[str]) -> list[dict]:
    """The rows of several ``--out`` files of one comparison (e.g. seeds 0-2, then 3-4),
    sorted by seed. Refuses a seed twice and files whose sweeps' names differ in more than the
    seed, which would average different methods."""
    rows: dict[int, dict] = {}
    first: tuple[str, str] | None = None  # (sweep names without the seed, file)
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            seed = row["seed"]
            if seed in rows:
                raise ValueError(f"{path}: seed {seed} is in more than one --table file")
            names = " vs ".join(
                row[k]["sweep"].removesuffix(f"-s{seed}") for k in ("search", "grid")
            )
            first = first or (names, path)
            if names != first[0]:
                raise ValueError(
                    f"--table files hold different searches: {first[0]} ({first[1]}) and "
                    f"{names} ({path}); give one method's files"
                )
            rows[seed] = row
    return [rows[seed] for seed in sorted(rows)]


def _val_batches(cfg: Config) -> int:
    from mtl.data import load_splits, make_loader
    from mtl.train.loop import active_taskset

    _, val = load_splits(cfg.data, active_taskset(cfg))
    return len(make_loader(val, cfg.train.micro_batch_size, train=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tag", default="", help="sweep name prefix (default: benchmark)")
    parser.add_argument(
        "--search-overrides",
        nargs="+",
        default=[],
        metavar="key=value",
        help="overrides for the PBT/PB2 sweep only; its name gets them, the grid is reused",
    )
    parser.add_argument("--out", default="pbt_vs_grid.json")
    parser.add_argument(
        "--select-batches",
        type=int,
        default=16,
        help="validation batches PBT ranks and sweeps pick on; the rest is held out",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="reprint the table of one method's --out files (seeds merged)",
    )
    ns = parser.parse_args()
    # Bad input fails here, before any sweep; cfg.tune is the search sweep's.
    cfg = load_config(ns.config, [*ns.overrides, *ns.search_overrides])
    if ns.table:
        try:
            rows = merge_rows(ns.table)
        except ValueError as e:
            parser.error(str(e))
        print(f"{cfg.data.benchmark}\n{table(rows, cfg.tune.metric)}")
        return
    batches = _val_batches(cfg)
    if not 0 < ns.select_batches < batches:
        parser.error(f"--select-batches must leave a held-out part of the {batches} val batches")
    tag = ns.tag or f"bench-{cfg.data.benchmark}"
    out, rows = Path(ns.out), []
    for seed in (int(s) for s in ns.seeds.split(",")):
        row = {"seed": seed, "scheduler": cfg.tune.scheduler}
        for key, scheduler in (("grid", "grid"), ("search", cfg.tune.scheduler)):
            extra = ns.search_overrides if key == "search" else []
            # e.g. "-initial_spread-population_5": a name of its own, safe in paths
            variant = "".join(f"-{o.split('.', 1)[-1].replace('=', '_')}" for o in extra)
            row[key] = sweep(
                ns.config, [*ns.overrides, *extra], scheduler, seed, tag, ns.select_batches, variant
            )
        rows.append(row)
        out.write_text(json.dumps(rows, indent=2))  # keep what finished if a later seed fails
        print(json.dumps(row), flush=True)
    print(f"\n{cfg.data.benchmark}\n{table(rows, cfg.tune.metric)}")


if __name__ == "__main__":
    main()
