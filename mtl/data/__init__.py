"""Benchmark data: generated benchmarks held in memory, the field's datasets streamed from files.

Pure PyTorch + numpy + Hugging Face ``datasets``; never imports Ray, DeepSpeed or MLflow.

    taskset = benchmark_taskset(cfg.data)          # reads no data
    prepare(cfg.data)                              # driver: build the cache, or check the files
    train, val = load_splits(cfg.data, taskset)    # worker: in-memory or streamed splits
    loader = make_loader(train, 64, train=True, rank=r, world_size=w, seed=s, num_workers=n)
    loader.batch_sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)                # reseeds a streamed split's augmentation
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
