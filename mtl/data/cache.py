"""Where data lives, and how a built benchmark is cached atomically and checked on use.

A cache entry is a folder ``<cache root>/<benchmark>-<config key>-<source key>/`` with one
``datasets`` folder per split and a ``meta.json``. The config key hashes everything in the
config that changes the content (the benchmark's content fields plus ``FORMAT_VERSION``);
the source key hashes a fingerprint of every source file the build reads (its path
relative to the data root, size and ``mtime_ns``; ``stat`` only, nothing is read). So a
changed size or seed, or a changed, replaced or re-downloaded source file, builds a new
entry and never reads a stale one, and an entry is only used once its source files were
found: a run never logs a ``data.root`` it did not read.

An entry is built in a hidden temporary sibling folder and renamed into place: rename is
atomic on one filesystem, so the entry either exists complete or not at all. A crash leaves
only a ``.tmp-*`` folder, which later builds sweep; of two concurrent builders, the second
rename fails and that builder keeps the first's. ``meta.json`` records the size of every
file of the entry and each split's row count; ``check_entry`` compares them with the disk
(sizes by ``stat``, rows from the Arrow record-batch headers, no data read), so an entry
truncated or damaged later is found on the driver before any worker starts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mtl.config import DataConfig
from mtl.config_checks import image_hw
from mtl.data.arrow import count_rows
from mtl.data.errors import DatasetCorruptError

log = logging.getLogger(__name__)

# Bump when the stored layout or any builder's output changes, so old entries are not reused.
# 2: the entry name holds a source-file fingerprint; meta.json lists sizes and row counts.
FORMAT_VERSION = 2
_STALE_TMP_SECONDS = 6 * 3600  # a build takes seconds; older temp folders are crash leftovers
META_FILE = "meta.json"
Stamp = list  # [path relative to its root, size in bytes, mtime_ns]


def data_root(cfg: DataConfig) -> Path:
    """MNIST-family root: ``data.root``, else ``$MTL_DATA_DIR``, else ``./data``."""
    return Path(cfg.root or os.environ.get("MTL_DATA_DIR") or "./data").expanduser()


def square_image_size(cfg: DataConfig) -> int:
    """``data.image_size`` of the MNIST-derived benchmarks, which are square by construction."""
    height, width = image_hw(cfg.image_size)
    if height != width:
        raise ValueError(
            f"data.image_size={cfg.image_size}: data.benchmark={cfg.benchmark} builds square "
            "images; give one number"
        )
    return height


def cache_root(cfg: DataConfig) -> Path:
    """Arrow cache root: ``data.cache_dir``, else ``$MTL_CACHE_DIR``, else ``~/.cache/mtl``."""
    return Path(cfg.cache_dir or os.environ.get("MTL_CACHE_DIR") or "~/.cache/mtl").expanduser()


def cache_key(fields: dict[str, Any]) -> str:
    """A short stable hash of the content-defining fields (JSON-able values)."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(files: Mapping[str, str | os.PathLike]) -> list[Stamp]:
    """``[name, size, mtime_ns]`` per source file, sorted by name; one ``stat`` each.

    Args:
        files: A stable name (the path relative to the data root) -> the file.
    """
    stamps = []
    for name in sorted(files):
        stat = os.stat(files[name])
        stamps.append([name, stat.st_size, stat.st_mtime_ns])
    return stamps


def entry_name(benchmark: str, content: dict[str, Any], stamps: list[Stamp]) -> str:
    """``<benchmark>-<config key>-<source key>``: the folder of one built entry."""
    return f"{benchmark}-{cache_key(content)}-{cache_key({'sources': stamps})[:12]}"


def entries_for(root: Path, benchmark: str, content: dict[str, Any]) -> list[Path]:
    """Entries built for this config from any version of its source files."""
    return sorted(root.glob(f"{benchmark}-{cache_key(content)}-*")) if root.is_dir() else []


def _sweep_stale(root: Path) -> None:
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:  # another process swept it first
            pass


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META_FILE
    }


def build_atomic(
    final: Path, write: Callable[[Path], dict[str, Any] | None], meta: dict[str, Any]
) -> Path:
    """Create ``final`` by ``write(tmp_dir)`` then an atomic rename; idempotent.

    Args:
        final: The entry folder; returned untouched when it already exists.
        write: Fills an empty folder with the entry's content; may return more meta (e.g.
            ``{"rows": {split: n}}``, which ``check_entry`` verifies).
        meta: Written to ``meta.json`` beside the content (what was built, how long it took),
            with the size of every file written (``files``).

    Returns:
        ``final``.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(final.parent)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        extra = write(tmp) or {}
        meta = {
            **meta,
            **extra,
            "files": _file_sizes(tmp),
            "build_seconds": round(time.perf_counter() - start, 3),
            "built_at": time.time(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError as err:
        # A concurrent builder renamed first: its entry has the same content; keep it.
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():
            log.info("cache entry %s was built concurrently; using it", final)
            return
        raise
    log.info("cache entry built: %s", final)


def check_entry(final: Path) -> str:
    """What is wrong with a built entry, or "" when it matches its ``meta.json``.

    Cheap: one ``stat`` per file, and each split's row count from its Arrow record-batch
    headers (a memory map; no column data is read).
    """
    try:
        meta = json.loads((final / META_FILE).read_text())
        sizes, rows = dict(meta["files"]), dict(meta["rows"])
    except FileNotFoundError:
        return f"{META_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{META_FILE} is unreadable or incomplete ({type(err).__name__}: {err})"
    for name, size in sizes.items():
        try:
            found = (final / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found} bytes, {size} when it was built"
    for split, expected in rows.items():
        arrows = [final / n for n in sizes if n.startswith(f"{split}/") and n.endswith(".arrow")]
        try:
            found = count_rows(arrows)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            return f"{split}/ cannot be read ({type(err).__name__}: {err})"
        if found != expected:
            return f"{split}/ holds {found} rows, {expected} when it was built"
    return ""


def discard(final: Path, problem: str) -> None:
    """Move a damaged entry aside and delete it, so it can be rebuilt.

    Raises:
        DatasetCorruptError: It cannot be removed; the message names the folder to delete.
    """
    aside = final.parent / f".tmp-damaged-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(final, aside)  # atomic: no reader sees a half-deleted entry
    except FileNotFoundError:
        return  # another process moved it first, and rebuilds too
    except OSError as err:
        raise DatasetCorruptError(
            f"cache entry {final} is damaged ({problem}) and cannot be removed ({err}): "
            f"delete it (rm -r {final}) and rerun"
        ) from None
    shutil.rmtree(aside, ignore_errors=True)  # leftovers are swept as stale .tmp-* folders
    log.warning("cache entry %s was damaged (%s); rebuilding it", final, problem)
