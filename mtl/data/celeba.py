"""CelebA (multi-task): 40 binary face attributes, streamed from the published files.

Layout under ``data.root`` (what torchvision's ``celeba/`` folder holds: the CelebA site's
"Align&Cropped Images" zip, unpacked, and the two list files from its ``Anno/`` and
``Eval/`` folders)::

    img_align_celeba/000001.jpg ...   # 202,599 aligned and cropped 178x218 (W x H) JPEGs
    list_attr_celeba.txt              # line 1: the image count; line 2: the 40 attribute
                                      # names; then "<file> <40 values, each -1 or 1>"
    list_eval_partition.txt           # "<file> <0 | 1 | 2>": train / valid / test

Tasks: one ``binary`` head per attribute, named as in the file (``Smiling``, ``Male``,
``5_o_Clock_Shadow``, ...), target 1 where the file says 1 and 0 where it says -1; primary
metric accuracy. ``tasks.names`` trains a subset.

Splits: train is partition 0. The val split is partition 1 by default
(``data.eval_split=val``, for model selection), or partition 2 with ``data.eval_split=test``
(the split the literature reports); the partition not chosen is not read. Images are resized
to ``data.image_size``, usually 64x64 as in the FAMO and Nash-MTL experiments.

The lists are parsed by numpy's C reader (about a second for 202,599 lines); the images are
decoded per batch by ``FileDataset``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mtl.config import DataConfig
from mtl.config_checks import image_hw
from mtl.data.cache import data_root
from mtl.data.errors import DatasetCorruptError
from mtl.data.layout_io import read_image, require, require_listed
from mtl.data.streaming import Reader, Rows
from mtl.tasks import BINARY, TaskSet, TaskSpec

IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
# In the order of list_attr_celeba.txt's second line (checked when it is read).
ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
PARTITIONS = {"train": 0, "val": 1, "test": 2}
LineCheck = Callable[[list[str]], str]  # a line's fields -> "" if valid, else its expected form
_NAME_WIDTH = 40  # longest file name the lists may hold (CelebA's are 10 characters)
_FIX = (
    f"set data.root to the folder that holds {IMAGE_DIR}/, {ATTR_FILE} and {PARTITION_FILE} "
    "(the CelebA site's Align&Cropped Images, and the lists from its Anno/ and Eval/ folders)"
)


def taskset(cfg: DataConfig) -> TaskSet:
    """40 binary heads, RGB at ``data.image_size``; reads no data."""
    heads = tuple(TaskSpec(name, BINARY, 1, "accuracy", True) for name in ATTRIBUTES)
    return TaskSet("celeba", heads, in_channels=3, image_size=image_hw(cfg.image_size))


def index(cfg: DataConfig) -> dict[str, Rows]:
    """``image`` (file name in ``img_align_celeba/``) and ``attributes`` (N, 40) uint8 0/1.

    Raises:
        DatasetMissingError: The image folder, a list file, or a listed image is missing.
        DatasetCorruptError: A malformed line, a value other than -1/1 or 0/1/2, or lists
            that do not name the same images (the message names the file and line).
    """
    root = data_root(cfg)
    require(root / IMAGE_DIR, _FIX)
    files, values = read_attributes(require(root / ATTR_FILE, _FIX))
    partition = _aligned_partition(files, require(root / PARTITION_FILE, _FIX))
    keep = (partition == PARTITIONS["train"]) | (partition == PARTITIONS[cfg.eval_split])
    require_listed(root / IMAGE_DIR, files[keep], root / ATTR_FILE)
    attributes = (values > 0).astype(np.uint8)
    splits = {"train": PARTITIONS["train"], "val": PARTITIONS[cfg.eval_split]}
    return {
        split: {"image": files[partition == code], "attributes": attributes[partition == code]}
        for split, code in splits.items()
    }


def reader(cfg: DataConfig) -> Reader:
    """Decodes ``img_align_celeba/<image>`` and serves each attribute as a 0/1 float."""
    return partial(_read, data_root(cfg) / IMAGE_DIR)


def _read(folder: Path, row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"image": read_image(folder / str(row["image"]))}
    out.update(zip(ATTRIBUTES, row["attributes"].astype(np.float32).tolist(), strict=True))
    return out


def read_attributes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(file names ``np.str_``, values int8 (N, 40) of -1/1) from ``list_attr_celeba.txt``."""
    with open(path, encoding="utf-8") as f:
        count_line, names_line = f.readline(), f.readline()
    try:
        count = int(count_line)
    except ValueError:
        raise DatasetCorruptError(
            f"{path}, line 1: {count_line.strip()!r} is not the image count; "
            f"{ATTR_FILE} starts with the count, then the 40 attribute names"
        ) from None
    if tuple(names_line.split()) != ATTRIBUTES:
        raise DatasetCorruptError(
            f"{path}, line 2: expected the 40 CelebA attribute names {' '.join(ATTRIBUTES)}, "
            f"got {names_line.strip()!r}; use the published {ATTR_FILE}"
        )
    layout = np.dtype([("file", f"U{_NAME_WIDTH}"), ("values", np.int8, (len(ATTRIBUTES),))])
    table = _load_table(path, layout, 2, _attribute_line)
    values = table["values"]
    bad = np.flatnonzero(~np.isin(values, (-1, 1)).all(axis=1))
    if len(bad) or len(table) != count:
        _raise_first_bad_line(path, 2, _attribute_line)  # names the line when one is bad
        raise DatasetCorruptError(
            f"{path}: line 1 says {count} images but the file lists {len(table)}; the file is "
            f"truncated or edited: use the published {ATTR_FILE}"
        )
    return _compact(table["file"], path), np.ascontiguousarray(values)


def _aligned_partition(files: np.ndarray, path: Path) -> np.ndarray:
    """Partition code (int8) of each of ``files``, from ``list_eval_partition.txt``."""
    layout = np.dtype([("file", f"U{_NAME_WIDTH}"), ("part", np.int8)])
    table = _load_table(path, layout, 0, _partition_line)
    names, part = table["file"], table["part"]
    if not np.isin(part, (0, 1, 2)).all():
        _raise_first_bad_line(path, 0, _partition_line)
    if len(names) == len(files) and np.array_equal(names, files):
        return part  # the published lists share one order
    order = np.argsort(names)
    at = np.minimum(np.searchsorted(names, files, sorter=order), len(names) - 1)
    found = names[order[at]] == files if len(names) else np.zeros(len(files), dtype=bool)
    if not found.all():
        missing = files[np.flatnonzero(~found)[0]]
        raise DatasetCorruptError(
            f"{path} has no line for {missing}, which {ATTR_FILE} lists; use the published "
            f"{PARTITION_FILE} that matches {ATTR_FILE}"
        )
    return part[order[at]]


def _attribute_line(fields: list[str]) -> str:
    """What a line of the attribute list must be, or "" when ``fields`` are one."""
    ok = len(fields) == 1 + len(ATTRIBUTES) and all(v in ("-1", "1") for v in fields[1:])
    return "" if ok else "'<file> <40 values, each -1 or 1>'"


def _partition_line(fields: list[str]) -> str:
    ok = len(fields) == 2 and fields[1] in ("0", "1", "2")
    return "" if ok else "'<file> <0, 1 or 2>'"


def _load_table(path: Path, layout: np.dtype, skip: int, check: LineCheck) -> np.ndarray:
    """numpy's C parser; on a parse error, rescan in Python to name the bad line."""
    try:
        return np.loadtxt(path, dtype=layout, skiprows=skip, comments=None, ndmin=1)
    except (ValueError, OverflowError):
        _raise_first_bad_line(path, skip, check)
        raise


def _raise_first_bad_line(path: Path, skip: int, check: LineCheck) -> None:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            expected = check(fields) if number > skip and fields else ""
            if expected:
                raise DatasetCorruptError(
                    f"{path}, line {number}: {line.strip()[:120]!r} is not {expected}; use "
                    "the published file, or fix or remove the line"
                )


def _compact(names: np.ndarray, path: Path) -> np.ndarray:
    """Names at their own width (the parser's is ``_NAME_WIDTH``), refusing cut-off ones."""
    width = int(np.char.str_len(names).max()) if len(names) else 1
    if width >= _NAME_WIDTH:
        raise DatasetCorruptError(
            f"{path}: file names of {_NAME_WIDTH} or more characters; CelebA's are 10"
        )
    return names.astype(f"U{width}")
