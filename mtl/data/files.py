"""Your own data: images and per-task targets listed in one CSV table (``data.benchmark=files``).

Layout under ``data.root`` (paths in the table are relative to it)::

    samples.csv                 # data.files.table
    images/0001.jpg ...         # any folders: the table names every file
    targets/seg/0001.png ...    # dense targets, one file per sample and task

The table has a header row. Columns:

- ``image``: the image (JPEG, PNG or WebP), decoded as RGB, or as grey with
  ``data.files.in_channels: 1``.
- ``split``: ``train`` or ``val``.
- ``domain`` (multi-domain only): one of the names in ``data.files.domains``.
- one column per task of ``data.files.tasks``, named as the task or by its ``column``:

  ========================  ======================================================
  kind                      cell
  ========================  ======================================================
  ``classification``        an integer class in ``[0, num_outputs)``
  ``binary``                ``0`` or ``1``; ``-1`` marks a sample without the label
  dense kinds               the path of the sample's target file, ``.png`` or ``.npy``
  ========================  ======================================================

Dense target files have the image's height and width and hold, per kind:

========================  ==========================================  ===================
kind                      ``.png``                                    ``.npy`` (served)
========================  ==========================================  ===================
``dense_classification``  grey (8 or 16 bit) or palette (the index    class ids (float
                          is the class, as PASCAL VOC): class ids in  or int); 255 or
                          ``[0, num_outputs)``, 255 = unlabelled      negative =
                                                                      unlabelled
``depth``                 grey 16 bit, millimetres; 0 = no            metres; 0 = no
                          measurement (served in metres)              measurement
``normals``               RGB, ``n = 2 v / 255 - 1``, renormalised;   unit vectors
                          black (0, 0, 0) = unlabelled                (x right, y, z);
                                                                      0 = unlabelled
``saliency``              grey, 0/255 (served as v / 255), or 0/1     in [0, 1]
``dense_regression``      ``num_outputs`` channels (grey, RGB),       any float
                          served as v / 255 (8 bit) or v / 65535
========================  ==========================================  ===================

A ``.npy`` (read without unpickling) is ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)``, with C
the kind's channels (1 for depth, saliency and label maps; 3 for normals; ``num_outputs``
for dense regression); which of the two 3-D layouts is told apart by where the image's
``(H, W)`` lies.

Multi-task (``data.files.domains`` empty): every row carries every task, and
``tasks.names`` trains a subset of the tasks. Multi-domain (``data.files.domains`` names the
domains): exactly one task, the head shared by all domains, and ``tasks.names`` picks
domains. Example::

    data:
      benchmark: files
      root: /data/my_set
      image_size: [240, 320]
      files:
        table: samples.csv
        tasks:
          scene: {kind: classification, num_outputs: 10}
          seg: {kind: dense_classification, num_outputs: 21}
          depth: {kind: depth}

Train rows keep the table's order; val rows are served in an order seeded by ``data.seed``,
so a capped validation (``train.val_batches``) is a random sample of the table.

The table is checked when it is read (before training: ``mtl.data.prepare``): a missing
column, a split or domain not in the list, a class out of range, an attribute other than
0/1/-1, or a dense cell that is not a .png/.npy path fails naming the table, the line and
the fix. Every listed file must exist (one folder listing per folder, not a stat per file); target
files are checked as they are read (sample 0 of each split by ``prepare``), and only the
trained tasks' files are opened.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.io import ImageReadMode

from mtl.config import DataConfig, FileTaskConfig
from mtl.config_checks import image_hw
from mtl.data.cache import data_root
from mtl.data.errors import DatasetCorruptError
from mtl.data.file_targets import SUFFIXES, read_target
from mtl.data.layout_io import LazySample, read_image, require, require_listed, shuffled
from mtl.data.streaming import Reader, Rows, take_rows
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_KINDS,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
    TASK_KINDS,
    TaskSet,
    TaskSpec,
)

RESERVED = ("image", "split", "domain")  # table columns and row keys no task may be named
KIND_METRICS = {  # primary metric and whether higher is better (mtl.metrics)
    CLASSIFICATION: ("accuracy", True),
    BINARY: ("accuracy", True),
    DENSE_CLASSIFICATION: ("miou", True),
    DENSE_REGRESSION: ("rmse", False),
    DEPTH: ("abs_err", False),
    NORMALS: ("mean_angle", False),
    SALIENCY: ("max_f", True),
}
FIXED_OUTPUTS = {BINARY: 1, DEPTH: 1, NORMALS: 3, SALIENCY: 1}
SPLITS = ("train", "val")


def taskset(cfg: DataConfig) -> TaskSet:
    """One head per ``data.files.tasks`` entry; reads no data.

    Raises:
        ValueError: No tasks, an unknown kind, a missing or wrong ``num_outputs``, a
            reserved task name, or several tasks with ``data.files.domains``.
    """
    files = cfg.files
    if not files.tasks:
        raise ValueError(
            "data.files.tasks is empty: describe each task's column, e.g. "
            "data.files.tasks.label={kind: classification, num_outputs: 10}"
        )
    heads = tuple(_spec(name, task) for name, task in files.tasks.items())
    if files.domains and len(heads) != 1:
        raise ValueError(
            f"data.files.domains={files.domains} with tasks {[h.name for h in heads]}: a "
            "multi-domain table has exactly one task (the head every domain shares)"
        )
    if len(set(files.domains)) != len(files.domains):
        raise ValueError(f"data.files.domains={files.domains} names a domain twice")
    if files.in_channels not in (1, 3):
        raise ValueError(
            f"data.files.in_channels={files.in_channels}: images are read as grey (1) or RGB (3)"
        )
    return TaskSet(
        "files", heads, files.in_channels, image_hw(cfg.image_size), tuple(files.domains)
    )


def _spec(name: str, task: FileTaskConfig) -> TaskSpec:
    where = f"data.files.tasks.{name}"
    if name in RESERVED:
        raise ValueError(f"{where}: {RESERVED} are table columns; give the task another name")
    if task.kind not in TASK_KINDS:
        raise ValueError(f"{where}.kind={task.kind!r}: use one of {', '.join(TASK_KINDS)}")
    outputs = task.num_outputs
    if task.kind in FIXED_OUTPUTS:
        fixed = FIXED_OUTPUTS[task.kind]
        if outputs not in (0, fixed):
            raise ValueError(f"{where}.num_outputs={outputs}: a {task.kind} task has {fixed}")
        outputs = fixed
    elif task.kind == DENSE_REGRESSION:
        if outputs < 0:
            raise ValueError(f"{where}.num_outputs={outputs}: give the channels (0 means 1)")
        outputs = outputs or 1
    elif outputs < 2:
        raise ValueError(f"{where}.num_outputs={outputs}: give the number of classes (>= 2)")
    metric, higher = KIND_METRICS[task.kind]
    return TaskSpec(name, task.kind, outputs, metric, higher)


def index(cfg: DataConfig) -> dict[str, Rows]:
    """``image``, one column per task (class, 0/1, or target path), ``domain`` codes.

    Raises:
        DatasetMissingError: The table does not exist.
        DatasetCorruptError: A missing column or a bad cell (names the table and line).
    """
    full = taskset(cfg)
    root = data_root(cfg)
    path = require(
        root / cfg.files.table,
        f"set data.root to the folder that holds {cfg.files.table}, or data.files.table to "
        "the table's path relative to data.root",
    )
    columns = {"image": "image", "split": "split"}
    if full.multi_domain:
        columns["domain"] = "domain"
    columns.update({name: task.column or name for name, task in cfg.files.tasks.items()})
    cells, lines = _read_table(path, columns)
    table = _Table(path, columns, lines)
    rows: Rows = {"image": table.paths("image", cells["image"], ())}
    split = table.choices("split", cells["split"], SPLITS, "use train or val")
    if full.multi_domain:
        rows["domain"] = table.choices(
            "domain", cells["domain"], full.domains, "add it to data.files.domains"
        )
    for head in full.heads:
        rows[head.name] = table.target(head, cells[head.name])
    for values in rows.values():
        if values.dtype.kind == "U":  # the image and every dense target file
            require_listed(root, values, path)
    train, val = (take_rows(rows, split == code) for code in range(len(SPLITS)))
    return {"train": train, "val": shuffled(val, cfg.seed)}


def reader(cfg: DataConfig) -> Reader:
    """Decodes a row's image; each target only when the dataset asks for it (``LazySample``),
    so training a subset of the tasks opens only their files."""
    full = taskset(cfg)
    mode = ImageReadMode.GRAY if full.in_channels == 1 else ImageReadMode.RGB
    tasks = tuple((h.name, h.kind, h.num_outputs) for h in full.heads)
    return partial(_read, data_root(cfg), tasks, mode)


def _read(
    root: Path, tasks: tuple[tuple[str, str, int], ...], mode: ImageReadMode, row: dict
) -> LazySample:
    image = read_image(root / str(row["image"]), mode)
    size = tuple(image.shape[-2:])
    loaders: dict[str, Any] = {}
    for name, kind, outputs in tasks:
        value = row[name]
        if kind in DENSE_KINDS:
            loaders[name] = partial(read_target, root / str(value), kind, outputs, size)
        else:
            loaders[name] = value.item
    return LazySample(image, loaders)


def _read_table(path: Path, columns: dict[str, str]) -> tuple[dict[str, list[str]], list[int]]:
    """The cells of ``columns`` (key -> header name) and each row's line number."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        records = csv.reader(f)
        header = [h.strip() for h in next(records, [])]
        for key, column in columns.items():
            if column not in header:
                fix = (
                    f"add it, or set data.files.tasks.{key}.column to the column that holds "
                    f"task {key!r}"
                    if key not in RESERVED
                    else "add it (see mtl/data/files.py for the layout)"
                )
                raise DatasetCorruptError(
                    f"{path}, line 1: no column {column!r} in the header {header}; {fix}"
                )
        at = {key: header.index(column) for key, column in columns.items()}
        cells: dict[str, list[str]] = {key: [] for key in columns}
        lines: list[int] = []
        for record in records:
            if not any(cell.strip() for cell in record):
                continue  # a blank line
            if len(record) != len(header):
                raise DatasetCorruptError(
                    f"{path}, line {records.line_num}: {len(record)} fields but the header "
                    f"has {len(header)}; give every row one cell per column"
                )
            for key, i in at.items():
                cells[key].append(record[i].strip())
            lines.append(records.line_num)
    return cells, lines


class _Table:
    """Converts one column's cells, failing on the first bad one with its line."""

    def __init__(self, path: Path, columns: dict[str, str], lines: list[int]) -> None:
        self.path, self.columns, self.lines = path, columns, lines

    def fail(self, key: str, row: int, problem: str, fix: str) -> None:
        raise DatasetCorruptError(
            f"{self.path}, line {self.lines[row]}, column {self.columns[key]!r}: {problem}; {fix}"
        )

    def first_bad(self, key: str, bad: np.ndarray, cells: list[str], problem: str, fix: str):
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            self.fail(key, row, f"{cells[row]!r} {problem}", fix)

    def choices(self, key: str, cells: list[str], allowed: tuple[str, ...], fix: str):
        """Codes (int64 positions in ``allowed``) of cells that must be one of ``allowed``."""
        lookup = {name: code for code, name in enumerate(allowed)}
        codes = np.array([lookup.get(cell, -1) for cell in cells], dtype=np.int64)
        self.first_bad(key, codes < 0, cells, f"is not one of {list(allowed)}", fix)
        return codes

    def paths(self, key: str, cells: list[str], suffixes: tuple[str, ...]) -> np.ndarray:
        values = np.array(cells, dtype=np.str_)
        lower = np.char.lower(values)
        ok = np.char.str_len(values) > 0
        if suffixes:
            ok &= np.logical_or.reduce([np.char.endswith(lower, s) for s in suffixes])
        want = f"a path ending in {' or '.join(suffixes)}" if suffixes else "a path"
        self.first_bad(key, ~ok, cells, f"is not {want}", "give the file's path under data.root")
        return values

    def integers(self, key: str, cells: list[str]) -> np.ndarray:
        try:
            return np.array(cells, dtype=np.str_).astype(np.int64)
        except ValueError:
            bad = np.array([not _is_int(cell) for cell in cells])
            self.first_bad(key, bad, cells, "is not an integer", "write the class as a number")
            raise

    def target(self, head: TaskSpec, cells: list[str]) -> np.ndarray:
        """A task's column: int64 classes, float32 attributes, or target file paths."""
        if head.kind in DENSE_KINDS:
            return self.paths(head.name, cells, SUFFIXES)
        values = self.integers(head.name, cells)
        if head.kind == BINARY:
            bad = values > 1
            self.first_bad(head.name, bad, cells, "is not 0 or 1", "use -1 for no label")
            return np.where(values < 0, -1, values).astype(np.float32)
        bad = (values < 0) | (values >= head.num_outputs)
        fix = f"fix the class, or data.files.tasks.{head.name}.num_outputs"
        self.first_bad(head.name, bad, cells, f"is outside [0, {head.num_outputs})", fix)
        return values


def _is_int(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return True
