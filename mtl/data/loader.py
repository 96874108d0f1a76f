"""``make_loader``: a ``DataLoader`` over a split of ``load_splits`` that yields whole batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mtl.data.dataset import ArrayDataset
from mtl.data.samplers import DomainMixBatches, ShardedEvalBatches, ShardedTrainBatches
from mtl.data.streaming import FileDataset


def _as_batch(batch: dict) -> dict:
    """The dataset already returns a collated batch (module-level so workers can pickle it)."""
    return batch


def domain_probabilities(
    domains: tuple[str, ...], weights: dict[str, float] | None
) -> torch.Tensor:
    """Sampling probabilities in ``domains`` order; ``None`` means uniform.

    Raises:
        ValueError: Keys that are not exactly ``domains``, a negative weight, or all zero.
    """
    if weights is None:
        return torch.full((len(domains),), 1.0 / len(domains), dtype=torch.float64)
    if set(weights) != set(domains):
        raise ValueError(
            f"domain_weights keys {sorted(weights)} must be exactly the domains {list(domains)}"
        )
    values = torch.tensor([float(weights[d]) for d in domains], dtype=torch.float64)
    if (values < 0).any() or values.sum() <= 0:
        raise ValueError(f"domain_weights {weights}: need non-negative weights with a positive sum")
    return values / values.sum()


def make_loader(
    dataset: ArrayDataset,
    batch_size: int,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    domain_weights: dict[str, float] | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A loader yielding batch dicts (see ``mtl.data.dataset``) for one rank.

    Train: reshuffled each epoch (call ``loader.batch_sampler.set_epoch(epoch)``), full
    batches only. Single-domain: disjoint per-rank shards of a shared permutation.
    Multi-domain: each sample's domain is drawn with probability ``domain_weights``
    (normalised here; keys exactly ``dataset.domains``; None = uniform), then a row of that
    domain with replacement, from a stream seeded by (seed, epoch, rank); an epoch has as
    many samples over all ranks as the split has rows.

    Eval (``train=False``): deterministic order, contiguous shards, no sample repeated; on
    uneven splits shards differ by one sample, and every rank gets the same number of
    batches, of near-equal sizes <= ``batch_size`` (``ShardedEvalBatches``).

    Args:
        dataset: A split from ``load_splits``.
        batch_size: Samples per batch on this rank.
        train: Training (shuffled, dropped tail) or evaluation order.
        rank: This worker's rank.
        world_size: Number of workers.
        seed: Base seed of the shuffles.
        domain_weights: Domain sampling weights for multi-domain training.
        num_workers: Loader processes that decode batches ahead, for a streamed split
            (``FileDataset``); an in-memory split always uses none.
    """
    if not isinstance(dataset, (ArrayDataset, FileDataset)):
        raise TypeError(
            f"make_loader needs a split from mtl.data.load_splits, got {type(dataset).__name__}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if domain_weights is not None and not (train and dataset.multi_domain):
        raise ValueError("domain_weights apply only to multi-domain training loaders")
    if not train:
        batches = ShardedEvalBatches(len(dataset), batch_size, rank, world_size)
    elif dataset.multi_domain:
        weights = domain_probabilities(dataset.domains, domain_weights)
        batches = DomainMixBatches(
            dataset.domain_indices(), weights, batch_size, rank, world_size, seed
        )
    else:
        batches = ShardedTrainBatches(len(dataset), batch_size, rank, world_size, seed)
    # An in-memory split serves a batch in microseconds: loader processes would only add IPC.
    workers = num_workers if dataset.decodes_per_batch else 0
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_as_batch,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,  # new processes each epoch see the dataset's new epoch
    )
