"""`mtl serve` end to end: real registry entries in a SQLite store, a real server process on
127.0.0.1, plain HTTP. Good requests answer 200; non-finite inputs, too many images and a
domain out of range 400 with a message; a body over the byte limit 413 before it is read."""

from __future__ import annotations

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

from mtl.tasks import CLASSIFICATION, TaskSet, TaskSpec

mlflow = pytest.importorskip("mlflow")

from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from test_registry import TASKS, TwoHeads  # noqa: E402 - tests/tracking is on sys.path

from mtl.cli import main  # noqa: E402
from mtl.tracking.registry import (  # noqa: E402
    JSON_BYTES_PER_VALUE,
    REQUEST_OVERHEAD_BYTES,
    register_fixed_model,
)

MAX_ROWS = 8
DOMAINS = TaskSet(
    "toy-digits",
    (TaskSpec("digit", CLASSIFICATION, 10, "accuracy", True),),
    in_channels=3,
    image_size=16,
    domains=("a", "b", "c"),
)
MTL = Path(sys.executable).parent / "mtl"  # the console script of this environment


def _domain_moe() -> tuple[nn.Module, nn.Module]:
    """A routed multi-domain task-expert MoE (random router: the domains route differently)
    and its fixed model."""
    from mtl.config import ModelConfig, MoEConfig
    from mtl.models import build_model
    from mtl.prune import fix_moe

    torch.manual_seed(0)
    config = ModelConfig(
        name="moe", backbone="resnet", width=8, depth=2, moe=MoEConfig(num_experts=4, top_k=2)
    )
    model = build_model(config, DOMAINS).eval()
    routes = {str(r) for r in model.routes().values()}
    assert len(routes) > 1, "the test needs domains that route differently"
    return model, fix_moe(model)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two registered entries with serve_max_rows=8: images only, and (image, domain)."""
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serving", artifact_location=str(tmp / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    torch.manual_seed(0)
    plain = TwoHeads().eval()
    x = torch.randn(4, 1, 12, 12)
    register_fixed_model(uri, run_id, plain, x, TASKS, name="plain", tags={}, max_rows=MAX_ROWS)
    routed, fixed = _domain_moe()
    images, domain = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    register_fixed_model(
        uri, run_id, fixed, images, DOMAINS, name="routed", tags={}, domain=domain,
        max_rows=MAX_ROWS,
    )  # fmt: skip
    return SimpleNamespace(uri=uri, tmp=tmp, plain=plain, routed=routed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(store, model_uri: str, *extra: str) -> Iterator[SimpleNamespace]:
    """`mtl serve` in its own process group; PATH holds only the system dirs (a fresh shell
    without the venv activated), so nothing may be found on PATH by name."""
    port = _free_port()
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(MTL), "serve", model_uri, "--port", str(port), "--tracking-uri", store.uri]
    log_path = store.tmp / f"serve-{port}.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*command, *extra], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            _wait_for_ping(url, server, log_path, timeout_s=180)
            print(f"mtl serve {model_uri}: up in {time.perf_counter() - started:.1f} s")
            yield SimpleNamespace(url=url, port=port, pid=server.pid, log=log_path)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _wait_for_ping(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mtl serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mtl serve did not answer /ping within {timeout_s} s")


def _no_bare_nan(token: str) -> float:
    raise AssertionError(f"the response holds a bare {token}")


def _post(url: str, body: object) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read(), parse_constant=_no_bare_nan)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read(), parse_constant=_no_bare_nan)


def _raw_post(port: int, body: bytes, *, expect: bool = False, chunked: bool = False) -> bytes:
    """POST /invocations over a plain socket; returns the raw response (status line first).

    ``expect``: send ``Expect: 100-continue`` and the body only after ``100 Continue``, as
    curl does for large bodies. ``chunked``: no Content-Length, the body in 64 KiB chunks.
    """
    head = [b"POST /invocations HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json"]
    head.append(b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body))
    if expect:
        head.append(b"Expect: 100-continue")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        if expect:
            first = sock.recv(65536)
            if not first.startswith(b"HTTP/1.1 100"):  # a final answer before the body was
                return first + _read_to_close(sock)  # sent; its body may come in a later packet
        try:
            if chunked:
                for i in range(0, len(body), 65536):
                    piece = body[i : i + 65536]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")
            else:
                sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        return _read_to_close(sock)


def _read_to_close(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return answer


@pytest.fixture(scope="module")
def plain_server(store):
    with _serving(store, "models:/plain@candidate") as server:
        yield server


@pytest.fixture(scope="module")
def routed_server(store):
    with _serving(store, "models:/routed@candidate") as server:
        yield server


@pytest.mark.slow
def test_good_request_is_answered_and_only_on_loopback(store, plain_server):
    import psutil

    x = torch.randn(MAX_ROWS, 1, 12, 12)  # exactly the limit
    status, body = _post(f"{plain_server.url}/invocations", {"inputs": x.tolist()})
    assert status == 200, body
    with torch.no_grad():
        expected = store.plain(x)
    for head, value in expected.items():
        np.testing.assert_allclose(np.array(body["predictions"][head]), value, atol=1e-5)
    listening = {
        c.laddr.ip
        for c in psutil.Process(plain_server.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {"127.0.0.1"}


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused_with_400(plain_server, value):
    x = np.zeros((3, 1, 12, 12), np.float32)
    x[1, 0, 5, 5] = value
    status, body = _post(f"{plain_server.url}/invocations", {"inputs": x.tolist()})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "images [1] hold NaN or infinite values (1 of 3 images)" in body["message"]


@pytest.mark.slow
def test_too_many_images_are_refused_with_400(plain_server):
    x = np.zeros((MAX_ROWS + 1, 1, 12, 12), np.float32)
    started = time.perf_counter()
    status, body = _post(f"{plain_server.url}/invocations", {"inputs": x.tolist()})
    seconds = time.perf_counter() - started
    assert status == 400, body
    assert (
        f"{MAX_ROWS + 1} images in one request; this model takes at most {MAX_ROWS}"
        in (body["message"])
    )
    print(f"{MAX_ROWS + 1} images (limit {MAX_ROWS}): 400 in {seconds * 1e3:.0f} ms")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["content-length", "expect-100-continue", "chunked"])
def test_a_body_over_the_byte_limit_gets_413_before_it_is_read(plain_server, how):
    limit = MAX_ROWS * 144 * JSON_BYTES_PER_VALUE + REQUEST_OVERHEAD_BYTES
    body = b"[" + b"0.0, " * (60 * 2**20 // 5) + b"0.0]"  # ~60 MB, as in the issue
    assert len(body) > limit
    started = time.perf_counter()
    answer = _raw_post(
        plain_server.port, body, expect=how == "expect-100-continue", chunked=how == "chunked"
    )
    seconds = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    message = json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"]
    assert f"exceeds this server's limit of {limit} bytes" in message
    print(f"{len(body) / 1e6:.0f} MB body ({how}): 413 in {seconds * 1e3:.0f} ms")


@pytest.mark.slow
def test_domain_model_predicts_per_domain_over_rest(store, routed_server):
    x = torch.rand(5, 3, 16, 16)
    for d in range(3):
        domain = torch.full((5,), d)
        body = {"inputs": {"image": x.tolist(), "domain": domain.tolist()}}
        status, answer = _post(f"{routed_server.url}/invocations", body)
        assert status == 200, answer
        with torch.no_grad():
            expected = store.routed(x, domain)["digit"]
        np.testing.assert_allclose(np.array(answer["predictions"]["digit"]), expected, atol=1e-5)
    status, answer = _post(
        f"{routed_server.url}/invocations", {"inputs": {"image": x.tolist(), "domain": [0] * 4}}
    )
    assert status == 400 and "'domain' must be int64 of shape (5,)" in answer["message"], answer
    status, answer = _post(
        f"{routed_server.url}/invocations", {"inputs": {"image": x.tolist(), "domain": [3] * 5}}
    )
    assert status == 400 and "values must be in 0..2 (0=a, 1=b, 2=c)" in answer["message"]


def test_output_that_overflows_is_refused_not_returned(store):
    """A finite input far out of range overflows float32; the caller gets an error naming
    the images, never an array holding inf or NaN."""
    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(store.uri)
    try:
        model = mlflow.pyfunc.load_model("models:/plain@candidate")
    finally:
        mlflow.set_registry_uri(previous)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    x = np.zeros((2, 1, 12, 12), np.float32)
    x[1] = np.finfo(np.float32).max
    with torch.no_grad():
        overflows = not torch.isfinite(store.plain(torch.from_numpy(x))["digit"][1]).all()
    assert overflows, "the test needs an input that overflows the model"
    with pytest.raises(MlflowException, match=r"output 'digit' is not finite for images \[1\]"):
        model.predict(x)


@pytest.mark.slow
def test_serve_errors_are_one_line_before_loading(store, plain_server, capsys):
    argv = ["serve", "models:/absent@candidate", "--tracking-uri", store.uri]
    assert main([*argv, "--port", str(_free_port())]) == 2
    assert "absent" in capsys.readouterr().err
    taken = ["serve", "models:/plain@candidate", "--tracking-uri", store.uri]
    assert main([*taken, "--port", str(plain_server.port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{plain_server.port}" in err
