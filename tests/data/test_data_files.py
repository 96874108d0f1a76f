"""The generic ``files`` layout: a CSV of images and targets; every bad cell or file is named."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, encode_png

from mtl.config import DataConfig, FilesConfig, FileTaskConfig, load_config
from mtl.data import (
    DatasetCorruptError,
    DatasetMissingError,
    benchmark_taskset,
    load_splits,
    make_loader,
    prepare,
)
from mtl.data.synthetic_layouts import write_files
from mtl.losses import IGNORE_INDEX

SIZE = (12, 16)  # (H, W) of the fixture; served at the same size, so val targets are exact
NPY_TASKS = ("seg", "depth", "normals", "sal", "recon")


def _cfg(root, tasks: dict, domains=(), **kw) -> DataConfig:
    files = FilesConfig(
        tasks={name: FileTaskConfig(**spec) for name, spec in tasks.items()},
        domains=list(domains),
    )
    return DataConfig(benchmark="files", root=str(root), image_size=list(SIZE), files=files, **kw)


def _val_batch(cfg: DataConfig, names=None) -> tuple[dict, list[dict]]:
    """The whole val split as one batch, and the table's val rows in the same order."""
    taskset = benchmark_taskset(cfg)
    _, val = load_splits(cfg, taskset.subset(names) if names else taskset)
    with open(f"{cfg.root}/samples.csv", newline="") as f:
        by_image = {r["image"]: r for r in csv.DictReader(f) if r["split"] == "val"}
    rows = [by_image[str(image)] for image in val.rows["image"]]  # val is in a seeded order
    assert len(rows) == len(by_image)
    return next(iter(make_loader(val, len(val), train=False))), rows


def _png(path, mode=ImageReadMode.UNCHANGED) -> torch.Tensor:
    return decode_image(str(path), mode=mode)


def _edit_cell(root, line: int, column: str, value: str) -> None:
    path = root / "samples.csv"
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    table[line - 1][table[0].index(column)] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(table)


@pytest.fixture
def every_kind(tmp_path):
    return tmp_path, write_files(tmp_path, n_train=4, n_val=2, size=SIZE)


def test_every_kind_is_served_in_its_units(every_kind):
    root, tasks = every_kind
    cfg = _cfg(root, tasks)
    assert prepare(cfg) == root
    batch, rows = _val_batch(cfg)
    t = batch["targets"]
    assert batch["image"].shape == (2, 3, *SIZE) and batch["image"].dtype == torch.float32
    assert t["label"].dtype == torch.int64 and t["label"].tolist() == [
        int(r["label"]) for r in rows
    ]
    assert t["attr"].dtype == torch.float32 and t["attr"].tolist() == [
        float(r["attr"]) for r in rows
    ]
    for i, row in enumerate(rows):
        seg = _png(root / row["seg"])[0].long()
        seg[seg == 255] = IGNORE_INDEX
        assert t["seg"].dtype == torch.int64 and torch.equal(t["seg"][i], seg)
        assert t["seg"][i, 0, 0] == IGNORE_INDEX
        depth = _png(root / row["depth"]).float() / 1000  # 16-bit millimetres
        assert torch.allclose(t["depth"][i], depth) and t["depth"][i, 0, 0, 0] == 0
        normals = t["normals"][i]
        assert normals.shape == (3, *SIZE) and torch.all(normals[:, 0, 0] == 0)
        norm = normals.norm(dim=0)
        assert torch.allclose(norm[norm > 0], torch.ones(()), atol=1e-5) and (norm > 0).sum() > 1
        sal = _png(root / row["sal"]).float() / 255
        assert torch.equal(t["sal"][i], sal) and set(t["sal"].unique().tolist()) <= {0.0, 1.0}
        recon = _png(root / row["recon"]).float() / 255
        assert torch.allclose(t["recon"][i], recon)


def test_npy_targets_in_hwc_and_chw(tmp_path):
    tasks = write_files(tmp_path, n_train=2, n_val=2, size=SIZE, npy=NPY_TASKS)
    cfg = _cfg(tmp_path, tasks)
    prepare(cfg)
    batch, rows = _val_batch(cfg)
    t = batch["targets"]
    for i, row in enumerate(rows):
        seg = torch.from_numpy(np.load(tmp_path / row["seg"])).long()  # float, -1 = unlabelled
        assert torch.equal(t["seg"][i], torch.where(seg < 0, IGNORE_INDEX, seg))
        for name in ("depth", "normals", "sal", "recon"):
            hwc = torch.from_numpy(np.load(tmp_path / row[name]))  # (H, W, C) as written
            assert torch.allclose(t[name][i], hwc.permute(2, 0, 1))
    for row in rows:  # the same arrays stored (C, H, W) serve the same targets
        path = tmp_path / row["normals"]
        np.save(path, np.load(path).transpose(2, 0, 1))
    again, _ = _val_batch(cfg)
    assert torch.equal(again["targets"]["normals"], t["normals"])


def test_tasks_names_picks_tasks(every_kind):
    root, tasks = every_kind
    batch, _ = _val_batch(_cfg(root, tasks), ["seg", "label"])
    assert set(batch["targets"]) == {"seg", "label"}


def test_multi_domain_table(tmp_path):
    tasks = write_files(
        tmp_path, 3, 1, SIZE, tasks={"cls": ("classification", 5)}, domains=("photo", "sketch")
    )
    cfg = _cfg(tmp_path, tasks, domains=("photo", "sketch"))
    taskset = benchmark_taskset(cfg)
    assert taskset.domains == ("photo", "sketch") and [h.name for h in taskset.heads] == ["cls"]
    prepare(cfg)
    train, val = load_splits(cfg, taskset)
    assert train.rows["domain"].tolist() == [0, 0, 0, 1, 1, 1] and len(val) == 2
    batch = next(iter(make_loader(train, 4, train=True)))
    assert batch["domain"].dtype == torch.int64 and batch["targets"]["cls"].max() < 5
    sketch_train, _ = load_splits(cfg, taskset.subset(["sketch"]))
    assert sketch_train.rows["domain"].tolist() == [0, 0, 0]


def test_column_option_names_the_table_column(every_kind):
    root, tasks = every_kind
    text = (root / "samples.csv").read_text()
    (root / "samples.csv").write_text(text.replace(",label,", ",scene_id,", 1))
    with pytest.raises(DatasetCorruptError, match="data.files.tasks.label.column") as err:
        prepare(_cfg(root, tasks))
    assert f"{root / 'samples.csv'}, line 1: no column 'label'" in str(err.value)
    tasks["label"]["column"] = "scene_id"
    assert prepare(_cfg(root, tasks)) == root


def test_files_tasks_load_from_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "data:\n  benchmark: files\n  files:\n    domains: [a, b]\n    tasks:\n"
        "      cls: {kind: classification, num_outputs: 7, column: y}\n"
    )
    files = load_config(path).data.files
    assert files.tasks == {"cls": FileTaskConfig("classification", 7, "y")}


@pytest.mark.parametrize(
    "tasks, domains, fragment",
    [
        ({"x": {"kind": "segmentation"}}, (), "data.files.tasks.x.kind='segmentation'"),
        ({"x": {"kind": "classification"}}, (), "data.files.tasks.x.num_outputs=0"),
        ({"x": {"kind": "normals", "num_outputs": 2}}, (), "a normals task has 3"),
        ({"image": {"kind": "binary"}}, (), "another name"),
        ({}, (), "data.files.tasks is empty"),
        ({"a": {"kind": "binary"}, "b": {"kind": "binary"}}, ("p", "q"), "exactly one task"),
        ({"a": {"kind": "binary"}}, ("p", "p"), "names a domain twice"),
    ],
)
def test_bad_task_config_is_refused_before_reading(tmp_path, tasks, domains, fragment):
    with pytest.raises(ValueError) as err:
        benchmark_taskset(_cfg(tmp_path, tasks, domains))
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "line, column, value, fragment",
    [
        (3, "split", "test", "'test' is not one of ['train', 'val']"),
        (2, "label", "3", "'3' is outside [0, 3)"),
        (4, "label", "-1", "'-1' is outside [0, 3)"),
        (5, "label", "two", "'two' is not an integer"),
        (6, "attr", "2", "'2' is not 0 or 1"),
        (2, "seg", "targets/seg/00000.jpg", "'targets/seg/00000.jpg' is not a path ending in .png"),
        (3, "image", "", "'' is not a path"),
    ],
)
def test_bad_cell_names_table_line_and_column(every_kind, line, column, value, fragment):
    root, tasks = every_kind
    _edit_cell(root, line, column, value)
    with pytest.raises(DatasetCorruptError) as err:
        prepare(_cfg(root, tasks))
    assert f"{root / 'samples.csv'}, line {line}, column {column!r}: {fragment}" in str(err.value)


def test_unlabelled_attribute(every_kind):
    root, tasks = every_kind
    _edit_cell(root, 6, "attr", "-1")  # line 6: images/00004.jpg, a val row
    batch, rows = _val_batch(_cfg(root, tasks))
    served = dict(zip([r["image"] for r in rows], batch["targets"]["attr"].tolist(), strict=True))
    assert served["images/00004.jpg"] == -1


def test_domain_not_in_the_list_names_line(tmp_path):
    tasks = write_files(
        tmp_path, 2, 1, SIZE, tasks={"cls": ("classification", 2)}, domains=("photo", "sketch")
    )
    _edit_cell(tmp_path, 4, "domain", "cartoon")
    with pytest.raises(DatasetCorruptError, match="add it to data.files.domains") as err:
        prepare(_cfg(tmp_path, tasks, domains=("photo", "sketch")))
    assert "line 4, column 'domain': 'cartoon' is not one of ['photo', 'sketch']" in str(err.value)


def test_row_with_missing_fields_names_line(every_kind):
    root, tasks = every_kind
    lines = (root / "samples.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]
    (root / "samples.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetCorruptError, match="line 3: 8 fields but the header has 9"):
        prepare(_cfg(root, tasks))


def test_missing_table_or_split_column(every_kind):
    root, tasks = every_kind
    with pytest.raises(DatasetMissingError, match="data.files.table") as err:
        prepare(dataclasses.replace(_cfg(root, tasks), root=str(root / "x")))
    assert str(root / "x" / "samples.csv") in str(err.value)
    text = (root / "samples.csv").read_text()
    (root / "samples.csv").write_text(text.replace(",split,", ",part,", 1))
    with pytest.raises(DatasetCorruptError, match="no column 'split'"):
        prepare(_cfg(root, tasks))


def _write_png(path, data: np.ndarray) -> None:
    path.write_bytes(encode_png(torch.from_numpy(data)).numpy().tobytes())


@pytest.mark.parametrize(
    "task, write, fragment",
    [
        ("seg", lambda p: _write_png(p, np.zeros((1, 8, 16), np.uint8)), "is (8, 16) pixels"),
        ("seg", lambda p: _write_png(p, np.full((1, 12, 16), 9, np.uint8)), "class id 9"),
        ("seg", lambda p: _write_png(p, np.zeros((3, 12, 16), np.uint8)), "has 3 channel(s)"),
        ("depth", lambda p: _write_png(p, np.ones((1, 12, 16), np.uint8)), "8-bit PNG"),
        ("normals", lambda p: p.write_bytes(b"not a png"), "cannot decode"),
    ],
)
def test_bad_target_file_is_named_by_prepare(every_kind, task, write, fragment):
    root, tasks = every_kind
    target = root / "targets" / task / "00000.png"  # the first train row's
    write(target)
    with pytest.raises(DatasetCorruptError) as err:
        prepare(_cfg(root, tasks))
    assert str(target) in str(err.value) and fragment in str(err.value)


def test_missing_target_file_is_named_with_the_table(every_kind):
    root, tasks = every_kind
    target = root / "targets" / "sal" / "00003.png"
    target.unlink()
    with pytest.raises(DatasetMissingError) as err:
        prepare(_cfg(root, tasks))
    assert f"{target} is missing, but {root / 'samples.csv'} lists it" in str(err.value)


def test_only_the_trained_tasks_files_are_opened(every_kind):
    root, tasks = every_kind
    for path in (root / "targets" / "normals").iterdir():
        path.write_bytes(b"garbage")
    batch, _ = _val_batch(_cfg(root, tasks), ["seg", "label"])
    assert batch["targets"]["seg"].shape == (2, *SIZE)
    with pytest.raises(DatasetCorruptError, match="cannot decode"):
        _val_batch(_cfg(root, tasks), ["normals"])


@pytest.mark.parametrize("bits", [8, 4])
def test_palette_png_label_maps_serve_their_indices(every_kind, bits):
    root, tasks = every_kind
    ids = np.random.default_rng(0).integers(0, 4, SIZE).astype(np.uint8)
    ids[0, 0] = 255 if bits == 8 else 3
    for path in (root / "targets" / "seg").iterdir():
        image = Image.fromarray(ids, mode="P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, 7 * i % 256)])
        image.save(path, bits=bits)  # PIL packs 4-bit indices: torchvision cannot unpack them
    batch, _ = _val_batch(_cfg(root, tasks), ["seg"])
    expected = torch.from_numpy(ids).long()
    expected[expected == 255] = IGNORE_INDEX
    assert torch.equal(batch["targets"]["seg"], expected.expand(2, *SIZE))


def test_npy_target_of_the_wrong_shape_is_named(tmp_path):
    tasks = write_files(tmp_path, 2, 1, SIZE, npy=("depth",))
    target = tmp_path / "targets" / "depth" / "00002.npy"  # the first val row's
    np.save(target, np.ones((3, *SIZE), np.float32))
    with pytest.raises(DatasetCorruptError, match=r"has shape \(3, 12, 16\)") as err:
        prepare(_cfg(tmp_path, tasks))
    assert str(target) in str(err.value) and "(1, H, W) or (H, W, 1)" in str(err.value)


def test_corrupt_image_is_named_by_prepare(every_kind):
    root, tasks = every_kind
    (root / "images" / "00000.jpg").write_bytes(b"\xff\xd8 garbage")  # the first train row's
    with pytest.raises(DatasetCorruptError, match="cannot decode") as err:
        prepare(_cfg(root, tasks))
    assert str(root / "images" / "00000.jpg") in str(err.value)
