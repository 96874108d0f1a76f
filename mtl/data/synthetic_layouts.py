"""Test and benchmark tooling: tiny (or large) datasets written in the published layouts.

Not used by training. The unit tests, the end-to-end Ray tests and
``benchmarks/data_scale.py`` write fixtures with these functions, so the loaders are tested
against exactly the layouts they document (``mtl.data.celeba``, ``mtl.data.domains``,
``mtl.data.files``). Content is random but seeded; pixels carry no signal.

``write_celeba`` is fast enough for 50,000 images: it encodes a few distinct JPEGs and
writes their bytes to many files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from mtl.data import celeba, domains
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
)

CELEBA_SIZE = (218, 178)  # (H, W) of img_align_celeba


def _picture(rng: np.random.Generator, size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """A smooth random picture (compresses like a photo, unlike noise): uint8 (C, H, W)."""
    height, width = size
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    a, b, c = rng.uniform(0, 255, (3, channels))
    image = a * (1 - y) + b * x + c * y * (1 - x)
    top, left = rng.integers(0, height), rng.integers(0, width)
    image[top : top + height // 4, left : left + width // 4] = rng.uniform(0, 255, channels)
    return torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8)).permute(2, 0, 1)


def _jpegs(rng: np.random.Generator, size: tuple[int, int], count: int) -> list[bytes]:
    return [encode_jpeg(_picture(rng, size), quality=90).numpy().tobytes() for _ in range(count)]


def write_celeba(
    root: str | Path,
    n_train: int,
    n_val: int,
    size: tuple[int, int] = CELEBA_SIZE,
    *,
    n_test: int = 0,
    seed: int = 0,
    variants: int = 8,
) -> dict[str, np.ndarray]:
    """The CelebA layout: ``img_align_celeba/`` and the two list files, as published.

    Args:
        root: Folder to write into (created).
        n_train, n_val, n_test: Images of partitions 0, 1 and 2, in this order.
        size: Image ``(height, width)``.
        seed: Seeds pictures and attributes.
        variants: Distinct JPEGs; image ``i`` is a copy of variant ``i % variants``.

    Returns:
        ``file`` (names), ``attributes`` (N, 40) int8 of -1/1, ``partition`` (N,) int8.
    """
    root = Path(root)
    folder = root / celeba.IMAGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    blobs = _jpegs(rng, size, max(1, min(variants, n)))
    for i, name in enumerate(files):
        (folder / name).write_bytes(blobs[i % len(blobs)])
    values = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, len(celeba.ATTRIBUTES)))
    partition = np.repeat(np.array([0, 1, 2], dtype=np.int8), [n_train, n_val, n_test])
    # The published spacing: each value right-aligned in two characters.
    cells = np.where(values > 0, " 1", "-1")
    lines = [f"{name} {' '.join(row)}" for name, row in zip(files, cells.tolist(), strict=True)]
    header = f"{n}\n{' '.join(celeba.ATTRIBUTES)} \n"
    (root / celeba.ATTR_FILE).write_text(header + "\n".join(lines) + "\n")
    parts = "".join(f"{name} {p}\n" for name, p in zip(files, partition.tolist(), strict=True))
    (root / celeba.PARTITION_FILE).write_text(parts)
    return {"file": np.array(files), "attributes": values, "partition": partition}


def _write_labelled(
    root: Path, domain: str, names: list[str], per_class: int, rng, size, blobs
) -> list[tuple[str, int]]:
    """``per_class`` images in each of ``names``' first folders; (relative path, label)."""
    written = []
    for label, name in enumerate(names):
        (root / domain / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            relative = f"{domain}/{name}/{domain}_{label:03d}_{k:06d}.jpg"
            (root / relative).write_bytes(blobs[int(rng.integers(len(blobs)))])
            written.append((relative, label))
    return written


def _write_list(path: Path, items: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{relative} {label}\n" for relative, label in items))


def write_office_home(
    root: str | Path,
    per_class: int = 2,
    used_classes: int = 3,
    size: tuple[int, int] = (12, 16),
    *,
    lists: bool = False,
    seed: int = 0,
) -> dict[str, list[tuple[str, int]]]:
    """The Office-Home layout: 4 domains x 65 class folders, images in the first few.

    Args:
        root: Folder to write into.
        per_class: Images per used class and domain.
        used_classes: Classes (of the 65, in sorted order) that get images; the rest are
            empty folders.
        size: Image ``(height, width)``.
        lists: Also write ``<Domain>_train.txt`` / ``<Domain>_test.txt`` (the last image of
            each class is test).

    Returns:
        Domain -> the (relative path, label) pairs written.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    blobs = _jpegs(rng, size, 4)
    names = [f"class_{i:02d}" for i in range(domains.OFFICE_HOME_CLASSES)]
    written = {}
    for domain in domains.OFFICE_HOME_DOMAINS:
        for name in names:
            (root / domain / name).mkdir(parents=True, exist_ok=True)
        items = _write_labelled(root, domain, names[:used_classes], per_class, rng, size, blobs)
        if lists:
            test = [it for i, it in enumerate(items) if i % per_class == per_class - 1]
            _write_list(root / f"{domain}_train.txt", [it for it in items if it not in test])
            _write_list(root / f"{domain}_test.txt", test)
        written[domain] = items
    return written


def write_domainnet(
    root: str | Path,
    per_class: int = 2,
    used_classes: int = 3,
    size: tuple[int, int] = (12, 16),
    *,
    seed: int = 0,
) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """The DomainNet layout: 6 domain folders and their ``_train.txt`` / ``_test.txt``.

    Images go to the first ``used_classes`` class folders of each domain; the last image of
    each class is listed as test, the others as train.

    Returns:
        Domain -> ``{"train": [(relative path, label)], "test": [...]}``.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    blobs = _jpegs(rng, size, 4)
    names = [f"class_{i:03d}" for i in range(used_classes)]
    written = {}
    for domain in domains.DOMAINNET_DOMAINS:
        items = _write_labelled(root, domain, names, per_class, rng, size, blobs)
        test = [it for i, it in enumerate(items) if i % per_class == per_class - 1]
        train = [it for it in items if it not in test]
        _write_list(root / f"{domain}_train.txt", train)
        _write_list(root / f"{domain}_test.txt", test)
        written[domain] = {"train": train, "test": test}
    return written


# Task name -> (kind, num_outputs) of the default generic-layout fixture: one task per kind.
FILES_TASKS = {
    "label": (CLASSIFICATION, 3),
    "attr": (BINARY, 1),
    "seg": (DENSE_CLASSIFICATION, 4),
    "depth": (DEPTH, 1),
    "normals": (NORMALS, 3),
    "sal": (SALIENCY, 1),
    "recon": (DENSE_REGRESSION, 1),
}


def _dense_png(path: Path, kind: str, outputs: int, rng, size: tuple[int, int]) -> None:
    height, width = size
    if kind == DEPTH:  # 16-bit, millimetres; 0 = no measurement
        depth = rng.integers(500, 10000, size, dtype=np.uint16)
        depth[0, 0] = 0
        Image.fromarray(depth).save(path)
        return
    if kind == DENSE_CLASSIFICATION:
        data = rng.integers(0, outputs, (1, height, width), dtype=np.uint8)
        data[0, 0, 0] = 255  # unlabelled
    elif kind == SALIENCY:
        data = rng.choice(np.array([0, 255], dtype=np.uint8), (1, height, width))
    elif kind == NORMALS:
        data = rng.integers(1, 256, (3, height, width), dtype=np.uint8)
        data[:, 0, 0] = 0  # unlabelled
    else:
        data = rng.integers(0, 256, (outputs, height, width), dtype=np.uint8)
    path.write_bytes(encode_png(torch.from_numpy(data)).numpy().tobytes())


def _dense_npy(path: Path, kind: str, outputs: int, rng, size: tuple[int, int]) -> None:
    channels = {DEPTH: 1, NORMALS: 3, SALIENCY: 1}.get(kind, outputs)
    if kind == DENSE_CLASSIFICATION:
        data = rng.integers(-1, outputs, size).astype(np.float32)  # -1 = unlabelled (LibMTL)
    elif kind == NORMALS:
        data = rng.normal(size=(*size, 3)).astype(np.float32)
        data /= np.linalg.norm(data, axis=-1, keepdims=True)
    else:
        data = rng.uniform(0, 1, (*size, channels)).astype(np.float32)
    np.save(path, data)  # (H, W) or (H, W, C), as LibMTL's NYUv2


def write_files(
    root: str | Path,
    n_train: int = 4,
    n_val: int = 2,
    size: tuple[int, int] = (12, 16),
    *,
    tasks: dict[str, tuple[str, int]] | None = None,
    domains: tuple[str, ...] = (),
    npy: tuple[str, ...] = (),
    table: str = "samples.csv",
    seed: int = 0,
) -> dict[str, dict]:
    """The generic ``files`` layout: ``images/``, ``targets/<task>/`` and a CSV table.

    Args:
        root: Folder to write into.
        n_train, n_val: Rows of each split (per domain, when ``domains`` are given).
        size: Image and dense target ``(height, width)``.
        tasks: Task -> (kind, num_outputs); default ``FILES_TASKS`` (one of each kind).
        domains: Domain names for a multi-domain table (then give exactly one task).
        npy: Dense tasks whose targets are written as ``.npy`` (H, W[, C]) instead of PNG.
        table: The CSV's name under ``root``.

    Returns:
        The ``data.files.tasks`` mapping for these tasks (``{task: {kind, num_outputs}}``).
    """
    root, rng = Path(root), np.random.default_rng(seed)
    tasks = FILES_TASKS if tasks is None else tasks
    blobs = _jpegs(rng, size, 4)
    (root / "images").mkdir(parents=True, exist_ok=True)
    header = ["image", "split", *(["domain"] if domains else []), *tasks]
    rows = []
    for i, (split, domain) in enumerate(
        (s, d) for d in (domains or ("",)) for s in ["train"] * n_train + ["val"] * n_val
    ):
        image = f"images/{i:05d}.jpg"
        (root / image).write_bytes(blobs[i % len(blobs)])
        row = [image, split, *([domain] if domains else [])]
        for name, (kind, outputs) in tasks.items():
            if kind == CLASSIFICATION:
                row.append(str(int(rng.integers(outputs))))
            elif kind == BINARY:
                row.append(str(int(rng.integers(2))))
            else:
                (root / "targets" / name).mkdir(parents=True, exist_ok=True)
                suffix = ".npy" if name in npy else ".png"
                target = f"targets/{name}/{i:05d}{suffix}"
                write = _dense_npy if name in npy else _dense_png
                write(root / target, kind, outputs, rng, size)
                row.append(target)
        rows.append(row)
    with open(root / table, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return {name: {"kind": kind, "num_outputs": outputs} for name, (kind, outputs) in tasks.items()}
