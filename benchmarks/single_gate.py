"""The single-gated MoE's exit-threshold sweep against hard sharing and the task MoE.

Protocol: the trade-off study's (``benchmarks/tradeoff.py``): the same configs, data, global
batch, optimizer, LR schedule and epochs, one plain PyTorch process per arm on the CPU (no Ray,
no DeepSpeed). The single-gated MoE spends the same epochs as the other arms in total: the base
trains for ``model.single_gate.base_fraction`` of the steps with its own warm-up and cosine
schedule, k-means of its pooled features (``cluster_samples`` training images) starts the
experts and the gate, then the experts and the gate train for the rest with a fresh optimizer
and schedule (as ``mtl train`` does, ``mtl/train/single_gate.py``). Hard sharing and the task
MoE are the trade-off study's rows of the same seeds (``--reference``, its JSON lines): no arm
is retrained here.

Measured per seed, on the whole validation split (the split the trade-off study reports; no
choice is made on it): metrics and Δ_MTL (baselines: that study's single-task arms of the same
seed) at each exit threshold, with the exit rate and expected FLOPs per image (base always,
gate and one expert for the rest); the gate's assignment (images per expert, usage entropy,
collapse flag); the fixed model (front + expert programs, ``mtl.prune_single_gate``) against
the trained one (max difference); and the fixed model's CPU latency at batch 64 on one thread
at two thresholds against its FLOPs ratio.

    .venv/bin/python benchmarks/single_gate.py --benchmark multimnist --seeds 0 1 2 \\
        --reference benchmarks/results/tradeoff_multimnist_4ep.jsonl \\
        --out benchmarks/results/single_gate_multimnist_4ep.jsonl
    .venv/bin/python benchmarks/single_gate.py --benchmark multimnist \\
        --table benchmarks/results/single_gate_multimnist_4ep.jsonl \\
        --reference benchmarks/results/tradeoff_multimnist_4ep.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS = {
    "multimnist": "configs/multimnist_single_gate.yaml",
    "digits": "configs/digits_single_gate.yaml",
}
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LATENCY_THRESHOLDS = (0.9, 1.0)


def _train(model, loader, steps: int, cfg, taskset, weights, device, params) -> None:
    """``steps`` AdamW steps over ``params`` with warm-up and cosine decay (tradeoff.py's)."""
    from tradeoff import lr_lambda

    from mtl.train.step import compute_loss, to_device

    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(steps, min(t.warmup_steps, steps), t.lr_schedule)
    )
    step, epoch = 0, 0
    while step < steps:
        loader.batch_sampler.set_epoch(epoch)
        for b in loader:
            loss, _ = compute_loss(model, to_device(b, device), taskset, weights, "loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        epoch += 1


@torch.no_grad()
def _latency_ms(fixed, x: torch.Tensor, repeats: int = 20) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fixed(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fixed(x)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def train_seed(ns: argparse.Namespace, seed: int, baseline: dict[str, float]) -> dict[str, Any]:
    """Train one seed's single-gated MoE, sweep it, fix it, time it; returns its row."""
    from mtl.config import load_config
    from mtl.data import load_splits, make_loader
    from mtl.losses import normalize_weights
    from mtl.models import build_model
    from mtl.models.single_gate import branch_flops, kmeans_centroids
    from mtl.prune_single_gate import export_single_gate, fix_single_gate
    from mtl.single_gate_eval import assignment, threshold_sweep
    from mtl.train.loop import active_taskset

    torch.set_num_threads(ns.threads)
    start = time.perf_counter()
    overrides = [f"train.epochs={ns.epochs}", f"model.width={ns.width}", "tasks.baseline=",
                 f"train.seed={seed}", *ns.set]  # fmt: skip
    cfg = load_config(CONFIGS[ns.benchmark], overrides)
    t, sg = cfg.train, cfg.model.single_gate
    torch.manual_seed(t.seed)
    taskset = active_taskset(cfg)
    weights = normalize_weights(cfg.tasks.weights, taskset.loss_keys)
    model = build_model(cfg.model, taskset).train()
    device = torch.device("cpu")
    train_set, val_set = load_splits(cfg.data, taskset)
    batch = t.micro_batch_size * t.num_workers * t.grad_accum_steps
    loader = make_loader(train_set, batch, train=True, seed=t.seed)
    total = t.epochs * len(loader)
    base_steps = min(total - 1, max(1, round(total * sg.base_fraction)))

    model.set_stage("base")
    _train(model, loader, base_steps, cfg, taskset, weights, device, model.trainable())
    feats = []
    model.eval()
    for b in make_loader(train_set, 256, train=False):
        feats.append(model.features(b["image"]))
        if sum(len(f) for f in feats) >= sg.cluster_samples:
            break
    model.train()
    model.init_from_base(kmeans_centroids(torch.cat(feats)[: sg.cluster_samples],
                                          sg.num_experts, t.seed))  # fmt: skip
    model.set_stage("experts")
    _train(model, loader, total - base_steps, cfg, taskset, weights, device, model.trainable())
    train_s = time.perf_counter() - start

    model.eval()
    val = list(make_loader(val_set, 256, train=False))
    sweep = threshold_sweep(model, val, taskset, THRESHOLDS, baseline or None)
    usage = assignment(model, val, taskset)
    x = val[0]["image"][:64]
    parts = branch_flops(model, x[:1])
    row: dict[str, Any] = {
        "key": f"single_gate@seed{seed}", "seed": seed, "epochs": ns.epochs, "steps": total,
        "base_steps": base_steps, "global_batch": batch, "train_s": round(train_s, 1),
        "sweep": sweep, "assignment": usage, "flops": parts, "overrides": overrides,
    }  # fmt: skip
    row["latency"] = {}
    for threshold in LATENCY_THRESHOLDS:
        model.threshold = threshold
        fixed = export_single_gate(fix_single_gate(model, taskset.image_size), x)
        with torch.no_grad():
            want, got = model(x), fixed(x)
        diff = max(float((want[k] - got[k]).abs().max()) for k in want)
        exits = float(model.exits(model.base(model.prefix(x), taskset.image_size)).float().mean())
        row["latency"][str(threshold)] = {
            "ms_b64": _latency_ms(fixed, x), "max_diff": diff, "exit_rate_b64": exits,
        }  # fmt: skip
    model.threshold = sg.threshold
    row["wall_s"] = round(time.perf_counter() - start, 1)
    return row


def reference_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _taskset(config: str):
    from mtl.config import load_config
    from mtl.train.loop import active_taskset

    return active_taskset(load_config(config, []))


def baselines(reference: list[dict[str, Any]], seed: int, config: str) -> dict:
    """The trade-off study's single-task values of ``seed``: loss key -> primary metric."""
    taskset = _taskset(config)
    tasks = taskset.loss_keys
    out = {}
    for row in reference:
        if row["seed"] == seed and row["label"].startswith("single/"):
            key = row["label"].split("/", 1)[1]
            metric, _ = taskset.primary(key)
            out[key] = row["metrics"][metric]
    return {k: out[k] for k in tasks if k in out}


def table(rows: list[dict[str, Any]], reference: list[dict[str, Any]], metric: str,
          config: str) -> str:  # fmt: skip
    """Mean ± std over seeds: the sweep's points and the reference arms, FLOPs and metric."""
    lines = [
        f"| model | threshold | exit rate | MFLOPs / image | {metric} |",
        "|---|---|---|---|---|",
    ]
    seeds = sorted({r["seed"] for r in rows})

    def ms(values: list[float], digits: int = 2) -> str:
        if len(values) < 2:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    for label in sorted({r["label"] for r in reference if r["seed"] in seeds and (
            r["label"] == "hard_sharing" or r["label"].startswith("moe/"))}):  # fmt: skip
        picked = [r for r in reference if r["label"] == label and r["seed"] in seeds]
        values = [_metric(r, metric, reference, config) for r in picked]
        lines.append(f"| {label} | - | - | {ms([r['mflops'] for r in picked])} | {ms(values)} |")
    for i, threshold in enumerate(rows[0]["sweep"]):
        points = [r["sweep"][i] for r in rows]
        lines.append(
            f"| single_gate | {threshold['threshold']} | {ms([p['exit_rate'] for p in points])} "
            f"| {ms([p['flops'] / 1e6 for p in points])} | {ms([p[metric] for p in points])} |"
        )
    return "\n".join(lines)


def _metric(row: dict[str, Any], metric: str, reference: list[dict[str, Any]],
            config: str) -> float:  # fmt: skip
    """A reference arm's metric; Δ_MTL against its own seed's single-task arms."""
    if metric != "delta_mtl":
        return row["metrics"][metric]
    from mtl.metrics import delta_mtl

    return delta_mtl(row["metrics"], baselines(reference, row["seed"], config), _taskset(config))


def details(rows: list[dict[str, Any]]) -> str:
    """Per seed: the gate's usage, the fixed model's difference and latency at two thresholds."""
    lines = [
        "| seed | images per expert (val) | usage entropy | collapsed | max abs diff fixed vs "
        "trained | latency b64 @0.9 / @1.0 (ms) | exit rate b64 @0.9 | FLOPs ratio @0.9 / @1.0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        usage, lat, parts = r["assignment"], r["latency"], r["flops"]
        full = parts["base"] + parts["gate"] + parts["expert"]
        at = {float(p["threshold"]): p for p in r["sweep"]}
        ratio = f"{at[0.9]['flops'] / full:.2f} / {at[1.0]['flops'] / full:.2f}"
        counts = [sum(row) for row in usage["counts"]]
        diff = max(v["max_diff"] for v in lat.values())
        lines.append(
            f"| {r['seed']} | {counts} | {usage['usage_entropy']:.2f} | {usage['collapsed']} | "
            f"{diff:.1e} | {lat['0.9']['ms_b64']:.1f} / {lat['1.0']['ms_b64']:.1f} | "
            f"{lat['0.9']['exit_rate_b64']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def save_figure(rows: list[dict[str, Any]], reference: list[dict[str, Any]], config: str,
                metric: str, path: Path) -> None:  # fmt: skip
    """The seed-mean sweep against the seed-mean reference arms (``sweep_figure``), as PNG."""
    from mtl.single_gate_eval import sweep_figure

    seeds = {r["seed"] for r in rows}
    mean_rows = []
    for i, point in enumerate(rows[0]["sweep"]):
        values = [r["sweep"][i] for r in rows]
        mean_rows.append({
            "threshold": point["threshold"],
            "exit_rate": statistics.mean(v["exit_rate"] for v in values),
            "flops": statistics.mean(v["flops"] for v in values),
            metric: statistics.mean(v[metric] for v in values),
        })  # fmt: skip
    references = {}
    for label in sorted({r["label"] for r in reference if r["label"] == "hard_sharing"
                         or r["label"].startswith("moe/")}):  # fmt: skip
        picked = [r for r in reference if r["label"] == label and r["seed"] in seeds]
        if picked:
            references[label] = (
                statistics.mean(r["mflops"] * 1e6 for r in picked),
                statistics.mean(_metric(r, metric, reference, config) for r in picked),
            )
    figure = sweep_figure(mean_rows, metric, references)
    figure.savefig(path, dpi=110)


def summary(rows: list[dict[str, Any]], reference: list[dict[str, Any]], config: str) -> str:
    """The README block: the sweep against the references on Δ_MTL and mean accuracy, then the
    per-seed details."""
    parts = [table(rows, reference, m, config) for m in ("delta_mtl", "mean_accuracy")
             if all(m in p for p in rows[0]["sweep"])]  # fmt: skip
    return "\n\n".join([*parts, details(rows)])


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tradeoff.py's helpers
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", choices=sorted(CONFIGS), default="multimnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=["data.train_size=6000"])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path)
    parser.add_argument("--figure", type=Path, help="with --table: the sweep figure (PNG)")
    ns = parser.parse_args()
    reference = reference_rows(ns.reference)
    if ns.table:
        rows = reference_rows(ns.table)
        print(summary(rows, reference, CONFIGS[ns.benchmark]))
        if ns.figure:
            metric = "delta_mtl" if "delta_mtl" in rows[0]["sweep"][0] else "mean_accuracy"
            save_figure(rows, reference, CONFIGS[ns.benchmark], metric, ns.figure)
        return
    done = {r["key"] for r in reference_rows(ns.out)} if ns.out and ns.out.exists() else set()
    for seed in ns.seeds:
        if f"single_gate@seed{seed}" in done:
            continue
        row = train_seed(ns, seed, baselines(reference, seed, CONFIGS[ns.benchmark]))
        print(json.dumps({k: row[k] for k in ("key", "train_s", "latency")}), flush=True)
        if ns.out:
            with ns.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
