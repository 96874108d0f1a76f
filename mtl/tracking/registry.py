"""MLflow Model Registry entries for fixed inference architectures (DESIGN.md §5).

A registry entry is one MLflow *pyfunc* model that predicts every head in one call:
``mlflow.pyfunc.load_model("models:/<name>@candidate").predict(x)`` with ``x`` a float32
array ``(B, C, H, W)`` returns ``{head: np.ndarray}`` (logits ``(B, K)`` or ``(B, K, H, W)``,
regression maps ``(B, C, H, W)``). The REST endpoint (``mtl serve``, ``serve`` below) answers
``{"inputs": <nested list (B, C, H, W)>}`` with ``{"predictions": {head: nested list}}``.

A model that routes by domain (the multi-domain task-expert MoE) takes the domain too: its
input is ``{"image": float32 (B, C, H, W), "domain": int64 (B,)}``, ``domain`` indexing the
task set's domains (tag ``domains``), over REST ``{"inputs": {"image": ..., "domain": ...}}``.

Refused with HTTP 400 (``INVALID_PARAMETER_VALUE``, checked by the wrapper): a non-finite
input value, more than ``max_rows`` images in one request (``tracking.serve_max_rows``), a
domain out of range, and an output that is not finite (never a bare ``NaN`` in the JSON).
MLflow's scoring server has no request-size limit of its own (only a timeout), so ``serve``
wraps it in ``BodyLimit``: a body over ``max_request_bytes`` gets 413 before it is read.

Why a custom ``PythonModel`` around a ``torch.export`` program, not ``mlflow.pytorch``:
    * mlflow.pytorch's pyfunc wrapper accepts only models returning *one* tensor (it raises
      ``TypeError`` on a dict), and every head has to come out of one call.
    * The model travels as a pt2 archive (``torch.export.save``): a graph of aten ops with a
      dynamic batch dim, not a pickled ``nn.Module``, so loading imports neither ``mtl`` nor
      the classes the fixed model was built from. The wrapper class is pickled *by value*
      (``cloudpickle.register_pickle_by_value``), so the entry needs only torch, numpy and
      mlflow wherever it is loaded or served (a test checks this with ``mtl`` unimportable).

Bad input. The signature's input is one TensorSpec float32 ``(-1, C, H, W)``, and MLflow
enforces it before ``predict`` runs: a wrong rank, size or dtype (float64 and int64 too:
there is no silent cast) raises ``MlflowException`` whose message *ends* with e.g.
``Error: Shape of input (2, 12, 12) does not match expected shape (-1, 1, 12, 12).`` or
``Error: dtype of input int64 does not match expected dtype float32``, after a print of the
offending data and the schema ``[Tensor('float32', (-1, 1, 12, 12))]``. Over REST the same
text comes back as HTTP 400 ``{"error_code": "INVALID_PARAMETER_VALUE", "message": ...,
"error_class": "SCHEMA_ENFORCEMENT_FAILED"}``; strings that are not numbers give 400
``BAD_REQUEST`` "could not convert string to float". JSON numbers are cast to float32 by
the server, so integer lists are accepted over REST. The wrapper checks again (with
``expected a float32 array of shape (batch, C, H, W)``) for callers that bypass MLflow.

Each version carries tags (the caller's, plus ``heads``, ``input`` and
``structure_picture``), a markdown description, and alias ``candidate``; ``promote`` moves
``champion``. Per version the run holds ``registry/<name>-v<version>/``: the structure
picture and the full value of every tag longer than ``TAG_LIMIT`` characters.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle
import mlflow
import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from torch import Tensor, nn

from mtl.tasks import TaskSet
from mtl.tracking import policy

CANDIDATE = "candidate"
CHAMPION = "champion"
# MLflow accepts 100k characters per version tag, but the UI shows tags in a table; longer
# values are cut here and logged in full. The description column is String(5000) in SQL stores.
TAG_LIMIT = 5000
DESCRIPTION_LIMIT = 5000
PROGRAM = "program"  # pyfunc artifact key of the pt2 archive
PICTURE = "structure"  # pyfunc artifact key (and file stem) of the structure picture
EXAMPLE_ROWS = 4  # images kept as the input example
IMAGE, DOMAIN = "image", "domain"  # input names of an entry that takes the domain
# Request-size bound per image value: a float as JSON text (e.g. "-0.12345678901234568, ")
# takes at most 26 characters; 32 leaves room for brackets and spaces.
JSON_BYTES_PER_VALUE = 32
REQUEST_OVERHEAD_BYTES = 64 * 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # for a pyfunc that does not say its own limit


def _refuse(message: str) -> MlflowException:
    """The error MLflow's scoring server answers with HTTP 400 and this message."""
    return MlflowException.invalid_parameter_value(message)


class FixedProgramModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: runs the exported program and returns every head as numpy.

    Args:
        in_shape: ``(C, H, W)`` every input image must have.
        heads: Head names, in output order.
        domains: The domains ``domain`` indexes, for a model that takes it; else empty.
        max_rows: Most images per call (``tracking.serve_max_rows``).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        heads: list[str],
        domains: tuple[str, ...] = (),
        max_rows: int = 1024,
    ) -> None:
        self.in_shape = tuple(in_shape)
        self.heads = list(heads)
        self.domains = tuple(domains)
        self.max_rows = int(max_rows)
        self._program: nn.Module | None = None

    def load_context(self, context: Any) -> None:
        self._program = torch.export.load(context.artifacts[PROGRAM]).module()

    def max_request_bytes(self) -> int:
        """A JSON request of ``max_rows`` images is at most this long."""
        values = self.max_rows * int(np.prod(self.in_shape))
        return values * JSON_BYTES_PER_VALUE + REQUEST_OVERHEAD_BYTES

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """``{head: (B, ...) array}`` for a float32 ``(B, C, H, W)`` array ``model_input``
        (a model that takes the domain: ``{"image": that array, "domain": int64 (B,)}``)."""
        # MLflow 3 derives a schema from most hints on ``model_input``; np.ndarray is one it
        # leaves alone, so the TensorSpec signature is what gets enforced (a dict of arrays
        # for an entry with two inputs).
        inputs = self._inputs(model_input)
        with torch.no_grad():
            out = self._program(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
        result = {head: out[head].numpy() for head in self.heads}
        for head, value in result.items():
            if not np.isfinite(value).all():
                rows = np.flatnonzero(~np.isfinite(value.reshape(len(value), -1)).all(axis=1))
                raise _refuse(
                    f"the model's output {head!r} is not finite for images "
                    f"{rows[:10].tolist()}: their values lie far outside what it was trained on"
                )
        return result

    def _inputs(self, model_input: Any) -> tuple[np.ndarray, ...]:
        if not self.domains:
            return (self._check(model_input),)
        if not isinstance(model_input, dict) or set(model_input) != {IMAGE, DOMAIN}:
            got = sorted(model_input) if isinstance(model_input, dict) else type(model_input)
            raise _refuse(
                f"expected {{{IMAGE!r}: images, {DOMAIN!r}: int64 (batch,) indexing "
                f"{list(self.domains)}}}, got {got}"
            )
        x = self._check(model_input[IMAGE])
        return x, self._check_domain(model_input[DOMAIN], len(x))

    def _check(self, x: Any) -> np.ndarray:
        """``x`` itself if it is a float32 ``(1 <= B <= max_rows, C, H, W)`` array of finite
        values, else a clear error."""
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", None)
        ok = isinstance(x, np.ndarray) and dtype == np.float32 and shape[1:] == self.in_shape
        if not ok or shape[0] == 0:
            want = ", ".join(map(str, self.in_shape))
            raise _refuse(
                f"expected a float32 array of shape (batch >= 1, {want}), "
                f"got {type(x).__name__} of shape {shape} and dtype {dtype}"
            )
        if shape[0] > self.max_rows:
            raise _refuse(
                f"{shape[0]} images in one request; this model takes at most {self.max_rows} "
                "(tracking.serve_max_rows): split the request"
            )
        finite = np.isfinite(x).reshape(shape[0], -1).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            raise _refuse(
                f"images {rows[:10].tolist()} hold NaN or infinite values "
                f"({len(rows)} of {shape[0]} images): every input value must be finite"
            )
        return x

    def _check_domain(self, domain: Any, rows: int) -> np.ndarray:
        names = ", ".join(f"{i}={d}" for i, d in enumerate(self.domains))
        ok = isinstance(domain, np.ndarray) and domain.dtype == np.int64
        if not ok or domain.shape != (rows,):
            raise _refuse(
                f"{DOMAIN!r} must be int64 of shape ({rows},), one per image ({names}); got "
                f"{type(domain).__name__} {getattr(domain, 'dtype', None)} "
                f"{getattr(domain, 'shape', None)}"
            )
        if domain.min() < 0 or domain.max() >= len(self.domains):
            raise _refuse(f"{DOMAIN!r} values must be in 0..{len(self.domains) - 1} ({names})")
        return domain


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (used inside ``Model.log``) at ``uri``, then restore it.

    ``set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, so that is restored too.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _check_example(example: Tensor, taskset: TaskSet, domain: Tensor | None) -> None:
    expected = (taskset.in_channels, *taskset.image_size)
    if example.dtype != torch.float32 or example.ndim != 4 or tuple(example.shape[1:]) != expected:
        raise ValueError(
            f"example must be a float32 batch (B, {', '.join(map(str, expected))}) of task set "
            f"{taskset.name!r}; got {example.dtype} {tuple(example.shape)}"
        )
    if domain is not None and (not taskset.multi_domain or domain.shape != example.shape[:1]):
        raise ValueError(
            f"domain {tuple(domain.shape)} needs a multi-domain task set and one per image "
            f"({example.shape[0]}); task set {taskset.name!r} has domains {taskset.domains}"
        )


@torch.no_grad()
def export_fixed(
    fixed: nn.Module, example: Tensor, domain: Tensor | None = None
) -> tuple[Any, dict[str, Tensor]]:
    """``torch.export`` of ``fixed`` (a CPU copy, eval mode) with a dynamic batch dim.

    Args:
        fixed: ``fixed(x)``, or ``fixed(x, domain)`` when ``domain`` is given.
        example: Images ``(B, C, H, W)``.
        domain: Their domains ``(B,)`` int64, for a model that reads them.

    Returns:
        The ``ExportedProgram`` and the eager outputs on the example (CPU).

    Raises:
        ValueError: The eager outputs are not finite, or the program's outputs differ from
            them (atol 1e-5).
    """
    model = copy.deepcopy(fixed).cpu().eval()
    inputs = [example.detach().cpu()] + ([] if domain is None else [domain.detach().cpu().long()])
    # torch.export specialises a size-1 dim to a constant, so trace with a batch of 2 at least.
    trace = [t if t.shape[0] > 1 else t.expand(2, *t.shape[1:]).contiguous() for t in inputs]
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in trace)
    program = torch.export.export(model, tuple(trace), dynamic_shapes=shapes)
    expected = model(*inputs)
    bad = [head for head, value in expected.items() if not torch.isfinite(value).all()]
    if bad:
        raise ValueError(
            f"the fixed model's outputs {bad} are not finite on the example batch: its weights "
            "(or the example) are not finite, so there is nothing to register"
        )
    actual = program.module()(*inputs)
    for head, value in expected.items():
        if not torch.allclose(value, actual[head], atol=1e-5, rtol=0):
            raise ValueError(f"exported program differs from the module on head {head!r}")
    return program, expected


def fixed_signature(
    taskset: TaskSet, outputs: dict[str, Tensor], with_domain: bool = False
) -> ModelSignature:
    """Input TensorSpec float32 ``(-1, C, H, W)`` (``with_domain``: named ``image``, and
    ``domain`` int64 ``(-1,)``); one named TensorSpec per head."""
    shape = (-1, taskset.in_channels, *taskset.image_size)
    if with_domain:
        inputs = Schema([
            TensorSpec(np.dtype(np.float32), shape, IMAGE),
            TensorSpec(np.dtype(np.int64), (-1,), DOMAIN),
        ])  # fmt: skip
    else:
        inputs = Schema([TensorSpec(np.dtype(np.float32), shape)])
    heads = [
        TensorSpec(np.dtype(str(out.dtype).removeprefix("torch.")), (-1, *out.shape[1:]), head)
        for head, out in outputs.items()
    ]
    return ModelSignature(inputs=inputs, outputs=Schema(heads))


def _requirements() -> list[str]:
    # Explicit, so MLflow does not spend a subprocess inferring them; torch's local build
    # tag (+cu130) is dropped because no package index serves it.
    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
    ]


def _log_pyfunc(
    client: MlflowClient, run_id: str, name: str, files: dict[str, str], **kwargs: Any
) -> str:
    """Log the pyfunc as a LoggedModel of run ``run_id``; returns its model id."""
    experiment_id = client.get_run(run_id).info.experiment_id
    # Created here so that the model lands in the run's experiment without making the run
    # active (``mlflow.start_run`` would mark a finished run FINISHED again on exit).
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            artifacts=files,
            pip_requirements=_requirements(),
            **kwargs,
        )
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    return logged.model_id


def _write_files(folder: Path, program: Any, picture: Figure | None) -> dict[str, str]:
    """The pyfunc's artifact files: the pt2 program and, if given, the picture as PNG."""
    files = {PROGRAM: str(folder / "program.pt2")}
    torch.export.save(program, files[PROGRAM])
    if picture is not None:
        files[PICTURE] = str(folder / f"{PICTURE}.png")
        picture.savefig(files[PICTURE], dpi=120)
    return files


def _new_version(
    client: MlflowClient, name: str, model_id: str, run_id: str, identity: dict[str, str]
) -> ModelVersion:
    """A new version of ``name``; the registered model is created with its identity tags and
    description, or given them if it was created before they existed."""
    try:
        client.create_registered_model(
            name, tags=identity, description=policy.model_description(name, identity)
        )
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        model = client.get_registered_model(name)
        for key, value in identity.items():
            if key not in model.tags:
                client.set_registered_model_tag(name, key, value)
        if identity and not (model.description or "").startswith(f"### {name}:"):
            client.update_registered_model(name, policy.model_description(name, identity))
    return client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
    )


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def _fit_tags(
    tags: dict[str, str], folder: str, run_id: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(tags cut to ``TAG_LIMIT``, {artifact file name: full value} for the cut ones)."""
    short, full = {}, {}
    for key, value in tags.items():
        if not isinstance(value, str):
            raise TypeError(f"tag {key!r} must be a string, got {type(value).__name__}")
        if len(value) <= TAG_LIMIT:
            short[key] = value
            continue
        file = f"{_safe(key)}.txt"
        note = f" ... [truncated; full value: runs:/{run_id}/{folder}/tags/{file}]"
        short[key], full[file] = value[: TAG_LIMIT - len(note)] + note, value
    return short, full


def describe(
    name: str, version: int | str, taskset: TaskSet, signature: ModelSignature, tags: dict[str, str]
) -> str:
    """Markdown summary of one version: input, heads, short tags, where the picture is."""
    lines = [
        f"### {name} v{version}: fixed inference architecture for `{taskset.name}`",
        "",
        f"`predict(x)`, `x` {tags['input']}, returns one array per head:",
        "",
        "| head | kind | output |",
        "|---|---|---|",
    ]
    for spec in signature.outputs.inputs:
        kind = taskset.head(spec.name).kind
        lines.append(f"| {spec.name} | {kind} | {spec.type} {spec.shape} |")
    lines += ["", "| tag | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(tags.items()) if len(v) <= 120 and "|" not in v]
    if "structure_picture" in tags:
        where = f"`{tags['structure_picture']}`, also `artifacts/{PICTURE}.png` in the model"
        lines += ["", f"Structure picture: {where}."]
    text = "\n".join(lines)
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 3] + "..."


def _annotate(
    client: MlflowClient,
    version: ModelVersion,
    taskset: TaskSet,
    signature: ModelSignature,
    tags: dict[str, str],
    picture: Path | None,
) -> None:
    """Tags, description and the per-version run artifacts of a new version."""
    name, number, run_id = version.name, version.version, version.run_id
    folder = f"registry/{_safe(name)}-v{number}"
    auto = {
        "heads": ",".join(spec.name for spec in signature.outputs.inputs),
        "input": policy.input_text(taskset, with_domain=len(signature.inputs.inputs) > 1),
        "task_set": ",".join(taskset.loss_keys),
        "head_kinds": ",".join(f"{h.name}={h.kind}" for h in taskset.heads),
    }
    if len(signature.inputs.inputs) > 1:
        auto["domains"] = ",".join(taskset.domains)
    if picture is not None:
        client.log_artifact(run_id, str(picture), folder)
        auto["structure_picture"] = f"runs:/{run_id}/{folder}/{picture.name}"
    short, full = _fit_tags({**auto, **tags}, folder, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        for file, value in full.items():
            (Path(tmp) / file).write_text(value)
        if full:
            client.log_artifacts(run_id, tmp, f"{folder}/tags")
    for key, value in short.items():
        client.set_model_version_tag(name, number, key, value)
    text = describe(name, number, taskset, signature, short)
    client.update_model_version(name, number, description=text)


def register_fixed_model(
    uri: str,
    run_id: str,
    fixed: nn.Module,
    example: Tensor,
    taskset: TaskSet,
    *,
    name: str,
    tags: dict[str, str],
    picture: Figure | None = None,
    domain: Tensor | None = None,
    max_rows: int = 1024,
    identity: dict[str, str] | None = None,
) -> ModelVersion:
    """Log ``fixed`` into run ``run_id`` as a pyfunc, register it, alias it ``candidate``.

    Args:
        uri: Tracking (and registry) URI.
        run_id: Existing run the model is logged into; its status is left unchanged.
        fixed: Static module, ``fixed(x (B, C, H, W) float32) -> {head: Tensor}``.
        example: A real input batch: traces the export; its first ``EXAMPLE_ROWS`` images
            become the input example (stored as JSON, so kept small).
        taskset: Gives the input shape and the heads ``fixed`` must return.
        name: Registered model name (created if missing).
        tags: Version tags (string values); values over ``TAG_LIMIT`` are cut and logged
            in full under the run's ``registry/<name>-v<version>/tags/``.
        picture: Learned-structure figure, stored as PNG in the model and the run.
        domain: The example's domains ``(B,)``, for a model that reads them
            (``fixed(x, domain)``): the entry then takes ``{"image", "domain"}``.
        max_rows: Most images the served model takes per request.
        identity: What the name stands for (``mtl.tracking.policy.IDENTITY``); default the
            one of ``taskset`` with an unrecorded data source. Checked before anything is
            logged, stored on the registered model and on the version.

    Returns:
        The new model version, with its tags and description.

    Raises:
        NameTaken: ``name`` stands for models with another identity (a ``ValueError``).
        ValueError: ``example`` does not fit ``taskset``, ``fixed`` returns other heads, or
            the exported program disagrees with ``fixed``.
    """
    _check_example(example, taskset, domain)
    if identity is None:
        identity = policy.identity(taskset, tags.get("data_source", "?"), domain is not None)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    policy.check_name(client, name, identity)
    program, outputs = export_fixed(fixed, example, domain)
    heads = [spec.name for spec in taskset.heads]
    if sorted(outputs) != sorted(heads):
        raise ValueError(f"fixed model returns {sorted(outputs)}, task set has heads {heads}")
    signature = fixed_signature(taskset, outputs, with_domain=domain is not None)
    tags = {**tags, **identity, "serve_max_rows": str(max_rows)}
    rows = example[:EXAMPLE_ROWS].detach().cpu().numpy()
    if domain is not None:
        rows = {IMAGE: rows, DOMAIN: domain[:EXAMPLE_ROWS].detach().cpu().long().numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        files = _write_files(Path(tmp), program, picture)
        domains = taskset.domains if domain is not None else ()
        wrapper = FixedProgramModel(tuple(example.shape[1:]), list(outputs), domains, max_rows)
        # The fluent API inside Model.log, and the registry store resolving the
        # ``models:/<id>`` source, read the global tracking URI.
        with _tracking_uri(uri):
            model_id = _log_pyfunc(
                client, run_id, name, files, python_model=wrapper, signature=signature,
                input_example=rows,
            )  # fmt: skip
            version = _new_version(client, name, model_id, run_id, identity)
        png = Path(files[PICTURE]) if PICTURE in files else None
        _annotate(client, version, taskset, signature, tags, png)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return client.get_model_version(name, version.version)


def promote(uri: str, name: str, version: int | str) -> None:
    """Point alias ``champion`` of ``name`` at ``version``; ``candidate`` stays where it is.

    Raises:
        MlflowException: The version does not exist (RESOURCE_DOES_NOT_EXIST).
    """
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.get_model_version(name, str(version))  # a clear error for an unknown version
    client.set_registered_model_alias(name, CHAMPION, str(version))


class BodyLimit:
    """ASGI wrapper: a request whose body exceeds ``max_bytes`` gets HTTP 413 before the
    app parses it (MLflow's scoring server reads and parses any size).

    A declared ``Content-Length`` over the limit is refused at once, before the body is
    read (a client that sent ``Expect: 100-continue``, as curl does for large bodies, never
    sends it); a body without one is counted while it arrives and refused at the limit.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send, int(length))
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(send, None)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any, length: int | None) -> None:
        size = f"{length} bytes" if length is not None else "more"
        text = json.dumps({
            "error_code": "REQUEST_LIMIT_EXCEEDED",
            "message": f"request body of {size} exceeds this server's limit of "
            f"{self.max_bytes} bytes: send fewer images per request",
        }).encode()  # fmt: skip
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        headers.append((b"content-length", str(len(text)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": text})


def request_byte_limit(model: Any) -> int:
    """The request-size limit of a loaded pyfunc: what ``max_rows`` images take as JSON for
    an ``mtl`` entry, ``DEFAULT_MAX_BYTES`` for any other pyfunc."""
    try:
        wrapper = model.unwrap_python_model()
    except MlflowException:  # not a PythonModel
        return DEFAULT_MAX_BYTES
    # The wrapper is unpickled by value: its class is not this module's, so ask, not isinstance.
    limit = getattr(wrapper, "max_request_bytes", None)
    return limit() if callable(limit) else DEFAULT_MAX_BYTES


def serve(
    model_uri: str, uri: str, *, host: str = "127.0.0.1", port: int = 5001, max_bytes: int = 0
) -> None:
    """Serve ``model_uri`` with MLflow's scoring server (``/invocations``, ``/ping``) in this
    process, until interrupted.

    Runs uvicorn here, not through ``mlflow models serve`` (which spawns ``uvicorn`` by name
    and fails when the venv's ``bin`` is not on ``PATH``), and puts ``BodyLimit`` in front.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a path.
        uri: Tracking and registry URI the model URI resolves against.
        host: Address to listen on; loopback unless you put authentication in front.
        port: Port to listen on.
        max_bytes: Largest request body; 0: ``request_byte_limit`` of the model.
    """
    import uvicorn
    from mlflow.pyfunc import scoring_server

    with _tracking_uri(uri):
        model = mlflow.pyfunc.load_model(model_uri)
    limit = max_bytes or request_byte_limit(model)
    app = BodyLimit(scoring_server.init(model), limit)
    print(
        f"[mtl] serving {model_uri} at http://{host}:{port}/invocations (request bodies up to "
        f"{limit} bytes)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
