"""Batch samplers: each yields ``int64`` index tensors, one per batch, for ``__getitems__``.

- ``ShardedTrainBatches``: like ``DistributedSampler`` + ``drop_last``: one permutation per
  epoch shared by all ranks (seeded by ``(seed, epoch)``), cut to a multiple of
  ``world_size``, rank r takes every ``world_size``-th index from r; full batches only.
- ``DomainMixBatches``: multi-domain training; every sample's domain is drawn from the
  domain weights, then a row of that domain uniformly with replacement.
- ``ShardedEvalBatches``: deterministic order, contiguous shards, no duplicates; every rank
  gets the same number of batches (see its docstring).

Seeds are mixed with ``numpy.random.SeedSequence`` rather than added, so (epoch 1, rank 0)
and (epoch 0, rank 1) do not share a stream.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers, well mixed (distinct parts, distinct streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} world_size={world_size}: need 0 <= rank < world_size")


class ShardedTrainBatches:
    """Disjoint per-rank shards of a per-epoch permutation, in full batches.

    ``len(dataset) // world_size`` samples per rank (the tail of the permutation, fewer
    than ``world_size`` samples, is dropped that epoch), then the last partial batch is
    dropped. Call ``set_epoch`` before each epoch to reshuffle.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        _check_rank(rank, world_size)
        self.size, self.batch_size, self.rank, self.world_size, self.seed = (
            size,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.epoch, self.skip = 0, 0
        self.per_rank = size // world_size
        if self.per_rank < batch_size:
            raise ValueError(
                f"{size} training samples over {world_size} ranks is less than one batch of "
                f"{batch_size} per rank; use a smaller batch or more data"
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle for ``epoch``; the next iteration starts after its first ``skip`` batches."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
        perm = torch.randperm(self.size, generator=generator)
        shard = perm[self.rank : self.per_rank * self.world_size : self.world_size]
        batches = shard[: len(self) * self.batch_size].split(self.batch_size)
        yield from itertools.islice(batches, self.skip, None)


class DomainMixBatches:
    """Batches whose samples come from each domain with the given probabilities.

    Epoch length over all ranks is the total number of rows (so per rank
    ``total // world_size``, in full batches). Each rank draws its own stream, seeded by
    ``(seed, epoch, rank)``, so ranks differ; shards are not disjoint (sampling is with
    replacement within a domain).
    """

    def __init__(
        self,
        domain_indices: list[Tensor],
        weights: Tensor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        _check_rank(rank, world_size)
        if len(weights) != len(domain_indices):
            raise ValueError(f"{len(weights)} weights for {len(domain_indices)} domains")
        empty = [d for d, rows in enumerate(domain_indices) if len(rows) == 0 and weights[d] > 0]
        if empty:
            raise ValueError(f"domains {empty} have a positive weight but no samples")
        self.domain_indices, self.weights = domain_indices, weights.double()
        self.batch_size, self.rank, self.seed = batch_size, rank, seed
        self.epoch, self.skip = 0, 0
        self.per_rank = sum(len(rows) for rows in domain_indices) // world_size
        if self.per_rank < batch_size:
            raise ValueError(
                f"{self.per_rank} samples per rank is less than one batch of {batch_size}"
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw for ``epoch``; the next iteration starts after its first ``skip`` batches."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch, self.rank))
        count = len(self) * self.batch_size
        domain = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        index = torch.empty(count, dtype=torch.long)
        for d, rows in enumerate(self.domain_indices):
            where = torch.nonzero(domain == d).flatten()
            if len(where):
                index[where] = rows[torch.randint(len(rows), (len(where),), generator=generator)]
        yield from itertools.islice(index.split(self.batch_size), self.skip, None)


class ShardedEvalBatches:
    """Deterministic, duplicate-free evaluation shards with equal batch counts per rank.

    Rank r reads the contiguous rows ``[r*N//W, (r+1)*N//W)`` (shard sizes differ by at
    most one). Every rank splits its shard into the same number of batches,
    ``ceil(ceil(N/W) / batch_size)``, of near-equal size (at most ``batch_size``): ranks
    then step through validation in lockstep (no rank waits in a collective for a batch
    another rank lacks) and no sample is padded in twice, so sums over ranks are exact.
    Only when N < W can a rank have fewer (zero) batches.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        _check_rank(rank, world_size)
        self.start = rank * size // world_size
        self.stop = (rank + 1) * size // world_size
        self.num_batches = math.ceil(math.ceil(size / world_size) / batch_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """No-op: the order never changes (kept so every loader accepts ``set_epoch``)."""

    def __len__(self) -> int:
        return min(self.num_batches, self.stop - self.start)

    def __iter__(self) -> Iterator[Tensor]:
        rows = torch.arange(self.start, self.stop)
        yield from (b for b in rows.tensor_split(self.num_batches) if len(b))
