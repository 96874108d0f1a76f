"""Scaling over network hosts: samples/s of 1, 2 and 4 Ray Train x DeepSpeed workers spread
over two worker nodes vs packed on one, on a cluster of network namespaces (CPU).

The cluster is tests/multinode/harness.py's (a head with no CPUs, two worker nodes w1/w2 in
their own network namespaces, token auth, the MLflow server on the head). Each run is a real
``ray job submit`` of jobs/train.py (configs/tiny.yaml, a fixed number of steps, one torch
thread per worker, a fixed micro-batch per worker, so n workers do n times the work per
step). Where the workers land is set by their CPU request against the nodes' CPUs (Ray
Train packs a placement group onto as few nodes as it can) and read back from Ray's state
API; a run whose placement is not the intended one is recorded as such and left out.

Throughput is the run's own log: rank 0's ``train/samples_per_s`` (all workers) over windows
of ``--window`` steps, as logged to MLflow; the median window after the first, so start-up
(DeepSpeed's op build, the first batches) is excluded. Efficiency = rate / (n x the 1-worker
rate of the same repeat). Runs are interleaved (each repeat walks the cases in the other
order) and the load average is recorded around each.

The namespace hop alone: a gloo all-reduce of the tiny model's gradient (and of 8 MiB)
between two processes in two namespaces (over the veths and the bridge) vs in one namespace.

    sudo .venv/bin/python benchmarks/scaling.py [--steps 80] [--window 16] [--repeats 2]
        [--out benchmarks/results/scaling.json]
    .venv/bin/python benchmarks/scaling.py --table benchmarks/results/scaling.json
    .venv/bin/python benchmarks/scaling.py --rebuild FILE   # the summary again from raw runs

Needs root (ip netns). Not run in CI: 2 repeats took 25 minutes on two cores shared with other
sessions (start-up and their load, not the measured steps); a later `--out` to the same file
adds its repeats after the stored ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = "configs/tiny.yaml"
WORKER_NODE_CPUS = 4  # logical CPUs Ray sees per worker node (the machine has 2 cores)
# (workers, layout, CPUs each worker requests): 1 CPU each packs onto one 4-CPU node; 3 CPUs
# each cannot share a node (one per node); 2 CPUs each fill both nodes, two per node.
CASES = [
    (1, "1 node", 1),
    (2, "1 node", 1),
    (2, "2 nodes", 3),
    (4, "1 node", 1),
    (4, "2 nodes", 2),
]
CAVEAT = (
    "CPU only, on a machine with 2 physical cores shared with other sessions' test runs (the "
    "load column): 4 workers oversubscribe it (2 do too, with Ray's own processes), so the "
    "rows measure contention for cores as much as communication, and repeats differ by up to "
    "3x with the load; compare the layouts at equal n within a repeat, and do not read the "
    "efficiencies as a real cluster's."
)


# -- the namespace hop: a gloo all-reduce between two processes ----------------------------
def allreduce_worker(ns: argparse.Namespace) -> None:
    """One rank of the all-reduce timing (run inside a namespace by ``hop_cost``): for each
    size in ``--numel``, the median of ``--iters`` all-reduces after a warm-up."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{ns.master}", rank=ns.rank, world_size=2)
    out = {}
    for numel in map(int, ns.numel.split(",")):
        x = torch.ones(numel)
        for _ in range(5):  # warm-up: connections, buffers
            dist.all_reduce(x)
        times = []
        for _ in range(ns.iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        out[numel] = 1e3 * statistics.median(times)
    if ns.rank == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def _allreduce_ms(cluster, nodes, sizes: list[int], iters: int, port: int) -> dict[int, float]:
    """Median ms of an all-reduce of each of ``sizes`` floats, rank r in ``nodes[r]``'s
    namespace, both connecting to rank 0's address (one namespace: both on the same node)."""
    master = f"{nodes[0].ip}:{port}"
    procs = []
    for rank, node in enumerate(nodes):
        env = {**cluster.env(), "GLOO_SOCKET_IFNAME": f"mn{cluster.tag}{node.name}"}
        env.update(OMP_NUM_THREADS="1")
        argv = [sys.executable, __file__, "--allreduce-worker", "--rank", str(rank)]
        argv += ["--master", master, "--numel", ",".join(map(str, sizes))]
        argv += ["--iters", str(iters)]
        procs.append(
            subprocess.Popen(
                cluster.in_ns(node, argv),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=REPO,
            )  # fmt: skip
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"all-reduce ranks failed: {[p.returncode for p in procs]}")
    return {int(k): v for k, v in json.loads(outs[0].strip().splitlines()[-1]).items()}


def hop_cost(cluster, grad_numel: int, iters: int, repeats: int) -> list[dict[str, Any]]:
    w1, w2 = cluster.node("w1"), cluster.node("w2")
    sizes = {grad_numel: "tiny model's gradient", 2 * 1024**2: "8 MiB"}
    rows, port = [], 29600
    for r in range(repeats):
        layouts = [("1 namespace", (w1, w1)), ("2 namespaces", (w1, w2))]
        for layout, nodes in layouts if r % 2 == 0 else layouts[::-1]:
            port += 1
            load = os.getloadavg()[0]
            for numel, ms in _allreduce_ms(cluster, nodes, list(sizes), iters, port).items():
                rows.append(
                    {"size": sizes[numel], "numel": numel, "bytes": 4 * numel,
                     "layout": layout, "repeat": r, "median_ms": ms, "load_1m": load}
                )  # fmt: skip
                print(f"  all-reduce {sizes[numel]} ({4 * numel} B), {layout}: {ms:.3f} ms")
    return rows


def prebuild_deepspeed_ops() -> str:
    """DeepSpeed's CPU shm comm op, built once into a folder of this benchmark's own, which
    every node's workers inherit: each run then loads it instead of rebuilding it (a build
    is minutes on this machine, and other sessions' builds of the shared cache alternate)."""
    ext = Path(tempfile.gettempdir()) / "mtl_scaling_torch_extensions"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ext)
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    return str(ext)


# -- training runs -------------------------------------------------------------------------
def _overrides(cluster, workdir: Path, n: int, cpus: int, steps: int, window: int) -> list[str]:
    return [
        f"train.num_workers={n}",
        f"train.cpus_per_worker={cpus}",
        "train.threads_per_worker=1",
        "data.loader_workers=0",  # no decoding process per worker: fewer processes per core
        "data.train_size=4096",  # at most one epoch boundary in a run
        "data.val_size=32",
        f"data.cache_dir={workdir / 'cache'}",
        f"train.max_steps={steps}",
        f"train.log_every_steps={window}",
        f"train.val_every_steps={10 * steps}",
        f"train.checkpoint_every_steps={10 * steps}",  # one checkpoint, at the last step
        "train.val_batches=1",
        "tasks.baseline=",
        "tracking.register=false",
        f"train.storage_path={workdir / 'runs'}",
        f"tracking.tracking_uri={cluster.mlflow_uri}",
    ]


def train_run(cluster, workdir: Path, case, steps: int, window: int, tag: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    n, layout, cpus = case
    job = f"scaling-{n}w-{cpus}c-{tag}"
    argv = [sys.executable, str(REPO / "jobs" / "train.py"), str(REPO / CONFIG)]
    overrides = _overrides(cluster, workdir, n, cpus, steps, window)
    argv += [*overrides, "--name", job]
    load_before, start = os.getloadavg()[0], time.monotonic()
    done = cluster.submit(argv, job, timeout=600)
    status = cluster.wait_job(job, 60)
    wall = time.monotonic() - start
    logs = cluster.job_logs(job) or done.stdout + done.stderr
    (cluster.log_dir / f"{job}.log").write_text(logs)
    row = {
        "workers": n, "layout": layout, "cpus_per_worker": cpus, "job": job,
        "status": status, "wall_s": wall, "load_1m_before": load_before,
        "load_1m_after": os.getloadavg()[0], "overrides": overrides,
    }  # fmt: skip
    if status != "SUCCEEDED":
        row["error"] = logs[-2000:]
        return row
    jobs = json.loads(cluster.ray_cli("list", "jobs", "--format", "json", "--detail").stdout)
    job_id = next(j["job_id"] for j in jobs if j["submission_id"] == job)
    placed = sorted(cluster.actor_nodes("RayTrainWorker", job_id))
    row["placed_on"] = placed
    row["placement_ok"] = len(placed) == n and len(set(placed)) == (1 if layout == "1 node" else 2)
    shown = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    history = MlflowClient(cluster.mlflow_uri).get_metric_history(
        shown["mlflow_run_id"], "train/samples_per_s"
    )
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    row["window_rates"] = rates
    row["samples_per_s"] = statistics.median(rates[1:])
    return row


def summarise(runs: list[dict[str, Any]], micro_batch: int) -> list[dict[str, Any]]:
    """One row per (workers, layout): median rate over repeats, efficiency against the
    1-worker rate of the same repeat, and the step time that rate means (every worker does
    ``micro_batch`` samples a step)."""
    ok = [r for r in runs if r.get("placement_ok")]
    base = {r["repeat"]: r["samples_per_s"] for r in ok if r["workers"] == 1}
    rows = []
    for n, layout, _ in CASES:
        mine = [r for r in ok if r["workers"] == n and r["layout"] == layout]
        if not mine:
            continue
        effs = [r["samples_per_s"] / (n * base[r["repeat"]]) for r in mine if r["repeat"] in base]
        rate = statistics.median(r["samples_per_s"] for r in mine)
        rows.append(
            {
                "workers": n,
                "layout": "either" if n == 1 else layout,
                "samples_per_s": rate,
                "step_ms": 1e3 * n * micro_batch / rate,
                "samples_per_s_each": [round(r["samples_per_s"], 2) for r in mine],
                "efficiency": statistics.median(effs) if effs else None,
                "repeats": len(mine),
                "load_1m": [round(r["load_1m_before"], 1) for r in mine],
                "placed_on": mine[0]["placed_on"],
            }
        )
    return rows


def table(result: dict[str, Any]) -> str:
    """Markdown tables of a results file: the scaling rows, then the hop."""
    lines = [
        "| workers | layout | samples/s (each repeat) | efficiency | step (ms) | repeats "
        "| load (1 min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        eff = "1.00" if r["workers"] == 1 else f"{r['efficiency']:.2f}"
        each = ", ".join(f"{x:.0f}" for x in r["samples_per_s_each"])
        load = ", ".join(f"{x:.1f}" for x in r["load_1m"])
        lines.append(
            f"| {r['workers']} | {r['layout']} | {r['samples_per_s']:.0f} ({each}) | {eff} "
            f"| {r['step_ms']:.1f} | {r['repeats']} | {load} |"
        )
    steps = {(r["workers"], r["layout"]): r["step_ms"] for r in result["rows"]}
    for n in sorted({n for n, _ in steps}):
        if (n, "1 node") in steps and (n, "2 nodes") in steps:
            extra = steps[n, "2 nodes"] - steps[n, "1 node"]
            lines.append(f"\n{n} workers: a step over 2 nodes takes {extra:+.1f} ms vs 1 node.")
    lines += ["", "| all-reduce | bytes | 1 namespace (ms) | 2 namespaces (ms) | hop (ms) |"]
    lines.append("|---|---|---|---|---|")
    for h in result["hop"]:
        lines.append(
            f"| {h['size']} | {h['bytes']} | {h['one_ns_ms']:.3f} | {h['two_ns_ms']:.3f} "
            f"| {h['hop_ms']:+.3f} |"
        )
    lines += ["", f"Caveat: {result['caveat']}"]
    return "\n".join(lines)


def summarise_hop(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        one = statistics.median(
            r["median_ms"] for r in rows if r["size"] == size and r["layout"] == "1 namespace"
        )
        two = statistics.median(
            r["median_ms"] for r in rows if r["size"] == size and r["layout"] == "2 namespaces"
        )
        first = next(r for r in rows if r["size"] == size)
        out.append(
            {"size": size, "numel": first["numel"], "bytes": first["bytes"],
             "one_ns_ms": one, "two_ns_ms": two, "hop_ms": two - one}
        )  # fmt: skip
    return out


def grad_numel() -> int:
    from mtl.config import load_config
    from mtl.models import build_model
    from mtl.train.loop import active_taskset

    cfg = load_config(str(REPO / CONFIG), [])
    model = build_model(cfg.model, active_taskset(cfg))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tiny_micro_batch() -> int:
    from mtl.config import load_config

    return load_config(str(REPO / CONFIG), []).train.micro_batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        help="write the results to this JSON file (an existing one's runs "
        "are kept: this run's repeats are added after them)",
    )
    parser.add_argument("--table", type=Path, help="print the tables of a results file")
    parser.add_argument(
        "--rebuild", type=Path, help="recompute a results file's summary from its raw runs"
    )
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50, help="all-reduces per hop timing")
    parser.add_argument(
        "--workers", default="1,2,4", help="worker counts to run (1 is every efficiency's base)"
    )
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--numel", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.allreduce_worker:
        allreduce_worker(ns)
        return
    if ns.table:
        print(table(json.loads(ns.table.read_text())))
        return
    if ns.rebuild:
        result = json.loads(ns.rebuild.read_text())
        result["micro_batch"] = result.get("micro_batch") or tiny_micro_batch()
        result["caveat"] = CAVEAT
        result["rows"] = summarise(result["runs"], result["micro_batch"])
        result["hop"] = summarise_hop(result["hop_runs"])
        ns.rebuild.write_text(json.dumps(result, indent=2) + "\n")
        print(table(result))
        return
    if ns.steps < 3 * ns.window:
        parser.error("--steps must be at least 3 windows (the first is warm-up)")

    from tests.multinode.harness import Cluster, can_build

    why = can_build()
    if why:
        raise SystemExit(f"scaling benchmark: {why}")
    began = time.monotonic()
    numel, micro_batch = grad_numel(), tiny_micro_batch()
    ext = prebuild_deepspeed_ops()
    print(f"DeepSpeed's shm op ready in {ext} after {time.monotonic() - began:.0f}s")
    workdir = Path(tempfile.mkdtemp(prefix="mtl_scaling_"))
    print(f"{CONFIG}: {numel} parameters; {ns.steps} steps, windows of {ns.window}; "
          f"{os.cpu_count()} CPUs visible; worker nodes of {WORKER_NODE_CPUS} Ray CPUs; "
          f"load {os.getloadavg()[0]:.1f}; logs under {workdir}")  # fmt: skip
    old = json.loads(ns.out.read_text()) if ns.out and ns.out.is_file() else {}
    runs: list[dict[str, Any]] = list(old.get("runs", []))
    hop_rows: list[dict[str, Any]] = list(old.get("hop_runs", []))
    first = 1 + max((r["repeat"] for r in runs), default=-1)
    wanted = {int(w) for w in ns.workers.split(",")}
    cases = [c for c in CASES if c[0] in wanted]
    with Cluster(workdir, num_workers=2, worker_cpus=WORKER_NODE_CPUS) as cluster:
        print(f"cluster up in {time.monotonic() - began:.0f}s")
        for row in hop_cost(cluster, numel, ns.iters, ns.repeats):
            hop_rows.append({**row, "repeat": first + row["repeat"]})
        for r in range(first, first + ns.repeats):
            for case in cases if r % 2 == 0 else cases[::-1]:
                row = train_run(cluster, workdir, case, ns.steps, ns.window, f"r{r}")
                row["repeat"] = r
                runs.append(row)
                rate = row.get("samples_per_s")
                print(
                    f"  repeat {r}: {case[0]} worker(s), {case[1]}: {row['status']} on "
                    f"{row.get('placed_on')}, "
                    + (f"{rate:.1f} samples/s" if rate else "no rate")
                    + f", {row['wall_s']:.0f}s wall, load {row['load_1m_before']:.1f}",
                    flush=True,
                )
    result = {
        "config": CONFIG,
        "steps": ns.steps,
        "window": ns.window,
        "threads_per_worker": 1,
        "worker_node_cpus": WORKER_NODE_CPUS,
        "grad_numel": numel,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores visible",
        "caveat": CAVEAT,
        "total_s": old.get("total_s", 0.0) + time.monotonic() - began,
        "micro_batch": micro_batch,
        "rows": summarise(runs, micro_batch),
        "hop": summarise_hop(hop_rows),
        "hop_runs": hop_rows,
        "runs": runs,
    }
    print()
    print(table(result))
    print(f"\ntotal {result['total_s']:.0f}s")
    if ns.out:
        ns.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
