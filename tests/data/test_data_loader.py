"""make_loader on synthetic in-memory splits: sharding, epochs, domain mixing, contract."""

from __future__ import annotations

import pytest
import torch

from mtl.data import ArrayDataset, make_loader
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSpec

SPECS = {
    "cls": TaskSpec("cls", CLASSIFICATION, 10, "accuracy", True),
    "seg": TaskSpec("seg", DENSE_CLASSIFICATION, 3, "miou", True),
    "reg": TaskSpec("reg", DENSE_REGRESSION, 1, "rmse", False),
}


def synthetic(n: int, domains: tuple[str, ...] = (), sizes: tuple[int, ...] = ()) -> ArrayDataset:
    """Row i has label i (so indices can be read back from a batch)."""
    images = torch.randint(0, 256, (n, 2, 4, 4), dtype=torch.uint8)
    targets = {
        "cls": torch.arange(n, dtype=torch.int64),
        "seg": torch.randint(0, 3, (n, 4, 4), dtype=torch.uint8),
        "reg": torch.randint(0, 256, (n, 4, 4), dtype=torch.uint8),
    }
    domain = None
    if domains:
        domain = torch.cat([torch.full((s,), d) for d, s in enumerate(sizes)])
    return ArrayDataset(images, targets, SPECS, {"reg": 1 / 255}, domains, domain)


def rows(loader) -> list[list[int]]:
    return [batch["targets"]["cls"].tolist() for batch in loader]


def test_batch_contract():
    data = synthetic(10, ("a", "b"), (6, 4))
    batch = next(iter(make_loader(data, 4, train=False)))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 2, 4, 4)
    assert batch["targets"]["cls"].dtype == torch.int64 and batch["targets"]["cls"].shape == (4,)
    assert batch["targets"]["seg"].dtype == torch.int64 and batch["targets"]["seg"].shape == (
        4,
        4,
        4,
    )
    reg = batch["targets"]["reg"]
    assert reg.dtype == torch.float32 and reg.shape == (4, 1, 4, 4) and reg.max() <= 1.0
    assert torch.allclose(reg[:, 0] * 255, data.targets["reg"][:4].float())
    assert batch["domain"].dtype == torch.int64 and batch["domain"].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_shards_are_disjoint_and_cover(world_size):
    n, batch = 50, 4
    data = synthetic(n)
    shards = []
    for rank in range(world_size):
        loader = make_loader(data, batch, train=True, rank=rank, world_size=world_size, seed=7)
        loader.batch_sampler.set_epoch(2)
        got = rows(loader)
        assert all(len(b) == batch for b in got), "drop_last"
        assert len(got) == len(loader) == (n // world_size) // batch
        shards.append({i for b in got for i in b})
    union = set().union(*shards)
    assert sum(len(s) for s in shards) == len(union), "ranks overlap"
    assert len(union) >= n - world_size * batch, "most rows are read"


def test_train_epochs_reshuffle_and_repeat():
    loader = make_loader(synthetic(64), 8, train=True, seed=1)
    loader.batch_sampler.set_epoch(0)
    first = rows(loader)
    assert rows(loader) == first, "same epoch, same order"
    loader.batch_sampler.set_epoch(1)
    assert rows(loader) != first
    assert sorted(sum(first, [])) == list(range(64))


@pytest.mark.parametrize("n, world_size", [(50, 1), (50, 3), (257, 2), (5, 2)])
def test_eval_shards_exact_and_lockstep(n, world_size):
    data = synthetic(n)
    per_rank = [
        rows(make_loader(data, 8, train=False, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    flat = [i for shard in per_rank for b in shard for i in b]
    assert flat == list(range(n)), "deterministic order, each row once"
    assert len({len(shard) for shard in per_rank}) == 1, "same number of batches on every rank"
    assert all(len(b) <= 8 for shard in per_rank for b in shard)


def test_domain_sampling_follows_weights():
    sizes = (300, 200, 100)
    data = synthetic(sum(sizes), ("a", "b", "c"), sizes)
    weights = {"a": 1.0, "b": 2.0, "c": 7.0}  # normalised to 0.1 / 0.2 / 0.7
    draws = []
    for epoch in range(10):
        loader = make_loader(data, 50, train=True, seed=3, domain_weights=weights)
        loader.batch_sampler.set_epoch(epoch)
        draws += [b["domain"] for b in loader]
        assert len(loader) == sum(sizes) // 50, "epoch length = all rows"
    counts = torch.bincount(torch.cat(draws), minlength=3).double()
    freq = counts / counts.sum()  # 6000 draws: standard error <= 0.006
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.03)


def test_domain_sampling_uniform_and_rank_streams_differ():
    sizes = (500, 100)
    data = synthetic(sum(sizes), ("a", "b"), sizes)
    loaders = [make_loader(data, 20, train=True, rank=r, world_size=2, seed=0) for r in (0, 1)]
    domains = [torch.cat([b["domain"] for b in loader]) for loader in loaders]
    assert len(domains[0]) == 300, "per-rank epoch = rows // world_size, full batches"
    assert abs(domains[0].double().mean().item() - 0.5) < 0.1, "None = uniform over domains"
    assert not torch.equal(domains[0], domains[1])
    # Samples come from their own domain's rows.
    batch = next(iter(loaders[0]))
    assert torch.equal(batch["domain"], (batch["targets"]["cls"] >= 500).long())


def test_bad_arguments():
    single, multi = synthetic(20), synthetic(20, ("a", "b"), (10, 10))
    with pytest.raises(ValueError, match="exactly the domains"):
        make_loader(multi, 4, train=True, domain_weights={"a": 1.0})
    with pytest.raises(ValueError, match="multi-domain"):
        make_loader(single, 4, train=True, domain_weights={"a": 1.0})
    with pytest.raises(ValueError, match="rank"):
        make_loader(single, 4, train=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="less than one batch"):
        make_loader(single, 64, train=True)
