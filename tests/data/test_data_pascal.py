"""PASCAL-Context in Vandenhende et al.'s PASCAL_MT layout, streamed.

The fixture (mtl.data.synthetic_layouts_dense) writes that layout: JPEG images, semseg PNGs in
both of its folders (VOC12 palette PNGs and grey pascal-context ones), Pascal-Part .mat files
with and without an annotated person, distilled saliency and normals PNGs, and the context
LabelMap that masks the normals.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from mtl.config import AugmentConfig, DataConfig
from mtl.data import (
    DatasetCorruptError,
    DatasetMissingError,
    benchmark_taskset,
    load_splits,
    make_loader,
    prepare,
)
from mtl.data.pascal import HUMAN_PART_GROUPS, NORMALS_VALID_CONTEXT_CLASSES
from mtl.data.synthetic_layouts_dense import (
    CONTEXT_INVALID,
    CONTEXT_VALID,
    targets,
    unexplained_pixels,
    unit_normals,
    write_nyuv2_libmtl,
    write_pascal_mt,
)
from mtl.losses import IGNORE_INDEX

N_TRAIN, N_VAL, SIZE = 4, 3, (8, 12)


def config(root: Path, size=SIZE, augment: bool = False) -> DataConfig:
    return DataConfig(
        benchmark="pascal_context",
        root=str(root),
        image_size=list(size),
        loader_workers=0,
        augment=AugmentConfig(enabled=augment, scale=[0.3, 1.0]),
    )


@pytest.fixture
def root(tmp_path) -> Path:
    return write_pascal_mt(tmp_path / "PASCAL_MT", N_TRAIN, N_VAL, SIZE)


def file_of(root: Path, folder: str, k: int, suffix: str) -> Path:
    return root / folder / f"2008_{k:06d}{suffix}"


def test_taskset():
    heads = {h.name: h for h in benchmark_taskset(config(Path("/nonexistent"))).heads}
    assert {n: (h.kind, h.num_outputs) for n, h in heads.items()} == {
        "semseg": ("dense_classification", 21),
        "human_parts": ("dense_classification", 7),
        "saliency": ("saliency", 1),
        "normals": ("normals", 3),
    }
    assert [heads[n].metric for n in heads] == ["miou", "miou", "max_f", "mean_angle"]


def test_the_context_classes_of_the_normals_mask():
    assert len(NORMALS_VALID_CONTEXT_CLASSES) == 170  # 169 shared names + tvmonitor (427)
    assert {CONTEXT_VALID, 284, 427} <= set(NORMALS_VALID_CONTEXT_CLASSES.tolist())
    assert CONTEXT_INVALID not in NORMALS_VALID_CONTEXT_CLASSES  # sky
    assert sorted(n for names in HUMAN_PART_GROUPS.values() for n in names)[:3] == [
        "hair",
        "head",
        "lear",
    ]


def test_every_value_as_stored(root):
    cfg = config(root)
    prepare(cfg)
    splits = load_splits(cfg, benchmark_taskset(cfg))
    assert [len(s) for s in splits] == [N_TRAIN, N_VAL]
    for offset, dataset in zip((0, N_TRAIN), splits, strict=True):
        for i in range(len(dataset)):
            k = offset + i
            sample, t = dataset[i], targets(SIZE, k)
            got = {name: v.numpy() for name, v in sample["targets"].items()}
            assert np.abs(sample["image"].numpy() - t["image"].transpose(2, 0, 1)).max() < 3 / 255
            # semseg from semseg/VOC12 (even k, palette PNG) or semseg/pascal-context (odd k)
            np.testing.assert_array_equal(
                got["semseg"], np.where(t["unlabelled"], IGNORE_INDEX, t["cls"])
            )
            assert sample["targets"]["human_parts"].dtype == torch.int64
            if k % 2 == 0:
                np.testing.assert_array_equal(got["human_parts"], t["cls"] % 7)
            else:  # no annotated person: nothing to learn from this map
                assert (got["human_parts"] == IGNORE_INDEX).all()
            assert got["saliency"].shape == (1, *SIZE) and got["saliency"].dtype == np.float32
            np.testing.assert_array_equal(got["saliency"][0], t["saliency"])
            # Normals: 2 v / 255 - 1, renormalised, zero off the NYUD-like context classes.
            np.testing.assert_allclose(got["normals"], t["normals"].transpose(2, 0, 1), atol=0.01)
            norms = np.linalg.norm(got["normals"], axis=0)
            np.testing.assert_allclose(norms[~t["unlabelled"]], 1.0, atol=1e-5)
            assert (norms[t["unlabelled"]] == 0).all()


def test_loader_batches_at_another_size(root):
    cfg = config(root, size=(16, 16))
    train, _ = load_splits(cfg, benchmark_taskset(cfg))
    batch = next(iter(make_loader(train, 2, train=True)))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert {k: tuple(v.shape) for k, v in batch["targets"].items()} == {
        "semseg": (2, 16, 16),
        "human_parts": (2, 16, 16),
        "saliency": (2, 1, 16, 16),
        "normals": (2, 3, 16, 16),
    }
    again = pickle.loads(pickle.dumps(train))  # as loader processes started by spawn get it
    assert torch.equal(again[1]["targets"]["normals"], train[1]["targets"]["normals"])


def test_augmentation_moves_every_target_with_the_image(tmp_path):
    size, flips = (16, 24), set()
    cfg = config(write_pascal_mt(tmp_path, N_TRAIN, 1, size), size=size, augment=True)
    train, _ = load_splits(cfg, benchmark_taskset(cfg))
    for epoch in range(4):
        train.set_epoch(epoch)
        for k in range(N_TRAIN):
            sample = train[k]
            image = sample["image"].numpy()
            got = {name: v.numpy() for name, v in sample["targets"].items()}
            semseg = got["semseg"]
            assert unexplained_pixels(image, semseg, size, k, IGNORE_INDEX) == 0
            labelled = semseg != IGNORE_INDEX
            if k % 2 == 0:
                np.testing.assert_array_equal(got["human_parts"][labelled], semseg[labelled] % 7)
            np.testing.assert_array_equal(got["saliency"][0][labelled], semseg[labelled] % 2)
            flipped = image[1, :, 0].mean() > image[1, :, -1].mean()
            sign = np.array([[-1.0 if flipped else 1.0], [1.0], [1.0]])
            expected = unit_normals(semseg[labelled]).T * sign
            np.testing.assert_allclose(got["normals"][:, labelled], expected, atol=0.01)
            assert (got["normals"][:, ~labelled] == 0).all()
            flips.add(bool(flipped))
    assert flips == {True, False}


def test_a_task_subset_reads_only_its_files(root):
    for path in (root / "human_parts").glob("*.mat"):
        path.write_bytes(b"not a mat file")
    cfg = config(root)
    train, _ = load_splits(cfg, benchmark_taskset(cfg).subset(["semseg", "saliency"]))
    assert set(next(iter(make_loader(train, 2, train=True)))["targets"]) == {"semseg", "saliency"}
    with pytest.raises(DatasetCorruptError, match="as a MATLAB .mat file") as err:
        prepare(cfg)
    assert str(file_of(root, "human_parts", 0, ".mat")) in str(err.value)


# --- bad inputs: each a clear error naming the file and the fix -------------------------------


def test_a_folder_in_another_layout(tmp_path):
    write_nyuv2_libmtl(tmp_path, 2, 1, SIZE)
    with pytest.raises(DatasetMissingError, match="PASCAL_MT.tgz") as err:
        prepare(config(tmp_path))
    assert str(tmp_path / "ImageSets" / "Context" / "train.txt") in str(err.value)


def test_missing_split_list(root):
    (root / "ImageSets" / "Context" / "val.txt").unlink()
    with pytest.raises(DatasetMissingError, match="set data.root") as err:
        prepare(config(root))
    assert str(root / "ImageSets" / "Context" / "val.txt") in str(err.value)


@pytest.mark.parametrize(
    "folder, suffix",
    [
        ("JPEGImages", ".jpg"),
        ("human_parts", ".mat"),
        ("sal_distill", ".png"),
        ("normals_distill", ".png"),
        ("pascal-context/trainval", ".mat"),
    ],
)
def test_missing_file_is_named(root, folder, suffix):
    file_of(root, folder, 5, suffix).unlink()
    with pytest.raises(DatasetMissingError, match="PASCAL_MT folder") as err:
        prepare(config(root))
    assert str(file_of(root, folder, 5, suffix)) in str(err.value)


def test_semseg_missing_from_both_folders(root):
    file_of(root, "semseg/pascal-context", 3, ".png").unlink()
    with pytest.raises(DatasetMissingError) as err:
        prepare(config(root))
    message = str(err.value)
    assert str(file_of(root, "semseg/pascal-context", 3, ".png")) in message
    assert str(file_of(root, "semseg/VOC12", 3, ".png")) in message


def test_corrupt_image_is_named(root):
    file_of(root, "JPEGImages", 4, ".jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(DatasetCorruptError, match="Replace the file") as err:
        prepare(config(root))  # sample 4 is the first of val
    assert str(file_of(root, "JPEGImages", 4, ".jpg")) in str(err.value)


def test_semseg_label_out_of_range(root):
    path = file_of(root, "semseg/VOC12", 0, ".png")
    Image.fromarray(np.full(SIZE, 30, np.uint8), "L").save(path)
    with pytest.raises(DatasetCorruptError, match=r"\[30\] are out of range.*0\.\.20") as err:
        prepare(config(root))
    assert str(path) in str(err.value)


def test_a_target_of_the_wrong_size(root):
    path = file_of(root, "sal_distill", 0, ".png")
    Image.fromarray(np.zeros((SIZE[0], SIZE[1] + 2), np.uint8), "L").save(path)
    with pytest.raises(DatasetCorruptError, match="is 8x14 pixels but its image") as err:
        prepare(config(root))
    assert str(path) in str(err.value) and "Regenerate the file" in str(err.value)


def test_a_context_label_map_of_the_wrong_size(root):
    path = file_of(root, "pascal-context/trainval", 0, ".mat")
    savemat(path, {"LabelMap": np.zeros((3, 3), np.uint16)})
    with pytest.raises(DatasetCorruptError, match="is 3x3 pixels") as err:
        prepare(config(root))
    assert str(path) in str(err.value)


def test_human_parts_in_another_format(root):
    path = file_of(root, "human_parts", 0, ".mat")
    savemat(path, {"parts": np.zeros((2, 2))})
    with pytest.raises(DatasetCorruptError, match="no field 'anno'.*Pascal-Part") as err:
        prepare(config(root))
    assert str(path) in str(err.value)


def test_an_unknown_person_part(root):
    path = file_of(root, "human_parts", 0, ".mat")
    part = np.zeros((1, 1), dtype=[("part_name", object), ("mask", object)])
    part[0, 0] = (np.array(["tail"]), np.ones(SIZE, np.uint8))
    person = np.zeros(
        (1, 1),
        dtype=[("class", object), ("class_ind", object), ("mask", object), ("parts", object)],
    )
    person[0, 0] = ("person", np.array([[15]]), np.ones(SIZE, np.uint8), part)
    savemat(path, {"anno": {"imname": "x", "objects": person}})
    with pytest.raises(DatasetCorruptError, match="'tail' is not a Pascal-Part person part"):
        prepare(config(root))


def test_a_person_without_part_masks_leaves_the_map_unlabelled(root):
    path = file_of(root, "human_parts", 0, ".mat")
    person = np.zeros(
        (1, 1),
        dtype=[("class", object), ("class_ind", object), ("mask", object), ("parts", object)],
    )
    person[0, 0] = ("person", np.array([[15]]), np.ones(SIZE, np.uint8), np.zeros((0, 0)))
    savemat(path, {"anno": {"imname": "x", "objects": person}})
    cfg = config(root)
    train, _ = load_splits(cfg, benchmark_taskset(cfg).subset(["human_parts"]))
    assert (train[0]["targets"]["human_parts"] == IGNORE_INDEX).all()
