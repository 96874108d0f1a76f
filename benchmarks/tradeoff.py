"""Δ_MTL, FLOPs and latency of every model family, trained side by side on one device.

The arms of one study share the data, epochs, global batch, optimizer and LR schedule of
``mtl train`` (AdamW; linear warm-up then cosine decay; InterroGate's gate group at
``gate_lr_scale``): single-task models (the Δ_MTL baselines of this very study), hard
sharing, InterroGate at several budgets τ, and the task-expert MoE at top-1 and top-2. Each
arm is one plain PyTorch process (no Ray, no DeepSpeed), so one GPU, or a CPU, runs the whole
study; the Ray Train x DeepSpeed path trains the same models with the same step
(``mtl.train.step``), which ``benchmarks/throughput.py`` compares against this loop.

After training every arm is fixed the way registration fixes it (``FIXERS``), verified
against the trained model on held-out images, and measured: validation metrics of the fixed
model's trained twin, FLOPs per image of the fixed model, parameters, and CPU latency at
batch 64 on one thread. InterroGate arms start their task blocks from the same seed's
single-task arms (``model.interrogate.init_from``'s warm start) unless ``--cold``.

    .venv/bin/python benchmarks/tradeoff.py --benchmark multimnist --epochs 8 --seeds 0 1 2 \
        --taus 0.05 0.1 0.25 0.5 --jobs 6 --out tradeoff.json
    .venv/bin/python benchmarks/tradeoff.py --table tradeoff.json   # print a finished study

Results are appended to ``--out`` (JSON lines) as arms finish, and a rerun skips the arms
already there, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIGS = {
    "multimnist": {
        "hard_sharing": "configs/multimnist.yaml",
        "interrogate": "configs/multimnist_interrogate.yaml",
        "moe": "configs/multimnist_moe.yaml",
    },
    "digits": {
        "hard_sharing": "configs/digits.yaml",
        "interrogate": "configs/digits.yaml",
        "moe": "configs/digits_moe.yaml",
    },
}


@dataclass
class Arm:
    """One model to train: a label, its config file and overrides, and what it waits for."""

    label: str
    seed: int
    config: str
    overrides: list[str] = field(default_factory=list)
    warm_start: bool = False  # InterroGate: task blocks from this seed's single-task arms

    @property
    def key(self) -> str:
        return f"{self.label}@seed{self.seed}"


def plan(ns: argparse.Namespace, tasks: list[str]) -> list[Arm]:
    """Every arm of the study, single-task arms first (InterroGate starts from them)."""
    files = CONFIGS[ns.benchmark]
    common = [
        f"train.epochs={ns.epochs}",
        f"model.width={ns.width}",
        "tasks.baseline=",
        *ns.set,
    ]
    arms: list[Arm] = []
    for seed in ns.seeds:
        run = [*common, f"train.seed={seed}"]
        if not ns.no_single:
            for task in tasks:
                arms.append(Arm(f"single/{task}", seed, files["hard_sharing"],
                                [*run, f"tasks.names=[{task}]"]))  # fmt: skip
        arms.append(Arm("hard_sharing", seed, files["hard_sharing"], run))
        for tau in ns.taus:
            overrides = [*run, f"model.interrogate.tau={tau}", *ns.interrogate]
            if ns.benchmark == "digits":
                overrides = [*overrides, "model.name=interrogate"]
            warm = not ns.cold and ns.benchmark != "digits"
            name = "interrogate-cold" if ns.cold and ns.benchmark != "digits" else "interrogate"
            arms.append(Arm(f"{name}/tau={tau}", seed, files["interrogate"], overrides, warm))
        for k in ns.moe_top_k:
            overrides, label = [*run, f"model.moe.top_k={k}"], f"moe/top{k}"
            if ns.moe_layers:  # MoE in these blocks only; the others stay shared
                layers = ",".join(map(str, ns.moe_layers))
                overrides.append(f"model.moe.moe_layers=[{layers}]")
                label += f"/blocks={layers}"
            arms.append(Arm(label, seed, files["moe"], overrides))
    return arms


def lr_lambda(total: int, warmup: int, schedule: str):
    """DeepSpeed's WarmupCosineLR as ``mtl train`` configures it, as a LambdaLR factor."""

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    domain = batch.get("domain")
    return batch["image"].to(device), None if domain is None else domain.to(device)


@torch.no_grad()
def cpu_latency_ms(model: torch.nn.Module, x: torch.Tensor, domain, repeats: int = 20) -> float:
    """Median wall time of one forward pass on the CPU, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model(x, domain)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, domain)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def train_arm(arm: Arm, device_name: str, threads: int, scratch: str) -> dict[str, Any]:
    """Train, fix, verify and measure one arm; returns its result row."""
    # Imported in the worker process: it may run on a machine without Ray, DeepSpeed, MLflow.
    from mtl.config import load_config
    from mtl.data import load_splits, make_loader
    from mtl.losses import normalize_weights
    from mtl.models import build_model
    from mtl.models.flops import count_flops, count_params
    from mtl.prune import verify_fixed
    from mtl.train.engine import parameter_groups
    from mtl.train.loop import active_taskset
    from mtl.train.register import FIXERS, _tolerance
    from mtl.train.step import compute_loss, evaluate, to_device
    from mtl.train.warm_start import load_single_task_weights

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    start = time.perf_counter()
    cfg = load_config(arm.config, arm.overrides)
    t = cfg.train
    torch.manual_seed(t.seed)
    taskset = active_taskset(cfg)
    weights = normalize_weights(cfg.tasks.weights, taskset.loss_keys)
    model = build_model(cfg.model, taskset)
    if arm.warm_start:
        load_single_task_weights(model, {
            h.name: torch.load(
                Path(scratch) / f"single-{h.name}-seed{arm.seed}.pt", weights_only=True
            )
            for h in taskset.heads
        })  # fmt: skip
    model.to(device).train()

    # The global batch of the Ray path: num_workers x micro-batch x accumulation.
    batch = t.micro_batch_size * t.num_workers * t.grad_accum_steps
    train_set, val_set = load_splits(cfg.data, taskset)
    sampling = weights if cfg.tasks.weighting == "sampling" else None
    loader = make_loader(train_set, batch, train=True, seed=t.seed, domain_weights=sampling)
    total = t.max_steps if t.max_steps > 0 else t.epochs * len(loader)
    opt = torch.optim.AdamW(parameter_groups(model, cfg), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(total, min(t.warmup_steps, total), t.lr_schedule)
    )
    clip = cfg.deepspeed.gradient_clipping
    step, epoch, aux_sums = 0, 0, {}
    while step < total:
        loader.batch_sampler.set_epoch(epoch)
        for b in loader:
            loss, losses = compute_loss(
                model, to_device(b, device), taskset, weights, cfg.tasks.weighting
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            step += 1
            if step > total - 20:  # auxiliary losses over the last 20 steps
                for k, v in losses.items():
                    if k.startswith("aux/"):
                        aux_sums[k] = aux_sums.get(k, 0.0) + float(v.detach()) / 20
            if step >= total:
                break
        epoch += 1
    train_s = time.perf_counter() - start

    model.eval()
    val_loader = make_loader(val_set, 256, train=False)
    metrics = evaluate(model, val_loader, taskset, device).compute()
    row: dict[str, Any] = {
        "key": arm.key, "label": arm.label, "seed": arm.seed, "model": cfg.model.name,
        "tasks": taskset.loss_keys, "epochs": t.epochs, "steps": total, "global_batch": batch,
        "train_s": round(train_s, 1), "device": device_name, "metrics": metrics, **aux_sums,
    }  # fmt: skip
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, weights_path(scratch, arm))
    if arm.label.startswith("single/"):
        torch.save(state, Path(scratch) / f"single-{taskset.loss_keys[0]}-seed{arm.seed}.pt")

    # Fix as registration does, verify on held-out images, measure on the CPU.
    model = model.cpu()
    first = next(iter(make_loader(val_set, 64, train=False)))
    x, domain = _inputs(first, torch.device("cpu"))
    fixed = FIXERS[cfg.model.name](model)
    if fixed is not model:
        row["verify_max_diff"] = verify_fixed(model, fixed, x, _tolerance(cfg), domain)
    one = (x[:1], None if domain is None else domain[:1])
    row["mflops"] = count_flops(fixed, *one) / 1e6
    row["trained_mflops"] = count_flops(model, *one) / 1e6
    row["params"] = count_params(fixed)
    row["config"], row["overrides"] = arm.config, arm.overrides
    if hasattr(model, "gate_pattern"):
        row["gate_pattern"] = model.gate_pattern()
        row["task_rates"] = {k: float(v) for k, v in model.task_rates().items()}
    if hasattr(model, "routes"):
        row.update(_moe_rows(model, fixed, x, domain))
    row["wall_s"] = round(time.perf_counter() - start, 1)
    return row


def _moe_rows(model, fixed, x: torch.Tensor, domain) -> dict[str, Any]:
    """Routes, utilisation and the fixed cost per task (domain) of a task-expert MoE.

    On a multi-domain set the fixed model runs every distinct domain route over the whole
    batch (static shapes); an image of domain d served by the model fixed for d alone costs
    that model's FLOPs, which is what ``mflops`` reports there (the mixed pass is kept too).
    """
    from mtl.prune_moe import moe_flops

    flops = moe_flops(model, x[:1])
    rows: dict[str, Any] = {
        "routes": model.routes(),
        "expert_usage": model.expert_usage(),
        "num_experts": model.num_experts,
        "mflops_all": flops["all"] / 1e6,
        "mflops_per_key": {k: v / 1e6 for k, v in flops.items() if k != "all"},
    }
    if domain is not None:
        rows["mflops"] = statistics.mean(rows["mflops_per_key"].values())
    return rows


def weights_path(scratch: str, arm: Arm) -> Path:
    return Path(scratch) / (arm.key.replace("/", "_").replace("=", "") + ".pt")


def measure_latency(row: dict[str, Any], scratch: str) -> None:
    """CPU latency (batch 64, one thread) of a finished arm's fixed model, measured after
    every arm has trained so that nothing else runs beside it. A multi-domain MoE is timed
    per domain with the model fixed for that domain (and its mixed-domain pass)."""
    from mtl.config import load_config
    from mtl.data import load_splits, make_loader
    from mtl.models import build_model
    from mtl.prune_moe import fix_moe
    from mtl.train.loop import active_taskset
    from mtl.train.register import FIXERS

    arm = Arm(row["label"], row["seed"], row["config"], row["overrides"])
    cfg = load_config(arm.config, arm.overrides)
    taskset = active_taskset(cfg)
    model = build_model(cfg.model, taskset)
    model.load_state_dict(torch.load(weights_path(scratch, arm), weights_only=True))
    model.eval()
    _, val_set = load_splits(cfg.data, taskset)
    x, domain = _inputs(next(iter(make_loader(val_set, 64, train=False))), torch.device("cpu"))
    fixed = FIXERS[cfg.model.name](model)
    row["cpu_ms_b64"] = cpu_latency_ms(fixed, x, domain)
    if domain is not None and hasattr(model, "routes"):
        row["cpu_ms_b64_mixed"] = row["cpu_ms_b64"]
        row["cpu_ms_b64"] = statistics.mean(
            cpu_latency_ms(fix_moe(model, [key]), x, torch.full_like(domain, i))
            for i, key in enumerate(model.keys)
        )


def _worker(args: tuple[Arm, str, int, str]) -> dict[str, Any]:
    arm = args[0]
    try:
        return train_arm(*args)
    except Exception as error:  # reported in the results, the study goes on
        return {"key": arm.key, "label": arm.label, "seed": arm.seed, "error": repr(error)}


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_study(ns: argparse.Namespace) -> None:
    from mtl.config import load_config
    from mtl.data import prepare
    from mtl.train.loop import active_taskset

    base = load_config(CONFIGS[ns.benchmark]["hard_sharing"], ["tasks.baseline=", *ns.set])
    tasks = active_taskset(base).loss_keys
    prepare(base.data)  # build the data cache once, before the workers read it
    out = Path(ns.out)
    done = {r["key"] for r in load_rows(out) if "error" not in r}
    arms = [a for a in plan(ns, tasks) if a.key not in done]
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = max(1, (os.cpu_count() or 2) // ns.jobs)
    scratch = ns.scratch or str(out.with_suffix(".weights"))
    Path(scratch).mkdir(parents=True, exist_ok=True)
    print(f"{len(arms)} arms to train on {device}, {ns.jobs} at a time, {threads} thread(s) "
          f"each; single-task weights in {scratch}", flush=True)  # fmt: skip
    # Single-task arms first (InterroGate's warm start reads their weights), then
    # InterroGate, the slowest, so that a study cut short loses the cheap arms.
    first = [a for a in arms if a.label.startswith("single/")]
    second = sorted((a for a in arms if a not in first), key=lambda a: not a.warm_start)
    context = mp.get_context("spawn")
    with context.Pool(ns.jobs, maxtasksperchild=1) as pool, out.open("a") as sink:
        for group in (first, second):
            jobs = [(a, device, threads, scratch) for a in group]
            for row in pool.imap_unordered(_worker, jobs):
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                status = row.get("error") or f"{row['wall_s']:.0f} s"
                print(f"[{time.strftime('%H:%M:%S')}] {row['key']}: {status}", flush=True)
    rows = load_rows(out)
    for row in rows:
        if "error" not in row and "cpu_ms_b64" not in row:
            try:
                measure_latency(row, scratch)
            except Exception as error:  # the table still prints, without this latency
                row["cpu_ms_b64"] = math.nan
                print(f"latency of {row['key']} not measured: {error!r}", flush=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print_table(rows, tasks)


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _taskset(tasks: list[str]):
    """The task set a row was evaluated on (its benchmark's, restricted to its tasks)."""
    from mtl.config import load_config
    from mtl.data import benchmark_taskset

    benchmark = "digits" if {"mnist_m", "optdigits"} & set(tasks) else "multimnist"
    cfg = load_config(CONFIGS[benchmark]["hard_sharing"], ["tasks.baseline="])
    return benchmark_taskset(cfg.data).subset(tasks)


def summarize(rows: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """Per label, over seeds: Δ_MTL against the same seed's single-task arms, mean accuracy,
    and the fixed model's cost; plus "single-task (all)", the single-task models summed."""
    from mtl.metrics import delta_mtl

    rows = [r for r in rows if "error" not in r]
    taskset = _taskset(tasks)
    singles = {(r["seed"], r["tasks"][0]): r for r in rows if r["label"].startswith("single/")}
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["label"].startswith("single/"):
            continue
        entry = table.setdefault(r["label"], {"label": r["label"], "delta": [], "acc": [],
                                              "mflops": [], "ms": [], "params": []})  # fmt: skip
        entry["mflops"].append(r["mflops"])
        entry["ms"].append(r.get("cpu_ms_b64", math.nan))  # not yet measured: nan
        entry["params"].append(r["params"])
        if "mean_accuracy" in r["metrics"]:
            entry["acc"].append(r["metrics"]["mean_accuracy"])
        if all((r["seed"], t) in singles for t in tasks):
            baseline = {t: singles[(r["seed"], t)]["metrics"][taskset.primary(t)[0]] for t in tasks}
            entry["delta"].append(delta_mtl(r["metrics"], baseline, taskset))
    seeds = sorted({s for s, t in singles if all((s, u) in singles for u in tasks)})
    if seeds:
        total = {k: [sum(singles[(s, t)].get(k, math.nan) for t in tasks) for s in seeds]
                 for k in ("mflops", "cpu_ms_b64", "params")}  # fmt: skip
        accs = [
            statistics.mean(
                singles[(s, t)]["metrics"].get("mean_accuracy", math.nan) for t in tasks
            )
            for s in seeds
        ]
        table["single-task (all)"] = {
            "label": "single-task (all)", "delta": [0.0] * len(seeds), "acc": accs,
            "mflops": total["mflops"], "ms": total["cpu_ms_b64"], "params": total["params"],
        }  # fmt: skip
    return list(table.values())


def print_table(rows: list[dict[str, Any]], tasks: list[str]) -> None:
    """The Δ_MTL / accuracy / FLOPs / latency table, mean ± std over seeds."""
    entries = summarize(rows, tasks)
    single = next((e for e in entries if e["label"] == "single-task (all)"), None)
    reference = statistics.mean(single["mflops"]) if single else math.nan
    print("\n| model | seeds | Δ_MTL % | mean accuracy | MFLOPs/image | % of single-task "
          "FLOPs | params (k) | CPU ms, batch 64 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for e in entries:
        mflops = statistics.mean(e["mflops"])
        acc = [a for a in e["acc"] if not math.isnan(a)]
        params, ms = statistics.mean(e["params"]) / 1e3, statistics.mean(e["ms"])
        print(f"| {e['label']} | {len(e['mflops'])} | {_mean_std(e['delta'])} "
              f"| {_mean_std(acc, 4)} | {mflops:.1f} | {100 * mflops / reference:.0f} "
              f"| {params:.0f} | {ms:.1f} |")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['key']}: {r['error']}")
    print_utilisation(rows)


def utilisation(row: dict[str, Any]) -> dict[str, Any]:
    """Load-balance statistics of a MoE row's fixed routes, per MoE layer.

    ``max_share``: the largest fraction of all (task, top-k slot) routing decisions that
    any one expert receives (1/E is perfectly balanced, 1.0 is collapse onto one expert);
    ``experts_used``: experts that at least one task uses; ``mi_bits``: the mutual
    information between task and expert under the router's probabilities (0 = every task
    routes alike; log2(E) = each task has experts of its own); ``distinct_routes``: how many
    different whole-network routes the tasks take (1 = collapse, T = all different).
    """
    routes, usage, E = row["routes"], row["expert_usage"], row["num_experts"]
    keys = list(routes)
    layers = len(next(iter(routes.values())))
    stats: dict[str, Any] = {"max_share": [], "experts_used": [], "mi_bits": []}
    for layer in range(layers):
        counts = [0] * E
        for key in keys:
            for e in routes[key][layer]:
                counts[e] += 1
        stats["max_share"].append(max(counts) / sum(counts))
        stats["experts_used"].append(sum(c > 0 for c in counts))
        probs = [usage[key][layer] for key in keys]
        mean = [statistics.mean(p[e] for p in probs) for e in range(E)]
        entropy = lambda p: -sum(q * math.log2(q) for q in p if q > 0)  # noqa: E731
        stats["mi_bits"].append(entropy(mean) - statistics.mean(entropy(p) for p in probs))
    stats["distinct_routes"] = len({json.dumps(routes[k]) for k in keys})
    return stats


def print_utilisation(rows: list[dict[str, Any]]) -> None:
    moe_rows = [r for r in rows if "routes" in r and "error" not in r]
    if not moe_rows:
        return
    print("\n| MoE arm | seed | distinct routes / tasks | experts used per layer "
          "| max expert share per layer | I(task; expert) bits per layer "
          "| balance loss |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in sorted(moe_rows, key=lambda r: (r["label"], r["seed"])):
        u = utilisation(r)
        print(f"| {r['label']} | {r['seed']} | {u['distinct_routes']} / {len(r['routes'])} "
              f"| {' '.join(map(str, u['experts_used']))} of {r['num_experts']} "
              f"| {' '.join(f'{v:.2f}' for v in u['max_share'])} "
              f"| {' '.join(f'{v:.2f}' for v in u['mi_bits'])} "
              f"| {r.get('aux/load_balance', math.nan):.4f} |")  # fmt: skip


def save_figures(rows: list[dict[str, Any]], tasks: list[str], directory: Path) -> None:
    """The Δ_MTL-vs-FLOPs figure, and per model of the first seed its learned structure
    (InterroGate: gate pattern; MoE: routes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl.tracking.pictures import gate_pattern_figure, routes_figure

    directory.mkdir(parents=True, exist_ok=True)
    entries = summarize(rows, tasks)
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in entries:
        if e["delta"]:
            x, y = statistics.mean(e["mflops"]), statistics.mean(e["delta"])
            err = statistics.stdev(e["delta"]) if len(e["delta"]) > 1 else 0.0
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
            ax.annotate(e["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("MFLOPs per image (fixed model)")
    ax.set_ylabel("Δ_MTL % vs single-task")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "delta_vs_flops.png", dpi=120)
    first = min(r["seed"] for r in rows if "error" not in r)
    for r in rows:
        if "error" in r or r["seed"] != first:
            continue
        name = r["label"].replace("/", "_").replace("=", "")
        if "gate_pattern" in r:
            figure = gate_pattern_figure(r["gate_pattern"], f"{r['label']}: task-specific channels")
        elif "routes" in r:
            figure = routes_figure(r["routes"], r["num_experts"], f"{r['label']}: experts per task")
        else:
            continue
        figure.savefig(directory / f"{name}.png", dpi=120)
    print(f"figures in {directory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=sorted(CONFIGS), default="multimnist")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--taus", type=float, nargs="*", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--moe-top-k", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--interrogate", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides of the InterroGate arms")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of every arm (e.g. data.train_size=2000)")  # fmt: skip
    parser.add_argument("--moe-layers", type=int, nargs="*", default=[],
                        help="blocks that are MoE layers (default: every block)")  # fmt: skip
    parser.add_argument("--cold", action="store_true",
                        help="InterroGate without warm start (label interrogate-cold)")  # fmt: skip
    parser.add_argument("--no-single", action="store_true", help="skip the single-task arms")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once")
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--scratch", default="", help="where trained weights are kept "
                        "(default: next to --out)")  # fmt: skip
    parser.add_argument("--out", default="tradeoff.jsonl")
    parser.add_argument("--table", default="", help="print the table of a finished study")
    parser.add_argument("--figures", default="", help="with --table: write figures here")
    ns = parser.parse_args()
    if ns.table:
        rows = load_rows(Path(ns.table))
        first = next(r for r in rows if "error" not in r and not r["label"].startswith("single/"))
        print_table(rows, first["tasks"])
        if ns.figures:
            save_figures(rows, first["tasks"], Path(ns.figures))
        return
    run_study(ns)


if __name__ == "__main__":
    main()
