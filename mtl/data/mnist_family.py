"""Readers for the torchvision MNIST family in its raw IDX layout.

Files live at ``<root>/<ClassName>/raw/<file>`` (optionally ``<file>.gz``), exactly where
``torchvision.datasets.<ClassName>(root, download=True)`` puts them, so a user with internet
and one without share one layout. Each split is returned as ``uint8 (N, 28, 28)`` images and
``int64 (N,)`` labels.

IDX format (LeCun): 2 zero bytes, a type code (0x08 = uint8), the number of dimensions,
then one big-endian int32 per dimension, then the values. Everything is validated so a
truncated download fails here with the file's name rather than later as a shape error.
"""

from __future__ import annotations

import gzip
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtl.data.errors import DatasetCorruptError, DatasetMissingError

_IDX_UINT8 = 0x08
_SPLITS = ("train", "test")
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class MnistSource:
    """One member of the MNIST family.

    Attributes:
        folder: torchvision class name, which is also its folder under the data root.
        files: split ("train" | "test") -> (images file, labels file), without ``.gz``.
        transpose: EMNIST stores images transposed (column-major); flip them upright so
            all sources look alike.
        download_kwargs: Extra arguments for the torchvision class when downloading.
    """

    folder: str
    files: dict[str, tuple[str, str]]
    transpose: bool = False
    download_kwargs: dict[str, str] = field(default_factory=dict)


# Keys are the values of ``data.source``. EMNIST: the "digits" split (280k balanced digits,
# 10 classes), the only EMNIST split whose label space matches MNIST's.
SOURCES: dict[str, MnistSource] = {
    "mnist": MnistSource("MNIST", _MNIST_FILES),
    "fashion_mnist": MnistSource("FashionMNIST", _MNIST_FILES),
    "kmnist": MnistSource("KMNIST", _MNIST_FILES),
    "emnist": MnistSource(
        "EMNIST",
        {
            "train": (
                "emnist-digits-train-images-idx3-ubyte",
                "emnist-digits-train-labels-idx1-ubyte",
            ),
            "test": (
                "emnist-digits-test-images-idx3-ubyte",
                "emnist-digits-test-labels-idx1-ubyte",
            ),
        },
        transpose=True,
        download_kwargs={"split": "digits"},
    ),
}


def get_source(name: str) -> MnistSource:
    """The registry entry for ``data.source``, with a helpful error for a typo."""
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r} is not one of {sorted(SOURCES)}")
    return SOURCES[name]


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped when its name ends in ``.gz``) into a uint8 array.

    Raises:
        DatasetCorruptError: Unreadable gzip, wrong magic number or a size that does not
            match the header; the message names ``path``.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetCorruptError(
            f"{path}: cannot read ({err}); delete it and fetch it again"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UINT8:
        raise DatasetCorruptError(
            f"{path}: not an uint8 IDX file (magic bytes {raw[:4].hex() or 'missing'}, expected "
            f"0000 08 0n); delete it and fetch it again"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorruptError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise DatasetCorruptError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file has "
            f"{len(raw)} bytes; it is truncated or corrupt, delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _raw_dir(root: Path, source: MnistSource) -> Path:
    return root / source.folder / "raw"


def _locate(raw_dir: Path, name: str) -> Path | None:
    """The uncompressed file if present (torchvision extracts), else the ``.gz`` one."""
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_message(
    root: Path, source: MnistSource, missing: list[str], fetch_error: Exception | None = None
) -> str:
    raw_dir = _raw_dir(root, source)
    expected = [name for split in _SPLITS for name in source.files[split]]
    lines = [
        f"  {raw_dir / name}[.gz]{'   <- missing' if name in missing else ''}" for name in expected
    ]
    if fetch_error is None:
        why = "data.download=false, so nothing was fetched"
        fetch = "or drop data.download=false to let torchvision fetch them (needs internet)"
        detail = ""
    else:
        why = "fetching them with torchvision failed: it needs internet"
        fetch = "or rerun on a machine with internet (torchvision fetches missing files)"
        detail = "\ntorchvision said: " + (" ".join(str(fetch_error).split()) or repr(fetch_error))
    return (
        f"{source.folder} raw files not found under data root {root} ({why}). Expected:\n"
        + "\n".join(lines)
        + f"\nFix: put these files there (gzipped or not), or point the config key data.root "
        f"(or the environment variable MTL_DATA_DIR) at the folder that contains "
        f"{source.folder}/raw, {fetch}." + detail
    )


# Per connect or read. Without it urllib waits on a firewall that drops packets for minutes
# per mirror and file; with no DNS (the usual offline case) torchvision fails at once anyway.
_NETWORK_TIMEOUT_S = 20.0


def download(root: Path, source: MnistSource) -> None:
    """Fetch both splits with torchvision into ``root`` (``<root>/<ClassName>/raw``).

    Raises:
        Exception: Whatever torchvision raises (no network, checksum); ``load_split`` turns
            it into a ``DatasetMissingError`` that lists the files.
    """
    import torchvision.datasets as tv_datasets  # only here: a heavy import, rarely used

    cls = getattr(tv_datasets, source.folder)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_NETWORK_TIMEOUT_S)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True, **source.download_kwargs)
    finally:
        socket.setdefaulttimeout(previous)


def source_files(name: str, root: Path, allow_download: bool = False) -> dict[str, Path]:
    """The raw files of both splits of one source (what a build reads), fetched if allowed.

    Args:
        name: A key of ``SOURCES`` (the value of ``data.source``).
        root: Data root holding ``<ClassName>/raw``.
        allow_download: Fetch missing files with torchvision (``data.download``, on in
            the config by default); False never touches the network.

    Returns:
        Path relative to ``root`` (``MNIST/raw/train-images-idx3-ubyte.gz``) -> the file;
        the uncompressed file where torchvision left both.

    Raises:
        DatasetMissingError: Files missing and not fetched (download off or failed); lists
            what goes where.
    """
    source = get_source(name)
    raw_dir = _raw_dir(root, source)
    wanted = [name for s in _SPLITS for name in source.files[s]]
    missing = [f for f in wanted if _locate(raw_dir, f) is None]
    if missing and allow_download:
        try:
            download(root, source)
        except Exception as err:  # any failure means the same to the user: the files are absent
            raise DatasetMissingError(_missing_message(root, source, missing, err)) from err
        missing = [f for f in wanted if _locate(raw_dir, f) is None]
    if missing:
        raise DatasetMissingError(_missing_message(root, source, missing))
    located = [_locate(raw_dir, f) for f in wanted]
    return {p.relative_to(root).as_posix(): p for p in located if p is not None}


def load_split(
    name: str, root: Path, split: str, allow_download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split of one MNIST-family source.

    Args:
        name: A key of ``SOURCES`` (the value of ``data.source``).
        root: Data root holding ``<ClassName>/raw``.
        split: "train" or "test".
        allow_download: As for ``source_files``.

    Returns:
        ``uint8 (N, 28, 28)`` images (upright) and ``int64 (N,)`` labels.

    Raises:
        DatasetMissingError: Files missing and not fetched (download off or failed); lists
            what goes where.
        DatasetCorruptError: A file fails validation.
    """
    source = get_source(name)
    source_files(name, root, allow_download)
    raw_dir = _raw_dir(root, source)
    image_path, label_path = (_locate(raw_dir, f) for f in source.files[split])
    if image_path is None or label_path is None:  # deleted since source_files looked
        raise DatasetMissingError(_missing_message(root, source, list(source.files[split])))
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetCorruptError(
            f"{image_path} / {label_path}: shapes {images.shape} and {labels.shape} do not "
            f"form an image set (N, H, W) with N labels"
        )
    if source.transpose:
        images = images.transpose(0, 2, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)
