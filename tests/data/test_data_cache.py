"""The Arrow cache: keyed by content, reused, built atomically, located by config or env."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtl.config import DataConfig
from mtl.data import BENCHMARKS, cache_path, prepare
from mtl.data.arrow import read_columns, to_hf
from mtl.data.cache import build_atomic, cache_key, cache_root, data_root


def tiny(data_root, cache_dir, **overrides) -> DataConfig:
    return DataConfig(
        root=str(data_root), cache_dir=str(cache_dir), train_size=16, val_size=8, **overrides
    )


def counting_build(monkeypatch, name: str, fail: bool = False) -> list[int]:
    """Wrap a benchmark's builder to count calls (and optionally fail after building)."""
    calls = []
    bench = BENCHMARKS[name]

    def build(cfg):
        calls.append(1)
        out = bench.build(cfg)
        if fail:
            raise RuntimeError("injected failure")
        return out

    monkeypatch.setitem(BENCHMARKS, name, dataclasses.replace(bench, build=build))
    return calls


def test_cache_is_reused(data_root, tmp_path, monkeypatch):
    calls = counting_build(monkeypatch, "multimnist")
    cfg = tiny(data_root, tmp_path)
    entry = prepare(cfg)
    stamp = (entry / "meta.json").stat().st_mtime_ns
    assert prepare(cfg) == entry and len(calls) == 1
    assert (entry / "meta.json").stat().st_mtime_ns == stamp
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["content"]["train_size"] == 16


def test_key_follows_content(data_root, tmp_path):
    base = cache_path(tiny(data_root, tmp_path))
    assert cache_path(tiny(data_root, tmp_path, seed=1)) != base
    assert cache_path(tiny(data_root, tmp_path, image_size=32)) != base
    content = BENCHMARKS["multimnist"].content_key  # KMNIST's files are not here to stat
    kmnist = content(tiny(data_root, tmp_path, source="kmnist"))
    assert cache_key(kmnist) != cache_key(content(tiny(data_root, tmp_path)))
    # Whether downloading is allowed does not change content, nor does a copy of the raw
    # files that keeps their sizes and mtimes (the key holds paths relative to data.root).
    assert cache_path(tiny(data_root, tmp_path, download=True)) == base
    copy = tmp_path / "copy"
    shutil.copytree(data_root / "MNIST" / "raw", copy / "MNIST" / "raw")  # copy2: keeps mtimes
    assert cache_path(tiny(copy, tmp_path)) == base


def test_failed_build_leaves_nothing(data_root, tmp_path, monkeypatch):
    counting_build(monkeypatch, "multimnist", fail=True)
    with pytest.raises(RuntimeError, match="injected"):
        prepare(tiny(data_root, tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builder_keeps_the_first_entry(tmp_path):
    final = tmp_path / "entry"

    def write(tmp: Path) -> None:
        (tmp / "mine").write_text("second")
        final.mkdir()  # another process published while we were writing
        (final / "theirs").write_text("first")

    assert build_atomic(final, write, {}) == final
    assert sorted(p.name for p in final.iterdir()) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"], "temporary folder removed"


def test_locations_from_config_then_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path / "env-data"))
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "env-cache"))
    assert data_root(DataConfig()) == tmp_path / "env-data"
    assert cache_root(DataConfig()) == tmp_path / "env-cache"
    assert data_root(DataConfig(root="/x")) == Path("/x")
    monkeypatch.delenv("MTL_DATA_DIR")
    monkeypatch.delenv("MTL_CACHE_DIR")
    assert data_root(DataConfig()) == Path("data")
    assert cache_root(DataConfig()) == Path("~/.cache/mtl").expanduser()


def test_arrow_roundtrip_keeps_dtype_and_shape():
    columns = {
        "image": np.random.default_rng(0).integers(0, 256, (5, 3, 7, 4), dtype=np.uint8),
        "mask": np.arange(5 * 7 * 4, dtype=np.uint8).reshape(5, 7, 4),
        "label": np.arange(5, dtype=np.int64),
    }
    back = read_columns(to_hf(columns), list(columns))
    for name, values in columns.items():
        assert back[name].dtype == values.dtype
        np.testing.assert_array_equal(back[name], values)
