"""Training throughput: the Ray Train x DeepSpeed path vs a plain single-process PyTorch loop.

Same model, micro-batch, data pipeline and threads per process, measured side by side in one
run. Both sides count samples/s over windows of ``--window`` optimizer steps and report the
median window after the first (warm-up), so start-up is excluded on both sides alike.

    .venv/bin/python benchmarks/throughput.py [CONFIG] [key=value ...] [--steps 120]
        [--out FILE]            # append this run's rows to a JSON results file
    .venv/bin/python benchmarks/throughput.py --table FILE   # the README's table of a file
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mtl.config import Config, load_config
from mtl.data import load_splits, make_loader, prepare
from mtl.losses import normalize_weights
from mtl.models import build_model
from mtl.train.loop import active_taskset
from mtl.train.step import compute_loss


def plain_loop(cfg: Config, steps: int, window: int) -> float:
    """Median samples/s of a textbook loop: one process, torch AdamW, no Ray, no DeepSpeed."""
    torch.set_num_threads(cfg.train.threads_per_worker)
    torch.manual_seed(cfg.train.seed)
    taskset = active_taskset(cfg)
    weights = normalize_weights(cfg.tasks.weights, taskset.loss_keys)
    model = build_model(cfg.model, taskset)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    train_set, _ = load_splits(cfg.data, taskset)
    loader = make_loader(
        train_set,
        cfg.train.micro_batch_size,
        train=True,
        seed=cfg.train.seed,
        num_workers=cfg.data.loader_workers,  # the same decoding processes as a Ray worker
    )
    rates, step, samples, start = [], 0, 0, time.perf_counter()
    while step < steps:
        for batch in loader:
            loss, _ = compute_loss(model, batch, taskset, weights, cfg.tasks.weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, samples = step + 1, samples + batch["image"].shape[0]
            if step % window == 0:
                loss.item()  # the Ray path syncs when it logs; so does this one
                rates.append(samples / (time.perf_counter() - start))
                samples, start = 0, time.perf_counter()
            if step >= steps:
                break
    return statistics.median(rates[1:])


def ray_path(cfg: Config, workers: int, steps: int, window: int) -> float:
    """Median samples/s (all workers) that the real training job logged to MLflow."""
    from mlflow.tracking import MlflowClient

    from mtl.train.launch import fit

    train = dataclasses.replace(
        cfg.train,
        num_workers=workers,
        max_steps=steps,
        log_every_steps=window,
        val_every_steps=10 * steps,
        checkpoint_every_steps=10 * steps,
        val_batches=1,
    )
    result = fit(
        dataclasses.replace(cfg, train=train), run_name=f"throughput-{workers}w-{time.time():.0f}"
    )
    history = MlflowClient(result.tracking_uri).get_metric_history(
        result.mlflow_run_id, "train/samples_per_s"
    )
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    return statistics.median(rates[1:])


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of stored rows, one line per (run, path)."""
    lines = [
        "| config | model | input | micro-batch | path | workers | samples/s | vs plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['model']} | {r['input']} | {r['micro_batch']} | {r['path']} "
            f"| {r['workers']} | {r['samples_per_s']:.2f} | {r['vs_plain']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    parser.add_argument("--out", type=Path, help="append the rows to this JSON results file")
    parser.add_argument("--table", type=Path, help="print the table of a results file")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument(
        "--max-workers", type=int, default=2, choices=(1, 2), help="1 skips the 2-worker run"
    )
    ns = parser.parse_args()
    if ns.table:
        print(table(json.loads(ns.table.read_text())["rows"]))
        return
    path = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    cfg = load_config(path or "configs/multimnist.yaml", ns.args[1:] if path else ns.args)
    cfg = dataclasses.replace(
        cfg,
        tasks=dataclasses.replace(cfg.tasks, baseline=""),
        tracking=dataclasses.replace(cfg.tracking, register=False),  # measuring, not shipping
    )
    prepare(cfg.data)
    t = cfg.train
    print(
        f"model {cfg.model.backbone} width {cfg.model.width} depth {cfg.model.depth}, micro-batch "
        f"{t.micro_batch_size}, {t.threads_per_worker} thread(s) per process, "
        f"ZeRO {cfg.deepspeed.zero_stage}, "
        f"{ns.steps} steps, windows of {ns.window}, {torch.get_num_threads()} cores visible"
    )
    plain = plain_loop(cfg, ns.steps, ns.window)
    one = ray_path(cfg, 1, ns.steps, ns.window)
    two = ray_path(cfg, 2, ns.steps, ns.window) if ns.max_workers == 2 else None
    rows = [
        ("plain PyTorch loop", 1, plain),
        ("Ray Train x DeepSpeed", 1, one),
        *([("Ray Train x DeepSpeed", 2, two)] if two is not None else []),
    ]
    print("\n| path | workers | samples/s | vs plain |\n|---|---|---|---|")
    for name, workers, rate in rows:
        print(f"| {name} | {workers} | {rate:.0f} | {rate / plain:.2f} |")
    print(f"\nRay x DeepSpeed (1 worker) / plain = {one / plain:.3f} (target >= 0.9)")
    if ns.out:
        m = cfg.model
        dilated = f" os{m.output_stride}" if m.output_stride != 32 else ""
        model = f"{m.name} {m.backbone}{dilated}"
        common = {
            "config": path or "configs/multimnist.yaml",
            "overrides": ns.args[1:] if path else ns.args,
            "model": model,
            "input": "x".join(map(str, active_taskset(cfg).image_size)),
            "micro_batch": t.micro_batch_size,
            "threads": t.threads_per_worker,
            "steps": ns.steps,
            "window": ns.window,
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} cores visible",
        }
        stored = json.loads(ns.out.read_text())["rows"] if ns.out.is_file() else []
        stored += [
            {**common, "path": name, "workers": w, "samples_per_s": r, "vs_plain": r / plain}
            for name, w, r in rows
        ]
        ns.out.write_text(json.dumps({"rows": stored}, indent=2) + "\n")
    if two is not None:
        print(f"2 workers / 1 worker = {two / one:.2f}")


if __name__ == "__main__":
    main()
