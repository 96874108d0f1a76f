"""MNIST-family IDX reader: real files, synthetic files, corrupt and missing files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from mtl.config import DataConfig
from mtl.data import (
    DatasetCorruptError,
    DatasetMissingError,
    digits,
    mnist_family,
    multimnist,
    prepare,
)
from mtl.data.mnist_family import SOURCES, load_split, read_idx

# Imported before tests/conftest.py swaps it for a stub that never touches the network.
REAL_DOWNLOAD = mnist_family.download
FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """An IDX file of uint8 ``array`` (the format the reader must accept)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_source(root: Path, name: str, n: int = 5, compress: bool = True) -> np.ndarray:
    """Both splits of a tiny fake source; returns the images written (same for both)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    source = SOURCES[name]
    for image_file, label_file in source.files.values():
        suffix = ".gz" if compress else ""
        raw = root / source.folder / "raw"
        write_idx(raw / f"{image_file}{suffix}", images, compress)
        write_idx(raw / f"{label_file}{suffix}", np.arange(n) % 10, compress)
    return images


def test_real_mnist_splits(data_root):
    images, labels = load_split("mnist", data_root, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("x.gz" if compress else "x"), array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_uncompressed_source_and_emnist_transposed(tmp_path):
    written = write_source(tmp_path, "emnist", compress=False)
    images, labels = load_split("emnist", tmp_path, "train")
    # EMNIST is stored column-major; the reader returns it upright.
    np.testing.assert_array_equal(images, written.transpose(0, 2, 1))
    np.testing.assert_array_equal(labels, np.arange(5) % 10)


def test_truncated_file_names_the_file(tmp_path):
    write_source(tmp_path, "mnist")
    bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-10]))
    with pytest.raises(DatasetCorruptError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_split("mnist", tmp_path, "train")


@pytest.mark.parametrize(
    "content, match",
    [(b"\x00\x00\x0d\x03" + bytes(12), "magic"), (b"not gzip at all", "cannot read")],
)
def test_bad_magic_or_gzip(tmp_path, content, match):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(content) if match == "magic" else content)
    with pytest.raises(DatasetCorruptError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_files_say_what_goes_where(tmp_path, monkeypatch):
    def never(*args):
        raise AssertionError("data.download=false must not fetch")

    monkeypatch.setattr(mnist_family, "download", never)
    cfg = DataConfig(
        root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"), download=False
    )
    with pytest.raises(DatasetMissingError) as info:
        prepare(cfg)
    message = str(info.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "t10k-labels-idx1-ubyte" in message
    for hint in ("data.root", "MTL_DATA_DIR", "data.download=false", "internet"):
        assert hint in message
    assert not list((tmp_path / "cache").glob("*")), "a failed build leaves nothing behind"


def test_missing_files_are_fetched_by_default(tmp_path):
    """The default config tries torchvision (here conftest's offline stub) before failing."""
    with pytest.raises(DatasetMissingError, match="tests never download") as info:
        prepare(DataConfig(root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache")))
    assert "train-images-idx3-ubyte" in str(info.value) and "MTL_DATA_DIR" in str(info.value)


def test_download_failure_is_wrapped(tmp_path, monkeypatch):
    import socket

    import torchvision.datasets

    timeouts, before = [], socket.getdefaulttimeout()

    def offline(*args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nName or service not known"
        )

    monkeypatch.setattr(mnist_family, "download", REAL_DOWNLOAD)
    monkeypatch.setattr(torchvision.datasets, "KMNIST", offline)
    with pytest.raises(DatasetMissingError, match="needs internet") as info:
        load_split("kmnist", tmp_path, "train", allow_download=True)
    message = str(info.value)
    assert str(tmp_path / "KMNIST" / "raw" / "t10k-images-idx3-ubyte") in message
    assert "Error downloading train-images-idx3-ubyte.gz: Name or service not known" in message
    # A bounded wait per socket operation (an offline machine must fail fast), then restored.
    assert timeouts == [mnist_family._NETWORK_TIMEOUT_S] and socket.getdefaulttimeout() == before


def test_unknown_source():
    with pytest.raises(ValueError, match="data.source='svhn'"):
        load_split("svhn", Path("."), "train")


def test_fixture_builds_like_the_full_data(data_root):
    """The committed subset keeps the rows the tests draw (tests/fixtures/make_mnist_subset.py),
    so builds, and the stored loss curve, do not depend on which data root the tests use."""
    if data_root.resolve() == FIXTURE_DATA.resolve():
        pytest.skip("only the committed fixture is present; nothing to compare it with")
    for build, cfg in (
        (multimnist.build, DataConfig(train_size=512, val_size=64)),  # configs/tiny.yaml
        (digits.build, DataConfig(benchmark="digits", image_size=28, train_size=64, val_size=32)),
    ):
        full, subset = build(cfg, root=data_root), build(cfg, root=FIXTURE_DATA)
        for split in ("train", "val"):
            for name in full[split]:
                np.testing.assert_array_equal(subset[split][name], full[split][name], err_msg=name)
