"""Digits: three domains with the right shapes, disjoint mnist_m photos, domain subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl.config import DataConfig
from mtl.data import benchmark_taskset, digits, load_splits, make_loader, photos, prepare
from mtl.data.arrow import load_split_columns


def tiny(data_root, cache_dir, **overrides) -> DataConfig:
    fields = {"benchmark": "digits", "image_size": 28, "train_size": 40, "val_size": 20}
    fields.update(overrides)
    return DataConfig(root=str(data_root), cache_dir=str(cache_dir), **fields)


@pytest.fixture(scope="module")
def splits(data_root, cache_dir):
    cfg = tiny(data_root, cache_dir)
    return load_splits(cfg, benchmark_taskset(cfg))


def test_taskset_reads_no_data(tmp_path):
    ts = benchmark_taskset(DataConfig(benchmark="digits", root=str(tmp_path), image_size=28))
    assert ts.domains == ("mnist", "mnist_m", "optdigits") and ts.in_channels == 3
    assert [h.name for h in ts.heads] == ["digit"]


def test_domains_shapes_and_caps(splits):
    train, val = splits
    assert [len(i) for i in train.domain_indices()] == [40, 40, 40]
    assert [len(i) for i in val.domain_indices()] == [20, 20, 20]
    batch = val.__getitems__(range(len(val)))
    assert batch["image"].shape == (60, 3, 28, 28)
    assert batch["targets"]["digit"].dtype == torch.int64
    assert batch["targets"]["digit"].max() <= 9
    mnist, mnist_m, optdigits = (batch["image"][batch["domain"] == d] for d in range(3))
    assert torch.equal(mnist[:, 0], mnist[:, 2]), "grey replicated to RGB"
    assert not torch.equal(mnist_m[:, 0], mnist_m[:, 2]), "photo colours"
    assert optdigits[:, :, :4].max() == 0 and optdigits[:, :, :, -4:].max() == 0, "padding"


def test_mnist_m_photos_are_disjoint(data_root, cache_dir):
    assert not set(photos.TRAIN_PHOTOS) & set(photos.VAL_PHOTOS)
    for package, path in photos.TRAIN_PHOTOS + photos.VAL_PHOTOS:
        assert photos.photo_path(package, path).is_file()
    entry = prepare(tiny(data_root, cache_dir))
    n_train = len(photos.TRAIN_PHOTOS)
    for split, allowed in (
        ("train", range(n_train)),
        ("val", range(n_train, len(digits.ALL_PHOTOS))),
    ):
        columns = load_split_columns(entry / split, ["domain", "photo"])
        used = columns["photo"][columns["domain"] == 1]
        assert set(used.tolist()) <= set(allowed)
        assert (columns["photo"][columns["domain"] != 1] == -1).all()


def test_domains_interleaved_and_digits_disjoint(data_root, cache_dir):
    entry = prepare(tiny(data_root, cache_dir))
    columns = load_split_columns(entry / "train", ["domain", "source_index"])
    assert len(set(columns["domain"][:12].tolist())) >= 2, "a prefix mixes domains"
    mnist = set(columns["source_index"][columns["domain"] == 0].tolist())
    mnist_m = set(columns["source_index"][columns["domain"] == 1].tolist())
    assert not mnist & mnist_m, "mnist and mnist_m use different source digits"


def test_mnist_m_blend_is_abs_difference():
    digit = np.array([[[0, 255], [100, 50]]], dtype=np.uint8)
    patch = np.full((1, 2, 2, 3), 120, dtype=np.uint8)
    out = photos.blend(digit, patch)
    assert out.shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(out[0, 1], [[120, 135], [20, 70]])


def test_domain_subset_reindexes(data_root, cache_dir):
    cfg = tiny(data_root, cache_dir)
    subset = benchmark_taskset(cfg).subset(["optdigits", "mnist_m"])
    assert subset.domains == ("mnist_m", "optdigits")
    train, _ = load_splits(cfg, subset)
    assert [len(i) for i in train.domain_indices()] == [40, 40]
    loader = make_loader(train, 16, train=True, domain_weights={"mnist_m": 0.0, "optdigits": 1.0})
    assert all((b["domain"] == 1).all() for b in loader)


def test_resized_digits(data_root, cache_dir):
    cfg = tiny(data_root, cache_dir, image_size=32, train_size=8, val_size=4)
    train, _ = load_splits(cfg, benchmark_taskset(cfg))
    assert train.images.shape == (24, 3, 32, 32)
