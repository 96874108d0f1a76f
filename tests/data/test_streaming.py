"""Streamed splits (FileDataset) and the v2 transforms that move every target with its image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from mtl.data import make_loader
from mtl.data.errors import DatasetCorruptError
from mtl.data.samplers import ShardedTrainBatches
from mtl.data.streaming import FileDataset
from mtl.data.transforms import Depth, Normals, RandomScaleCrop, sample_transform
from mtl.losses import IGNORE_INDEX
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    TaskSpec,
)

SPECS = {
    "semseg": TaskSpec("semseg", DENSE_CLASSIFICATION, 4, "miou", True),
    "depth": TaskSpec("depth", DEPTH, 1, "abs_err", False),
    "normals": TaskSpec("normals", NORMALS, 3, "mean_angle", False),
    "smile": TaskSpec("smile", BINARY, 1, "accuracy", True),
    "cls": TaskSpec("cls", CLASSIFICATION, 10, "accuracy", True),
    "col": TaskSpec("col", DENSE_REGRESSION, 1, "rmse", False),
}
H, W = 12, 16


def coordinate_sample(index: int) -> dict:
    """Image channels hold (row, column, index); every target is derived from them, so any
    geometric transform applied consistently keeps them derivable from the image."""
    rows = torch.arange(H).view(H, 1).expand(H, W)
    cols = torch.arange(W).view(1, W).expand(H, W)
    image = torch.stack([rows * 20, cols * 15, torch.full((H, W), index)]).to(torch.uint8)
    semseg = (cols % 4).clone()
    semseg[0, 0] = 255  # unlabelled
    depth = (1.0 + cols.float() / W)[None]  # (1, H, W)
    normals = torch.zeros(3, H, W)
    normals[0] = 1.0  # every surface faces +x
    return {
        "image": image,
        "semseg": semseg,
        "depth": depth,
        "normals": normals,
        "smile": float(index % 2),
        "cls": index % 10,
        "col": cols.float()[None],  # the source column, moved by nearest neighbour
    }


def dataset(n: int = 12, train: bool = True, **kwargs) -> FileDataset:
    rows = {"index": np.arange(n)}
    return FileDataset(
        rows,
        lambda row: coordinate_sample(int(row["index"])),
        SPECS,
        (H, W),
        train=train,
        **kwargs,
    )


def test_batch_contract_and_ignore_label():
    batch = dataset(train=False)[3]
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (3, H, W)
    t = batch["targets"]
    assert t["semseg"].dtype == torch.int64 and t["semseg"].shape == (H, W)
    assert t["semseg"][0, 0] == IGNORE_INDEX and t["semseg"][0, 1] == 1
    assert t["depth"].shape == (1, H, W) and t["normals"].shape == (3, H, W)
    assert t["smile"].dtype == torch.float32 and t["smile"] == 1.0
    assert t["cls"].dtype == torch.int64 and t["cls"] == 3


def test_augmentation_moves_every_target_with_the_image():
    data = dataset(train=True, scale=(0.3, 0.6), hflip=True)
    flipped = 0
    for index in range(12):
        s = data[index]
        col = s["targets"]["col"][0]  # nearest source column of each output pixel
        # The image is resized bilinearly, the targets by (torch's floor) nearest neighbour:
        # they agree to within one source pixel.
        assert (s["image"][1] * 255 / 15 - col).abs().max() <= 1.0
        semseg = s["targets"]["semseg"]
        labelled = semseg != IGNORE_INDEX
        assert torch.equal(semseg[labelled], (col % 4).long()[labelled])
        # A crop of area a magnifies by 1/sqrt(a): depth shrinks by the same factor.
        zoom = (1.0 + col / W) / s["targets"]["depth"][0]
        assert zoom.min() > 1.25 and torch.allclose(zoom, zoom.mean().expand_as(zoom), rtol=1e-4)
        # Flipped samples see columns decrease left to right, and normals pointing -x.
        is_flipped = bool(col[0, 0] > col[0, -1])
        flipped += is_flipped
        assert torch.all(s["targets"]["normals"][0] == (-1.0 if is_flipped else 1.0))
    assert 0 < flipped < 12


def test_validation_only_resizes_and_keeps_depth():
    data = FileDataset(
        {"index": np.arange(2)},
        lambda row: coordinate_sample(int(row["index"])),
        SPECS,
        (6, 8),
        train=False,
    )
    s = data[0]
    assert s["image"].shape == (3, 6, 8)
    # Resizing the whole image is no zoom: depth values are kept (nearest neighbour).
    assert set(s["targets"]["depth"].unique().tolist()) <= set((1.0 + torch.arange(W) / W).tolist())


def test_augmentation_is_seeded_per_sample_and_epoch():
    data = dataset(train=True, seed=5)
    first = data.__getitems__([1, 2])
    assert torch.equal(data.__getitems__([2])["image"][0], first["image"][1])  # not by order
    data.set_epoch(1)
    assert not torch.equal(data.__getitems__([1, 2])["image"], first["image"])
    data.set_epoch(0)
    assert torch.equal(data.__getitems__([1, 2])["image"], first["image"])


def test_loader_processes_give_the_same_batches():
    data = dataset(n=24, train=True, seed=3)
    batches = []
    for workers in (0, 2):
        loader = make_loader(data, 4, train=True, seed=1, num_workers=workers)
        loader.batch_sampler.set_epoch(1)
        data.set_epoch(1)
        batches.append([b["image"] for b in loader])
    assert len(batches[0]) == 6
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True))


def test_resume_skips_batches_without_reading_them():
    sampler = ShardedTrainBatches(40, 4, seed=2)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.set_epoch(3, skip=4)
    rest = list(sampler)
    assert len(rest) == len(whole) - 4
    assert all(torch.equal(a, b) for a, b in zip(rest, whole[4:], strict=True))


def test_dense_target_of_the_wrong_shape_names_the_file():
    def read(row):
        sample = coordinate_sample(0)
        sample["depth"] = torch.ones(1, H - 1, W)
        return sample

    data = FileDataset({"image": np.array(["a/0.jpg"])}, read, SPECS, (H, W), train=False)
    with pytest.raises(DatasetCorruptError, match=r"a/0\.jpg.*'depth'"):
        data[0]


def test_reader_failure_is_a_corrupt_error_naming_the_file():
    def read(row):
        raise RuntimeError("Not a JPEG file")

    data = FileDataset({"image": np.array(["x/bad.jpg"])}, read, SPECS, (H, W), train=False)
    with pytest.raises(DatasetCorruptError, match=r"x/bad\.jpg.*Not a JPEG"):
        data[0]


def test_scale_crop_keeps_the_input_aspect_ratio():
    image = tv_tensors.Image(torch.zeros(1, 40, 100))
    crop = RandomScaleCrop((20, 20), (0.25, 0.25))
    params = crop.make_params([image])
    assert (params["height"], params["width"]) == (20, 50)


def test_flip_negates_the_x_of_normals_and_moves_depth():
    # (3, 1, 2): column 0 faces (0.6, 0.8, 0), column 1 faces (-0.6, 0, 0.8)
    normals = Normals(torch.tensor([[[0.6, -0.6]], [[0.8, 0.0]], [[0.0, 0.8]]]))
    depth = Depth(torch.tensor([[[2.0, 4.0]]]))
    flip = sample_transform((1, 2), train=True, scale=(1.0, 1.0), hflip=True)
    outcomes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = flip({"image": tv_tensors.Image(torch.zeros(1, 1, 2)), "n": normals, "d": depth})
        flipped = out["d"][0, 0].tolist() == [4.0, 2.0]
        outcomes.add(flipped)
        expected = [[0.6, -0.6], [0.0, 0.8], [0.8, 0.0]] if flipped else normals[:, 0].tolist()
        assert torch.allclose(out["n"].as_subclass(torch.Tensor)[:, 0], torch.tensor(expected))
    assert outcomes == {True, False}
