"""The benchmark registry and the three entry points the training loop calls.

Two kinds of benchmark share these entry points. A ``Benchmark`` is generated from sources
(MultiMNIST-dense, Digits, small local sets) into an Arrow cache and held in memory; a
``FileBenchmark`` (the field's datasets, a user's own files) is streamed from its files
in their published layout (``mtl.data.streaming``).

``prepare`` runs on the driver before any worker starts: it builds the Arrow cache once, or
checks a streamed dataset's layout and reads one sample of each split, so a missing file or
a bad target fails before training starts. A cached benchmark's source files must be
present even when its entry is built (the entry's name holds their fingerprint, see
``mtl.data.cache``), and the entry is checked against its ``meta.json``: a damaged one is
rebuilt. ``load_splits`` runs on each worker (and builds too, atomically, if the driver did
not); ``benchmark_taskset`` only reads the config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from mtl.config import DataConfig
from mtl.data import celeba, digits, domains, files, local, multimnist, nyud, pascal
from mtl.data.arrow import load_split_columns, quiet_progress, save_split
from mtl.data.cache import (
    build_atomic,
    cache_root,
    check_entry,
    data_root,
    discard,
    entries_for,
    entry_name,
    fingerprint,
)
from mtl.data.dataset import ArrayDataset
from mtl.data.errors import DatasetCorruptError, DatasetMissingError
from mtl.data.streaming import FileDataset, Reader, Rows, take_rows
from mtl.tasks import TaskSet

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
Split = ArrayDataset | FileDataset  # what load_splits returns and make_loader takes


@dataclass(frozen=True)
class Benchmark:
    """How to describe, key and build one benchmark.

    Attributes:
        taskset: Full task set from the config alone (reads no data).
        content_key: Config values that change the built content (hashed into the cache key).
        sources: Every file ``build`` reads, by a stable name (its path relative to the data
            root) -> path; raises ``DatasetMissingError`` (what goes where) when one is
            absent. Their sizes and mtimes are hashed into the cache key too.
        build: Split name -> numpy columns: ``image`` uint8 (N, C, H, W), one column per
            head, ``domain`` int64 for multi-domain, plus optional provenance columns.
        target_scales: Dense-regression head -> factor from stored code to served value.
    """

    taskset: Callable[[DataConfig], TaskSet]
    content_key: Callable[[DataConfig], dict[str, Any]]
    sources: Callable[[DataConfig], Mapping[str, str | os.PathLike]]
    build: Callable[[DataConfig], dict[str, dict[str, np.ndarray]]]
    target_scales: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FileBenchmark:
    """A dataset streamed from its files.

    Attributes:
        taskset: Full task set from the config alone (reads no data).
        index: The sample tables ``{"train": rows, "val": rows}``; reads only the dataset's
            lists and label tables, and raises ``DatasetMissingError`` naming the first
            missing file and where it goes.
        reader: Builds the ``Reader`` that opens one row's files.
    """

    taskset: Callable[[DataConfig], TaskSet]
    index: Callable[[DataConfig], dict[str, Rows]]
    reader: Callable[[DataConfig], Reader]


BENCHMARKS: dict[str, Benchmark | FileBenchmark] = {
    "multimnist": Benchmark(
        multimnist.taskset,
        multimnist.content_key,
        multimnist.sources,
        multimnist.build,
        multimnist.TARGET_SCALES,
    ),
    "digits": Benchmark(digits.taskset, digits.content_key, digits.sources, digits.build),
    "local": Benchmark(local.taskset, local.content_key, local.sources, local.build),
    "celeba": FileBenchmark(celeba.taskset, celeba.index, celeba.reader),
    "office_home": FileBenchmark(
        domains.office_home_taskset, domains.office_home_index, domains.reader
    ),
    "domainnet": FileBenchmark(domains.domainnet_taskset, domains.domainnet_index, domains.reader),
    "files": FileBenchmark(files.taskset, files.index, files.reader),
    "nyuv2": FileBenchmark(nyud.taskset, nyud.index, nyud.reader),
    "pascal_context": FileBenchmark(pascal.taskset, pascal.index, pascal.reader),
}


def _benchmark(cfg: DataConfig) -> Benchmark | FileBenchmark:
    if cfg.benchmark not in BENCHMARKS:
        raise ValueError(f"data.benchmark={cfg.benchmark!r} is not one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[cfg.benchmark]


def benchmark_taskset(cfg: DataConfig) -> TaskSet:
    """The benchmark's full task set (all heads, all domains); cheap, reads no data."""
    return _benchmark(cfg).taskset(cfg)


def cache_path(cfg: DataConfig) -> Path:
    """Where ``prepare`` puts (or finds) this config's cache entry.

    Raises:
        DatasetMissingError: A source file is missing (the key needs its fingerprint).
    """
    bench = _benchmark(cfg)
    if isinstance(bench, FileBenchmark):
        raise ValueError(f"data.benchmark={cfg.benchmark!r} is streamed from files: no cache")
    content = bench.content_key(cfg)
    stamps = fingerprint(_sources(cfg, bench, content))
    return cache_root(cfg) / entry_name(cfg.benchmark, content, stamps)


def prepare(cfg: DataConfig) -> Path:
    """Build the benchmark's Arrow cache if it is missing or damaged; idempotent and atomic.

    Returns:
        The cache entry folder (``train/`` and ``val/`` ``datasets`` folders, meta.json).

    Raises:
        DatasetMissingError: Source files are missing (the message says where they go),
            even when an entry built from them exists (it names that entry).
        DatasetCorruptError: A source file is unreadable, or a damaged entry cannot be
            removed (the message names the folder to delete).
    """
    bench = _benchmark(cfg)
    if isinstance(bench, FileBenchmark):
        return _check_files(cfg, bench)
    content = bench.content_key(cfg)
    files = _sources(cfg, bench, content)
    stamps = fingerprint(files)
    final = cache_root(cfg) / entry_name(cfg.benchmark, content, stamps)
    if final.is_dir():
        problem = check_entry(final)
        if not problem:
            return final
        discard(final, problem)
    log.info("building %s cache at %s", cfg.benchmark, final)

    def write(tmp: Path) -> dict[str, Any]:
        with quiet_progress():
            built = bench.build(cfg)
        if fingerprint(files) != stamps:
            raise DatasetCorruptError(
                f"the source files of data.benchmark={cfg.benchmark} changed while its cache "
                f"entry was built ({', '.join(str(p) for p in files.values())}); rerun"
            )
        for split, columns in built.items():
            save_split(columns, tmp / split)
        return {"rows": {split: len(c["image"]) for split, c in built.items()}}

    meta = {
        "content": content,
        "data_root": str(_source_root(cfg)),
        "sources": stamps,
        "key": final.name,
    }
    build_atomic(final, write, meta)
    problem = check_entry(final)  # e.g. a concurrent builder's entry, damaged since
    if problem:
        raise DatasetCorruptError(
            f"cache entry {final} is damaged ({problem}) right after it was built: delete it "
            f"(rm -r {final}) and rerun; if it recurs, check the disk under {final.parent}"
        )
    return final


def _source_root(cfg: DataConfig) -> Path:
    return Path(cfg.local.path).expanduser() if cfg.benchmark == "local" else data_root(cfg)


def _sources(
    cfg: DataConfig, bench: Benchmark, content: dict[str, Any]
) -> Mapping[str, str | os.PathLike]:
    """``bench.sources(cfg)``; when one is missing, the error also names the entries built
    for this config, which are not used: the run would log a data.root it never read."""
    try:
        return bench.sources(cfg)
    except DatasetMissingError as err:
        built = entries_for(cache_root(cfg), cfg.benchmark, content)
        if not built:
            raise
        lines = []
        for entry in built:
            problem = check_entry(entry)
            state = f"damaged ({problem}): delete it (rm -r {entry})" if problem else "intact"
            lines.append(f"  {entry}  {state}")
        raise DatasetMissingError(
            f"{err}\nA cache entry for this config exists, but it is not used while its "
            f"source files are missing (a run must read the data.root it logs):\n"
            + "\n".join(lines)
        ) from err


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
            f"task set input {taskset.in_channels} channels, {taskset.image_size} (H, W) "
            f"differs from the benchmark's {full.in_channels}, {full.image_size}"
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


def _check_files(cfg: DataConfig, bench: FileBenchmark) -> Path:
    """Index a streamed dataset and decode the first sample of each split (fail early)."""
    full = bench.taskset(cfg)
    for split, dataset in zip(SPLITS, _file_splits(cfg, bench, full, full), strict=True):
        if len(dataset) == 0:
            raise DatasetMissingError(
                f"data.benchmark={cfg.benchmark}: the {split} split under {data_root(cfg)} "
                "has no samples; check the split lists"
            )
        dataset.sample(0)
    return data_root(cfg)


def _file_splits(
    cfg: DataConfig, bench: FileBenchmark, taskset: TaskSet, full: TaskSet
) -> tuple[FileDataset, FileDataset]:
    tables = bench.index(cfg)
    read = bench.reader(cfg)
    specs = {h.name: h for h in taskset.heads}
    out = []
    for split in SPLITS:
        rows = tables[split]
        if taskset.multi_domain:
            # Stored domain codes index the full benchmark's domains; remap to the subset's.
            remap = np.full(len(full.domains), -1, dtype=np.int64)
            for i, name in enumerate(taskset.domains):
                remap[full.domains.index(name)] = i
            code = remap[rows["domain"]]
            rows = take_rows({**rows, "domain": code}, code >= 0)
        out.append(
            FileDataset(
                rows,
                read,
                specs,
                taskset.image_size,
                train=split == "train" and cfg.augment.enabled,
                scale=(cfg.augment.scale[0], cfg.augment.scale[1]),
                hflip=cfg.augment.hflip,
                seed=cfg.seed,
                domains=taskset.domains,
            )
        )
    return out[0], out[1]


def train_size(cfg: DataConfig, taskset: TaskSet) -> int:
    """Samples in the training split of ``taskset`` (after ``prepare``), without decoding.

    For the driver's check that every worker gets at least one batch.
    """
    bench = _benchmark(cfg)
    if isinstance(bench, FileBenchmark):
        return len(_file_splits(cfg, bench, taskset, bench.taskset(cfg))[0])
    with quiet_progress():
        return datasets.load_from_disk(str(prepare(cfg) / "train")).num_rows


def load_splits(cfg: DataConfig, taskset: TaskSet) -> tuple[Split, Split]:
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
    if isinstance(bench, FileBenchmark):
        splits = _file_splits(cfg, bench, taskset, full)
        log.info(
            "streaming %s from %s: train %d, val %d samples",
            taskset.name,
            data_root(cfg),
            len(splits[0]),
            len(splits[1]),
        )
        return splits
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
