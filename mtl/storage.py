"""Where runs live: ``train.storage_path`` as a local folder or an ``s3://bucket/prefix`` URI.

Every path here is a string: a local path, or a URI that pyarrow's filesystems resolve, as
Ray Train resolves its ``RunConfig.storage_path``. An S3-compatible store other than AWS is
named by the standard ``AWS_ENDPOINT_URL`` (with ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``); pyarrow, boto3 and MLflow all read it, and the driver forwards
it to the workers (``mtl.train.launch.FORWARDED_ENV``).

Checkpoint verification (checksums, the tensors-only scan) reads local files, so a checkpoint
in S3 is downloaded to a temporary folder first (``local_copy``) and verified there; a
half-uploaded one (a file missing, a changed byte) is refused, never loaded.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMES = ("s3", "file")  # besides plain local paths; the ones the tests prove
CHECKPOINT_DIR = re.compile(r"checkpoint_[0-9]+")
ENDPOINT_ENV = "AWS_ENDPOINT_URL"


def scheme(path: str) -> str:
    """``"s3"`` for ``s3://...``, ``""`` for a local path."""
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_remote(path: str) -> bool:
    return scheme(path) not in ("", "file")


def check_scheme(path: str, key: str = "train.storage_path") -> None:
    """Raises ``ValueError`` for a URI scheme this project does not support."""
    found = scheme(path)
    if found and found not in SCHEMES:
        raise ValueError(
            f"{key}={path!r}: the scheme {found}:// is not supported; use a local folder or "
            "s3://bucket/prefix (an S3-compatible store other than AWS: set AWS_ENDPOINT_URL)"
        )
    if found == "s3" and not path[len("s3://") :].split("/", 1)[0]:
        raise ValueError(f"{key}={path!r} names no bucket: use s3://bucket/prefix")


def resolve(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a local path or URI."""
    import pyarrow.fs

    check_scheme(path, "storage path")
    if scheme(path) in ("", "file"):
        local = path[len("file://") :] if scheme(path) == "file" else path
        return pyarrow.fs.LocalFileSystem(), str(Path(local).expanduser())
    return s3_filesystem(), path.split("://", 1)[1].rstrip("/")


def uri_of(filesystem: Any, path: str) -> str:
    """The URI of ``path`` inside ``filesystem`` (Ray's ``Checkpoint.path`` and
    ``Result.path`` are filesystem paths, ``bucket/key`` for S3)."""
    if "://" in path or filesystem is None or filesystem.type_name == "local":
        return path
    return f"{filesystem.type_name}://{path.lstrip('/')}"


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (no ``..`` or absolute parts)."""
    for part in parts:
        if not part or part.startswith("/") or ".." in Path(part).parts:
            raise ValueError(f"{part!r} is not a relative name inside {base}")
    if not is_remote(base):
        return str(Path(base).joinpath(*parts))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def name(path: str) -> str:
    """The last component (a run's or a checkpoint's name)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def _info(path: str) -> Any:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def is_dir(path: str) -> bool:
    import pyarrow.fs

    return _info(path).type == pyarrow.fs.FileType.Directory


def is_file(path: str) -> bool:
    import pyarrow.fs

    return _info(path).type == pyarrow.fs.FileType.File


def exists(path: str) -> bool:
    import pyarrow.fs

    return _info(path).type != pyarrow.fs.FileType.NotFound


def children(path: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of everything directly inside ``path``; [] if it is no folder."""
    import pyarrow.fs

    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        return []
    found = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return sorted((name(i.path), i.type == pyarrow.fs.FileType.Directory) for i in found)


def checkpoints(run: str) -> list[str]:
    """The checkpoint folders (``checkpoint_<step>``) of a run, oldest first."""
    found = [n for n, folder in children(run) if folder and CHECKPOINT_DIR.fullmatch(n)]
    return [join(run, n) for n in sorted(found, key=lambda n: int(n.split("_")[1]))]


def read_text(path: str) -> str:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    fs, inner = resolve(path)
    parent = inner.rstrip("/").rsplit("/", 1)[0]
    if parent and parent != inner:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(text.encode())


def move(source: str, target: str) -> None:
    """Rename a file (in S3 a copy and a delete: not atomic)."""
    fs, inner = resolve(source)
    fs.move(inner, resolve(target)[1])


def delete_file(path: str) -> None:
    fs, inner = resolve(path)
    if is_file(path):
        fs.delete_file(inner)


def delete_dir(path: str) -> None:
    """Delete a folder and everything in it; a missing one is no error."""
    if not is_dir(path):
        return
    fs, inner = resolve(path)
    fs.delete_dir(inner)


def download(path: str, local: Path) -> Path:
    """Copy the folder ``path`` (and what is inside it) to the local folder ``local``."""
    import pyarrow.fs

    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{path} is not a folder")
    local.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(inner, str(local), source_filesystem=fs)
    return local


@contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """The folder ``path`` on this machine: a local folder itself, an S3 one downloaded to a
    temporary folder that is deleted afterwards."""
    if not is_remote(path):
        yield Path(resolve(path)[1])
        return
    tmp = tempfile.mkdtemp(prefix=f"mtl-{name(path)}-")
    try:
        yield download(path, Path(tmp) / name(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prune_checkpoints(sweep: str, keep: int) -> list[str]:
    """After a sweep: delete all but each trial's ``keep`` newest checkpoints (0: keep all);
    returns the deleted folders."""
    removed: list[str] = []
    if keep <= 0:
        return removed
    for trial in (n for n, folder in children(sweep) if folder and n.startswith("trial_")):
        for old in checkpoints(join(sweep, trial))[:-keep]:
            delete_dir(old)
            removed.append(old)
    return removed


def is_under(path: str, root: str) -> bool:
    """Whether ``path`` lies inside ``root`` (same scheme and bucket; local links resolved)."""
    if is_remote(path) or is_remote(root):
        if scheme(path) != scheme(root):
            return False
        inner = [p for p in path.split("://", 1)[1].split("/") if p]
        base = [p for p in root.split("://", 1)[1].split("/") if p]
        return ".." not in inner and inner[: len(base)] == base
    local = [resolve(p)[1] for p in (path, root)]
    return Path(local[0]).resolve().is_relative_to(Path(local[1]).resolve())


def s3_filesystem(*, timeout_s: float | None = None, attempts: int | None = None) -> Any:
    """An ``S3FileSystem`` whose endpoint, region and credentials are this process's
    ``AWS_*`` variables, written into the object: pickled to Ray's Train controller (which
    does not inherit the workers' environment) it reaches the same store with the same keys."""
    import pyarrow.fs

    options: dict[str, Any] = {}
    endpoint = os.environ.get(ENDPOINT_ENV, "")
    if endpoint:
        found = re.match(r"(?:(https?)://)?([^/]+)", endpoint)
        options["endpoint_override"] = found.group(2) if found else endpoint
        options["scheme"] = (found.group(1) if found else None) or "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options.update(access_key=key, secret_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    if timeout_s is not None:
        options.update(connect_timeout=timeout_s, request_timeout=timeout_s)
    if attempts is not None:
        options["retry_strategy"] = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts)
    return pyarrow.fs.S3FileSystem(**options)


def ray_storage(path: str) -> tuple[str, Any]:
    """(``storage_path``, ``storage_filesystem``) for Ray's ``RunConfig``: a local path as it
    is, an ``s3://`` URI as ``bucket/prefix`` on ``s3_filesystem()``."""
    if not is_remote(path):
        return resolve(path)[1], None
    check_scheme(path)
    return path.split("://", 1)[1].rstrip("/"), s3_filesystem()


def check_reachable(path: str, key: str = "train.storage_path", timeout_s: float = 5.0) -> None:
    """Raises ``ValueError`` when an ``s3://`` path's bucket cannot be reached or does not
    exist, naming the endpoint and the variable that sets it; local paths pass."""
    if not is_remote(path):
        return
    import pyarrow.fs

    endpoint = os.environ.get(ENDPOINT_ENV, "")
    bucket = path.split("://", 1)[1].split("/", 1)[0]
    where = f"the endpoint {endpoint} ({ENDPOINT_ENV})" if endpoint else "AWS S3"
    hint = (
        f"set {ENDPOINT_ENV} to your S3-compatible server (e.g. http://host:9000) and "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    )
    try:
        info = s3_filesystem(timeout_s=timeout_s, attempts=1).get_file_info(bucket)
    except OSError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise ValueError(f"{key}={path}: cannot reach bucket {bucket!r} at {where}: {first}; "
                         f"{hint}") from None  # fmt: skip
    if info.type != pyarrow.fs.FileType.Directory:
        raise ValueError(
            f"{key}={path}: bucket {bucket!r} does not exist at {where}; create it, or {hint}"
        )
