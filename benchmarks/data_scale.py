"""Streamed data at scale: worker memory and start-up against dataset size; time waiting on data.

Both parts run the product path (``mtl.train.launch.fit``: Ray Train x DeepSpeed on CPU) on
datasets generated in the published layouts (``mtl.data.synthetic_layouts*``; pixels carry
no signal, only their size and format matter here).

- ``rss``: CelebA-layout sets of ``--sizes`` JPEGs at 178x218, trained at 64x64 by one worker
  with ``data.loader_workers=0``, so every byte of the data path (sample table, decoding,
  augmentation) lives in the worker process whose peak RSS (``sys/peak_rss_mb``) and time to
  the first optimizer step (``sys/first_step_s``) the worker reports. Target: RSS ratio
  largest / smallest <= 1.15, first step not growing with size.
- ``wait``: 2 workers (``data.loader_workers`` loader processes each, the config's value)
  on a CelebA-layout set at 64x64 and a NYUD-v2 (LibMTL layout) set at 288x384; the share
  of step time spent waiting for the next batch (``train/data_wait_fraction``), median over
  the log windows after the first (which holds the loader processes' start). Target <= 5%.

    .venv/bin/python benchmarks/data_scale.py rss --sizes 2000 50000
    .venv/bin/python benchmarks/data_scale.py wait
    .venv/bin/python benchmarks/data_scale.py --table benchmarks/results/data_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mtl.config import Config, load_config

RESULTS = Path(__file__).parent / "results" / "data_scale.json"


def _config(path: str, root: Path, work: Path, *overrides: str) -> Config:
    return load_config(
        path,
        [
            f"data.root={root}",
            "tasks.baseline=",
            f"train.storage_path={work / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "tracking.register=false",  # measuring, not shipping
            "train.val_batches=1",
            *overrides,
        ],
    )


def _celeba(work: Path, n: int) -> Path:
    """A CelebA-layout set of ``n`` images (90% train), written once per size."""
    from mtl.data.synthetic_layouts import write_celeba

    root = work / f"celeba-{n}"
    if not (root / "list_eval_partition.txt").is_file():
        start = time.perf_counter()
        write_celeba(root, n - n // 10, n // 10)
        print(f"wrote {n} CelebA-layout JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
    return root


def measure_rss(work: Path, sizes: list[int], steps: int) -> list[dict[str, Any]]:
    from mtl.train.launch import fit

    rows = []
    for n in sizes:
        root = _celeba(work, n)
        cfg = _config(
            "configs/celeba.yaml",
            root,
            work,
            "train.num_workers=1",
            "data.loader_workers=0",
            f"train.max_steps={steps}",
            f"train.log_every_steps={steps}",
            f"train.val_every_steps={steps}",
            f"train.checkpoint_every_steps={steps}",
        )
        result = fit(cfg, run_name=f"data-scale-rss-{n}-{time.time():.0f}")
        m = result.metrics
        rows.append(
            {
                "part": "rss",
                "images": n,
                "peak_rss_mb": m["sys/peak_rss_mb"],
                "first_step_s": m["sys/first_step_s"],
                "steps": steps,
                "micro_batch": cfg.train.micro_batch_size,
            }
        )
        print(rows[-1], flush=True)
    return rows


def measure_wait(work: Path, steps: int, window: int) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    from mtl.data.synthetic_layouts_dense import write_nyuv2_libmtl
    from mtl.train.launch import fit

    nyu = work / "nyuv2-libmtl"
    if not (nyu / "val").is_dir():
        write_nyuv2_libmtl(nyu, 400, 40, (288, 384))
    cases = [("celeba 64x64", "configs/celeba.yaml", _celeba(work, 4000))]
    cases.append(("nyuv2 288x384", "configs/nyuv2.yaml", nyu))
    rows = []
    for name, path, root in cases:
        cfg = _config(
            path,
            root,
            work,
            "train.num_workers=2",
            f"train.max_steps={steps}",
            f"train.log_every_steps={window}",
            f"train.val_every_steps={steps}",
            f"train.checkpoint_every_steps={steps}",
        )
        result = fit(cfg, run_name=f"data-wait-{name.split()[0]}-{time.time():.0f}")
        client = MlflowClient(result.tracking_uri)
        waits, rates = (
            _history(client, result.mlflow_run_id, key)
            for key in ("train/data_wait_fraction", "train/samples_per_s")
        )
        rows.append(
            {
                "part": "wait",
                "dataset": name,
                "workers": 2,
                "loader_workers": cfg.data.loader_workers,
                "micro_batch": cfg.train.micro_batch_size,
                "data_wait_fraction": statistics.median(waits[1:]),
                "first_window_wait": waits[0],
                "samples_per_s": statistics.median(rates[1:]),
                "windows": len(waits),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _history(client: Any, run_id: str, key: str) -> list[float]:
    """A metric's values in step order."""
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown tables of stored rows (the README's are printed by this function)."""
    lines = []
    rss = [r for r in rows if r["part"] == "rss"]
    if rss:
        base = min(rss, key=lambda r: r["images"])
        lines += ["| run | images | peak RSS (MiB) | vs smallest | time to first step (s) |"]
        lines += ["|---|---|---|---|---|"]
        for run, r in enumerate(rss, 1):  # in the order they ran: the first starts Ray cold
            ratio = r["peak_rss_mb"] / base["peak_rss_mb"]
            lines.append(
                f"| {run} | {r['images']:,} | {r['peak_rss_mb']:.0f} | {ratio:.3f} | "
                f"{r['first_step_s']:.1f} |"
            )
    wait = [r for r in rows if r["part"] == "wait"]
    if wait:
        lines += ["", "| dataset | workers x loader processes | micro-batch | data wait | "]
        lines[-1] += "first window | samples/s |"
        lines += ["|---|---|---|---|---|---|"]
        for r in wait:
            lines.append(
                f"| {r['dataset']} | {r['workers']} x {r['loader_workers']} | "
                f"{r['micro_batch']} | {100 * r['data_wait_fraction']:.1f}% | "
                f"{100 * r['first_window_wait']:.1f}% | {r['samples_per_s']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=["rss", "wait"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 50000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=10, help="wait: steps per log window")
    parser.add_argument("--work", type=Path, default=None, help="where datasets are written")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, help="print the tables of a result file")
    ns = parser.parse_args()
    if ns.table:
        print(table(json.loads(ns.table.read_text())["rows"]))
        return
    if ns.part is None:
        parser.error("give a part (rss or wait) or --table FILE")
    work = ns.work or Path(tempfile.gettempdir()) / "mtl-data-scale"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if ns.part == "rss":
        rows = measure_rss(work, ns.sizes, ns.steps)
    else:
        rows = measure_wait(work, max(ns.steps, 4 * ns.window), ns.window)  # >= 4 windows
    stored = json.loads(ns.out.read_text())["rows"] if ns.out.is_file() else []
    stored = [r for r in stored if r["part"] != ns.part] + rows
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.ctime()}
    ns.out.write_text(json.dumps({"meta": meta, "rows": stored}, indent=2) + "\n")
    print(table(stored))


if __name__ == "__main__":
    main()
