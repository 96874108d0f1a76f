"""MultiMNIST-dense: labels are exact, splits are separate, builds are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl.config import DataConfig
from mtl.data import benchmark_taskset, load_splits, make_loader, multimnist, prepare
from mtl.data.arrow import load_split_columns
from mtl.data.mnist_family import load_split

PROVENANCE = ["index_a", "index_b", "a_y", "a_x", "b_y", "b_x"]
STORED = ["image", "left", "right", "semseg", "depth", "recon_left", *PROVENANCE]


def tiny(data_root, cache_dir, **overrides) -> DataConfig:
    fields = {"train_size": 64, "val_size": 32, "seed": 0}
    fields.update(overrides)
    return DataConfig(root=str(data_root), cache_dir=str(cache_dir), **fields)


@pytest.fixture(scope="module")
def built(data_root, cache_dir):
    """Stored columns of a tiny build, per split."""
    entry = prepare(tiny(data_root, cache_dir))
    return {split: load_split_columns(entry / split, STORED) for split in ("train", "val")}


@pytest.fixture(scope="module")
def mnist(data_root):
    return {split: load_split("mnist", data_root, split) for split in ("train", "test")}


def paste(digit: np.ndarray, y: int, x: int) -> np.ndarray:
    """Reference placement, one sample, by explicit clipping (independent of ``place``)."""
    canvas = np.zeros((36, 36), dtype=np.uint8)
    for r in range(28):
        for c in range(28):
            if 0 <= y + r < 36 and 0 <= x + c < 36:
                canvas[y + r, x + c] = digit[r, c]
    return canvas


def recompose(columns: dict, images: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    a = paste(images[columns["index_a"][i]], columns["a_y"][i], columns["a_x"][i])
    b = paste(images[columns["index_b"][i]], columns["b_y"][i], columns["b_x"][i])
    return a, b


@pytest.mark.parametrize("split, source_split", [("train", "train"), ("val", "test")])
def test_labels_are_exact(built, mnist, split, source_split):
    columns = built[split]
    images, labels = mnist[source_split]
    for i in range(len(columns["image"])):
        a, b = recompose(columns, images, i)
        np.testing.assert_array_equal(columns["image"][i, 0], np.maximum(a, b))
        np.testing.assert_array_equal(columns["recon_left"][i, 0], a)
        assert columns["left"][i] == labels[columns["index_a"][i]]
        assert columns["right"][i] == labels[columns["index_b"][i]]
        semseg, depth = columns["semseg"][i], columns["depth"][i]
        foreground = np.maximum(a, b) > 0.3 * 255
        np.testing.assert_array_equal(depth > 0, foreground)
        np.testing.assert_array_equal(depth == 2, foreground & (b >= a))
        np.testing.assert_array_equal(semseg[depth == 1], 1 + columns["left"][i])
        np.testing.assert_array_equal(semseg[depth == 2], 1 + columns["right"][i])
        assert (semseg[depth == 0] == 0).all()


def test_jitter_and_positions(built):
    columns = built["train"]
    assert columns["a_y"].min() >= -4 and columns["a_y"].max() <= 4
    assert columns["b_x"].min() >= 4 and columns["b_x"].max() <= 12
    assert len(np.unique(columns["a_x"])) > 3, "jitter should vary"


def test_val_comes_from_test_split(built, mnist):
    """Val pairs reproduce from MNIST test digits and not from train digits at the same rows."""
    columns = built["val"]
    a_test, _ = recompose(columns, mnist["test"][0], 0)
    a_train, _ = recompose(columns, mnist["train"][0], 0)
    assert np.array_equal(columns["recon_left"][0, 0], a_test)
    assert not np.array_equal(columns["recon_left"][0, 0], a_train)
    assert columns["index_a"].max() < 10000


def test_determinism(data_root):
    cfg = DataConfig(root=str(data_root), train_size=16, val_size=8, seed=3)
    first, again = multimnist.build(cfg), multimnist.build(cfg)
    other = multimnist.build(DataConfig(root=str(data_root), train_size=16, val_size=8, seed=4))
    for split in ("train", "val"):
        for name in first[split]:
            np.testing.assert_array_equal(first[split][name], again[split][name])
        assert not np.array_equal(first[split]["image"], other[split]["image"])


def test_loader_batches_follow_contract(data_root, cache_dir):
    cfg = tiny(data_root, cache_dir)
    train, val = load_splits(cfg, benchmark_taskset(cfg))
    assert (len(train), len(val)) == (64, 32)
    batch = next(iter(make_loader(train, 8, train=True)))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (8, 1, 36, 36)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    t = batch["targets"]
    assert t["left"].dtype == torch.int64 and t["left"].shape == (8,)
    assert t["semseg"].dtype == torch.int64 and t["semseg"].shape == (8, 36, 36)
    for name in ("depth", "recon_left"):
        assert t[name].dtype == torch.float32 and t[name].shape == (8, 1, 36, 36)
    assert set(torch.unique(t["depth"]).tolist()) <= {0.0, 0.5, 1.0}
    assert "domain" not in batch


def test_subset_loads_only_its_heads(data_root, cache_dir):
    cfg = tiny(data_root, cache_dir)
    subset = benchmark_taskset(cfg).subset(["right", "depth"])
    train, _ = load_splits(cfg, subset)
    assert set(train[0]["targets"]) == {"right", "depth"}


def test_resized_benchmark(data_root, cache_dir):
    cfg = tiny(data_root, cache_dir, image_size=28, train_size=16, val_size=8)
    train, _ = load_splits(cfg, benchmark_taskset(cfg))
    batch = train.__getitems__(range(16))
    assert batch["image"].shape == (16, 1, 28, 28)
    assert batch["targets"]["semseg"].shape == (16, 28, 28)
    assert batch["targets"]["semseg"].max() <= 10
    assert set(torch.unique(batch["targets"]["depth"]).tolist()) <= {0.0, 0.5, 1.0}
