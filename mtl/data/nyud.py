"""NYUD-v2 (semseg, depth, normals) streamed from either of its two published layouts.

**LibMTL / MTAN** (``data.nyuv2_layout=libmtl``; Liu et al., "End-to-end multi-task learning
with attention", CVPR 2019, whose preprocessed NYUv2 LibMTL reads): 795 train and 654 val
samples at 288x384, one ``.npy`` per sample and target, HWC::

    <root>/{train,val}/image/<i>.npy   float (H, W, 3) in [0, 1]
    <root>/{train,val}/label/<i>.npy   (H, W): 13 classes 0..12, -1 = unlabelled
    <root>/{train,val}/depth/<i>.npy   float (H, W, 1), 0 = no measurement
    <root>/{train,val}/normal/<i>.npy  float (H, W, 3) unit vectors, 0 = unlabelled

The split is the folder: ``train/`` trains and ``val/`` (the 654 images the papers report on)
validates; samples are the integer file names found in ``image/``, in numeric order.

**NYUD_MT** (``data.nyuv2_layout=nyud_mt``; Vandenhende et al., "Multi-Task Learning for
Dense Prediction Tasks: A Survey", and ASTMT before it): the same 795/654 split; their code
trains at 480x640::

    <root>/gt_sets/{train,val}.txt     one sample id per line
    <root>/images/<id>.jpg             RGB
    <root>/segmentation/<id>.png       40 classes 1..40, 0 = void (served as class - 1)
    <root>/depth/<id>.npy              float (H, W) in metres, 0 = no measurement
    <root>/normals/<id>.npy            float (H, W, 3) in [-1, 1], 0 = unlabelled
    <root>/edge/<id>.npy               edges: not read (no edge task here yet)

The task set differs between the layouts (13 or 40 semseg classes), so it depends on
``data.nyuv2_layout``. With ``auto`` (the default) ``taskset`` looks, without reading any
file, for the folder that marks each layout (``<root>/train/image`` or ``<root>/gt_sets``);
set the layout explicitly to build a model where the data is not present.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl.config import DataConfig
from mtl.config_checks import image_hw
from mtl.data.cache import data_root
from mtl.data.errors import DatasetCorruptError, DatasetMissingError
from mtl.data.layout_io import (
    LazySample,
    channels_first,
    check_hw,
    class_ids,
    folder_names,
    load_npy,
    read_image,
    read_label_png,
    read_split_list,
    require_listed,
)
from mtl.data.streaming import UNLABELLED_PIXEL, Reader, Rows
from mtl.tasks import DENSE_CLASSIFICATION, DEPTH, NORMALS, TaskSet, TaskSpec

LIBMTL, NYUD_MT = "libmtl", "nyud_mt"
LAYOUTS = ("auto", LIBMTL, NYUD_MT)
SEMSEG_CLASSES = {LIBMTL: 13, NYUD_MT: 40}
SPLITS = ("train", "val")
_LIBMTL_FOLDERS = ("image", "label", "depth", "normal")
_LIBMTL_FIX = (
    "The LibMTL/MTAN layout needs <root>/{train,val}/{image,label,depth,normal}/<i>.npy for "
    "every sample i (MTAN's preprocessed NYUv2, as LibMTL's examples/nyu/README.md links); "
    "set data.root (or $MTL_DATA_DIR) to the folder that holds train/ and val/."
)
_NYUD_MT_FIX = (
    "The NYUD_MT layout needs <root>/gt_sets/{train,val}.txt and, per listed id, "
    "images/<id>.jpg, segmentation/<id>.png, depth/<id>.npy and normals/<id>.npy "
    "(NYUD_MT.tgz of Vandenhende et al.'s Multi-Task-Learning-PyTorch); set data.root (or "
    "$MTL_DATA_DIR) to the NYUD_MT folder."
)
# Vandenhende et al.'s NYUD_MT folders of the tasks read here: (folder, file suffix).
_NYUD_MT_FILES = {
    "image": ("images", ".jpg"),
    "semseg": ("segmentation", ".png"),
    "depth": ("depth", ".npy"),
    "normals": ("normals", ".npy"),
}


def layout(cfg: DataConfig) -> str:
    """``data.nyuv2_layout``, or with ``auto`` the layout whose marker folder exists.

    Raises:
        DatasetMissingError: ``auto`` and neither (or both) layouts are under ``data.root``.
    """
    if cfg.nyuv2_layout != "auto":
        return cfg.nyuv2_layout
    root = data_root(cfg)
    found = [
        name
        for name, marker in ((LIBMTL, root / "train" / "image"), (NYUD_MT, root / "gt_sets"))
        if marker.is_dir()
    ]
    if len(found) == 1:
        return found[0]
    what = "holds both NYUv2 layouts" if found else "holds neither NYUv2 layout"
    raise DatasetMissingError(
        f"data.benchmark=nyuv2: {root} {what} (data.nyuv2_layout=auto looks for "
        f"{root / 'train' / 'image'} or {root / 'gt_sets'}). {_LIBMTL_FIX} {_NYUD_MT_FIX} "
        "Or set data.nyuv2_layout=libmtl|nyud_mt to say which one you mean."
    )


def taskset(cfg: DataConfig) -> TaskSet:
    """``semseg`` (13 or 40 classes, by layout), ``depth``, ``normals``; RGB at image_size."""
    heads = (
        TaskSpec("semseg", DENSE_CLASSIFICATION, SEMSEG_CLASSES[layout(cfg)], "miou", True),
        TaskSpec("depth", DEPTH, 1, "abs_err", False),
        TaskSpec("normals", NORMALS, 3, "mean_angle", False),
    )
    return TaskSet("nyuv2", heads, in_channels=3, image_size=image_hw(cfg.image_size))


def index(cfg: DataConfig) -> dict[str, Rows]:
    """Sample tables ``{"train", "val"}`` with one ``id`` column; lists folders only."""
    root = data_root(cfg)
    if layout(cfg) == LIBMTL:
        return {split: _libmtl_rows(root, split) for split in SPLITS}
    return {split: _nyud_mt_rows(root, split) for split in SPLITS}


def reader(cfg: DataConfig) -> Reader:
    """Opens one sample's files (``LazySample``: targets decode when first asked for).

    A ``partial`` of a module function, not a closure: loader processes started by spawn or
    forkserver receive the dataset, reader included, pickled.
    """
    return partial(_read_libmtl if layout(cfg) == LIBMTL else _read_nyud_mt, data_root(cfg))


def _libmtl_rows(root: Path, split: str) -> Rows:
    folder = root / split / "image"
    if not folder.is_dir():
        raise DatasetMissingError(f"{folder} not found. {_LIBMTL_FIX}")
    stems = [name[: -len(".npy")] for name in folder_names(folder) if name.endswith(".npy")]
    numbers = sorted(int(s) for s in stems if s.isdigit())
    ids = [str(n) for n in numbers]
    for sub in _LIBMTL_FOLDERS[1:]:
        require_listed(root, [f"{split}/{sub}/{i}.npy" for i in ids], folder, _LIBMTL_FIX)
    return {"id": np.array([f"{split}/{i}" for i in ids], dtype=np.str_)}


def _nyud_mt_rows(root: Path, split: str) -> Rows:
    listed = root / "gt_sets" / f"{split}.txt"
    ids = read_split_list(listed, _NYUD_MT_FIX)
    for folder, suffix in _NYUD_MT_FILES.values():
        require_listed(root, [f"{folder}/{i}{suffix}" for i in ids], listed, _NYUD_MT_FIX)
    return {"id": np.array(ids, dtype=np.str_)}


def _read_libmtl(root: Path, row: dict[str, Any]) -> LazySample:
    split, i = str(row["id"]).split("/")
    path = {sub: root / split / sub / f"{i}.npy" for sub in _LIBMTL_FOLDERS}
    image = channels_first(load_npy(path["image"]), 3, path["image"], "image")
    low, high = float(image.min()), float(image.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise DatasetCorruptError(
            f"{path['image']}: image values span [{low:.3g}, {high:.3g}]; the LibMTL layout "
            "stores images as floats in [0, 1]"
        )
    hw = (image.shape[1], image.shape[2])

    def semseg() -> Tensor:
        values = load_npy(path["label"])
        check_hw(values, hw, path["label"], path["image"])
        rule = "LibMTL NYUv2 labels are 13 classes 0..12, with -1 for unlabelled pixels"
        return class_ids(values, 13, (-1, UNLABELLED_PIXEL), path["label"], rule)

    def depth() -> Tensor:
        return _depth(load_npy(path["depth"]), hw, path["depth"], path["image"])

    def normals() -> Tensor:
        return _normals(load_npy(path["normal"]), hw, path["normal"], path["image"])

    return LazySample(image.clamp(0.0, 1.0), {"semseg": semseg, "depth": depth, "normals": normals})


def _read_nyud_mt(root: Path, row: dict[str, Any]) -> LazySample:
    sample = str(row["id"])
    path = {
        task: root / folder / f"{sample}{suffix}"
        for task, (folder, suffix) in _NYUD_MT_FILES.items()
    }
    image = read_image(path["image"])
    hw = (image.shape[1], image.shape[2])

    def semseg() -> Tensor:
        stored = read_label_png(path["semseg"])
        check_hw(stored, hw, path["semseg"], path["image"])
        rule = "NYUD_MT segmentation PNGs hold classes 1..40 and 0 for void"
        labels = class_ids(stored, 41, (), path["semseg"], rule)
        # Void (0) is unlabelled and class k is served as k - 1, as Vandenhende et al. do.
        return torch.where(labels == 0, UNLABELLED_PIXEL, labels - 1)

    def depth() -> Tensor:
        return _depth(load_npy(path["depth"]), hw, path["depth"], path["image"])

    def normals() -> Tensor:
        return _normals(load_npy(path["normals"]), hw, path["normals"], path["image"])

    return LazySample(image, {"semseg": semseg, "depth": depth, "normals": normals})


def _depth(values: np.ndarray, hw: tuple[int, int], path: Path, image: Path) -> Tensor:
    """Depth ``(1, H, W)``; 0 marks pixels without a measurement (both layouts)."""
    out = channels_first(values, 1, path, "depth")
    check_hw(out, hw, path, image)
    if bool((out < 0).any()):
        raise DatasetCorruptError(f"{path}: depth has negative values; 0 marks missing depth")
    return out


def _normals(values: np.ndarray, hw: tuple[int, int], path: Path, image: Path) -> Tensor:
    """Normals ``(3, H, W)`` as stored (unit vectors; zero vectors are unlabelled)."""
    out = channels_first(values, 3, path, "normals")
    check_hw(out, hw, path, image)
    if float(out.abs().max()) > 1 + 1e-3:
        raise DatasetCorruptError(
            f"{path}: normal components reach {float(out.abs().max()):.3g}; they must be unit "
            "vectors in [-1, 1] (a zero vector marks an unlabelled pixel)"
        )
    return out
