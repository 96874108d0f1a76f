"""CPU inference: the fixed (pruned) InterroGate model vs the gated model it came from.

The gated model runs the shared and every task stream and mixes them with binarised gates;
the fixed model computes only the channels some output reads. Both run side by side at the
same batch; the latency ratio should track the FLOPs ratio. Each row also gives the tasks'
mean budget rate r_t (``task_rates()``, binarised gates), the fixed model's FLOPs against
the hard-sharing model of the same config, and max |fixed - gated| (``verify_fixed``).

Gate patterns:
- default: a fraction p of each task's channels (random, seeded) set task-specific, the rest
  shared, at every layer;
- ``--taus``: a budget τ; per task, its deepest blocks made wholly task-specific, from the
  last block backwards while r_t <= τ, the rest shared (τ = 0 is hard sharing, τ = 1 one
  trunk per task);
- ``--checkpoint``: the learned gates of a trained run.

    .venv/bin/python benchmarks/inference.py [CONFIG] [key=value ...] [--checkpoint DIR]
    .venv/bin/python benchmarks/inference.py configs/multimnist_interrogate.yaml \\
        "tasks.names=[left,right,semseg]" model.head_channels=32 data.image_size=64 \\
        model.backbone=resnet18 --taus 0 0.25 1 --batch 16 --threads 1 \\
        --out benchmarks/results/inference_standard.json
    (the same with data.image_size=112 model.backbone=vit_s16 --batch 8)
    .venv/bin/python benchmarks/inference.py --table benchmarks/results/inference_standard.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mtl.config import load_config
from mtl.models import build_model
from mtl.models.flops import count_flops
from mtl.prune import fix_interrogate, verify_fixed
from mtl.train.loop import active_taskset
from mtl.train.register import latency_ms, load_trained

DEFAULT_CONFIG = "configs/multimnist_interrogate.yaml"
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def set_gates(model: torch.nn.Module, fraction: float, seed: int = 0) -> None:
    """Open the task-specific path on ``fraction`` of every task's channels, per layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for alpha in model.alpha:  # (T, C) per layer; alpha > 0 means shared
            closed = torch.rand(alpha.shape, generator=generator) < fraction
            alpha.copy_(torch.where(closed, -1.0, 1.0))


@torch.no_grad()
def set_budget_gates(model: torch.nn.Module, tau: float) -> dict[str, list[int]]:
    """Per task, make its deepest blocks wholly task-specific (every channel's alpha < 0),
    from the last block backwards while its rate r_t stays <= ``tau``; the rest shared.

    Returns:
        Head name -> the task-specific blocks, in order.
    """
    for alpha in model.alpha:
        alpha.fill_(1.0)
    opened = {}
    for i, task in enumerate(model.task_rates()):
        blocks = []
        for layer in reversed(range(len(model.alpha))):
            model.alpha[layer][i].fill_(-1.0)
            if model.task_rates()[task].item() > tau + 1e-6:  # r_t of float weights summing to 1
                model.alpha[layer][i].fill_(1.0)
                break
            blocks.insert(0, layer)
        opened[task] = blocks
    return opened


def measure(
    gated: torch.nn.Module, hard_flops: int, x: torch.Tensor, atol: float, repeats: int
) -> dict[str, Any]:
    """FLOPs (per image), max |fixed - gated| and latency (batch ``x``) of ``gated`` and of
    its fixed model, measured one after the other.

    Raises:
        PruneVerificationError: The fixed model differs from the gated one by more than
            ``atol`` (the message names the task).
    """
    gated.eval()
    fixed = fix_interrogate(gated)
    diff = verify_fixed(gated, fixed, x, atol=atol)
    rates = {t: r.item() for t, r in gated.task_rates().items()}
    out = {
        "rate": sum(rates.values()) / len(rates),
        "rates": rates,
        "gated_flops": count_flops(gated, x[:1]),
        "fixed_flops": count_flops(fixed, x[:1]),
        "hard_sharing_flops": hard_flops,
        "max_abs_diff": diff,
        "gated_ms": latency_ms(gated, x, repeats),
        "fixed_ms": latency_ms(fixed, x, repeats),
    }
    return out


HEADER = (
    "| gates | r_t | gated MFLOPs | fixed MFLOPs | fixed / gated | fixed / hard sharing | "
    "max abs diff | gated ms | fixed ms | ms ratio |"
)
RULE = "|---" * 10 + "|"


def format_row(r: dict[str, Any]) -> str:
    g, f = r["gated_flops"], r["fixed_flops"]
    return (
        f"| {r['gates']} | {r['rate']:.3f} | {g / 1e6:,.1f} | {f / 1e6:,.1f} | {f / g:.3f} | "
        f"{f / r['hard_sharing_flops']:.2f} | {r['max_abs_diff']:.1e} | {r['gated_ms']:,.1f} | "
        f"{r['fixed_ms']:,.1f} | {r['fixed_ms'] / r['gated_ms']:.3f} |"
    )


def run_title(r: dict[str, Any]) -> str:
    """One line naming the run a row belongs to (rows of one run share it)."""
    return (
        f"{r['backbone']} {r['input']}, {len(r['tasks'])} tasks ({', '.join(r['tasks'])}), "
        f"batch {r['batch']}, {r['threads']} thread(s), {r['repeats']} latency repeats; "
        f"{r['config']} {' '.join(r['overrides'])}"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown tables of stored rows, one per run (the README's are printed by this)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault(run_title(r), []).append(r)
    tables = [
        "\n".join([title, "", HEADER, RULE, *map(format_row, group)])
        for title, group in runs.items()
    ]
    return "\n\n".join(tables)


def patterns(ns: argparse.Namespace, model: torch.nn.Module):
    """(label, extra row fields) for each gate pattern, after setting it on ``model``."""
    if ns.taus:
        for tau in ns.taus:
            opened = set_budget_gates(model, tau)
            yield f"τ = {tau:g}", {"tau": tau, "task_specific_blocks": opened}
    else:
        for fraction in FRACTIONS:
            set_gates(model, fraction)
            yield f"{fraction:.0%} task-specific", {"fraction": fraction}


def save(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to a result file (``{"meta", "rows"}``), creating it if need be."""
    stored = json.loads(path.read_text())["rows"] if path.is_file() else []
    meta = {
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "updated": time.ctime(),
    }
    path.write_text(json.dumps({"meta": meta, "rows": stored + rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    parser.add_argument("--checkpoint", help="a trained InterroGate run's checkpoint directory")
    parser.add_argument("--taus", type=float, nargs="+", help="budget patterns (see above)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes")
    parser.add_argument("--atol", type=float, default=1e-4, help="max |fixed - gated|")
    parser.add_argument("--out", type=Path, help="append the rows to this JSON result file")
    parser.add_argument("--table", type=Path, help="print the tables of a result file")
    ns = parser.parse_args()
    if ns.table:
        print(table(json.loads(ns.table.read_text())["rows"]))
        return
    torch.set_num_threads(ns.threads)
    given = bool(ns.args) and "=" not in ns.args[0]
    path = ns.args[0] if given else DEFAULT_CONFIG
    overrides = [*(ns.args[1:] if given else ns.args), "tasks.baseline="]
    cfg = load_config(path, overrides)
    if ns.checkpoint:
        from mtl import storage

        with storage.local_copy(ns.checkpoint) as local:  # local or s3://
            cfg, model = load_trained(local)
        path, overrides = ns.checkpoint, []  # the run's own config
    taskset = active_taskset(cfg)
    x = torch.rand(ns.batch, taskset.in_channels, *taskset.image_size)
    hard_cfg = dataclasses.replace(cfg.model, name="hard_sharing", pretrained="")
    hard_flops = count_flops(build_model(hard_cfg, taskset), x[:1])
    run = {
        "config": path,
        "overrides": overrides,
        "backbone": cfg.model.backbone,
        "input": f"{taskset.in_channels}x{taskset.image_size[0]}x{taskset.image_size[1]}",
        "tasks": [h.name for h in taskset.heads],
        "batch": ns.batch,
        "threads": ns.threads,
        "repeats": ns.repeats,
    }
    print(run_title(run) + "\n")
    print(HEADER + "\n" + RULE)
    rows = []
    if ns.checkpoint:
        cases = [(f"learned ({ns.checkpoint})", {"checkpoint": ns.checkpoint})]
    else:
        torch.manual_seed(0)
        model = build_model(cfg.model, taskset)
        cases = patterns(ns, model)
    for label, extra in cases:
        start = time.perf_counter()
        row = {**run, "gates": label, **extra}
        row.update(measure(model, hard_flops, x, ns.atol, ns.repeats))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(format_row(row), flush=True)
    if ns.out:
        save(ns.out, rows)


if __name__ == "__main__":
    main()
