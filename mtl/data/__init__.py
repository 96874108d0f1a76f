"""Benchmark data: real, offline, cached as Arrow, served as whole tensor batches.

Pure PyTorch + numpy + Hugging Face ``datasets``; never imports Ray, DeepSpeed or MLflow.

    taskset = benchmark_taskset(cfg.data)          # reads no data
    prepare(cfg.data)                              # driver: build the cache once
    train, val = load_splits(cfg.data, taskset)    # worker: tensors in memory
    loader = make_loader(train, 64, train=True, rank=r, world_size=w, seed=s)
    loader.batch_sampler.set_epoch(epoch)
"""

from mtl.data.benchmarks import (
    BENCHMARKS,
    Benchmark,
    benchmark_taskset,
    cache_path,
    load_splits,
    prepare,
    train_size,
)
from mtl.data.dataset import ArrayDataset
from mtl.data.errors import DatasetCorruptError, DatasetMissingError
from mtl.data.loader import make_loader

__all__ = [
    "BENCHMARKS",
    "ArrayDataset",
    "Benchmark",
    "DatasetCorruptError",
    "DatasetMissingError",
    "benchmark_taskset",
    "cache_path",
    "load_splits",
    "make_loader",
    "prepare",
    "train_size",
]
