"""The ``local`` benchmark: a tiny parquet file and a tiny imagefolder written here."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mtl.config import DataConfig, LocalSourceConfig
from mtl.data import DatasetMissingError, benchmark_taskset, load_splits, make_loader


def png(value: int, size: tuple[int, int] = (9, 7), mode: str = "RGB") -> Image.Image:
    """A flat image whose grey level encodes its label, so labels can be checked after resizing."""
    return Image.new(mode, size, (value,) * 3 if mode == "RGB" else value)


def write_parquet(path: Path, n: int = 20) -> Path:
    encoded = []
    for i in range(n):
        buffer = io.BytesIO()
        png(20 * (i % 5)).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    table = pa.table(
        {"img": encoded, "shape": [i % 5 for i in range(n)], "parity": [i % 2 for i in range(n)]}
    )
    pq.write_table(table, path)
    return path


def local_cfg(path: Path, cache: Path, **local) -> DataConfig:
    return DataConfig(
        benchmark="local", cache_dir=str(cache), local=LocalSourceConfig(path=str(path), **local)
    )


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "data.parquet")
    cfg = local_cfg(
        path,
        tmp_path / "cache",
        format="parquet",
        image_column="img",
        label_columns={"shape": "shape", "parity": "parity"},
        num_classes={"shape": 5, "parity": 2},
        image_size=16,
        in_channels=3,
        val_fraction=0.25,
    )
    taskset = benchmark_taskset(cfg)
    assert [h.name for h in taskset.heads] == ["shape", "parity"] and taskset.image_size == (16, 16)
    train, val = load_splits(cfg, taskset)
    assert (len(train), len(val)) == (15, 5)
    batch = next(iter(make_loader(train, 5, train=False)))
    assert batch["image"].shape == (5, 3, 16, 16)
    # The flat grey level of each image encodes its label (20 * label).
    level = (batch["image"][:, 0, 8, 8] * 255).round().long()
    assert torch.equal(level, 20 * batch["targets"]["shape"])
    assert set(batch["targets"]) == {"shape", "parity"}
    assert batch["targets"]["parity"].dtype == torch.int64


def test_imagefolder_grey(tmp_path):
    for label, name in enumerate(("cat", "dog", "emu")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            png(60 * label, size=(10 + i, 12)).save(tmp_path / "imgs" / name / f"{i}.png")
    cfg = local_cfg(
        tmp_path / "imgs",
        tmp_path / "cache",
        label_columns={"animal": "label"},
        num_classes={"animal": 3},
        image_size=8,
        in_channels=1,
        val_fraction=0.25,
    )
    train, val = load_splits(cfg, benchmark_taskset(cfg))
    assert (len(train), len(val)) == (9, 3)
    batch = train.__getitems__(range(9))
    assert batch["image"].shape == (9, 1, 8, 8)
    level = (batch["image"][:, 0, 4, 4] * 255).round().long()
    assert torch.equal(level, 60 * batch["targets"]["animal"])


def test_taskset_needs_num_classes():
    cfg = DataConfig(
        benchmark="local", local=LocalSourceConfig(path="x", label_columns={"age": "age"})
    )
    with pytest.raises(ValueError, match="data.local.num_classes.age"):
        benchmark_taskset(cfg)


def test_missing_path(tmp_path):
    cfg = local_cfg(
        tmp_path / "nope", tmp_path / "cache", label_columns={"a": "label"}, num_classes={"a": 2}
    )
    with pytest.raises(DatasetMissingError, match="data.local.path"):
        load_splits(cfg, benchmark_taskset(cfg))


def test_labels_out_of_range(tmp_path):
    path = write_parquet(tmp_path / "data.parquet")
    cfg = local_cfg(
        path,
        tmp_path / "cache",
        format="parquet",
        image_column="img",
        label_columns={"shape": "shape"},
        num_classes={"shape": 3},
    )
    with pytest.raises(ValueError, match="num_classes.shape=3"):
        load_splits(cfg, benchmark_taskset(cfg))
