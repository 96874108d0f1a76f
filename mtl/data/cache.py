"""Where data lives, and how a built benchmark is cached atomically.

A cache entry is a folder ``<cache root>/<benchmark>-<key>/`` with one ``datasets`` folder
per split and a ``meta.json``. ``key`` hashes everything that changes the content (the
benchmark's content fields plus ``FORMAT_VERSION``), so a changed size or seed builds a new
entry and never reads a stale one. An entry is built in a hidden temporary sibling folder
and renamed into place: rename is atomic on one filesystem, so the entry either exists
complete or not at all. A crash leaves only a ``.tmp-*`` folder, which later builds sweep;
of two concurrent builders, the second rename fails and that builder keeps the first's.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtl.config import DataConfig
from mtl.config_checks import image_hw

log = logging.getLogger(__name__)

# Bump when the stored layout or any builder's output changes, so old entries are not reused.
FORMAT_VERSION = 1
_STALE_TMP_SECONDS = 6 * 3600  # a build takes seconds; older temp folders are crash leftovers
META_FILE = "meta.json"


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


def _sweep_stale(root: Path) -> None:
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:  # another process swept it first
            pass


def build_atomic(final: Path, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
    """Create ``final`` by ``write(tmp_dir)`` then an atomic rename; idempotent.

    Args:
        final: The entry folder; returned untouched when it already exists.
        write: Fills an empty folder with the entry's content.
        meta: Written to ``meta.json`` beside the content (what was built, how long it took).

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
        write(tmp)
        meta = {
            **meta,
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
