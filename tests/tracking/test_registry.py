"""Registry entries on a real SQLite store: versions, aliases, tags, picture, pyfunc, serving."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mtl.tasks import CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

mlflow = pytest.importorskip("mlflow")

from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mtl.tracking.pictures import gate_pattern_figure, routes_figure  # noqa: E402
from mtl.tracking.registry import (  # noqa: E402
    TAG_LIMIT,
    promote,
    register_fixed_model,
)

NAME = "tiny-fixed"
TASKS = TaskSet(
    "tiny",
    (
        TaskSpec("digit", CLASSIFICATION, 3, "accuracy", True),
        TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),
    ),
    in_channels=1,
    image_size=12,
)


class TwoHeads(nn.Module):
    """A static two-head model: classification logits (B, 3) and a depth map (B, 1, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.cls = nn.Linear(4, 3)
        self.reg = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv(x))  # (B, 4, H, W)
        return {"digit": self.cls(h.mean(dim=(2, 3))), "depth": self.reg(h)}


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """One store, one RUNNING run, two registered versions (v1 with a picture)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("registry", artifact_location=str(tmp / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(4, 1, 12, 12)
    tags = {"task_set": "tiny", "delta_mtl": "1.5", "flops": "1234", "config": "{" + "x" * 9000}
    figure = gate_pattern_figure({"digit": [0.0, 0.5], "depth": [0.25, 1.0]}, f"{NAME} v1")
    start = time.perf_counter()
    v1 = register_fixed_model(uri, run_id, model, x, TASKS, name=NAME, tags=tags, picture=figure)
    seconds = time.perf_counter() - start
    v2 = register_fixed_model(uri, run_id, model, x[:1], TASKS, name=NAME, tags={"flops": "1"})
    return SimpleNamespace(
        uri=uri, client=client, run_id=run_id, model=model, x=x, v1=v1, v2=v2, seconds=seconds
    )


@pytest.fixture(scope="module")
def loaded(entry):
    with _registry(entry.uri):
        return mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")


@contextmanager
def _registry(uri: str) -> Iterator[None]:
    """``models:/`` URIs resolve against the global registry URI; point it at the store."""
    env = os.environ.get("MLFLOW_REGISTRY_URI")
    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_registry_uri(previous)  # also exports MLFLOW_REGISTRY_URI: restore it too
        if env is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
        else:
            os.environ["MLFLOW_REGISTRY_URI"] = env


def test_register_creates_versions_aliases_tags_and_picture(entry):
    client = entry.client
    assert (str(entry.v1.version), str(entry.v2.version)) == ("1", "2")
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "2"
    tags = client.get_model_version(NAME, "1").tags
    assert tags["delta_mtl"] == "1.5" and tags["heads"] == "digit,depth"
    assert tags["input"] == "float32 (-1, 1, 12, 12)"
    picture = tags["structure_picture"]
    assert picture == f"runs:/{entry.run_id}/registry/{NAME}-v1/structure.png"
    files = [f.path for f in client.list_artifacts(entry.run_id, f"registry/{NAME}-v1")]
    assert f"registry/{NAME}-v1/structure.png" in files
    assert "structure_picture" not in client.get_model_version(NAME, "2").tags
    description = client.get_model_version(NAME, "1").description
    assert "| digit | classification | float32 (-1, 3) |" in description
    assert "structure.png" in description and "| delta_mtl | 1.5 |" in description
    # Logging into the run neither ends it nor changes its status.
    assert client.get_run(entry.run_id).info.status == "RUNNING"
    print(f"register_fixed_model: {entry.seconds:.1f} s")


def test_long_tag_is_cut_and_logged_in_full(entry):
    value = entry.client.get_model_version(NAME, "1").tags["config"]
    assert len(value) <= TAG_LIMIT and "truncated" in value
    path = f"registry/{NAME}-v1/tags/config.txt"
    assert path in value
    local = mlflow.artifacts.download_artifacts(
        run_id=entry.run_id, artifact_path=path, tracking_uri=entry.uri
    )
    assert Path(local).read_text() == "{" + "x" * 9000


def test_pyfunc_predicts_every_head(entry, loaded):
    x = torch.randn(5, 1, 12, 12)  # another batch size than the example's
    out = loaded.predict(x.numpy())
    with torch.no_grad():
        expected = entry.model(x)
    assert sorted(out) == ["depth", "digit"]
    outputs = {spec.name: spec.shape for spec in loaded.metadata.get_output_schema().inputs}
    assert outputs == {"digit": (-1, 3), "depth": (-1, 1, 12, 12)}
    np.testing.assert_array_equal(loaded.input_example, entry.x[:1].numpy())  # v2's example
    for head, value in expected.items():
        assert isinstance(out[head], np.ndarray)
        np.testing.assert_allclose(out[head], value.numpy(), atol=1e-5)


BAD = {
    "no channel dim": (np.zeros((2, 12, 12), np.float32), r"\(2, 12, 12\).*\(-1, 1, 12, 12\)"),
    "wrong size": (np.zeros((2, 1, 10, 12), np.float32), r"\(-1, 1, 12, 12\)"),
    "wrong channels": (np.zeros((2, 3, 12, 12), np.float32), r"\(-1, 1, 12, 12\)"),
    "int64": (np.zeros((2, 1, 12, 12), np.int64), "int64 does not match expected dtype float32"),
    "float64": (np.zeros((2, 1, 12, 12)), "float64 does not match expected dtype float32"),
    "strings": (np.array([["a"]]), r"\(-1, 1, 12, 12\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_error_names_expected_shape_and_dtype(loaded, case):
    data, pattern = BAD[case]
    with pytest.raises(MlflowException, match=pattern) as info:
        loaded.predict(data)
    assert "Tensor('float32', (-1, 1, 12, 12))" in str(info.value)


def test_wrong_dataframe_is_refused_clearly(loaded):
    import pandas as pd

    with pytest.raises(MlflowException, match=r"\(-1, 1, 12, 12\)"):
        loaded.predict(pd.DataFrame({"a": [1.0, 2.0]}))


def test_wrapper_checks_input_when_mlflow_is_bypassed(loaded):
    wrapper = loaded.unwrap_python_model()
    with pytest.raises(MlflowException, match=r"float32 array of shape \(batch >= 1, 1, 12, 12\)"):
        wrapper.predict(None, np.zeros((0, 1, 12, 12), np.float32))


def test_promote_moves_champion_and_keeps_candidate(entry):
    promote(entry.uri, NAME, 1)
    client = entry.client
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "2"
    with pytest.raises(MlflowException):
        promote(entry.uri, NAME, 9)


def test_entry_loads_and_predicts_without_mtl(entry, monkeypatch):
    # The wrapper is pickled by value and the model is a pt2 graph: serving needs no mtl.
    for module in [m for m in sys.modules if m == "mtl" or m.startswith("mtl.")]:
        monkeypatch.setitem(sys.modules, module, None)
    with _registry(entry.uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert model.predict(entry.x.numpy())["digit"].shape == (4, 3)


def test_fixed_interrogate_round_trips_through_the_registry(entry):
    from mtl.config import ModelConfig
    from mtl.models import build_model
    from mtl.prune import fix_interrogate
    from mtl.tasks import DENSE_CLASSIFICATION

    tasks = TaskSet(
        "toy",
        (
            TaskSpec("left", CLASSIFICATION, 10, "accuracy", True),
            TaskSpec("semseg", DENSE_CLASSIFICATION, 5, "miou", True),
        ),
        in_channels=1,
        image_size=16,
    )
    torch.manual_seed(0)
    config = ModelConfig(name="interrogate", backbone="resnet", width=8, depth=2, num_heads=2)
    gated = build_model(config, tasks).eval()
    with torch.no_grad():
        for alpha in gated.alpha:  # a mixed pattern: some channels shared, some not
            alpha.copy_(torch.randn_like(alpha))
    fixed = fix_interrogate(gated)
    x = torch.rand(2, 1, 16, 16)
    picture = gate_pattern_figure(gated.gate_pattern(), "interrogate")
    version = register_fixed_model(
        entry.uri, entry.run_id, fixed, x, tasks, name="toy-ig", tags={}, picture=picture
    )
    with _registry(entry.uri):
        model = mlflow.pyfunc.load_model(f"models:/toy-ig/{version.version}")
    out = model.predict(x.numpy())
    with torch.no_grad():
        expected = fixed(x)
    assert out["semseg"].shape == (2, 5, 16, 16)
    for head, value in expected.items():
        np.testing.assert_allclose(out[head], value.numpy(), atol=1e-5)


def test_example_must_fit_the_task_set():
    with pytest.raises(ValueError, match=r"float32 batch \(B, 1, 12, 12\)"):
        register_fixed_model(
            "sqlite:///unused.db", "run", TwoHeads(), torch.zeros(2, 3, 12, 12), TASKS,
            name=NAME, tags={},
        )  # fmt: skip


def test_pictures_render_to_png():
    gates = gate_pattern_figure({"a": [0.0, 1.0, 0.5], "b": [0.2, 0.3, 0.4]}, "gates")
    routes = routes_figure({"a": [[0, 2], [1]], "b": [[3], [0, 1]]}, 4, "routes")
    for figure in (gates, routes):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        assert buffer.getvalue().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gate_pattern_figure({"a": [1.5]}, "bad")
    with pytest.raises(ValueError, match="experts \\[4\\] not in \\[0, 4\\)"):
        routes_figure({"a": [[4]]}, 4, "bad")


def _post(url: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_for_ping(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping within {timeout_s} s")


@pytest.mark.slow
def test_rest_endpoint_serves_every_head_and_refuses_bad_input(entry, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent  # the venv's mlflow and the uvicorn it launches
    env = {**os.environ, "MLFLOW_TRACKING_URI": entry.uri}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    command = [str(bin_dir / "mlflow"), "models", "serve", "--env-manager", "local"]
    command += ["-m", f"models:/{NAME}@candidate", "-p", str(port), "--host", "127.0.0.1"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(url, server, timeout_s=120)
        x = torch.randn(3, 1, 12, 12)
        status, body = _post(f"{url}/invocations", {"inputs": x.tolist()})
        assert status == 200, body
        with torch.no_grad():
            expected = entry.model(x)
        for head, value in expected.items():
            np.testing.assert_allclose(np.array(body["predictions"][head]), value, atol=1e-5)
        status, body = _post(f"{url}/invocations", {"inputs": x[:, 0].tolist()})
        assert status == 400, body
        assert "does not match expected shape (-1, 1, 12, 12)" in body["message"]
        status, body = _post(f"{url}/invocations", {"inputs": [[["a"]]]})
        assert status == 400 and "could not convert string to float" in body["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
