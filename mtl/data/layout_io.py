"""Reading the files of published dataset layouts: images, label maps, arrays, split lists.

Each function names the file in its error, because a decoder's own message ("Image is
incomplete or truncated") does not say which of 200,000 files it was, and says what to do.
Shared by the streamed benchmarks (``celeba``, ``domains``, ``files``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from mtl.data.dense_files import folder_names
from mtl.data.errors import DatasetCorruptError, DatasetMissingError
from mtl.data.streaming import Rows, take_rows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision decodes
_FIX = "replace the file, or remove it and its entry from the split list"
# A listed file that is absent is a corrupt dataset (the list and the files disagree), and
# FileDataset passes DatasetCorruptError through unchanged.


def require(path: Path, fix: str) -> Path:
    """``path`` if it exists, else ``DatasetMissingError`` naming it and ``fix``."""
    if not path.exists():
        kind = "folder" if not path.suffix else "file"
        raise DatasetMissingError(f"{kind} {path} is missing: {fix}")
    return path


def require_listed(root: Path, paths: np.ndarray, listed_in: Path) -> None:
    """Check that ``root/<path>`` exists for every path, with one listing per folder.

    A ``stat`` per file would cost a round trip each on a network filesystem; a folder of
    200,000 images is listed in a fraction of a second.

    Raises:
        DatasetMissingError: Naming the first missing file and the list that names it.
    """
    listings: dict[str, set[str]] = {}
    for relative in paths.tolist():
        parent, _, name = relative.rpartition("/")
        names = listings.get(parent)
        if names is None:
            names = listings[parent] = folder_names(root / parent)
        if name not in names:
            raise DatasetMissingError(
                f"{root / relative} is missing, but {listed_in} lists it: restore the file, "
                f"or remove its entry from {listed_in.name}"
            )


def shuffled(rows: Rows, seed: int) -> Rows:
    """The rows in an order seeded by ``seed``, so that any prefix of an evaluation split
    (a capped validation, ``train.val_batches``) is a random sample of all its rows rather
    than the first domain or classes of a sorted list."""
    n = len(next(iter(rows.values()), ()))
    return take_rows(rows, np.random.default_rng(seed).permutation(n))


def _decoder_message(err: Exception) -> str:
    # torchvision prefixes "<function>, <source file>:<line>, "; keep only the reason.
    return str(err).split(", ")[-1].strip()


def decode(path: Path, mode: ImageReadMode = ImageReadMode.RGB) -> Tensor:
    """An image file as uint8 (or uint16, for a 16-bit PNG with ``UNCHANGED``) ``(C, H, W)``.

    Raises:
        DatasetCorruptError: The file is missing or does not decode.
    """
    if not path.is_file():
        raise DatasetCorruptError(f"image {path} is missing: {_FIX}")
    try:
        return decode_image(str(path), mode=mode)
    except RuntimeError as err:
        raise DatasetCorruptError(f"cannot decode {path}: {_decoder_message(err)}; {_FIX}") from err


def decode_label_png(path: Path) -> Tensor:
    """A one-channel PNG's stored values ``(C, H, W)``: grey levels, or palette indices.

    torchvision returns the packed bytes of a palette PNG of fewer than 8 bits per pixel
    (what PIL writes for a palette of up to 16 colours), so those are read with PIL.
    """
    header = b""
    if path.is_file():
        with open(path, "rb") as f:
            header = f.read(26)
    if len(header) == 26 and header[25] == 3 and header[24] < 8:  # IHDR: palette, bit depth
        try:
            with Image.open(path) as image:
                return torch.from_numpy(np.array(image, dtype=np.uint8))[None]
        except (OSError, ValueError) as err:
            raise DatasetCorruptError(f"cannot decode {path}: {err}; {_FIX}") from err
    return decode(path, ImageReadMode.UNCHANGED)


def load_npy(path: Path) -> Tensor:
    """A ``.npy`` array (never unpickled: object arrays are refused)."""
    if not path.is_file():
        raise DatasetCorruptError(f"array {path} is missing: {_FIX}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DatasetCorruptError(f"cannot read {path} as a .npy array: {err}; {_FIX}") from err
    if array.dtype.kind not in "biuf":
        raise DatasetCorruptError(f"{path} holds {array.dtype} values; store numbers")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.kind == "u" and array.dtype != np.uint8:  # torch computes little on these
        array = array.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(array))


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
    require(path, "give the split list, or set data.root to the folder that holds it")
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
