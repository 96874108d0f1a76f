"""Training samples/s of the task-expert MoE against hard sharing, side by side in one run.

Every model trains in the same single-process PyTorch loop (AdamW, the project's losses, the
same cached batches, one thread), so the difference is the model. "Active" FLOPs are what one
training forward really computes per image, counted with ``torch.utils.flop_counter`` on a
real batch: a top-1 MoE whose experts are copies of the block computes one block per stream,
like hard sharing, plus the router and the dispatch (gather, ``index_add``). On a multi-domain
task set there is one stream, so top-1 is hard sharing's FLOPs exactly; on a multi-task set
every distinct route is its own stream. Rounds alternate between the models (A B C A B C ...)
and the table shows the median round, so slow drift of a shared machine hits all alike.

    .venv/bin/python benchmarks/moe_throughput.py [--benchmark digits|multimnist] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtl.config import load_config
from mtl.data import load_splits, make_loader
from mtl.losses import normalize_weights
from mtl.models import build_model
from mtl.models.flops import count_flops
from mtl.train.loop import active_taskset
from mtl.train.step import compute_loss

CONFIGS = {"digits": "configs/digits_moe.yaml", "multimnist": "configs/multimnist_moe.yaml"}


def variants(benchmark: str, width: int) -> dict[str, list[str]]:
    """Label -> overrides: hard sharing, then MoE top-1 and top-2 of 4 experts."""
    common = [f"model.width={width}", "tasks.baseline="]
    return {
        "hard sharing": [*common, "model.name=hard_sharing"],
        "MoE E=4 top-1": [*common, "model.moe.num_experts=4", "model.moe.top_k=1"],
        "MoE E=4 top-2": [*common, "model.moe.num_experts=4", "model.moe.top_k=2"],
    }


class Trainer:
    """One model's training loop over cached batches; ``run(n)`` returns samples/s."""

    def __init__(self, cfg, batches: list[dict]) -> None:
        torch.manual_seed(cfg.train.seed)
        self.taskset = active_taskset(cfg)
        self.weights = normalize_weights(cfg.tasks.weights, self.taskset.loss_keys)
        self.weighting = cfg.tasks.weighting
        self.model = build_model(cfg.model, self.taskset).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr)
        self.batches, self.i = batches, 0
        first = batches[0]
        images = first["image"]
        self.flops = count_flops(self.model, images, first.get("domain")) / images.shape[0]

    def run(self, steps: int) -> float:
        samples, start = 0, time.perf_counter()
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            loss, _ = compute_loss(self.model, batch, self.taskset, self.weights, self.weighting)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            samples += batch["image"].shape[0]
        return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=sorted(CONFIGS), default="digits")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    trainers = {}
    for label, overrides in variants(ns.benchmark, ns.width).items():
        cfg = load_config(CONFIGS[ns.benchmark], [*overrides, "data.train_size=2000"])
        train_set, _ = load_splits(cfg.data, active_taskset(cfg))
        loader = make_loader(train_set, cfg.train.micro_batch_size, train=True, seed=0)
        batches = [b for _, b in zip(range(8), loader, strict=False)]
        trainers[label] = Trainer(cfg, batches)
        trainers[label].run(2)  # warm-up: allocator, first-call overheads
    rates: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(ns.rounds):
        for label, trainer in trainers.items():
            rates[label].append(trainer.run(ns.steps))
    base = trainers["hard sharing"]
    base_rate = statistics.median(rates["hard sharing"])
    print(f"\n{ns.benchmark}, width {ns.width}, {ns.threads} thread(s), median of {ns.rounds}")
    print("| model | active MFLOPs/image (fwd) | vs hard sharing | samples/s | vs hard sharing |")
    print("|---|---|---|---|---|")
    for label, trainer in trainers.items():
        rate = statistics.median(rates[label])
        print(
            f"| {label} | {trainer.flops / 1e6:.1f} | {trainer.flops / base.flops:.2f} "
            f"| {rate:.0f} | {rate / base_rate:.2f} |"
        )


if __name__ == "__main__":
    main()
