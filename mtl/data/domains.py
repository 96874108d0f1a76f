"""Office-Home and DomainNet (multi-domain, one shared label space), in their published layouts.

Both serve one ``classification`` head, ``label``, shared by every domain; a batch mixes
domains (``tasks.weighting``), and losses and accuracy are split by domain. ``tasks.names``
trains on a subset of the domains, but every domain's files must be present: the index is
built for the whole benchmark. Images are decoded as RGB and resized to ``data.image_size``,
usually 224x224.

**Office-Home** (Venkateswara et al. 2017), under ``data.root``::

    Art/Alarm_Clock/00001.jpg ...      # <Domain>/<Class>/<image>; the 4 domains Art,
    Clipart/... Product/... Real_World/...   # Clipart, Product, Real_World; 65 classes
    Art_train.txt, Art_test.txt ...    # optional split lists: "<relative path> <label>"

Class ids are the positions of the class folders in sorted order, which must be the same
65 names in every domain. Where both ``<Domain>_train.txt`` and ``<Domain>_test.txt`` exist
they are that domain's train and val splits (the list's labels are used as given, and its
paths are relative to ``data.root``); otherwise a seeded ``data.val_fraction`` of the
domain's images (drawn with ``data.seed``, at least one) is the val split **(ours)**.

**DomainNet** (Peng et al. 2019), under ``data.root``::

    clipart/aircraft_carrier/clipart_001_000001.jpg ...   # the 6 domains clipart,
    infograph/... painting/... quickdraw/... real/... sketch/...   # 345 classes
    clipart_train.txt, clipart_test.txt ...   # "<domain>/<class>/<file>.jpg <label>"

Train is each domain's ``_train.txt``, val its ``_test.txt`` (DomainNet publishes no
separate validation split).

Both: train rows are in list (or folder) order, domain after domain; val rows are served in
an order seeded by ``data.seed``, so a capped validation (``train.val_batches``) samples
every domain and class.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mtl.config import DataConfig
from mtl.config_checks import image_hw
from mtl.data.cache import data_root
from mtl.data.errors import DatasetCorruptError
from mtl.data.layout_io import (
    IMAGE_SUFFIXES,
    read_image,
    read_label_list,
    require,
    require_listed,
    shuffled,
)
from mtl.data.streaming import Reader, Rows
from mtl.tasks import CLASSIFICATION, TaskSet, TaskSpec

HEAD = "label"
OFFICE_HOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")
OFFICE_HOME_CLASSES = 65
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = 345


def _taskset(name: str, classes: int, domains: tuple[str, ...], cfg: DataConfig) -> TaskSet:
    head = TaskSpec(HEAD, CLASSIFICATION, classes, "accuracy", True)
    return TaskSet(
        name, (head,), in_channels=3, image_size=image_hw(cfg.image_size), domains=domains
    )


def office_home_taskset(cfg: DataConfig) -> TaskSet:
    """One 65-class ``label`` head over Art, Clipart, Product, Real_World; reads no data."""
    return _taskset("office_home", OFFICE_HOME_CLASSES, OFFICE_HOME_DOMAINS, cfg)


def domainnet_taskset(cfg: DataConfig) -> TaskSet:
    """One 345-class ``label`` head over the six DomainNet domains; reads no data."""
    return _taskset("domainnet", DOMAINNET_CLASSES, DOMAINNET_DOMAINS, cfg)


def reader(cfg: DataConfig) -> Reader:
    """Decodes ``<data.root>/<image>`` as RGB and serves its ``label``."""
    return partial(_read, data_root(cfg))


def _read(root: Path, row: dict[str, Any]) -> dict[str, Any]:
    return {"image": read_image(root / str(row["image"])), HEAD: int(row[HEAD])}


def office_home_index(cfg: DataConfig) -> dict[str, Rows]:
    """``image`` (path under data.root), ``label`` and ``domain`` (int64) per split.

    Raises:
        DatasetMissingError: A domain folder, one list of a ``_train``/``_test`` pair, or
            an image a list names.
        DatasetCorruptError: Class folders that differ between domains or are not 65, or a
            list line with a label out of range (names the file and line).
    """
    root = data_root(cfg)
    fix = (
        "set data.root to the folder that holds the Office-Home domain folders "
        f"{', '.join(d + '/' for d in OFFICE_HOME_DOMAINS)}"
    )
    classes: list[str] | None = None
    parts: dict[str, list[Rows]] = {"train": [], "val": []}
    for code, domain in enumerate(OFFICE_HOME_DOMAINS):
        folder = require(root / domain, fix)
        found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        if classes is None:
            classes = _check_class_count(found, folder)
        elif found != classes:
            _raise_class_mismatch(folder, found, root / OFFICE_HOME_DOMAINS[0], classes)
        lists = [root / f"{domain}_{s}.txt" for s in ("train", "test")]
        if any(p.exists() for p in lists):
            list_fix = f"give both {lists[0].name} and {lists[1].name}, or neither"
            splits = [
                read_label_list(require(p, list_fix), len(classes), f"{domain}/") for p in lists
            ]
            for listed, (paths, _) in zip(lists, splits, strict=True):
                require_listed(root, paths, listed)
        else:
            splits = _seeded_split(folder, classes, domain, cfg, code)
        for split, (paths, labels) in zip(("train", "val"), splits, strict=True):
            parts[split].append(_rows(paths, labels, code))
    return _splits(parts, cfg.seed)


def domainnet_index(cfg: DataConfig) -> dict[str, Rows]:
    """``image`` (path under data.root), ``label`` and ``domain`` (int64) per split.

    Raises:
        DatasetMissingError: A domain folder, split list, or listed image.
        DatasetCorruptError: A list line with a label out of range or a path outside its
            domain's folder (names the file and line).
    """
    root = data_root(cfg)
    fix = (
        "set data.root to the folder that holds the DomainNet domain folders "
        f"({', '.join(DOMAINNET_DOMAINS)}) and their <domain>_train.txt / <domain>_test.txt"
    )
    parts: dict[str, list[Rows]] = {"train": [], "val": []}
    for code, domain in enumerate(DOMAINNET_DOMAINS):
        require(root / domain, fix)
        for split, suffix in (("train", "train"), ("val", "test")):
            listed = require(root / f"{domain}_{suffix}.txt", fix)
            paths, labels = read_label_list(listed, DOMAINNET_CLASSES, f"{domain}/")
            require_listed(root, paths, listed)
            parts[split].append(_rows(paths, labels, code))
    return _splits(parts, cfg.seed)


def _check_class_count(found: list[str], folder: Path) -> list[str]:
    if len(found) != OFFICE_HOME_CLASSES:
        raise DatasetCorruptError(
            f"{folder} has {len(found)} class folders, Office-Home has {OFFICE_HOME_CLASSES}: "
            "unpack the full dataset there (<Domain>/<Class>/*.jpg)"
        )
    return found


def _raise_class_mismatch(folder: Path, found: list[str], first: Path, classes: list[str]):
    extra, absent = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
    raise DatasetCorruptError(
        f"{folder} has other class folders than {first}: extra {extra[:5]}, absent "
        f"{absent[:5]}; every domain needs the same {len(classes)} class folders (class ids "
        "are their sorted positions)"
    )


def _seeded_split(
    folder: Path, classes: list[str], domain: str, cfg: DataConfig, code: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every image of the domain, split train/val by a draw seeded by (seed, domain)."""
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        images = sorted(
            e.name
            for e in os.scandir(folder / name)
            if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
        )
        paths += [f"{domain}/{name}/{image}" for image in images]
        labels += [label] * len(images)
    n = len(paths)
    n_val = max(1, round(cfg.val_fraction * n)) if n > 1 else 0
    val = np.zeros(n, dtype=bool)
    val[np.random.default_rng((cfg.seed, code)).permutation(n)[:n_val]] = True
    all_paths, all_labels = np.array(paths, dtype=np.str_), np.array(labels, dtype=np.int64)
    return [(all_paths[~val], all_labels[~val]), (all_paths[val], all_labels[val])]


def _rows(paths: np.ndarray, labels: np.ndarray, code: int) -> Rows:
    return {"image": paths, HEAD: labels, "domain": np.full(len(paths), code, dtype=np.int64)}


def _splits(parts: dict[str, list[Rows]], seed: int) -> dict[str, Rows]:
    """Each split's domains concatenated; val in a seeded order (``shuffled``)."""
    out = {}
    for split, tables in parts.items():
        rows = {name: np.concatenate([t[name] for t in tables]) for name in tables[0]}
        out[split] = shuffled(rows, seed) if split == "val" else rows
    return out
