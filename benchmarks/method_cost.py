"""Cost of the weighting methods: step time and peak memory of every ``tasks.method``
relative to ``ew``, with the workers' step code in a plain single-process PyTorch loop.

What runs: one process, no Ray, no DeepSpeed (torch AdamW on CPU), and per step exactly the
calls ``mtl.train.loop`` makes on a worker: ``forward_losses`` -> ``Combiner.combine(...,
head_losses)`` -> ``backward`` -> optimizer step -> ``Combiner.end_step(lr, recompute)``.
Every method of ``mtl.methods.METHODS`` is measured (``famo`` with ``tasks.famo.update`` =
``same_batch`` and ``next_batch``; the gradient methods with ``tasks.gradients`` = ``params``
and ``representation``), with the options' defaults, on two benchmarks:

- ``multimnist``: configs/multimnist.yaml as shipped (hard sharing, ResNet width 32 depth 4,
  36x36, 5 tasks, micro-batch 64), one real MultiMNIST-dense batch (needs MNIST under
  ``MTL_DATA_DIR``), reused every step.
- ``celeba40``: configs/celeba.yaml's 40-attribute layout (40 binary heads) on a small trunk
  (``model.backbone=resnet``, width 32, depth 4, 32x32 images, micro-batch 64), fed a
  SYNTHETIC batch (random images, random 0/1 targets): no CelebA files are needed.

Time: all configurations of a benchmark are built in one process and interleaved: each round
runs every configuration for ``--steps`` timed steps (``time.perf_counter`` around the whole
step) after ``--warmup`` untimed steps of each; the median over all timed steps of the
``--rounds`` rounds is reported. Memory: each configuration runs first in a fresh process
(forked from this one after the imports, before any model or step exists);
after the model, batch, optimizer and combiner are built the peak-RSS counter is reset
(``/proc/self/clear_refs``), and the peak RSS (``VmHWM``) over ``--memory-steps`` steps
minus the RSS right before them is reported: the step's transient memory plus what the first
step allocates for good (optimizer moments, gradients), in MB.

    .venv/bin/python benchmarks/method_cost.py     # full run: 17 min at load 3.5-4.5, 2 cores
    .venv/bin/python benchmarks/method_cost.py --quick --methods ew pcgrad --out /tmp/x.json
    .venv/bin/python benchmarks/method_cost.py --table benchmarks/results/method_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "method_cost.json"
ROOT = Path(__file__).resolve().parents[1]

# name -> (config, overrides, synthetic batch?)
BENCHMARKS: dict[str, tuple[str, list[str], bool]] = {
    "multimnist": ("configs/multimnist.yaml", [], False),
    "celeba40": (
        "configs/celeba.yaml",
        [
            "model.backbone=resnet",
            "model.width=32",
            "model.depth=4",
            "model.pretrained=",
            "data.image_size=32",
            "train.micro_batch_size=64",
        ],
        True,
    ),
}
QUICK_OVERRIDES = ["model.width=8", "model.depth=2", "train.micro_batch_size=16"]

# Targets of issue 18, at 5 tasks (the multimnist benchmark), on step time.
LOSS_TARGET, REPRESENTATION_TARGET = 1.1, 2.0


def variants(methods: list[str]) -> list[tuple[str, str]]:
    """(method, variant) pairs: famo's two update modes, the gradient methods' two gradients."""
    from mtl.methods import GRADIENT_METHODS

    out = []
    for m in methods:
        if m == "famo":
            out += [(m, "same_batch"), (m, "next_batch")]
        elif m in GRADIENT_METHODS:
            out += [(m, "params"), (m, "representation")]
        else:
            out.append((m, "-"))
    return out


def overrides_of(method: str, variant: str) -> list[str]:
    from mtl.methods import GRADIENT_METHODS

    extra = [f"tasks.method={method}"]
    if method == "famo":
        extra.append(f"tasks.famo.update={variant}")
    elif method in GRADIENT_METHODS:
        extra.append(f"tasks.gradients={variant}")
    return extra


def active_taskset(cfg):
    """``mtl.train.loop.active_taskset`` (that module imports Ray and DeepSpeed)."""
    from mtl.data import benchmark_taskset

    full = benchmark_taskset(cfg.data)
    return full.subset(cfg.tasks.names) if cfg.tasks.names else full


def make_batch(cfg, taskset, synthetic: bool) -> dict[str, Any]:
    """One batch in the data contract: real MultiMNIST, or random tensors of the set's shapes."""
    from mtl.tasks import BINARY

    n = cfg.train.micro_batch_size
    if not synthetic:
        import dataclasses

        from mtl.data import load_splits, make_loader

        data = dataclasses.replace(cfg.data, train_size=max(n, 64), val_size=16)
        train_set, _ = load_splits(data, taskset)
        return next(iter(make_loader(train_set, n, train=True, seed=0, num_workers=0)))
    if any(h.kind != BINARY for h in taskset.heads):
        raise ValueError(f"synthetic batches cover binary heads only, not {taskset.name}")
    g = torch.Generator().manual_seed(0)
    image = torch.randn(n, taskset.in_channels, *taskset.image_size, generator=g)
    targets = {h.name: torch.randint(0, 2, (n,), generator=g).float() for h in taskset.heads}
    return {"image": image, "targets": targets}


class Job:
    """One configuration: model, optimizer, combiner, and the worker's step."""

    def __init__(self, bench: str, method: str, variant: str, quick: bool, batch=None):
        from mtl.config import load_config
        from mtl.losses import normalize_weights
        from mtl.methods import build_combiner
        from mtl.models import build_model

        path, overrides, synthetic = BENCHMARKS[bench]
        extra = overrides_of(method, variant) + (QUICK_OVERRIDES if quick else [])
        self.cfg = cfg = load_config(ROOT / path, ["tasks.baseline=", *overrides, *extra])
        self.taskset = taskset = active_taskset(cfg)  # as mtl.train.loop, without Ray's import
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, taskset)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        priors = normalize_weights(cfg.tasks.weights, taskset.loss_keys)
        self.combiner = build_combiner(cfg.tasks, taskset, priors, self.model, cfg.train.seed)
        self.batch = make_batch(cfg, taskset, synthetic) if batch is None else batch
        self.step_index = 0

    def step(self) -> None:
        """The worker's micro-batch (mtl.train.loop._Job._train_micro), one process."""
        from mtl.losses import task_losses
        from mtl.train.step import auxiliary_total, cast_outputs, forward_losses

        batch, taskset, model = self.batch, self.taskset, self.model
        losses = forward_losses(model, batch, taskset)
        task = {k: losses[k] for k in taskset.loss_keys}
        loss, objective = self.combiner.combine(
            task,
            self.step_index,
            0,
            lambda outputs: task_losses(cast_outputs(outputs), batch, taskset),
        )
        loss = loss + auxiliary_total(losses)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_index += 1

        def recompute():
            outputs = cast_outputs(model(batch["image"], batch.get("domain")))
            return task_losses(outputs, batch, taskset)

        self.combiner.end_step(self.opt.param_groups[0]["lr"], recompute)
        float(objective.detach())  # the workers' logging reads it


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(bench: str, method: str, variant: str, quick: bool, steps: int) -> dict:
    """In this (fresh) process: peak RSS over ``steps`` steps minus the RSS before them."""
    job = Job(bench, method, variant, quick)
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    for _ in range(steps):
        job.step()
    peak = _rss_mb("VmHWM")
    return {"rss_before_mb": before, "peak_rss_mb": peak, "peak_mb": peak - before}


def run_memory(bench: str, method: str, variant: str, ns) -> dict:
    """``memory_probe`` in a child forked from this process before it built anything (so it
    inherits the imports, not a heap that a model or a step has grown)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, write one JSON line, exit without cleanup
        code = 0
        try:
            os.close(read)
            result = memory_probe(bench, method, variant, ns.quick, ns.memory_steps)
            os.write(write, json.dumps(result).encode())
        except BaseException as error:  # reported by the parent
            os.write(write, json.dumps({"error": repr(error)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(text) if text else {"error": "the probe wrote nothing"}
    if "error" in result:
        raise RuntimeError(f"memory probe {bench}/{method}/{variant} failed: {result['error']}")
    return result


def run_timing(bench: str, pairs: list[tuple[str, str]], ns) -> tuple[dict, Job]:
    """Interleaved rounds over every configuration: per-step seconds per configuration
    (and the first configuration's job, for the settings)."""
    first = Job(bench, *pairs[0], ns.quick)
    jobs = {pairs[0]: first}
    for pair in pairs[1:]:
        jobs[pair] = Job(bench, *pair, ns.quick, batch=first.batch)
    times: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    for job in jobs.values():
        for _ in range(ns.warmup):
            job.step()
    for r in range(ns.rounds):
        order = pairs if r % 2 == 0 else pairs[::-1]  # alternate so no method always follows one
        for pair in order:
            job = jobs[pair]
            for _ in range(ns.steps):
                start = time.perf_counter()
                job.step()
                times[pair].append(time.perf_counter() - start)
    return times, first


def _preimport(methods: list[str]) -> None:
    """Import what the step imports lazily, once, before the probes fork."""
    import importlib

    import mtl.losses
    import mtl.train.step  # noqa: F401

    for m in methods:
        importlib.import_module(f"mtl.methods.{m}")


def measure(ns) -> tuple[list[dict], dict]:
    pairs = variants(ns.methods)
    _preimport(ns.methods)
    rows = []
    for bench in ns.benchmarks:
        started = time.perf_counter()
        load_start = os.getloadavg()
        memory = {p: run_memory(bench, *p, ns) for p in pairs}  # first: a clean parent
        times, probe = run_timing(bench, pairs, ns)
        cfg = probe.cfg
        ew_time = statistics.median(times[("ew", "-")]) if ("ew", "-") in times else None
        ew_mem = memory[("ew", "-")]["peak_mb"] if ("ew", "-") in memory else None
        for pair in pairs:
            t = sorted(times[pair])
            median = statistics.median(t)
            q = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [median] * 3
            mem = memory[pair]
            rows.append(
                {
                    "benchmark": bench,
                    "tasks": len(probe.taskset.loss_keys),
                    "method": pair[0],
                    "variant": pair[1],
                    "kind": _kind(pair[0]),
                    "ms_per_step": 1e3 * median,
                    "ms_p25": 1e3 * q[0],
                    "ms_p75": 1e3 * q[2],
                    "timed_steps": len(t),
                    "x_ew_time": median / ew_time if ew_time else None,
                    **mem,
                    "x_ew_memory": mem["peak_mb"] / ew_mem if ew_mem else None,
                    "config": BENCHMARKS[bench][0],
                    "model": f"{cfg.model.name} {cfg.model.backbone} width {cfg.model.width} "
                    f"depth {cfg.model.depth}",
                    "input": f"{probe.taskset.in_channels}x{probe.taskset.image_size[0]}x"
                    f"{probe.taskset.image_size[1]}",
                    "micro_batch": cfg.train.micro_batch_size,
                    "data": "synthetic" if BENCHMARKS[bench][2] else "MultiMNIST-dense (real)",
                    "load_start": load_start,
                    "load_end": os.getloadavg(),
                    "bench_seconds": time.perf_counter() - started,
                }
            )
        print(f"{bench}: {time.perf_counter() - started:.0f} s", flush=True)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": time.ctime(),
        "threads": ns.threads,
        "warmup_steps": ns.warmup,
        "rounds": ns.rounds,
        "steps_per_round": ns.steps,
        "memory_steps": ns.memory_steps,
        "quick": ns.quick,
        "loadavg_end": os.getloadavg(),
        "loop": "single process, no Ray, no DeepSpeed, torch AdamW, CPU; the worker's calls: "
        "forward_losses -> Combiner.combine(head_losses) -> backward -> step -> end_step",
        "memory": "a fresh process per configuration (forked before anything was built): "
        "VmHWM after the steps minus VmRSS before them (peak reset via /proc/self/clear_refs)",
        "targets": {"loss_x_ew": LOSS_TARGET, "representation_x_ew": REPRESENTATION_TARGET},
    }
    return rows, meta


def _kind(method: str) -> str:
    from mtl.methods import GRADIENT_METHODS

    return "gradient" if method in GRADIENT_METHODS else "loss"


def target_of(row: dict) -> float | None:
    """The issue's step-time target for a 5-task row (None: the issue sets none)."""
    if row["tasks"] != 5 or row["method"] == "ew":
        return None
    if row["kind"] == "loss":
        return LOSS_TARGET
    return REPRESENTATION_TARGET if row["variant"] == "representation" else None


HEADER = (
    "| benchmark | tasks | method | variant | ms/step | × ew | peak MB | × ew | target (time) |"
)


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of stored rows (medians; × ew within the same benchmark)."""
    lines = [HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = target_of(r)
        verdict = "—"
        if target is not None:
            met = r["x_ew_time"] <= target
            verdict = f"≤ {target:g}: {'met' if met else 'missed'}"
        lines.append(
            f"| {r['benchmark']} | {r['tasks']} | {r['method']} | {r['variant']} | "
            f"{r['ms_per_step']:.1f} | {_x(r['x_ew_time'])} | {r['peak_mb']:.1f} | "
            f"{_x(r['x_ew_memory'])} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    from mtl.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, help="print the table of a result file")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    if ns.table:
        print(table(json.loads(ns.table.read_text())["rows"]))
        return
    if "ew" not in ns.methods:
        ns.methods = ["ew", *ns.methods]  # the reference of every ratio
    if ns.quick:
        ns.warmup, ns.rounds, ns.steps, ns.memory_steps = 1, 1, 2, 2
    rows, meta = measure(ns)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"load average (1, 5, 15 min) at the end: {meta['loadavg_end']}")


if __name__ == "__main__":
    main()
