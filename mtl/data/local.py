"""A user's own classification data, loadable by Hugging Face ``datasets`` from local files.

``data.local`` names a folder or file (``path``), its ``format`` ("imagefolder": one
sub-folder per class, optionally with a metadata.csv of more label columns; "parquet": one
file or a folder of ``*.parquet``), the ``image_column`` and, per task, a label column and
its number of classes. Every task is a classification head.

Images are decoded once while building the cache, converted to ``in_channels`` (1 = grey,
3 = RGB) and resized to ``local.image_size`` (bilinear); ``data.image_size`` is not used.
Splits: a "validation" (else "test") split found by ``datasets`` is the val split; otherwise
a seeded ``val_fraction`` of the rows is held out. ``data.train_size`` / ``val_size`` do not
cap local data: all of it is used.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from mtl.config import DataConfig, LocalSourceConfig
from mtl.data.errors import DatasetMissingError
from mtl.tasks import CLASSIFICATION, TaskSet, TaskSpec

FORMATS = ("imagefolder", "parquet")
_MODES = {1: "L", 3: "RGB"}
_VAL_SPLITS = ("validation", "test")
_BATCH = 256


def _check(local: LocalSourceConfig) -> None:
    if local.format not in FORMATS:
        raise ValueError(f"data.local.format={local.format!r}: use one of {FORMATS}")
    if local.in_channels not in _MODES:
        raise ValueError(f"data.local.in_channels={local.in_channels}: use 1 (grey) or 3 (RGB)")
    if not 0.0 < local.val_fraction < 1.0:
        raise ValueError(f"data.local.val_fraction={local.val_fraction}: must lie in (0, 1)")
    if not local.label_columns:
        raise ValueError(
            "data.local.label_columns is empty: map each task name to its label column"
        )


def taskset(cfg: DataConfig) -> TaskSet:
    """One classification head per ``label_columns`` key. Reads no data.

    Raises:
        ValueError: A task without ``data.local.num_classes.<task>``, or a bad setting.
    """
    local = cfg.local
    _check(local)
    heads = []
    for task in local.label_columns:
        if task not in local.num_classes:
            raise ValueError(
                f"data.local.num_classes.{task} is missing: give the number of classes of task "
                f"{task!r} (labels must be integers in [0, num_classes))"
            )
        heads.append(TaskSpec(task, CLASSIFICATION, int(local.num_classes[task]), "accuracy", True))
    return TaskSet(
        "local", tuple(heads), in_channels=local.in_channels, image_size=local.image_size
    )


def _source_files(local: LocalSourceConfig) -> list[str]:
    path = Path(local.path).expanduser()
    if not local.path or not path.exists():
        raise DatasetMissingError(
            f"data.local.path={local.path!r} does not exist: point it at your "
            f"{local.format} data (a folder, or a .parquet file)"
        )
    if path.is_file():
        return [str(path)]
    suffix = ".parquet" if local.format == "parquet" else ""
    files = _walk(str(path), suffix)
    if not files:
        raise DatasetMissingError(f"data.local.path={local.path!r} holds no *{suffix} files")
    return files


def _walk(folder: str, suffix: str) -> list[str]:
    """Files under ``folder`` named ``*suffix``, sorted; symlinked folders are not entered.

    ``os.scandir`` tells files from folders by the directory entry's type, so listing costs
    no ``stat`` per file, and paths stay strings: for 100,000 files ``Path.rglob`` with
    ``is_file``, ``resolve`` and ``relative_to`` took seconds, this takes a fraction of one.
    """
    found, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file() and entry.name.endswith(suffix):
                    found.append(entry.path)
    return sorted(found)


def content_key(cfg: DataConfig) -> dict[str, Any]:
    """The local config, the folder and the seed (the files are in ``sources``)."""
    taskset(cfg)  # validate before touching files
    return {
        "benchmark": "local",
        "local": dataclasses.asdict(cfg.local),
        "root": str(Path(cfg.local.path).expanduser().resolve()),
        "seed": cfg.seed,
    }


def sources(cfg: DataConfig) -> dict[str, str]:
    """Every data file, by its path relative to ``data.local.path`` (or its folder)."""
    files = _source_files(cfg.local)  # raises first when the path is missing
    path = Path(cfg.local.path).expanduser()
    base = str(path if path.is_dir() else path.parent)
    # _walk's paths are os.path.join(base, ...): the name is what follows "base/"
    return {f[len(base) + 1 :].replace(os.sep, "/"): f for f in files}


def _load(local: LocalSourceConfig, cache_dir: str) -> datasets.DatasetDict:
    files = _source_files(local)
    if local.format == "imagefolder":
        path = Path(local.path).expanduser()
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        return datasets.load_dataset("imagefolder", data_files=files, cache_dir=cache_dir)
    return datasets.load_dataset("parquet", data_files=files, cache_dir=cache_dir)


def _train_val(
    dsd: datasets.DatasetDict, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    val_name = next((s for s in _VAL_SPLITS if s in dsd), None)
    train_names = [s for s in dsd if s != val_name]
    if not train_names:
        raise ValueError(f"data.local.path holds only a {val_name!r} split; add training data")
    train = datasets.concatenate_datasets([dsd[s] for s in train_names])
    if val_name is not None:
        return train, dsd[val_name]
    perm = np.random.default_rng([seed, 3]).permutation(len(train))
    n_val = max(1, round(fraction * len(train)))
    # flatten_indices: later code reads the Arrow table directly, which ignores a selection
    pick = [
        train.select(np.sort(idx)).flatten_indices(keep_in_memory=True)
        for idx in (perm[n_val:], perm[:n_val])
    ]
    return pick[0], pick[1]


def _images(ds: datasets.Dataset, local: LocalSourceConfig) -> np.ndarray:
    column = local.image_column
    if column not in ds.features:
        raise ValueError(
            f"data.local.image_column={column!r} is not a column; columns: {list(ds.features)}"
        )
    if not isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image())  # encoded bytes or file paths
    mode, size = _MODES[local.in_channels], (local.image_size, local.image_size)
    out = np.empty((len(ds), local.in_channels, *size), dtype=np.uint8)
    start = 0
    for batch in ds.select_columns([column]).iter(batch_size=_BATCH):
        for image in batch[column]:
            pixels = np.asarray(image.convert(mode).resize(size, Image.Resampling.BILINEAR))
            out[start] = pixels.reshape(size + (-1,)).transpose(2, 0, 1)
            start += 1
    return out


def _labels(ds: datasets.Dataset, local: LocalSourceConfig) -> dict[str, np.ndarray]:
    out = {}
    for task, column in local.label_columns.items():
        if column not in ds.features:
            raise ValueError(
                f"data.local.label_columns.{task}={column!r} is not a column; "
                f"columns: {list(ds.features)}"
            )
        values = np.asarray(ds.data.column(column).to_numpy(zero_copy_only=False))
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(
                f"label column {column!r} (task {task}) holds {values.dtype}, not integer class ids"
            )
        classes = local.num_classes[task]
        if len(values) and (values.min() < 0 or values.max() >= classes):
            raise ValueError(
                f"label column {column!r} has values in [{values.min()}, {values.max()}] but "
                f"data.local.num_classes.{task}={classes}"
            )
        out[task] = values.astype(np.int64)
    return out


def build(cfg: DataConfig) -> dict[str, dict[str, np.ndarray]]:
    """Decode, convert and resize every image once; split into train and val."""
    local = cfg.local
    taskset(cfg)
    with tempfile.TemporaryDirectory(prefix="mtl-local-") as scratch:  # datasets' own cache
        train, val = _train_val(_load(local, scratch), local.val_fraction, cfg.seed)
        return {
            name: {"image": _images(ds, local), **_labels(ds, local)}
            for name, ds in (("train", train), ("val", val))
        }
