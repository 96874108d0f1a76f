"""CPU inference: the fixed (pruned) InterroGate model vs the gated model it came from.

The gated model runs the shared and every task stream and mixes them with binarised gates;
the fixed model computes only the channels some output reads. Both run side by side at the
same batch; the latency ratio should track the FLOPs ratio. Gate patterns: a fraction p of
each task's channels (random, seeded) set task-specific, the rest shared, at every layer;
or the learned gates of a trained checkpoint.

    .venv/bin/python benchmarks/inference.py [CONFIG] [key=value ...] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mtl.config import load_config
from mtl.models import build_model
from mtl.models.flops import count_flops
from mtl.prune import fix_interrogate, verify_fixed
from mtl.train.loop import active_taskset
from mtl.train.register import latency_ms, load_trained


def set_gates(model: torch.nn.Module, fraction: float, seed: int = 0) -> None:
    """Open the task-specific path on ``fraction`` of every task's channels, per layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for alpha in model.alpha:  # (T, C) per layer; alpha > 0 means shared
            closed = torch.rand(alpha.shape, generator=generator) < fraction
            alpha.copy_(torch.where(closed, -1.0, 1.0))


def row(label: str, gated: torch.nn.Module, x: torch.Tensor) -> str:
    gated.eval()
    fixed = fix_interrogate(gated)
    verify_fixed(gated, fixed, x, atol=1e-4)
    g_flops, f_flops = count_flops(gated, x[:1]), count_flops(fixed, x[:1])
    g_ms, f_ms = latency_ms(gated, x), latency_ms(fixed, x)
    return (
        f"| {label} | {g_flops / 1e6:.1f} | {f_flops / 1e6:.1f} | {f_flops / g_flops:.2f} "
        f"| {g_ms:.1f} | {f_ms:.1f} | {f_ms / g_ms:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    parser.add_argument("--checkpoint", help="a trained InterroGate run's checkpoint directory")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    path = (
        ns.args[0] if ns.args and "=" not in ns.args[0] else "configs/multimnist_interrogate.yaml"
    )
    overrides = ns.args[1:] if ns.args and "=" not in ns.args[0] else ns.args
    cfg = load_config(path, [*overrides, "tasks.baseline="])
    taskset = active_taskset(cfg)
    x = torch.rand(ns.batch, taskset.in_channels, *taskset.image_size)
    print(f"{cfg.model.backbone} width {cfg.model.width} depth {cfg.model.depth}, "
          f"{len(taskset.heads)} tasks, batch {ns.batch}, {ns.threads} thread(s)\n")  # fmt: skip
    print("| gates | gated MFLOPs | fixed MFLOPs | FLOPs ratio | gated ms | fixed ms | ms ratio |")
    print("|---|---|---|---|---|---|---|")
    if ns.checkpoint:
        _, model = load_trained(Path(ns.checkpoint))
        print(row(f"learned ({ns.checkpoint})", model, x))
        return
    torch.manual_seed(0)
    model = build_model(cfg.model, taskset)
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        set_gates(model, fraction)
        print(row(f"{fraction:.0%} task-specific", model, x), flush=True)


if __name__ == "__main__":
    main()
