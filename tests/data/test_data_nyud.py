"""NYUD-v2 in its two published layouts (LibMTL/MTAN .npy, Vandenhende's NYUD_MT), streamed.

Fixtures are tiny folders in exactly those layouts (mtl.data.synthetic_layouts_dense), made
from pixel coordinates so that every served value can be predicted, also after a random crop
and flip.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.config import AugmentConfig, ConfigError, DataConfig, load_config
from mtl.data import (
    DatasetCorruptError,
    DatasetMissingError,
    benchmark_taskset,
    load_splits,
    make_loader,
    prepare,
)
from mtl.data.synthetic_layouts_dense import (
    targets,
    unexplained_pixels,
    unit_normals,
    write_nyud_mt,
    write_nyuv2_libmtl,
    write_pascal_mt,
)
from mtl.losses import IGNORE_INDEX

N_TRAIN, N_VAL, SIZE = 4, 3, (8, 12)
WRITERS = {"libmtl": write_nyuv2_libmtl, "nyud_mt": write_nyud_mt}
LAYOUTS = list(WRITERS)


def config(root: Path, layout: str = "auto", size=SIZE, augment: bool = False) -> DataConfig:
    return DataConfig(
        benchmark="nyuv2",
        root=str(root),
        nyuv2_layout=layout,
        image_size=list(size),
        loader_workers=0,
        augment=AugmentConfig(enabled=augment, scale=[0.3, 1.0]),
    )


@pytest.fixture(params=LAYOUTS)
def layout(request, tmp_path) -> tuple[str, Path]:
    return request.param, WRITERS[request.param](tmp_path / request.param, N_TRAIN, N_VAL, SIZE)


def sample_number(split: str, i: int) -> int:
    return i if split == "train" else N_TRAIN + i


def nyud_file(root: Path, folder: str, k: int, suffix: str) -> Path:
    return root / folder / f"{k:04d}{suffix}"


def test_taskset_follows_the_layout(layout):
    name, root = layout
    for chosen in ("auto", name):
        heads = {h.name: h for h in benchmark_taskset(config(root, chosen)).heads}
        assert list(heads) == ["semseg", "depth", "normals"]
        assert heads["semseg"].num_outputs == {"libmtl": 13, "nyud_mt": 40}[name]
        assert (heads["depth"].kind, heads["normals"].kind) == ("depth", "normals")
    assert benchmark_taskset(config(root)).image_size == SIZE


def test_explicit_layout_builds_the_task_set_without_data(tmp_path):
    assert benchmark_taskset(config(tmp_path, "libmtl")).head("semseg").num_outputs == 13
    assert benchmark_taskset(config(tmp_path, "nyud_mt")).head("semseg").num_outputs == 40


def test_every_value_as_stored(layout):
    name, root = layout
    cfg = config(root)
    prepare(cfg)
    splits = load_splits(cfg, benchmark_taskset(cfg))
    assert [len(s) for s in splits] == [N_TRAIN, N_VAL]
    image_tol = 0.0 if name == "libmtl" else 3 / 255  # JPEG
    for split, dataset in zip(("train", "val"), splits, strict=True):
        for i in range(len(dataset)):
            sample, t = dataset[i], targets(SIZE, sample_number(split, i))
            image, got = sample["image"], sample["targets"]
            assert image.dtype == torch.float32 and image.shape == (3, *SIZE)
            assert np.abs(image.numpy() - t["image"].transpose(2, 0, 1)).max() <= image_tol
            semseg = np.where(t["unlabelled"], IGNORE_INDEX, t["cls"])
            assert got["semseg"].dtype == torch.int64
            np.testing.assert_array_equal(got["semseg"].numpy(), semseg)
            assert got["depth"].dtype == torch.float32 and got["depth"].shape == (1, *SIZE)
            np.testing.assert_array_equal(got["depth"][0].numpy(), t["depth"])
            assert got["normals"].shape == (3, *SIZE)
            np.testing.assert_array_equal(got["normals"].numpy(), t["normals"].transpose(2, 0, 1))
            norms = got["normals"].norm(dim=0)
            labelled = torch.from_numpy(~t["unlabelled"])
            assert torch.allclose(norms[labelled], torch.ones(())) and (norms[~labelled] == 0).all()


def test_resized_split_and_loader_batches(layout):
    _, root = layout
    cfg = config(root, size=(4, 6))
    train, val = load_splits(cfg, benchmark_taskset(cfg))
    batch = next(iter(make_loader(train, 2, train=True)))
    assert batch["image"].shape == (2, 3, 4, 6)
    shapes = {k: tuple(v.shape) for k, v in batch["targets"].items()}
    assert shapes == {"semseg": (2, 4, 6), "depth": (2, 1, 4, 6), "normals": (2, 3, 4, 6)}
    values = set(make_loader(val, 3, train=False).dataset[0]["targets"]["semseg"].unique().tolist())
    assert values <= set(range(13)) | {IGNORE_INDEX}
    # Loader processes started by spawn or forkserver get the split pickled, reader included.
    again = pickle.loads(pickle.dumps(train))
    assert torch.equal(again[1]["targets"]["semseg"], train[1]["targets"]["semseg"])


def test_augmentation_moves_every_target_with_the_image(tmp_path):
    size, flips, inverse_zooms = (16, 24), set(), []
    for name, writer in WRITERS.items():
        cfg = config(writer(tmp_path / name, N_TRAIN, 1, size), size=size, augment=True)
        train, _ = load_splits(cfg, benchmark_taskset(cfg))
        for epoch in range(4):
            train.set_epoch(epoch)
            for k in range(N_TRAIN):
                sample = train[k]
                image, got = sample["image"].numpy(), sample["targets"]
                semseg = got["semseg"].numpy()
                assert unexplained_pixels(image, semseg, size, k, IGNORE_INDEX) == 0
                labelled = semseg != IGNORE_INDEX
                # Depth and normals come from the same source pixel as the label map.
                ratio = got["depth"][0].numpy()[labelled] / (1 + semseg[labelled] % 3)
                assert np.ptp(ratio) < 1e-5 and np.sqrt(0.3) - 0.1 <= ratio[0] <= 1 + 1e-6
                assert (got["depth"][0].numpy()[~labelled] == 0).all()
                flipped = image[1, :, 0].mean() > image[1, :, -1].mean()
                expected = unit_normals(semseg[labelled]).T * np.array(
                    [[-1 if flipped else 1], [1], [1]]
                )
                np.testing.assert_allclose(got["normals"].numpy()[:, labelled], expected, atol=1e-6)
                assert (got["normals"].numpy()[:, ~labelled] == 0).all()
                flips.add(bool(flipped))
                inverse_zooms.append(float(ratio[0]))
    assert flips == {True, False} and min(inverse_zooms) < 0.95  # the test saw both


def test_a_task_subset_reads_only_its_files(tmp_path):
    root = write_nyuv2_libmtl(tmp_path, N_TRAIN, N_VAL, SIZE)
    for path in root.glob("*/depth/*.npy"):
        path.write_bytes(b"not an array")
    cfg = config(root)
    train, _ = load_splits(cfg, benchmark_taskset(cfg).subset(["semseg", "normals"]))
    batch = next(iter(make_loader(train, 2, train=True)))
    assert set(batch["targets"]) == {"semseg", "normals"}
    with pytest.raises(DatasetCorruptError, match=r"train/depth/0\.npy"):
        prepare(cfg)


# --- bad inputs: each a clear error naming the file and the fix -------------------------------


@pytest.mark.parametrize("content", ["empty", "pascal"])
def test_a_folder_in_neither_layout_lists_both(tmp_path, content):
    if content == "pascal":
        write_pascal_mt(tmp_path, 2, 1, SIZE)
    with pytest.raises(DatasetMissingError) as err:
        benchmark_taskset(config(tmp_path))
    message = str(err.value)
    assert "neither" in message and str(tmp_path / "train" / "image") in message
    assert "gt_sets/{train,val}.txt" in message and "data.nyuv2_layout" in message


def test_a_folder_with_both_layouts_asks_which(tmp_path):
    write_nyuv2_libmtl(tmp_path, 2, 1, SIZE)
    write_nyud_mt(tmp_path, 2, 1, SIZE)
    with pytest.raises(DatasetMissingError, match="both NYUv2 layouts"):
        benchmark_taskset(config(tmp_path))
    assert benchmark_taskset(config(tmp_path, "nyud_mt")).head("semseg").num_outputs == 40


@pytest.mark.parametrize(
    "name, missing",
    [("libmtl", "train/image"), ("nyud_mt", "gt_sets/train.txt")],
)
def test_explicit_layout_without_data_names_the_first_file(tmp_path, name, missing):
    with pytest.raises(DatasetMissingError, match="data.root") as err:
        prepare(config(tmp_path, name))
    assert str(tmp_path / missing) in str(err.value)


def test_missing_split_list(tmp_path):
    root = write_nyud_mt(tmp_path, N_TRAIN, N_VAL, SIZE)
    (root / "gt_sets" / "val.txt").unlink()
    with pytest.raises(DatasetMissingError, match="NYUD_MT.tgz") as err:
        prepare(config(root))
    assert str(root / "gt_sets" / "val.txt") in str(err.value)


@pytest.mark.parametrize(
    "name, relative",
    [("libmtl", "val/depth/1.npy"), ("nyud_mt", "normals/0005.npy")],
)
def test_missing_target_file_is_named(tmp_path, name, relative):
    root = WRITERS[name](tmp_path, N_TRAIN, N_VAL, SIZE)
    (root / relative).unlink()
    with pytest.raises(DatasetMissingError, match="set data.root") as err:
        prepare(config(root))
    assert str(root / relative) in str(err.value)


def test_corrupt_image_is_named(tmp_path):
    root = write_nyud_mt(tmp_path, N_TRAIN, N_VAL, SIZE)
    nyud_file(root, "images", 0, ".jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetCorruptError, match="Replace the file") as err:
        prepare(config(root))
    assert str(nyud_file(root, "images", 0, ".jpg")) in str(err.value)


def test_corrupt_npy_is_named(tmp_path):
    root = write_nyuv2_libmtl(tmp_path, N_TRAIN, N_VAL, SIZE)
    (root / "val" / "image" / "0.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetCorruptError, match=r"val/image/0\.npy.*\.npy array"):
        prepare(config(root))


def _overwrite(path: Path, change) -> None:
    np.save(path, change(np.load(path)))


@pytest.mark.parametrize(
    "relative, change, fragment",
    [
        (
            "train/label/0.npy",
            lambda a: np.where(a == 3, 13, a),
            r"\[13\] are out of range.*0\.\.12",
        ),
        ("train/label/0.npy", lambda a: a + 0.5, "non-integer"),
        ("train/image/0.npy", lambda a: a * 255, r"stores images as floats in \[0, 1\]"),
        ("train/normal/0.npy", lambda a: (a + 1) * 127.5, r"unit\s+vectors in \[-1, 1\]"),
        ("train/depth/0.npy", lambda a: -a, "negative"),
        ("train/depth/0.npy", lambda a: np.pad(a, ((0, 0), (0, 1), (0, 0))), "is 8x13 pixels"),
        ("train/normal/0.npy", lambda a: a[..., :2], r"expected \(H, W, 3\)"),
        ("train/label/0.npy", lambda a: a[None], r"expected \(H, W\)"),
    ],
)
def test_bad_libmtl_values_are_named(tmp_path, relative, change, fragment):
    root = write_nyuv2_libmtl(tmp_path, N_TRAIN, N_VAL, SIZE)
    _overwrite(root / relative, change)
    with pytest.raises(DatasetCorruptError, match=fragment) as err:
        prepare(config(root))
    assert str(root / relative) in str(err.value)


def test_nyud_mt_label_out_of_range_and_wrong_shape(tmp_path):
    from PIL import Image

    root = write_nyud_mt(tmp_path, N_TRAIN, N_VAL, SIZE)
    seg = nyud_file(root, "segmentation", 0, ".png")
    Image.fromarray(np.full(SIZE, 41, np.uint8), "L").save(seg)
    with pytest.raises(DatasetCorruptError, match=r"\[41\] are out of range.*1\.\.40") as err:
        prepare(config(root))
    assert str(seg) in str(err.value)
    Image.fromarray(np.ones((SIZE[0] + 1, SIZE[1]), np.uint8), "L").save(seg)
    with pytest.raises(DatasetCorruptError, match="is 9x12 pixels but its image") as err:
        prepare(config(root))
    assert str(seg) in str(err.value)


def test_a_bad_sample_past_the_first_fails_when_read(tmp_path):
    root = write_nyuv2_libmtl(tmp_path, N_TRAIN, N_VAL, SIZE)
    _overwrite(root / "val" / "label" / "2.npy", lambda a: a + 20)
    cfg = config(root)
    prepare(cfg)  # checks sample 0 of each split only
    _, val = load_splits(cfg, benchmark_taskset(cfg))
    with pytest.raises(DatasetCorruptError, match=r"val/label/2\.npy"):
        list(make_loader(val, 1, train=False))


def test_layout_value_is_checked():
    with pytest.raises(ConfigError, match="data.nyuv2_layout"):
        load_config(None, ["data.nyuv2_layout=mtan"])
