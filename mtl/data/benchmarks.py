"""The benchmark registry and the three entry points the training loop calls.

``prepare`` runs on the driver before any worker starts and builds the Arrow cache once;
``load_splits`` runs on each worker (and builds too, atomically, if the driver did not);
``benchmark_taskset`` only reads the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.config import DataConfig
from mtl.data import digits, local, multimnist
from mtl.data.arrow import load_split_columns, quiet_progress, save_split
from mtl.data.cache import build_atomic, cache_key, cache_root
from mtl.data.dataset import ArrayDataset
from mtl.tasks import TaskSet

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Benchmark:
    """How to describe, key and build one benchmark.

    Attributes:
        taskset: Full task set from the config alone (reads no data).
        content_key: Config values that change the built content (hashed into the cache key).
        build: Split name -> numpy columns: ``image`` uint8 (N, C, H, W), one column per
            head, ``domain`` int64 for multi-domain, plus optional provenance columns.
        target_scales: Dense-regression head -> factor from stored code to served value.
    """

    taskset: Callable[[DataConfig], TaskSet]
    content_key: Callable[[DataConfig], dict[str, Any]]
    build: Callable[[DataConfig], dict[str, dict[str, np.ndarray]]]
    target_scales: dict[str, float] = field(default_factory=dict)


BENCHMARKS: dict[str, Benchmark] = {
    "multimnist": Benchmark(
        multimnist.taskset, multimnist.content_key, multimnist.build, multimnist.TARGET_SCALES
    ),
    "digits": Benchmark(digits.taskset, digits.content_key, digits.build),
    "local": Benchmark(local.taskset, local.content_key, local.build),
}


def _benchmark(cfg: DataConfig) -> Benchmark:
    if cfg.benchmark not in BENCHMARKS:
        raise ValueError(f"data.benchmark={cfg.benchmark!r} is not one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[cfg.benchmark]


def benchmark_taskset(cfg: DataConfig) -> TaskSet:
    """The benchmark's full task set (all heads, all domains); cheap, reads no data."""
    return _benchmark(cfg).taskset(cfg)


def cache_path(cfg: DataConfig) -> Path:
    """Where ``prepare`` puts (or finds) this config's cache entry."""
    key = _benchmark(cfg).content_key(cfg)
    return cache_root(cfg) / f"{cfg.benchmark}-{cache_key(key)}"


def prepare(cfg: DataConfig) -> Path:
    """Build the benchmark's Arrow cache if it is missing; idempotent and atomic.

    Returns:
        The cache entry folder (``train/`` and ``val/`` ``datasets`` folders, meta.json).

    Raises:
        DatasetMissingError: Source files are missing (the message says where they go).
    """
    bench = _benchmark(cfg)
    final = cache_path(cfg)
    if final.is_dir():
        return final
    log.info("building %s cache at %s", cfg.benchmark, final)

    def write(tmp: Path) -> None:
        with quiet_progress():
            built = bench.build(cfg)
        for split, columns in built.items():
            save_split(columns, tmp / split)

    meta = {"content": bench.content_key(cfg), "key": final.name}
    return build_atomic(final, write, meta)


def _check_subset(taskset: TaskSet, full: TaskSet) -> None:
    heads = {h.name: h for h in full.heads}
    wrong = [h.name for h in taskset.heads if heads.get(h.name) != h]
    if wrong or not set(taskset.domains) <= set(full.domains) or taskset.name != full.name:
        raise ValueError(
            f"task set {taskset.name!r} (heads {[h.name for h in taskset.heads]}, domains "
            f"{list(taskset.domains)}) is not a subset of benchmark {full.name!r}; build it "
            f"with benchmark_taskset(cfg).subset(names)"
        )
    if (taskset.in_channels, taskset.image_size) != (full.in_channels, full.image_size):
        raise ValueError(
            f"task set input {taskset.in_channels} channels, {taskset.image_size} px differs "
            f"from the benchmark's {full.in_channels}, {full.image_size}"
        )


def _to_dataset(
    columns: dict[str, np.ndarray], taskset: TaskSet, full: TaskSet, scales: dict
) -> ArrayDataset:
    keep = slice(None)
    domain = None
    if taskset.multi_domain:
        # Stored domain codes index the full benchmark's domains; remap to the subset's.
        remap = np.full(len(full.domains), -1, dtype=np.int64)
        for i, name in enumerate(taskset.domains):
            remap[full.domains.index(name)] = i
        code = remap[columns["domain"]]
        keep = np.flatnonzero(code >= 0)
        domain = torch.from_numpy(code[keep])
    images = torch.from_numpy(columns["image"][keep])
    targets = {h.name: torch.from_numpy(columns[h.name][keep]) for h in taskset.heads}
    specs = {h.name: h for h in taskset.heads}
    return ArrayDataset(images, targets, specs, scales, taskset.domains, domain)


def load_splits(cfg: DataConfig, taskset: TaskSet) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, val) datasets restricted to ``taskset``, building the cache if needed.

    Args:
        cfg: Data config.
        taskset: ``benchmark_taskset(cfg)`` or a ``.subset(...)`` of it: only its heads'
            targets are loaded, and only its domains' rows (``domain`` re-indexed to
            ``taskset.domains``).
    """
    bench = _benchmark(cfg)
    full = bench.taskset(cfg)
    _check_subset(taskset, full)
    entry = prepare(cfg)
    names = ["image", *(h.name for h in taskset.heads)] + (
        ["domain"] if taskset.multi_domain else []
    )
    splits = tuple(
        _to_dataset(load_split_columns(entry / s, names), taskset, full, bench.target_scales)
        for s in SPLITS
    )
    log.info(
        "loaded %s from %s: train %d, val %d samples",
        taskset.name,
        entry,
        len(splits[0]),
        len(splits[1]),
    )
    return splits
