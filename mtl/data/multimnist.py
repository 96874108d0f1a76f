"""MultiMNIST-dense: two real digits per image, five tasks of different natures (DESIGN §3).

Composition: on a 36x36 canvas, digit A's 28x28 box sits at the top-left corner (offset 0)
and digit B's at the bottom-right (offset 8), each shifted by an integer jitter drawn
uniformly from [-4, 4] per axis; the image is the pixel-wise max of the two layers. Pixels
shifted off the canvas are cut (MNIST digits have a 4-pixel empty border, so ink rarely is).
Train pairs draw both digits from the source's train split, val pairs from its test split;
everything is a function of ``data.seed``.

Labels are exact because the composition is known **(ours: the threshold and depth codes)**:
- a pixel is foreground when the composite intensity is > ``FOREGROUND`` (0.3 on [0, 1]);
  the digit on top there is the brighter layer, B on ties (B is composited last);
- ``semseg``: 0 background, 1 + d where digit class d is on top;
- ``depth``: stored codes 0 background / 1 A / 2 B on top, served as 0.0 / 0.5 / 1.0;
- ``recon_left``: A's layer alone, served in [0, 1].
With ``data.image_size`` != 36 images are resized bilinearly and label maps with nearest
neighbour after composition, so label codes stay exact.

The stored columns also keep the provenance of every pair (``index_a``, ``index_b`` into
the source split and the canvas offsets ``a_y``, ``a_x``, ``b_y``, ``b_x``), which tests
use to recompose each sample independently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtl.config import DataConfig
from mtl.data import mnist_family
from mtl.data.cache import data_root, square_image_size
from mtl.data.imageops import resize_images, resize_labels
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

CANVAS = 36
DIGIT = 28
JITTER = 4
BASE_A = 0  # top-left
BASE_B = CANVAS - DIGIT  # bottom-right
FOREGROUND = 0.3  # on [0, 1]; strokes are ~1.0, antialiased edges fade below

HEADS = (
    TaskSpec("left", CLASSIFICATION, 10, "accuracy", True),
    TaskSpec("right", CLASSIFICATION, 10, "accuracy", True),
    TaskSpec("semseg", DENSE_CLASSIFICATION, 11, "miou", True),
    TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),
    TaskSpec("recon_left", DENSE_REGRESSION, 1, "rmse", False),
)
# Dense regression targets are stored as uint8 codes; served value = code * scale.
TARGET_SCALES = {"depth": 0.5, "recon_left": 1.0 / 255.0}


def taskset(cfg: DataConfig) -> TaskSet:
    """All five heads; 1 channel at ``data.image_size``. Reads no data."""
    return TaskSet("multimnist", HEADS, in_channels=1, image_size=square_image_size(cfg))


def content_key(cfg: DataConfig) -> dict[str, Any]:
    """Config values that change what ``build`` produces."""
    mnist_family.get_source(cfg.source)  # fail on a typo before hashing
    return {
        "benchmark": "multimnist",
        "source": cfg.source,
        "train_size": cfg.train_size,
        "val_size": cfg.val_size,
        "seed": cfg.seed,
        "image_size": square_image_size(cfg),
    }


def sources(cfg: DataConfig) -> dict[str, Path]:
    """The MNIST-family raw files ``build`` reads (fetched when ``data.download`` allows)."""
    return mnist_family.source_files(cfg.source, data_root(cfg), cfg.download)


def place(digits: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Paste ``(N, 28, 28)`` digits at per-sample ``(N, 2)`` (y, x) canvas offsets.

    Offsets may be negative or push past the edge; those pixels are cut. Samples are
    grouped by offset (at most 17x17 groups), so the work is a few slice copies.
    """
    pad = JITTER  # offsets lie in [-JITTER, CANVAS - DIGIT + JITTER]
    size = CANVAS + 2 * pad
    canvas = np.zeros((len(digits), size, size), dtype=np.uint8)
    padded = offsets + pad
    if padded.min(initial=0) < 0 or padded.max(initial=0) > size - DIGIT:
        raise ValueError(f"offsets must lie in [{-pad}, {CANVAS - DIGIT + pad}]")
    for y, x in np.unique(padded, axis=0):
        rows = np.flatnonzero((padded[:, 0] == y) & (padded[:, 1] == x))
        canvas[rows, y : y + DIGIT, x : x + DIGIT] = digits[rows]
    return canvas[:, pad : pad + CANVAS, pad : pad + CANVAS]


def dense_labels(
    layer_a: np.ndarray, layer_b: np.ndarray, label_a: np.ndarray, label_b: np.ndarray
) -> dict:
    """``semseg`` and ``depth`` codes (uint8 (N, H, W)) from the two layers."""
    image = np.maximum(layer_a, layer_b)
    foreground = image > FOREGROUND * 255
    b_on_top = layer_b >= layer_a  # ties go to B, composited last
    depth = np.where(foreground, np.where(b_on_top, 2, 1), 0).astype(np.uint8)
    top_class = np.where(b_on_top, label_b[:, None, None], label_a[:, None, None])
    semseg = np.where(foreground, 1 + top_class, 0).astype(np.uint8)
    return {"semseg": semseg, "depth": depth}


def compose_pairs(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> dict:
    """``n`` composited pairs drawn from one source split, at the native 36x36.

    Returns:
        Columns: ``image`` uint8 (n, 1, 36, 36), ``left``/``right`` int64 (n,), ``semseg``
        and ``depth`` uint8 (n, 36, 36), ``recon_left`` uint8 (n, 1, 36, 36), and the
        provenance columns described in the module docstring.
    """
    index = rng.integers(0, len(images), size=(n, 2))
    jitter = rng.integers(-JITTER, JITTER + 1, size=(n, 2, 2))  # (pair, digit, yx)
    offset_a, offset_b = BASE_A + jitter[:, 0], BASE_B + jitter[:, 1]
    layer_a = place(images[index[:, 0]], offset_a)
    layer_b = place(images[index[:, 1]], offset_b)
    label_a, label_b = labels[index[:, 0]], labels[index[:, 1]]
    return {
        "image": np.maximum(layer_a, layer_b)[:, None],
        "left": label_a.astype(np.int64),
        "right": label_b.astype(np.int64),
        **dense_labels(layer_a, layer_b, label_a, label_b),
        "recon_left": layer_a[:, None],
        "index_a": index[:, 0].astype(np.int64),
        "index_b": index[:, 1].astype(np.int64),
        "a_y": offset_a[:, 0].astype(np.int64),
        "a_x": offset_a[:, 1].astype(np.int64),
        "b_y": offset_b[:, 0].astype(np.int64),
        "b_x": offset_b[:, 1].astype(np.int64),
    }


def _resize(columns: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    out = dict(columns)
    for name in ("image", "recon_left"):
        out[name] = resize_images(columns[name], size)
    for name in ("semseg", "depth"):
        out[name] = resize_labels(columns[name], size)
    return out


# (our split name, source split, which seed stream): val never sees a train digit.
_SPLITS = (("train", "train", 0), ("val", "test", 1))


def build(cfg: DataConfig, root: Path | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Compose ``train_size`` train pairs and ``val_size`` val pairs.

    Args:
        cfg: Data config (source, sizes, seed, image_size, download).
        root: MNIST-family root; defaults to ``data_root(cfg)``.

    Returns:
        split name -> columns (see ``compose_pairs``), resized to ``cfg.image_size``.
    """
    root = data_root(cfg) if root is None else root
    out = {}
    for split, source_split, stream in _SPLITS:
        images, labels = mnist_family.load_split(cfg.source, root, source_split, cfg.download)
        size = cfg.train_size if split == "train" else cfg.val_size
        rng = np.random.default_rng([cfg.seed, stream])
        out[split] = _resize(compose_pairs(images, labels, size, rng), square_image_size(cfg))
    return out
