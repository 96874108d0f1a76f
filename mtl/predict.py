"""``mtl predict``: a registered model on image files, every head written to a folder.

What goes in. ``INPUT`` is an image file or a folder; a folder contributes every
``.png``/``.jpg``/``.jpeg``/``.bmp``/``.webp`` file under it, **recursively**, in sorted path
order (files under ``--out`` are skipped, so a rerun does not read its own previews). The
model's signature says what it takes: float32 ``(-1, C, H, W)``. Each image is decoded with
Pillow, converted to C channels (``C = 1``: Pillow's ``L``, ITU-R 601 luma; ``C = 3``: ``RGB``;
an alpha channel is dropped) and scaled to ``pixel / 255`` in ``[0, 1]``, as the training
pipeline feeds the model (``mtl/data/dataset.py``; no model in ``mtl`` normalises further).
Images are not resized: every file must be ``H`` high and ``W`` wide already.

Checked before anything is predicted or written (one ``ValueError``, exit 2 on the CLI, naming
each bad file, its size and the expected size): a missing path, a folder without images, a
file Pillow cannot read, 16-bit or float images, a wrong size, two files that would write the
same outputs, and for a model that routes by domain a missing or unknown ``--domain``.
The sizes come from each file's header; pixels are decoded batch by batch, so a file whose
header reads but whose pixels are corrupt stops the run there (earlier batches' map files stay,
``predictions.jsonl`` is only written when every image is done).

What comes out, under ``--out DIR``:
    * ``predictions.jsonl``: one JSON object per image, in input order: ``file`` (the path),
      and per head: classification ``{"class", "probabilities", "logits"}`` (softmax of the
      logits), binary ``{"class", "probability", "logit"}`` (sigmoid), dense heads
      ``{"npy", "png"}`` (paths relative to ``DIR``).
    * ``<head>/<name>.npy`` per dense head (output ``(-1, K, H, W)``): the model's raw output
      for the image, float32 ``(K, H, W)`` (logits for dense classification and saliency).
      ``<name>`` is the file's stem, or for a file found in a folder its path under that folder
      without the suffix (``sub/a.png`` -> ``<head>/sub/a.npy``).
    * ``<head>/<name>.png``: a preview at the model's resolution: the arg-max class as a
      colour (matplotlib's ``tab20``, class k gets colour k mod 20) for dense classification,
      the sigmoid as grey for saliency, ``(n + 1) / 2`` as RGB for normals, and the map
      min-max scaled to grey per image for regression and depth (first channel if not 1 or 3).

The head kinds come from the version's ``head_kinds`` tag (``name=kind,...``) if present, else
from the kinds table of the version's description (``mtl.tracking.registry.describe``), else
(a ``runs:/`` URI or a path) from the output shapes: ``(-1, K)`` classification, ``(-1,)``
binary, ``(-1, K, H, W)`` dense regression.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    NORMALS,
    SALIENCY,
    TASK_KINDS,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
PREDICTIONS = "predictions.jsonl"
IMAGE, DOMAIN = "image", "domain"  # input names of a model that routes by domain
# Pillow modes with 8 bits per channel; 16-bit ("I;16") and float ("F") images would be cut.
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
MAX_LISTED = 5  # bad files named in one error line


@dataclass(frozen=True)
class ModelSpec:
    """What a registered model takes and returns, from its signature and version tags.

    Attributes:
        channels: ``C`` of the input ``(-1, C, H, W)``.
        height: ``H``.
        width: ``W``.
        heads: Head name -> task kind (``mtl.tasks.TASK_KINDS``), in output order.
        domains: Domain names the ``domain`` input indexes; empty for a model without it.
    """

    channels: int
    height: int
    width: int
    heads: dict[str, str]
    domains: tuple[str, ...] = ()

    @property
    def size_text(self) -> str:
        unit = "channel" if self.channels == 1 else "channels"
        return f"{self.width} wide x {self.height} high, {self.channels} {unit}"


@dataclass(frozen=True)
class Image:
    """One input file and the name its outputs get (``<head>/<name>.npy``)."""

    path: Path
    name: str


@dataclass(frozen=True)
class Summary:
    images: int
    seconds: float
    predictions: Path
    dense_heads: tuple[str, ...]


def find_images(inputs: Sequence[str | os.PathLike], out: Path | None = None) -> list[Image]:
    """The files ``inputs`` name: files as given, folders searched recursively for
    ``IMAGE_SUFFIXES`` (any case) in sorted order, skipping anything under ``out``.

    Raises:
        ValueError: A path does not exist, a folder holds no image, or two files would write
            the same outputs (same name).
    """
    skip = Path(out).resolve() if out is not None else None
    found: list[Image] = []
    seen: set[Path] = set()
    for given in map(Path, inputs):
        if given.is_file():
            candidates = [(given, given.stem)]
        elif given.is_dir():
            files = sorted(
                p
                for p in given.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not (skip is not None and p.resolve().is_relative_to(skip))
            )
            if not files:
                raise ValueError(
                    f"folder {given} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files"
                )
            candidates = [(p, p.relative_to(given).with_suffix("").as_posix()) for p in files]
        else:
            raise ValueError(f"input {given} does not exist: give image files or folders")
        for path, name in candidates:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                found.append(Image(path, name))
    by_name: dict[str, list[Path]] = {}
    for image in found:
        by_name.setdefault(image.name, []).append(image.path)
    clashes = [paths for paths in by_name.values() if len(paths) > 1]
    if clashes:
        listed = "; ".join(" and ".join(map(str, p)) for p in clashes[:MAX_LISTED])
        raise ValueError(
            f"{len(clashes)} output name(s) would be written twice ({listed}): their outputs "
            "are named by file stem, so give files with different stems, or their folder"
        )
    return found


def check_images(images: Sequence[Image], spec: ModelSpec, model_uri: str) -> None:
    """Read every file's header: each must be an 8-bit image of the model's size.

    Raises:
        ValueError: Naming every file that does not fit (up to ``MAX_LISTED``), its size and
            the size the model takes.
    """
    from PIL import Image as Pil
    from PIL import UnidentifiedImageError

    bad = []
    for image in images:
        try:
            with Pil.open(image.path) as opened:
                width, height = opened.size
                mode = opened.mode
        except (UnidentifiedImageError, OSError) as err:
            bad.append(f"{image.path} is not an image Pillow can read ({err})")
            continue
        if mode not in EIGHT_BIT_MODES:
            bad.append(f"{image.path} has Pillow mode {mode} (16-bit or float): give 8-bit images")
        elif (height, width) != (spec.height, spec.width):
            bad.append(f"{image.path} is {width} wide x {height} high")
    if bad:
        listed = "; ".join(bad[:MAX_LISTED])
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        raise ValueError(
            f"{len(bad)} of {len(images)} images do not fit {model_uri}, which takes images "
            f"{spec.size_text}: {listed}{more}. Resize or convert them first; nothing was "
            "predicted"
        )


def read_images(images: Sequence[Image], channels: int) -> np.ndarray:
    """float32 ``(B, C, H, W)`` in ``[0, 1]`` (``pixel / 255``), as training feeds the model."""
    from PIL import Image as Pil

    mode = {1: "L", 3: "RGB"}[channels]
    arrays = []
    for image in images:
        try:
            with Pil.open(image.path) as opened:
                pixels = np.asarray(opened.convert(mode), dtype=np.uint8)
        except OSError as err:
            raise ValueError(f"{image.path}: its pixels do not decode ({err})") from None
        arrays.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))  # (C, H, W)
    batch = np.stack(arrays).astype(np.float32)
    batch *= np.float32(1.0 / 255.0)
    return batch


def model_spec(signature: Any, tags: dict[str, str], description: str) -> ModelSpec:
    """The input size, head kinds and domains of a model from its signature and tags.

    Raises:
        ValueError: The signature is not one ``mtl`` writes (an image TensorSpec
            ``(-1, C, H, W)`` with C 1 or 3, optionally a ``domain`` input).
    """
    if signature is None or signature.inputs is None or signature.outputs is None:
        raise ValueError("the model has no signature: `mtl predict` takes models `mtl` registered")
    inputs = {spec.name: spec for spec in signature.inputs.inputs}
    image = inputs.get(IMAGE) if len(inputs) > 1 else next(iter(inputs.values()))
    shape = tuple(getattr(image, "shape", ()) or ())
    if len(shape) != 4 or shape[1] not in (1, 3) or (len(inputs) > 1 and DOMAIN not in inputs):
        raise ValueError(
            f"the model takes {signature.inputs}, not images float32 (-1, C, H, W) with C 1 or "
            "3 (and optionally a domain): `mtl predict` takes models `mtl` registered"
        )
    outputs = {spec.name: tuple(spec.shape) for spec in signature.outputs.inputs}
    kinds = _head_kinds(outputs, tags, description)
    domains = tuple(d for d in tags.get("domains", "").split(",") if d) if DOMAIN in inputs else ()
    if DOMAIN in inputs and not domains:
        domains = ("?",)  # a model that routes but does not say its domains: filled on load
    return ModelSpec(int(shape[1]), int(shape[2]), int(shape[3]), kinds, domains)


def _head_kinds(
    outputs: dict[str, tuple[int, ...]], tags: dict[str, str], description: str
) -> dict[str, str]:
    tagged = dict(kv.split("=", 1) for kv in tags.get("head_kinds", "").split(",") if "=" in kv)
    table = dict(re.findall(r"^\| (\S+) \| (\w+) \|", description or "", flags=re.M))
    kinds = {}
    for head, shape in outputs.items():
        kind = tagged.get(head) or table.get(head)
        if kind not in TASK_KINDS:
            kind = {2: CLASSIFICATION, 1: BINARY}.get(len(shape), DENSE_REGRESSION)
            log.debug("head %s: kind not recorded, %s from its shape %s", head, kind, shape)
        kinds[head] = kind
    return kinds


def _version_of(model_uri: str, client: Any) -> Any | None:
    """The registry version a ``models:/NAME@ALIAS`` or ``models:/NAME/N`` URI names."""
    alias = re.fullmatch(r"models:/(.+)@([^/@]+)", model_uri)
    if alias:
        return client.get_model_version_by_alias(*alias.groups())
    number = re.fullmatch(r"models:/(.+)/(\d+)", model_uri)
    if number:
        return client.get_model_version(*number.groups())
    return None


@contextmanager
def _uris(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs at ``uri`` (``models:/`` resolves against
    them), and both back afterwards, the exported variables too."""
    import mlflow

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def predict_images(
    model_uri: str,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    uri: str,
    batch_size: int = 64,
    domain: str = "",
) -> Summary:
    """Predict every head of ``model_uri`` for the images ``inputs`` name; write ``out``.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a path.
        inputs: Image files and folders (see the module docstring).
        out: Output folder (created; files of an earlier run with the same names are replaced).
        uri: Tracking and registry URI the model URI resolves against.
        batch_size: Images per ``predict`` call.
        domain: For a model that routes by domain: the domain every image comes from.

    Returns:
        How many images, how long, where the predictions are.

    Raises:
        ValueError: Bad input (see the module docstring), checked before predicting.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    out = Path(out)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder")
    images = find_images(inputs, out)
    with _uris(uri):
        version = _version_of(model_uri, MlflowClient(tracking_uri=uri, registry_uri=uri))
        info = mlflow.models.get_model_info(model_uri)
        tags = dict(version.tags) if version is not None else {}
        description = (version.description or "") if version is not None else ""
        spec = model_spec(info.signature, tags, description)
        domain_index = None
        if spec.domains and spec.domains != ("?",):
            domain_index = _domain_index(spec.domains, domain, model_uri)
        if not spec.domains and domain:
            raise ValueError(f"{model_uri} does not route by domain: drop --domain {domain}")
        check_images(images, spec, model_uri)
        log.info("loading %s (%d images to predict)", model_uri, len(images))
        model = mlflow.pyfunc.load_model(model_uri)
    wrapper = _wrapper(model)
    if spec.domains == ("?",):
        domains = tuple(getattr(wrapper, "domains", ()))
        spec = ModelSpec(spec.channels, spec.height, spec.width, spec.heads, domains)
        domain_index = _domain_index(spec.domains, domain, model_uri)
    max_rows = int(getattr(wrapper, "max_rows", 0) or tags.get("serve_max_rows", 0) or 0)
    if max_rows and batch_size > max_rows:
        raise ValueError(
            f"--batch-size {batch_size} is over the {max_rows} images this model takes per "
            f"call (tag serve_max_rows): give --batch-size {max_rows} or less"
        )
    return _predict(model, images, spec, out, batch_size, domain_index)


def _wrapper(model: Any) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return model.unwrap_python_model()
    except MlflowException:
        return None


def _domain_index(domains: tuple[str, ...], domain: str, model_uri: str) -> int:
    if not domain:
        raise ValueError(
            f"{model_uri} routes by domain: give the images' domain, --domain NAME, one of "
            f"{', '.join(domains)}"
        )
    if domain not in domains:
        raise ValueError(f"--domain {domain!r} is not one of {model_uri}'s: {', '.join(domains)}")
    return domains.index(domain)


def _predict(
    model: Any,
    images: Sequence[Image],
    spec: ModelSpec,
    out: Path,
    batch_size: int,
    domain: int | None,
) -> Summary:
    from tqdm import tqdm

    dense = tuple(h for h, kind in spec.heads.items() if kind not in (CLASSIFICATION, BINARY))
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{PREDICTIONS}.partial"
    start = time.perf_counter()
    bar = tqdm(
        total=len(images),
        unit="image",
        desc="predict",
        file=sys.stderr,
        disable=not log.isEnabledFor(logging.INFO),
    )
    with partial.open("w") as lines, bar:
        for first in range(0, len(images), batch_size):
            chunk = images[first : first + batch_size]
            x = read_images(chunk, spec.channels)  # (B, C, H, W)
            if domain is not None:
                x = {IMAGE: x, DOMAIN: np.full(len(chunk), domain, dtype=np.int64)}
            outputs = model.predict(x)
            for row, image in enumerate(chunk):
                record: dict[str, Any] = {"file": str(image.path)}
                for head, kind in spec.heads.items():
                    value = np.asarray(outputs[head][row])
                    record[head] = _record(head, kind, value, image.name, out)
                lines.write(json.dumps(record) + "\n")
            bar.update(len(chunk))
    final = out / PREDICTIONS
    os.replace(partial, final)
    seconds = time.perf_counter() - start
    log.info(
        "predicted %d images in %.1f s (%.0f images/s): %s",
        len(images),
        seconds,
        len(images) / max(seconds, 1e-9),
        final,
    )
    return Summary(len(images), seconds, final, dense)


def _record(head: str, kind: str, value: np.ndarray, name: str, out: Path) -> dict[str, Any]:
    """The JSON of one head for one image; a dense head's map and preview are written."""
    if kind == CLASSIFICATION:
        probabilities = softmax(value)
        return {
            "class": int(np.argmax(value)),
            "probabilities": probabilities.tolist(),
            "logits": value.astype(float).tolist(),
        }
    if kind == BINARY:
        logit = float(value)
        return {"class": int(logit > 0), "probability": sigmoid(logit), "logit": logit}
    npy = Path(head) / f"{name}.npy"
    png = npy.with_suffix(".png")
    (out / npy).parent.mkdir(parents=True, exist_ok=True)
    np.save(out / npy, value)
    _save_png(preview(kind, value), out / png)
    return {"npy": npy.as_posix(), "png": png.as_posix()}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sigmoid(logit: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.float64(logit))))


def preview(kind: str, value: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB picture of one dense output ``(K, H, W)``."""
    if kind == DENSE_CLASSIFICATION:
        from matplotlib import colormaps

        palette = (np.asarray(colormaps["tab20"].colors)[:, :3] * 255).round().astype(np.uint8)
        return palette[np.argmax(value, axis=0) % len(palette)]  # (H, W, 3)
    if kind == SALIENCY:
        return (255 / (1 + np.exp(-value[0].astype(np.float64)))).round().astype(np.uint8)
    if kind == NORMALS and len(value) == 3:
        rgb = np.clip((value.astype(np.float64) + 1) / 2, 0, 1)
        return (rgb.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    if kind not in (DENSE_REGRESSION, NORMALS):
        log.debug("preview of kind %s as a grey min-max map", kind)
    maps = value if len(value) == 3 else value[:1]  # (1 or 3, H, W)
    low, high = float(maps.min()), float(maps.max())
    scaled = (maps - low) / (high - low) if high > low else np.zeros_like(maps)
    picture = (scaled * 255).round().astype(np.uint8).transpose(1, 2, 0)
    return picture[..., 0] if picture.shape[-1] == 1 else picture


def _save_png(picture: np.ndarray, path: Path) -> None:
    from PIL import Image as Pil

    Pil.fromarray(picture).save(path)
