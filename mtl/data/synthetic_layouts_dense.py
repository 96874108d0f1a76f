"""Tiny NYUD-v2 and PASCAL-Context folders in their published layouts: test and benchmark tooling.

Not a benchmark: these writers make fixtures, in exactly the layouts ``mtl.data.nyud`` and
``mtl.data.pascal`` read, for the unit tests, the end-to-end tests and ``benchmarks/``
(e.g. an NYUD-v2-layout set at 288x384 to time the streamed input pipeline).

Every sample is made from pixel coordinates, so a test can check that augmentation keeps
targets aligned with the image: the image's red channel is the row and its green channel the
column of the pixel, ``((r + 0.5) / H, (c + 0.5) / W)`` (``decode_coordinates`` inverts
it), and every target is a function of the class ``cls`` (0..12) of the 2x2 cell the pixel
lies in (``cell_class``). Sample ``k`` (counting train, then val) has ``k`` as the number in
its id (LibMTL: ``train/<k>``, ``val/<k - n_train>``); its targets are ``targets(size, k)``:

- ``semseg``: ``cls`` in every layout, unlabelled on the pixels of ``unlabelled``;
- ``depth``: ``1 + cls % 3`` (0 where unlabelled); ``normals``: ``(0.6, 0.8 cos(0.4 cls),
  0.8 sin(0.4 cls))``, a unit vector with a positive x (0 where unlabelled);
- PASCAL only: ``human_parts`` ``cls % 7`` for even ``k`` (odd samples have no person, so
  their map is unlabelled), ``saliency`` ``cls % 2``.

So a served pixel's semseg class says what its other targets must be, and the image says
which source pixel (within one, for the interpolation) it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PERSON, DOG = 15, 12  # Pascal VOC class indices
# One Pascal-Part person part name for each of the 6 part classes (mtl.data.pascal).
CELL_CLASSES = 13
PART_NAMES = {1: "head", 2: "torso", 3: "luarm", 4: "rhand", 5: "ruleg", 6: "lfoot"}
CONTEXT_VALID, CONTEXT_INVALID = 68, 360  # PASCAL-Context "ceiling" (NYUD-like), "sky" (not)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def cell_class(rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """The class (0..12) of each pixel's 2x2 cell in sample ``k``."""
    return ((rows // 2) * 5 + cols // 2 + k) % CELL_CLASSES


def decode_coordinates(
    image: np.ndarray, size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Source (row, column) of each pixel of a served ``(3, h, w)`` image in [0, 1]."""
    height, width = _hw(size)
    rows = np.clip(np.floor(image[0] * height), 0, height - 1).astype(np.int64)
    cols = np.clip(np.floor(image[1] * width), 0, width - 1).astype(np.int64)
    return rows, cols


def unlabelled(rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """Pixels of sample ``k`` that carry no semseg, depth or normals label."""
    return (rows + 2 * cols + k) % 7 == 0


def unit_normals(cls: np.ndarray) -> np.ndarray:
    """``(..., 3)`` unit normals of a class map, x component 0.6."""
    angle = 0.4 * cls
    return np.stack(
        [np.full(cls.shape, 0.6), 0.8 * np.cos(angle), 0.8 * np.sin(angle)], axis=-1
    ).astype(np.float32)


def targets(size: int | tuple[int, int], k: int) -> dict[str, np.ndarray]:
    """Sample ``k``'s image coordinates and targets, HWC numpy (see the module docstring)."""
    height, width = _hw(size)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    cls = cell_class(rows, cols, k)
    hole = unlabelled(rows, cols, k)
    image = np.stack(
        [(rows + 0.5) / height, (cols + 0.5) / width, np.full(rows.shape, 0.5)], axis=-1
    ).astype(np.float32)
    return {
        "image": image,
        "cls": cls,
        "unlabelled": hole,
        "depth": np.where(hole, 0.0, 1.0 + cls % 3).astype(np.float32),
        "normals": np.where(hole[..., None], 0.0, unit_normals(cls)).astype(np.float32),
        "human_parts": cls % 7 if k % 2 == 0 else np.full(cls.shape, 255),
        "saliency": (cls % 2).astype(np.float32),
    }


def unexplained_pixels(
    image: np.ndarray, semseg: np.ndarray, size: int | tuple[int, int], k: int, ignore: int
) -> int:
    """Served semseg pixels of sample ``k`` that no source pixel explains.

    A pixel is explained when the source pixel its image value decodes to, or one of that
    pixel's 8 neighbours (image and targets are interpolated differently), has its class
    (or is unlabelled, for ``ignore``). 0 means the targets moved with the image.

    Args:
        image: Served ``(3, h, w)`` image in [0, 1].
        semseg: Served ``(h, w)`` class map.
        size: The fixture's ``(H, W)``.
        k: The sample's number.
        ignore: The served value of unlabelled pixels.
    """
    height, width = _hw(size)
    rows, cols = decode_coordinates(image, size)
    t = targets(size, k)
    expected = np.where(t["unlabelled"], ignore, t["cls"])
    explained = np.zeros(semseg.shape, dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            r = np.clip(rows + dr, 0, height - 1)
            c = np.clip(cols + dc, 0, width - 1)
            explained |= expected[r, c] == semseg
    return int((~explained).sum())


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    # Full chroma and quality 100: each channel carries a coordinate that must survive.
    pixels = np.round(image * 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, quality=100, subsampling=0)


def _split_ids(n_train: int, n_val: int) -> dict[str, range]:
    return {"train": range(n_train), "val": range(n_train, n_train + n_val)}


def write_nyuv2_libmtl(
    root: Path, n_train: int, n_val: int, size: int | tuple[int, int] = (8, 12)
) -> Path:
    """LibMTL/MTAN NYUv2: ``<root>/{train,val}/{image,label,depth,normal}/<i>.npy`` (HWC).

    Sample ``k`` is ``train/<k>`` or ``val/<k - n_train>``.
    """
    root = Path(root)
    for split, ks in _split_ids(n_train, n_val).items():
        for sub in ("image", "label", "depth", "normal"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i, k in enumerate(ks):
            t = targets(size, k)
            label = np.where(t["unlabelled"], -1, t["cls"]).astype(np.float32)
            np.save(root / split / "image" / f"{i}.npy", t["image"])
            np.save(root / split / "label" / f"{i}.npy", label)
            np.save(root / split / "depth" / f"{i}.npy", t["depth"][..., None])
            np.save(root / split / "normal" / f"{i}.npy", t["normals"])
    return root


def write_nyud_mt(
    root: Path, n_train: int, n_val: int, size: int | tuple[int, int] = (8, 12)
) -> Path:
    """Vandenhende et al.'s NYUD_MT: ``gt_sets/``, ``images/``, ``segmentation/``, ``depth/``,
    ``normals/``, ``edge/``. Sample ``k`` has id ``f"{k:04d}"``."""
    root = Path(root)
    for sub in ("gt_sets", "images", "segmentation", "depth", "normals", "edge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, ks in _split_ids(n_train, n_val).items():
        ids = [f"{k:04d}" for k in ks]
        (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for sample, k in zip(ids, ks, strict=True):
            t = targets(size, k)
            _save_jpeg(root / "images" / f"{sample}.jpg", t["image"])
            seg = np.where(t["unlabelled"], 0, 1 + t["cls"]).astype(np.uint8)
            Image.fromarray(seg, "L").save(root / "segmentation" / f"{sample}.png")
            np.save(root / "depth" / f"{sample}.npy", t["depth"])
            np.save(root / "normals" / f"{sample}.npy", t["normals"])
            np.save(root / "edge" / f"{sample}.npy", np.zeros(t["depth"].shape, np.float32))
    return root


def _palette_png(path: Path, values: np.ndarray) -> None:
    image = Image.fromarray(values.astype(np.uint8), "P")
    image.putpalette([(i * 37) % 256 for i in range(768)])  # as VOC's SegmentationClass
    image.save(path)


def _part_annotation(t: dict[str, np.ndarray], k: int) -> dict:
    """A Pascal-Part ``anno`` struct: a dog without parts; for even ``k`` also a person."""
    obj_dtype = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    part_dtype = [("part_name", object), ("mask", object)]
    everywhere = np.ones(t["cls"].shape, np.uint8)
    objects = [("dog", np.array([[DOG]]), everywhere, np.zeros((0, 0)))]
    if k % 2 == 0:
        parts = np.zeros((1, len(PART_NAMES)), dtype=part_dtype)
        for j, (group, name) in enumerate(PART_NAMES.items()):
            parts[0, j] = (np.array([name]), (t["human_parts"] == group).astype(np.uint8))
        objects.append(("person", np.array([[PERSON]]), everywhere, parts))
    table = np.zeros((1, len(objects)), dtype=obj_dtype)
    for j, obj in enumerate(objects):
        table[0, j] = obj
    return {"imname": f"{k}", "objects": table}


def write_pascal_mt(
    root: Path, n_train: int, n_val: int, size: int | tuple[int, int] = (8, 12)
) -> Path:
    """Vandenhende et al.'s PASCAL_MT layout (see ``mtl.data.pascal``).

    Sample ``k`` has id ``f"2008_{k:06d}"``; even samples have their semseg in
    ``semseg/VOC12`` (palette PNG), odd ones in ``semseg/pascal-context`` (grey PNG).
    """
    from scipy.io import savemat

    root = Path(root)
    folders = ("ImageSets/Context", "JPEGImages", "semseg/VOC12", "semseg/pascal-context")
    folders += ("human_parts", "sal_distill", "normals_distill", "pascal-context/trainval")
    for sub in folders:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, ks in _split_ids(n_train, n_val).items():
        ids = [f"2008_{k:06d}" for k in ks]
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for sample, k in zip(ids, ks, strict=True):
            t = targets(size, k)
            _save_jpeg(root / "JPEGImages" / f"{sample}.jpg", t["image"])
            seg = np.where(t["unlabelled"], 255, t["cls"])
            if k % 2 == 0:
                _palette_png(root / "semseg" / "VOC12" / f"{sample}.png", seg)
            else:
                Image.fromarray(seg.astype(np.uint8), "L").save(
                    root / "semseg" / "pascal-context" / f"{sample}.png"
                )
            savemat(root / "human_parts" / f"{sample}.mat", {"anno": _part_annotation(t, k)})
            sal = (t["saliency"] * 255).astype(np.uint8)
            Image.fromarray(sal, "L").save(root / "sal_distill" / f"{sample}.png")
            coded = np.round((unit_normals(t["cls"]) + 1.0) * 127.5).astype(np.uint8)
            Image.fromarray(coded, "RGB").save(root / "normals_distill" / f"{sample}.png")
            context = np.where(t["unlabelled"], CONTEXT_INVALID, CONTEXT_VALID).astype(np.uint16)
            savemat(root / "pascal-context" / "trainval" / f"{sample}.mat", {"LabelMap": context})
    return root
