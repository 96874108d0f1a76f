"""Reading the files of the published dense multi-task layouts (NYUD-v2, PASCAL-Context).

Shared by ``mtl.data.nyud`` and ``mtl.data.pascal``: decoders that name the file they failed
on, one directory listing per folder to check that every sample's files exist (a stat per
file would cost thousands of round trips on a network filesystem), and ``LazySample``, a
reader result that decodes a target only when the dataset asks for it, so a single-task
baseline reads one target file per sample instead of all of them.

Decoders: images and PNG label maps with ``torchvision.io``; ``.npy`` with
``np.load(allow_pickle=False)`` (a dataset file is never unpickled); MATLAB ``.mat`` with
``scipy.io.loadmat`` (scipy is installed with scikit-image and scikit-learn).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file

from mtl.data.errors import DatasetCorruptError, DatasetMissingError


class LazySample(dict):
    """A reader's result: ``image`` now, each target decoded on first access and kept.

    ``FileDataset`` reads ``raw["image"]`` and then ``raw[head]`` for the heads it serves, so
    targets of tasks that are not trained are never opened.

    Args:
        image: The decoded image, ``(C, H, W)``.
        loaders: Head name -> function that decodes that head's target.
    """

    def __init__(self, image: Tensor, loaders: dict[str, Callable[[], Any]]) -> None:
        super().__init__(image=image)
        self._loaders = loaders

    def __missing__(self, key: str) -> Any:
        if key not in self._loaders:
            raise KeyError(key)
        value = self[key] = self._loaders[key]()
        return value


def read_split_list(path: Path, fix: str) -> list[str]:
    """Sample ids of a split list (one per line; blank lines skipped).

    Raises:
        DatasetMissingError: The list is missing; ``fix`` says how to get it.
    """
    if not path.is_file():
        raise DatasetMissingError(f"split list {path} not found. {fix}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def folder_names(folder: Path) -> set[str]:
    """File names in ``folder`` (one listing); empty when the folder does not exist."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def require_files(root: Path, folder: str, ids: Iterable[str], suffix: str, fix: str) -> None:
    """Check that ``<root>/<folder>/<id><suffix>`` exists for every id, with one listing.

    Raises:
        DatasetMissingError: Naming the first missing file; ``fix`` says how to get it.
    """
    present = folder_names(root / folder)
    for sample_id in ids:
        if f"{sample_id}{suffix}" not in present:
            path = root / folder / f"{sample_id}{suffix}"
            raise DatasetMissingError(f"{path} not found (sample {sample_id!r}). {fix}")


def read_image(path: Path, mode: ImageReadMode = ImageReadMode.RGB) -> Tensor:
    """A JPEG or PNG decoded by torchvision, uint8 ``(C, H, W)``; RGB by default."""
    try:
        data = read_file(str(path))
    except (OSError, RuntimeError) as err:
        raise DatasetCorruptError(f"cannot open {path}: {err}") from err
    try:
        return decode_image(data, mode=mode)
    except RuntimeError as err:
        raise DatasetCorruptError(
            f"cannot decode image {path}: {err}. Replace the file with a readable JPEG or PNG."
        ) from err


def read_png_values(path: Path) -> np.ndarray:
    """A single-channel PNG's stored values ``(H, W)`` (palette PNGs give their indices)."""
    values = read_image(path, ImageReadMode.UNCHANGED)
    if values.shape[0] != 1:
        raise DatasetCorruptError(
            f"{path} has {values.shape[0]} channels; a label map is one channel of class ids "
            "(grey or palette PNG)"
        )
    return values[0].numpy()


def load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, never unpickled."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:  # ValueError: bad header, or an object array
        raise DatasetCorruptError(f"cannot read {path} as a numeric .npy array: {err}") from err


def load_mat(path: Path) -> dict[str, Any]:
    """A MATLAB ``.mat`` file's variables (``scipy.io.loadmat``)."""
    from scipy.io import loadmat  # scipy only where a layout ships .mat files
    from scipy.io.matlab import MatReadError

    try:
        return loadmat(path)
    except (MatReadError, OSError, ValueError, TypeError, NotImplementedError) as err:
        raise DatasetCorruptError(f"cannot read {path} as a MATLAB .mat file: {err}") from err


def channels_first(array: np.ndarray, channels: int, path: Path, what: str) -> Tensor:
    """``(H, W, C)`` (or ``(H, W)`` when ``channels`` is 1) as float32 ``(C, H, W)``."""
    if array.ndim == 2 and channels == 1:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] != channels:
        want = "(H, W) or (H, W, 1)" if channels == 1 else f"(H, W, {channels})"
        raise DatasetCorruptError(f"{path}: {what} has shape {array.shape}, expected {want}")
    if not np.issubdtype(array.dtype, np.number):
        raise DatasetCorruptError(f"{path}: {what} has dtype {array.dtype}, expected numbers")
    out = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
    if not bool(torch.isfinite(out).all()):
        raise DatasetCorruptError(f"{path}: {what} holds NaN or infinite values")
    return out


def check_hw(value: np.ndarray | Tensor, hw: tuple[int, int], path: Path, image: Path) -> None:
    """A dense target's last two dimensions must be its image's ``(H, W)``."""
    got = tuple(value.shape[-2:])
    if got != tuple(hw):
        raise DatasetCorruptError(
            f"{path} is {got[0]}x{got[1]} pixels but its image {image} is {hw[0]}x{hw[1]}; "
            "every target must have its image's height and width. Regenerate the file, or "
            "drop the sample from the split list."
        )


def class_ids(
    values: np.ndarray, num_classes: int, unlabelled: tuple[int, ...], path: Path, rule: str
) -> Tensor:
    """Integer label map ``(H, W)`` int64 with classes ``0 .. num_classes-1`` or unlabelled.

    Args:
        values: Stored labels (integers, or floats holding integers).
        num_classes: Valid classes are ``0 .. num_classes-1``.
        unlabelled: Other values allowed, meaning "no label" (the dataset maps them to the
            ignore index).
        path: The file, for errors.
        rule: The layout's label convention, for errors.
    """
    if values.ndim != 2:
        raise DatasetCorruptError(f"{path}: label map has shape {values.shape}, expected (H, W)")
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise DatasetCorruptError(f"{path}: label map holds non-integer values. {rule}")
    elif not np.issubdtype(values.dtype, np.integer):
        raise DatasetCorruptError(f"{path}: label map has dtype {values.dtype}. {rule}")
    labels = values.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    for value in unlabelled:
        bad &= labels != value
    if bad.any():
        found = sorted({int(v) for v in np.unique(labels[bad])[:5]})
        raise DatasetCorruptError(f"{path}: label values {found} are out of range. {rule}")
    return torch.from_numpy(labels)
