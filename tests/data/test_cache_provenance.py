"""Data provenance: the cache key covers the source files, and a damaged entry is found.

Each test copies the MNIST raw files (the session's data root, in torchvision's published
layout) into its own folder, so it can change, corrupt or delete them; builds are tiny.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mtl.config import DataConfig, LocalSourceConfig
from mtl.data import (
    DatasetCorruptError,
    DatasetMissingError,
    benchmark_taskset,
    cache_path,
    digits,
    load_splits,
    prepare,
)
from mtl.data.cache import check_entry

TRAIN_ARROW = "train/data-00000-of-00001.arrow"


@pytest.fixture
def root(data_root, tmp_path) -> Path:
    """A private copy of the MNIST raw files."""
    shutil.copytree(data_root / "MNIST" / "raw", tmp_path / "data" / "MNIST" / "raw")
    return tmp_path / "data"


def tiny(root: Path, cache: Path, **overrides) -> DataConfig:
    fields = {"train_size": 16, "val_size": 8, "download": False, **overrides}
    return DataConfig(root=str(root), cache_dir=str(cache), **fields)


def raw_file(root: Path, stem: str) -> Path:
    """The file the reader picks (torchvision may leave it extracted or gzipped)."""
    plain = root / "MNIST" / "raw" / stem
    return plain if plain.is_file() else plain.with_name(f"{stem}.gz")


def test_entry_records_what_it_read(root, tmp_path):
    entry = prepare(tiny(root, tmp_path / "cache"))
    meta = json.loads((entry / "meta.json").read_text())
    names = [name for name, _, _ in meta["sources"]]
    assert names == sorted(names) and len(names) == 4
    labels = raw_file(root, "t10k-labels-idx1-ubyte")
    stat = labels.stat()
    assert [labels.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns] in meta["sources"]
    assert meta["data_root"] == str(root) and meta["rows"] == {"train": 16, "val": 8}
    assert meta["files"][TRAIN_ARROW] == (entry / TRAIN_ARROW).stat().st_size
    assert check_entry(entry) == ""


def test_changed_source_builds_a_new_entry(root, tmp_path):
    cfg = tiny(root, tmp_path / "cache")
    first = prepare(cfg)
    labels = raw_file(root, "t10k-labels-idx1-ubyte")
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    touched = prepare(cfg)
    assert touched != first and cache_path(cfg) == touched
    if labels.suffix == ".gz":  # same labels, another size, the first mtime
        labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes()), compresslevel=1))
        os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert labels.stat().st_size != stat.st_size
        resized = prepare(cfg)
        assert resized not in (first, touched)
        stamps = json.loads((resized / "meta.json").read_text())["sources"]
        assert [labels.relative_to(root).as_posix(), labels.stat().st_size, stat.st_mtime_ns] in (
            stamps
        )
    built = {p.name for p in (tmp_path / "cache").iterdir()}
    assert first.name in built and touched.name in built


def test_missing_source_with_a_warm_cache_is_refused(root, tmp_path):
    cfg = tiny(root, tmp_path / "cache")
    entry = prepare(cfg)
    shutil.rmtree(root / "MNIST")
    with pytest.raises(DatasetMissingError) as err:
        prepare(cfg)
    message = str(err.value)
    assert str(root / "MNIST" / "raw" / "train-images-idx3-ubyte") in message  # what goes where
    assert "data.root" in message and "MTL_DATA_DIR" in message
    assert f"{entry}  intact" in message  # the entry it refused to use
    with pytest.raises(DatasetMissingError):
        load_splits(cfg, benchmark_taskset(cfg))  # a worker refuses it too


def test_corrupt_gz_with_a_warm_cache_is_found(root, tmp_path):
    cfg = tiny(root, tmp_path / "cache")
    prepare(cfg)
    images = raw_file(root, "train-images-idx3-ubyte")
    images.write_bytes(b"not what the header promises")
    with pytest.raises(DatasetCorruptError, match="train-images-idx3-ubyte") as err:
        prepare(cfg)
    assert str(images) in str(err.value)


def _truncate(entry: Path) -> None:
    arrow = entry / TRAIN_ARROW
    arrow.write_bytes(arrow.read_bytes()[:1000])


def _zero_header(entry: Path) -> None:
    arrow = entry / TRAIN_ARROW
    data = bytearray(arrow.read_bytes())
    data[:64] = bytes(64)  # same size: only the row count finds it
    arrow.write_bytes(bytes(data))


def _drop_file(entry: Path) -> None:
    (entry / "val" / "state.json").unlink()


def _wrong_rows(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["rows"]["train"] += 1
    (entry / "meta.json").write_text(json.dumps(meta))


def _drop_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


DAMAGE = {
    "truncated": (_truncate, "has 1000 bytes"),
    "zeroed header": (_zero_header, "train/ cannot be read"),
    "missing file": (_drop_file, "val/state.json is missing"),
    "wrong row count": (_wrong_rows, "holds 16 rows, 17 when it was built"),
    "missing meta": (_drop_meta, "meta.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_found_and_rebuilt(root, tmp_path, damage, caplog):
    cfg = tiny(root, tmp_path / "cache")
    entry = prepare(cfg)
    good = (entry / TRAIN_ARROW).read_bytes()
    spoil, problem = DAMAGE[damage]
    spoil(entry)
    assert problem in check_entry(entry)
    with caplog.at_level("WARNING", logger="mtl.data.cache"):
        assert prepare(cfg) == entry
    assert problem in caplog.text and "rebuilding" in caplog.text
    assert check_entry(entry) == "" and (entry / TRAIN_ARROW).read_bytes() == good
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name], "no leftovers"
    train, val = load_splits(cfg, benchmark_taskset(cfg))
    assert (len(train), len(val)) == (16, 8)


def test_damaged_entry_without_source_names_the_path(root, tmp_path):
    cfg = tiny(root, tmp_path / "cache")
    entry = prepare(cfg)
    _truncate(entry)
    shutil.rmtree(root / "MNIST")
    with pytest.raises(DatasetMissingError) as err:
        prepare(cfg)
    message = str(err.value)
    assert f"{entry}  damaged ({TRAIN_ARROW} has 1000 bytes" in message
    assert f"rm -r {entry}" in message and "train-images-idx3-ubyte" in message


def test_damaged_entry_that_cannot_be_removed_is_refused(root, tmp_path, monkeypatch):
    cfg = tiny(root, tmp_path / "cache")
    entry = prepare(cfg)
    _truncate(entry)

    def read_only(src, dst):  # what a read-only cache folder answers (tests run as root)
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(os, "rename", read_only)
    with pytest.raises(DatasetCorruptError) as err:
        prepare(cfg)
    assert f"cache entry {entry} is damaged" in str(err.value)
    assert f"rm -r {entry}" in str(err.value)


def _parquet(path: Path, n: int) -> None:
    cells = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("L", (6, 6), 40 * (i % 2)).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    pq.write_table(pa.table({"img": cells, "odd": [i % 2 for i in range(n)]}), path)


def test_local_source_change_and_removal(tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    _parquet(folder / "a.parquet", 8)
    local = LocalSourceConfig(
        path=str(folder),
        format="parquet",
        image_column="img",
        label_columns={"odd": "odd"},
        num_classes={"odd": 2},
        image_size=8,
        in_channels=1,
    )
    cfg = DataConfig(benchmark="local", cache_dir=str(tmp_path / "cache"), local=local)
    first = prepare(cfg)
    _parquet(folder / "b.parquet", 4)  # a file added
    second = prepare(cfg)
    assert second != first
    assert json.loads((second / "meta.json").read_text())["rows"] == {"train": 11, "val": 1}
    shutil.rmtree(folder)
    with pytest.raises(DatasetMissingError, match="data.local.path") as err:
        prepare(cfg)
    assert f"{second}  intact" in str(err.value)


def test_digits_key_covers_photos_and_optdigits(data_root, tmp_path):
    cfg = DataConfig(benchmark="digits", root=str(data_root), image_size=28)
    names = set(digits.sources(cfg))
    assert "sklearn:datasets/data/digits.csv.gz" in names
    assert {f"{package}:{path}" for package, path in digits.ALL_PHOTOS} <= names
    assert any(name.startswith("MNIST/raw/train-images") for name in names)
