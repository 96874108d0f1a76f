"""Reading the files of published dataset layouts: lists, images, label maps, arrays, .mat.

Shared by every streamed benchmark (``celeba``, ``domains``, ``files``, ``nyud``, ``pascal``).
Each function names the file in its error, because a decoder's own message ("Image is
incomplete or truncated") does not say which of 200,000 files it was, and says what to do.
Existence is checked with one directory listing per folder (a ``stat`` per file would cost
a round trip each on a network filesystem), and ``LazySample`` decodes a target only when
the dataset asks for it, so a single-task run opens one target file per sample.

Decoders: images with ``torchvision.io``; label PNGs with it too, except palette PNGs of
fewer than 8 bits per pixel (PIL); ``.npy`` with ``np.load(allow_pickle=False)`` (a dataset
file is never unpickled); MATLAB ``.mat`` with ``scipy.io.loadmat``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from mtl.data.errors import DatasetCorruptError, DatasetMissingError
from mtl.data.streaming import Rows, take_rows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision decodes
# A listed file that is absent or unreadable is a corrupt dataset (the list and the files
# disagree), and FileDataset passes DatasetCorruptError through unchanged.
_FIX = "Replace the file, or remove its sample from the split list or table."
_TORCHVISION_PREFIX = re.compile(r"^\w+, \S+:\d+, ")


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


# --- what exists -------------------------------------------------------------------------


def require(path: Path, fix: str, what: str = "") -> Path:
    """``path`` if it exists, else ``DatasetMissingError`` naming it (as ``what``) and ``fix``."""
    if not path.exists():
        kind = what or ("folder" if not path.suffix else "file")
        raise DatasetMissingError(f"{kind} {path} is missing: {fix}")
    return path


def folder_names(folder: Path) -> set[str]:
    """File names in ``folder`` (one listing); empty when the folder does not exist."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def require_listed(
    root: Path, paths: Iterable[str] | np.ndarray, listed_in: Path, fix: str = ""
) -> None:
    """Check that ``root/<path>`` exists for every path, with one listing per folder.

    A folder of 200,000 images is listed in a fraction of a second.

    Args:
        root: What the paths are relative to.
        paths: ``/``-separated relative paths.
        listed_in: The list (or folder) that names them, for the error.
        fix: How to get the data; by default, restore the file or drop its list entry.

    Raises:
        DatasetMissingError: Naming the first missing file and the list that names it.
    """
    fix = fix or f"restore the file, or remove its entry from {listed_in.name}"
    listings: dict[str, set[str]] = {}
    for relative in paths.tolist() if isinstance(paths, np.ndarray) else paths:
        parent, _, name = relative.rpartition("/")
        names = listings.get(parent)
        if names is None:
            names = listings[parent] = folder_names(root / parent)
        if name not in names:
            raise DatasetMissingError(
                f"{root / relative} is missing, but {listed_in} lists it: {fix}"
            )


# --- lists -------------------------------------------------------------------------------


def read_split_list(path: Path, fix: str) -> list[str]:
    """Sample ids of a split list (one per line; blank lines skipped).

    Raises:
        DatasetMissingError: The list is missing; ``fix`` says how to get it.
    """
    require(path, fix, "split list")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_label_list(
    path: Path, num_classes: int, prefix: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """A split list of lines ``<relative path> <label>`` (blank lines skipped).

    Args:
        path: The list.
        num_classes: Labels must lie in ``[0, num_classes)``.
        prefix: Every path must start with it (e.g. ``"Art/"``: the domain's own folder).

    Returns:
        (paths, labels): fixed-width ``np.str_`` paths and int64 labels in
        ``[0, num_classes)``, in file order.

    Raises:
        DatasetMissingError: The list does not exist.
        DatasetCorruptError: A line without a label, a label out of range, or a path
            without ``prefix`` (names the line).
    """
    require(path, "give it, or set data.root to the folder that holds it", "split list")
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.rsplit(None, 1)
            if not parts:
                continue
            try:
                label = int(parts[1]) if len(parts) == 2 else None
            except ValueError:
                label = None
            if label is None or not 0 <= label < num_classes:
                raise DatasetCorruptError(
                    f"{path}, line {number}: {line.strip()!r} is not '<relative path> <label>' "
                    f"with a label in [0, {num_classes}); fix or remove the line"
                )
            if not parts[0].startswith(prefix):
                raise DatasetCorruptError(
                    f"{path}, line {number}: {parts[0]!r} is not under {prefix}; list paths "
                    "are relative to data.root and name the list's own domain folder"
                )
            paths.append(parts[0])
            labels.append(label)
    return np.array(paths, dtype=np.str_), np.array(labels, dtype=np.int64)


def shuffled(rows: Rows, seed: int) -> Rows:
    """The rows in an order seeded by ``seed``, so that any prefix of an evaluation split
    (a capped validation, ``train.val_batches``) is a random sample of all its rows rather
    than the first domain or classes of a sorted list."""
    n = len(next(iter(rows.values()), ()))
    return take_rows(rows, np.random.default_rng(seed).permutation(n))


# --- decoders ----------------------------------------------------------------------------


def _require_file(path: Path, what: str) -> None:
    # DatasetCorruptError, not Missing: the index listed the file, so the dataset changed.
    if not path.is_file():
        raise DatasetCorruptError(f"{what} {path} is missing. {_FIX}")


def _decoder_message(err: Exception) -> str:
    # torchvision prefixes "<function>, <source file>:<line>, "; keep only the reason.
    return _TORCHVISION_PREFIX.sub("", str(err)).strip().rstrip(".")


def read_image(path: Path, mode: ImageReadMode = ImageReadMode.RGB) -> Tensor:
    """A JPEG, PNG or WebP as uint8 ``(C, H, W)``, RGB by default (uint16 for a 16-bit PNG
    read ``UNCHANGED``).

    Raises:
        DatasetCorruptError: The file is missing or does not decode.
    """
    _require_file(path, "image")
    try:
        return decode_image(str(path), mode=mode)
    except RuntimeError as err:
        raise DatasetCorruptError(f"cannot decode {path}: {_decoder_message(err)}. {_FIX}") from err


def read_label_png(path: Path) -> Tensor:
    """A one-channel PNG's stored values ``(H, W)``: grey levels, or palette indices.

    torchvision returns the packed bytes of a palette PNG of fewer than 8 bits per pixel
    (what PIL writes for a palette of up to 16 colours), not its indices, so those are read
    with PIL.

    Raises:
        DatasetCorruptError: The file is missing, does not decode, or has several channels.
    """
    _require_file(path, "label map")
    with open(path, "rb") as f:
        header = f.read(26)
    if len(header) == 26 and header[25] == 3 and header[24] < 8:  # IHDR: palette, bit depth
        try:
            with Image.open(path) as image:
                return torch.from_numpy(np.array(image, dtype=np.uint8))
        except (OSError, ValueError) as err:
            raise DatasetCorruptError(f"cannot decode {path}: {err}. {_FIX}") from err
    values = read_image(path, ImageReadMode.UNCHANGED)
    if values.shape[0] != 1:
        raise DatasetCorruptError(
            f"{path} has {values.shape[0]} channel(s); a label map PNG needs 1 (class ids as "
            "grey levels or palette indices)"
        )
    return values[0]


def load_npy(path: Path) -> np.ndarray:
    """A numeric ``.npy`` array, never unpickled, ready for ``torch.from_numpy``: C order,
    native byte order, and unsigned integers wider than 8 bits as int64 (torch computes
    little on those).

    Raises:
        DatasetCorruptError: The file is missing, is not a ``.npy`` of numbers (object
            arrays are refused), or does not load.
    """
    _require_file(path, "array")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # ValueError: bad header, or pickled
        raise DatasetCorruptError(
            f"cannot read {path} as a numeric .npy array: {err}. {_FIX}"
        ) from err
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise DatasetCorruptError(f"{path} is an .npz archive; store one array with np.save")
    if array.dtype.kind not in "biuf":
        raise DatasetCorruptError(f"{path} holds {array.dtype} values; store numbers")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.kind == "u" and array.dtype != np.uint8:
        array = array.astype(np.int64)
    return np.ascontiguousarray(array)


def load_mat(path: Path) -> dict[str, Any]:
    """A MATLAB ``.mat`` file's variables (``scipy.io.loadmat``)."""
    from scipy.io import loadmat  # scipy only where a layout ships .mat files
    from scipy.io.matlab import MatReadError

    try:
        return loadmat(path)
    except (MatReadError, OSError, ValueError, TypeError, NotImplementedError) as err:
        raise DatasetCorruptError(f"cannot read {path} as a MATLAB .mat file: {err}") from err


def normals_from_rgb(rgb: Tensor) -> Tensor:
    """Unit normals ``(3, H, W)`` from an 8-bit RGB normal map, ``n = 2 v / 255 - 1``.

    Renormalised, because 8-bit rounding leaves the decoded vectors off unit length.
    """
    normals = rgb.float() * (2.0 / 255.0) - 1.0
    return normals / normals.norm(dim=0, keepdim=True).clamp_min(1e-6)


# --- checks on decoded targets -----------------------------------------------------------


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
    values: np.ndarray | Tensor,
    num_classes: int,
    unlabelled: tuple[int, ...],
    path: Path,
    rule: str,
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
    values = values.numpy() if isinstance(values, Tensor) else values
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
