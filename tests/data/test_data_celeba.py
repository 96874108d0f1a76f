"""CelebA: the published layout read into 40 binary tasks; every bad input fails naming the file."""

from __future__ import annotations

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
from mtl.data.celeba import ATTR_FILE, ATTRIBUTES, IMAGE_DIR, PARTITION_FILE
from mtl.data.synthetic_layouts import write_celeba

SIZE = (16, 12)  # (H, W) of the fixture's JPEGs


@pytest.fixture
def celeba(tmp_path):
    written = write_celeba(tmp_path, n_train=6, n_val=3, size=SIZE, n_test=2)
    return tmp_path, written


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(benchmark="celeba", root=str(root), image_size=8, **kw)


def _batch(dataset) -> dict:
    return next(iter(make_loader(dataset, len(dataset), train=False)))


def test_taskset_has_the_40_attributes_as_binary_heads(tmp_path):
    taskset = benchmark_taskset(_cfg(tmp_path / "nowhere"))  # reads no data
    assert [h.name for h in taskset.heads] == list(ATTRIBUTES) and len(ATTRIBUTES) == 40
    assert {(h.kind, h.num_outputs, h.metric) for h in taskset.heads} == {("binary", 1, "accuracy")}
    assert taskset.image_size == (8, 8) and taskset.in_channels == 3


def test_splits_follow_the_partition_and_targets_the_attributes(celeba):
    root, written = celeba
    cfg = _cfg(root)
    assert prepare(cfg) == root
    train, val = load_splits(cfg, benchmark_taskset(cfg))
    part = written["partition"]
    assert list(train.rows["image"]) == list(written["file"][part == 0])
    assert list(val.rows["image"]) == list(written["file"][part == 1])
    batch = _batch(val)
    assert batch["image"].shape == (3, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    expected = torch.from_numpy((written["attributes"][part == 1] > 0).astype(np.float32))
    got = torch.stack([batch["targets"][name] for name in ATTRIBUTES], dim=1)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_tasks_names_picks_attributes(celeba):
    root, written = celeba
    cfg = _cfg(root, augment=AugmentConfig(enabled=True))
    taskset = benchmark_taskset(cfg).subset(["Smiling", "Male"])
    train, _ = load_splits(cfg, taskset)
    batch = next(iter(make_loader(train, 4, train=True, seed=1)))
    assert set(batch["targets"]) == {"Male", "Smiling"}
    assert batch["image"].shape == (4, 3, 8, 8)
    assert set(batch["targets"]["Smiling"].tolist()) <= {0.0, 1.0}


def test_eval_split_test_serves_partition_2(celeba):
    root, written = celeba
    _, val = load_splits(_cfg(root, eval_split="test"), benchmark_taskset(_cfg(root)))
    assert list(val.rows["image"]) == list(written["file"][written["partition"] == 2])


def test_eval_split_is_checked():
    with pytest.raises(ConfigError, match="data.eval_split"):
        load_config(None, ["data.eval_split=valid"])


def test_partition_list_in_another_order_is_aligned_by_name(celeba):
    root, written = celeba
    lines = (root / PARTITION_FILE).read_text().splitlines()
    (root / PARTITION_FILE).write_text("\n".join(lines[::-1]) + "\n")
    train, _ = load_splits(_cfg(root), benchmark_taskset(_cfg(root)))
    assert list(train.rows["image"]) == list(written["file"][written["partition"] == 0])


@pytest.mark.parametrize("missing", [IMAGE_DIR, ATTR_FILE, PARTITION_FILE])
def test_missing_part_of_the_layout_names_it_and_data_root(celeba, missing):
    root, _ = celeba
    path = root / missing
    if path.is_dir():
        path.rename(root / "elsewhere")
    else:
        path.unlink()
    with pytest.raises(DatasetMissingError) as err:
        prepare(_cfg(root))
    assert str(path) in str(err.value) and "data.root" in str(err.value)


def test_drive_layout_with_subfolders_names_the_expected_paths(tmp_path):
    # The Google Drive download nests the files (Img/, Anno/, Eval/): not this layout.
    write_celeba(tmp_path / "Img", 2, 1, SIZE)
    with pytest.raises(DatasetMissingError, match="img_align_celeba") as err:
        prepare(_cfg(tmp_path))
    assert str(tmp_path / IMAGE_DIR) in str(err.value)


def _edit_line(path, number: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "file, number, edit",
    [
        (ATTR_FILE, 5, lambda s: s[:-2] + " 0"),  # a value other than -1/1
        (ATTR_FILE, 4, lambda s: s.rsplit(" ", 1)[0]),  # 39 values
        (ATTR_FILE, 6, lambda s: s.replace("-1", "x", 1)),  # not a number
        (ATTR_FILE, 2, lambda s: s.replace("Smiling", "Smile")),  # header names
        (ATTR_FILE, 1, lambda s: "many"),  # the count line
        (PARTITION_FILE, 3, lambda s: s[:-1] + "3"),  # partition 3
    ],
)
def test_bad_list_line_is_named(celeba, file, number, edit):
    root, _ = celeba
    _edit_line(root / file, number, edit)
    with pytest.raises(DatasetCorruptError) as err:
        prepare(_cfg(root))
    assert f"{root / file}, line {number}" in str(err.value)


def test_truncated_attribute_list_is_refused(celeba):
    root, _ = celeba
    lines = (root / ATTR_FILE).read_text().splitlines()
    (root / ATTR_FILE).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetCorruptError, match="line 1 says 11 images but the file lists 10"):
        prepare(_cfg(root))


def test_image_missing_from_the_partition_list_is_named(celeba):
    root, _ = celeba
    lines = (root / PARTITION_FILE).read_text().splitlines()
    (root / PARTITION_FILE).write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DatasetCorruptError, match="has no line for 000001.jpg"):
        prepare(_cfg(root))


def test_corrupt_jpeg_is_named_by_prepare(celeba):
    root, written = celeba
    first_val = written["file"][written["partition"] == 1][0]
    (root / IMAGE_DIR / first_val).write_bytes(b"these are not jpeg bytes")
    with pytest.raises(DatasetCorruptError) as err:
        prepare(_cfg(root))
    assert str(root / IMAGE_DIR / first_val) in str(err.value)


def test_missing_image_is_named_with_its_list(celeba):
    root, written = celeba
    (root / IMAGE_DIR / written["file"][1]).unlink()
    with pytest.raises(DatasetMissingError) as err:
        prepare(_cfg(root))
    path = root / IMAGE_DIR / written["file"][1]
    assert f"{path} is missing, but {root / ATTR_FILE} lists it" in str(err.value)


def test_images_of_the_unused_partition_may_be_absent(celeba):
    root, written = celeba
    for name in written["file"][written["partition"] == 2]:
        (root / IMAGE_DIR / name).unlink()
    assert prepare(_cfg(root)) == root
