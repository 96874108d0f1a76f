"""PASCAL-Context (semseg, human parts, saliency, normals) in Vandenhende et al.'s PASCAL_MT.

The layout of ``PASCAL_MT.tgz`` from "Multi-Task Learning for Dense Prediction Tasks: A
Survey" (Vandenhende et al., TPAMI 2021; ASTMT, Maninis et al., CVPR 2019, before it): 4,998
train and 5,105 val images of PASCAL-Context, about 500x375 (papers train at 512x512)::

    <root>/ImageSets/Context/{train,val}.txt      one image id per line: the split
    <root>/JPEGImages/<id>.jpg                    RGB
    <root>/semseg/VOC12/<id>.png                  21 classes 0..20 (0 = background),
    <root>/semseg/pascal-context/<id>.png         255 = unlabelled; VOC12 is used when present
    <root>/human_parts/<id>.mat                   Pascal-Part annotation (``anno`` struct)
    <root>/sal_distill/<id>.png                   distilled saliency, grey 0..255
    <root>/normals_distill/<id>.png               distilled normals, RGB: n = 2 v / 255 - 1
    <root>/pascal-context/trainval/<id>.mat       ``LabelMap``: the 459-class context labels

How the targets are made, as Vandenhende et al.'s loader makes them:

- ``human_parts``: 7 classes, background 0 and 6 parts (head, torso, upper arms, lower arms
  and hands, upper legs, lower legs and feet) painted from the part masks of every person
  (class 15) object. An image with no person that has part masks gets an all-unlabelled map
  (255), so it adds nothing to the loss. (Their pipeline decides this after augmentation,
  so a crop that misses every part also blanks the map; here it is decided per image.)
- ``saliency``: 1 where the distilled map exceeds half (``v / 255 > 0.5``), else 0.
- ``normals``: the distilled normals, renormalised to unit length, kept only on pixels whose
  context class also names an NYUD class (where the NYUD-trained teacher is trusted) and
  zero (unlabelled) elsewhere. ``NORMALS_VALID_CONTEXT_CLASSES`` lists those classes.
- Edges (from ``LabelMap``) are not served: there is no edge task here yet.

Semseg has 21 classes as in that code base; PASCAL-Context's 59-class protocol needs label
maps that PASCAL_MT does not ship.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode

from mtl.config import DataConfig
from mtl.config_checks import image_hw
from mtl.data.cache import data_root
from mtl.data.errors import DatasetCorruptError, DatasetMissingError
from mtl.data.layout_io import (
    LazySample,
    check_hw,
    class_ids,
    folder_names,
    load_mat,
    normals_from_rgb,
    read_image,
    read_label_png,
    read_split_list,
    require_listed,
)
from mtl.data.streaming import UNLABELLED_PIXEL, Reader, Rows
from mtl.tasks import DENSE_CLASSIFICATION, NORMALS, SALIENCY, TaskSet, TaskSpec

SPLITS = ("train", "val")
SEMSEG_CLASSES = 21
PERSON = 15  # Pascal VOC class index of "person" in the Pascal-Part annotations
# Pascal-Part part names of a person, grouped into the 6 parts of the 7-class task.
HUMAN_PART_GROUPS = {
    1: ("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"),
    2: ("neck", "torso"),
    3: ("luarm", "ruarm"),
    4: ("llarm", "rlarm", "lhand", "rhand"),
    5: ("luleg", "ruleg"),
    6: ("llleg", "rlleg", "lfoot", "rfoot"),
}
HUMAN_PART_CLASSES = 1 + len(HUMAN_PART_GROUPS)
_PART_ID = {name: group for group, names in HUMAN_PART_GROUPS.items() for name in names}
# PASCAL-Context (459-label LabelMap) classes whose name is also an NYUD-v2 class name
# ("unknown" excepted), plus tvmonitor: the pixels where Vandenhende et al. keep the
# distilled normals. Derived once from the two class-name tables of their repository
# (data/db_info/context_classes.json and nyu_classes.json).
NORMALS_VALID_CONTEXT_CLASSES = np.array(
    [3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46]
    + [49, 50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95]
    + [96, 101, 104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154]
    + [157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215]
    + [216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252]
    + [255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291]
    + [292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345]
    + [349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403]
    + [405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441]
    + [442, 443, 444, 446, 454, 457],
    dtype=np.int64,
)
_FIX = (
    "data.benchmark=pascal_context reads Vandenhende et al.'s PASCAL_MT layout: extract "
    "PASCAL_MT.tgz (linked from github.com/SimonVandenhende/Multi-Task-Learning-PyTorch) and "
    "set data.root (or $MTL_DATA_DIR) to the PASCAL_MT folder, which holds ImageSets/Context/, "
    "JPEGImages/, semseg/, human_parts/, sal_distill/, normals_distill/ and "
    "pascal-context/trainval/."
)
# Every task's file: (folder, suffix); semseg is in one of two folders (see _semseg_rows).
_FILES = {
    "image": ("JPEGImages", ".jpg"),
    "human_parts": ("human_parts", ".mat"),
    "saliency": ("sal_distill", ".png"),
    "normals": ("normals_distill", ".png"),
    "context": ("pascal-context/trainval", ".mat"),
}
_SEMSEG_DIRS = ("semseg/VOC12", "semseg/pascal-context")


def taskset(cfg: DataConfig) -> TaskSet:
    """``semseg`` (21), ``human_parts`` (7), ``saliency``, ``normals``; reads no data."""
    heads = (
        TaskSpec("semseg", DENSE_CLASSIFICATION, SEMSEG_CLASSES, "miou", True),
        TaskSpec("human_parts", DENSE_CLASSIFICATION, HUMAN_PART_CLASSES, "miou", True),
        TaskSpec("saliency", SALIENCY, 1, "max_f", True),
        TaskSpec("normals", NORMALS, 3, "mean_angle", False),
    )
    return TaskSet("pascal_context", heads, in_channels=3, image_size=image_hw(cfg.image_size))


def index(cfg: DataConfig) -> dict[str, Rows]:
    """``{"train", "val"}``: ``id`` and ``semseg_voc12`` (which semseg folder) per image."""
    root = data_root(cfg)
    tables = {}
    for split in SPLITS:
        listed = root / "ImageSets" / "Context" / f"{split}.txt"
        ids = read_split_list(listed, _FIX)
        for folder, suffix in _FILES.values():
            require_listed(root, [f"{folder}/{i}{suffix}" for i in ids], listed, _FIX)
        tables[split] = {
            "id": np.array(ids, dtype=np.str_),
            "semseg_voc12": _semseg_rows(root, ids),
        }
    return tables


def _semseg_rows(root: Path, ids: list[str]) -> np.ndarray:
    voc12, context = (folder_names(root / d) for d in _SEMSEG_DIRS)
    for sample_id in ids:
        if f"{sample_id}.png" not in voc12 and f"{sample_id}.png" not in context:
            raise DatasetMissingError(
                f"{root / _SEMSEG_DIRS[1] / (sample_id + '.png')} not found, nor "
                f"{root / _SEMSEG_DIRS[0] / (sample_id + '.png')} (sample {sample_id!r}). {_FIX}"
            )
    return np.array([f"{i}.png" in voc12 for i in ids], dtype=np.bool_)


def reader(cfg: DataConfig) -> Reader:
    """Opens one image's files (``LazySample``: targets decode when first asked for).

    A picklable ``partial``, for loader processes started by spawn or forkserver.
    """
    return partial(_read, data_root(cfg))


def _read(root: Path, row: dict[str, Any]) -> LazySample:
    sample, voc12 = str(row["id"]), bool(row["semseg_voc12"])
    path = {task: root / folder / f"{sample}{suffix}" for task, (folder, suffix) in _FILES.items()}
    path["semseg"] = root / _SEMSEG_DIRS[0 if voc12 else 1] / f"{sample}.png"
    image = read_image(path["image"])
    hw = (image.shape[1], image.shape[2])

    def semseg() -> Tensor:
        stored = read_label_png(path["semseg"])
        check_hw(stored, hw, path["semseg"], path["image"])
        rule = "PASCAL_MT semseg PNGs hold classes 0..20 (0 = background) and 255 = unlabelled"
        return class_ids(stored, SEMSEG_CLASSES, (UNLABELLED_PIXEL,), path["semseg"], rule)

    def human_parts() -> Tensor:
        return _human_parts(path["human_parts"], hw, path["image"])

    def saliency() -> Tensor:
        grey = read_image(path["saliency"], ImageReadMode.GRAY)
        check_hw(grey, hw, path["saliency"], path["image"])
        return (grey >= 128).float()  # v / 255 > 0.5

    def normals() -> Tensor:
        return _normals(path["normals"], path["context"], hw, path["image"])

    loaders = {"semseg": semseg, "human_parts": human_parts, "saliency": saliency}
    return LazySample(image, {**loaders, "normals": normals})


_PART_FORMAT = (
    "a Pascal-Part annotation: struct anno.objects(class_ind, mask, parts(part_name, mask))"
)


def _field(record: Any, name: str, path: Path, expected: str = _PART_FORMAT) -> Any:
    try:
        return record[name]
    except (KeyError, ValueError, IndexError) as err:
        raise DatasetCorruptError(f"{path}: no field {name!r}; expected {expected}") from err


def _human_parts(path: Path, hw: tuple[int, int], image: Path) -> Tensor:
    """The 7-class part map of one image, or all unlabelled without annotated persons."""
    anno = _field(load_mat(path), "anno", path)
    objects = np.asarray(_field(anno.flat[0], "objects", path))
    target: np.ndarray | None = None
    for obj in objects.flat:
        parts = np.asarray(_field(obj, "parts", path))
        if int(np.asarray(_field(obj, "class_ind", path)).flat[0]) != PERSON or parts.size == 0:
            continue
        if target is None:
            target = np.zeros(hw, dtype=np.int64)
        for part in parts.flat:
            name = str(np.asarray(_field(part, "part_name", path)).flat[0])
            if name not in _PART_ID:
                raise DatasetCorruptError(
                    f"{path}: person part {name!r} is not a Pascal-Part person part "
                    f"({sorted(_PART_ID)})"
                )
            mask = np.asarray(_field(part, "mask", path)).astype(bool)
            check_hw(mask, hw, path, image)
            target[mask] = _PART_ID[name]
    if target is None:
        return torch.full(hw, UNLABELLED_PIXEL, dtype=torch.int64)
    return torch.from_numpy(target)


def _normals(path: Path, context: Path, hw: tuple[int, int], image: Path) -> Tensor:
    """Unit normals ``(3, H, W)`` on NYUD-like classes, zero (unlabelled) elsewhere."""
    rgb = read_image(path)
    check_hw(rgb, hw, path, image)
    normals = normals_from_rgb(rgb)
    labels = np.asarray(_field(load_mat(context), "LabelMap", context, "a PASCAL-Context LabelMap"))
    check_hw(labels, hw, context, image)
    valid = torch.from_numpy(np.isin(labels, NORMALS_VALID_CONTEXT_CLASSES))
    return normals * valid
