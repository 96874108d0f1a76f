"""Digits: three real domains sharing one 10-class head (DESIGN §3, multi-domain).

- ``mnist``: the MNIST-family source (``data.source``), grey replicated to RGB.
- ``mnist_m``: other digits of the same source blended as ``|photo patch - digit|`` per RGB
  channel onto random crops of real photos shipped in scikit-image / scikit-learn
  (``photos.py``); train and val use disjoint photos. Not the published MNIST-M.
- ``optdigits``: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 digits, values
  0..16), upsampled bilinearly to 20x20 (the size of an MNIST digit's box), padded to 28x28,
  RGB replicated; a seeded 80/20 train/val split.

Per domain, train holds at most ``data.train_size`` samples and val at most
``data.val_size``; mnist and mnist_m take disjoint digits while the source has enough
(val digits come from the source's test split). Rows of the three domains are interleaved
in a seeded order, so any prefix of a split (a capped validation) holds every domain.

Stored columns: ``image`` uint8 (N, 3, S, S), ``digit`` and ``domain`` int64 (``domain``
indexes ``DOMAINS``), and provenance: ``source_index`` (row in the source split or in
``load_digits``) and ``photo`` (index into ``ALL_PHOTOS`` for mnist_m, -1 otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtl.config import DataConfig
from mtl.data import mnist_family, photos
from mtl.data.cache import data_root, square_image_size
from mtl.data.imageops import gray_to_rgb, resize_images
from mtl.tasks import CLASSIFICATION, TaskSet, TaskSpec

DOMAINS = ("mnist", "mnist_m", "optdigits")
HEADS = (TaskSpec("digit", CLASSIFICATION, 10, "accuracy", True),)
NATIVE_SIZE = 28
OPTDIGITS_BOX = 20  # MNIST digits fit a 20x20 box centred in 28x28
OPTDIGITS_VAL_FRACTION = 0.2
ALL_PHOTOS = photos.TRAIN_PHOTOS + photos.VAL_PHOTOS
OPTDIGITS_FILE = ("sklearn", "datasets/data/digits.csv.gz")  # what load_digits reads
_PHOTO_OFFSET = {"train": 0, "val": len(photos.TRAIN_PHOTOS)}


def taskset(cfg: DataConfig) -> TaskSet:
    """One ``digit`` head over three domains; 3 channels at ``data.image_size``."""
    return TaskSet(
        "digits", HEADS, in_channels=3, image_size=square_image_size(cfg), domains=DOMAINS
    )


def content_key(cfg: DataConfig) -> dict[str, Any]:
    """Config values (and fixed choices) that change what ``build`` produces."""
    mnist_family.get_source(cfg.source)
    return {
        "benchmark": "digits",
        "source": cfg.source,
        "train_size": cfg.train_size,
        "val_size": cfg.val_size,
        "seed": cfg.seed,
        "image_size": square_image_size(cfg),
        "photos": [list(p) for p in ALL_PHOTOS],
        "photo_short_side": photos.SHORT_SIDE,
    }


def sources(cfg: DataConfig) -> dict[str, Path]:
    """Every file ``build`` reads: the MNIST-family raw files (fetched when
    ``data.download`` allows), the mnist_m photos and scikit-learn's bundled digits."""
    files = mnist_family.source_files(cfg.source, data_root(cfg), cfg.download)
    files.update(photos.package_files(ALL_PHOTOS, "mnist_m"))
    files.update(photos.package_files((OPTDIGITS_FILE,), "the optdigits domain"))
    return files


def optdigits_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split -> (uint8 (n, 28, 28) images, int64 labels, indices into ``load_digits``)."""
    from sklearn.datasets import load_digits  # bundled data; imported lazily (slow import)

    bunch = load_digits()
    small = torch.from_numpy(bunch.images / 16.0).float()[:, None]  # (N, 1, 8, 8) in [0, 1]
    box = F.interpolate(small, size=(OPTDIGITS_BOX,) * 2, mode="bilinear", align_corners=False)
    pad = (NATIVE_SIZE - OPTDIGITS_BOX) // 2
    images = F.pad(box, (pad, pad, pad, pad))[:, 0].mul(255).round().clamp(0, 255).to(torch.uint8)
    perm = np.random.default_rng([seed, 2]).permutation(len(images))
    n_val = round(OPTDIGITS_VAL_FRACTION * len(images))
    labels = bunch.target.astype(np.int64)
    return {
        split: (images.numpy()[idx], labels[idx], idx)
        for split, idx in (("train", perm[n_val:]), ("val", perm[:n_val]))
    }


def _domain_columns(
    image: np.ndarray, digit: np.ndarray, domain: str, index: np.ndarray, photo: np.ndarray
) -> dict:
    n = len(image)
    return {
        "image": image,
        "digit": digit.astype(np.int64),
        "domain": np.full(n, DOMAINS.index(domain), dtype=np.int64),
        "source_index": index.astype(np.int64),
        "photo": photo.astype(np.int64),
    }


def _mnist_m(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, split: str, rng: np.random.Generator
) -> dict:
    pictures = [photos.load_photo(*p) for p in photos.PHOTOS[split]]
    choice = rng.integers(0, len(pictures), size=len(idx))  # stored as provenance
    patches = np.empty((len(idx), NATIVE_SIZE, NATIVE_SIZE, 3), dtype=np.uint8)
    for k, picture in enumerate(pictures):
        rows = np.flatnonzero(choice == k)
        patches[rows] = photos.random_crops(picture, len(rows), NATIVE_SIZE, rng)
    blended = photos.blend(images[idx], patches)
    return _domain_columns(blended, labels[idx], "mnist_m", idx, choice + _PHOTO_OFFSET[split])


def _split_columns(cfg: DataConfig, split: str, source: tuple, optdigits: tuple) -> dict:
    images, labels = source
    cap = cfg.train_size if split == "train" else cfg.val_size
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
    perm = rng.permutation(len(images))
    mnist_idx, mnist_m_idx = perm[:cap], np.roll(perm, -cap)[:cap]  # disjoint when 2*cap <= N
    no_photo = np.full(len(mnist_idx), -1)
    parts = [
        _domain_columns(
            gray_to_rgb(images[mnist_idx]), labels[mnist_idx], "mnist", mnist_idx, no_photo
        ),
        _mnist_m(images, labels, mnist_m_idx, split, rng),
    ]
    opt_images, opt_labels, opt_index = (a[:cap] for a in optdigits)  # already shuffled
    parts.append(
        _domain_columns(
            gray_to_rgb(opt_images), opt_labels, "optdigits", opt_index, np.full(len(opt_index), -1)
        )
    )
    # Interleave the domains: a prefix of the split (e.g. a capped validation) then sees all.
    order = rng.permutation(sum(len(p["digit"]) for p in parts))
    columns = {name: np.concatenate([p[name] for p in parts])[order] for name in parts[0]}
    columns["image"] = resize_images(columns["image"], square_image_size(cfg))
    return columns


def build(cfg: DataConfig, root: Path | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Train and val columns of all three domains (see the module docstring)."""
    root = data_root(cfg) if root is None else root
    opt = optdigits_splits(cfg.seed)
    out = {}
    for split, source_split in (("train", "train"), ("val", "test")):
        source = mnist_family.load_split(cfg.source, root, source_split, cfg.download)
        out[split] = _split_columns(cfg, split, source, opt[split])
    return out
