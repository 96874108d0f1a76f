"""A fixed single-gated MoE in the registry, on a real SQLite store: the K + 1 programs predict
what the trained model predicts at two thresholds, the FLOPs tags, loading without mtl, and
the refusals."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtl.models.single_gate import SingleGateMoE, branch_flops, confidence, expected_flops
from tests.models.test_single_gate import TASKSET, images, model

mlflow = pytest.importorskip("mlflow")

from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mtl.tracking import single_gate_registry  # noqa: E402
from mtl.tracking.single_gate_registry import register_single_gate  # noqa: E402

NAME = "tiny-single-gate"
SHAPE = "(-1, 1, 16, 16)"


def trained() -> SingleGateMoE:
    """Stage 3 with K = 2 experts unlike the base and each other (BatchNorm statistics moved)."""
    net = model(num_experts=2).train()
    x = images(16)
    net.init_from_base(net.features(x)[:2].clone())
    net.set_stage("experts")
    with torch.no_grad():
        for expert in net.experts:
            for p in expert.parameters():
                p.add_(0.3 * torch.randn_like(p))
        net(x)
    return net.eval()


def base_confidence(net: SingleGateMoE, x: torch.Tensor) -> torch.Tensor:
    net.set_stage("base")
    with torch.no_grad():
        conf = confidence(net(x), net.taskset)
    net.set_stage("experts")
    return conf


def eval_forward(net: SingleGateMoE, x: torch.Tensor, threshold: float) -> dict[str, np.ndarray]:
    net.threshold = threshold
    with torch.no_grad():
        return {head: value.numpy() for head, value in net(x).items()}


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """v1: threshold at the median confidence of the test batch (some rows exit), exit rate
    and assignment on the example; v2: threshold 1 (none exit), on labelled batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up costs more than the maths
    tmp = tmp_path_factory.mktemp("single_gate_registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sg", artifact_location=str(tmp / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    net = trained()
    x, example = images(12, seed=7), images(6, seed=3)
    half = float(base_confidence(net, x).median())
    labels = torch.arange(10).repeat(2)[:16]
    batches = [{"image": images(16, seed=11), "targets": {"left": labels}}]
    start = time.perf_counter()
    net.threshold = half
    v1 = register_single_gate(uri, run_id, net, example, TASKSET, name=NAME, tags={"a": "1"})
    seconds = time.perf_counter() - start
    net.threshold = 1.0
    v2 = register_single_gate(
        uri, run_id, net, example, TASKSET, name=NAME, tags={}, assignment_batches=iter(batches)
    )
    yield SimpleNamespace(
        uri=uri, client=client, run_id=run_id, net=net, x=x, example=example, half=half,
        batches=batches, versions={half: v1, 1.0: v2}, seconds=seconds,
    )  # fmt: skip
    torch.set_num_threads(threads)


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


def _load(entry, version: int | str = "candidate"):
    where = f"@{version}" if version == "candidate" else f"/{version}"
    with _registry(entry.uri):
        return mlflow.pyfunc.load_model(f"models:/{NAME}{where}")


@pytest.mark.parametrize("threshold", ["half exit", "none exit"])
def test_pyfunc_predicts_what_the_trained_model_predicts(entry, threshold):
    t = entry.half if threshold == "half exit" else 1.0
    exits = int((base_confidence(entry.net, entry.x) >= t).sum()) if t < 1 else 0
    assert 0 < exits < len(entry.x) or t == 1.0
    want = eval_forward(entry.net, entry.x, t)
    out = _load(entry, entry.versions[t].version).predict(entry.x.numpy())
    assert sorted(out) == sorted(want)
    worst = 0.0
    for head, value in want.items():
        assert isinstance(out[head], np.ndarray) and out[head].shape == value.shape
        worst = max(worst, float(np.abs(out[head] - value).max()))
    assert worst <= 1e-5
    # The experts matter: where a row does not exit its output is not the base's.
    base = {h: v.numpy() for h, v in entry.net.base(entry.net.prefix(entry.x), (16, 16)).items()}
    assert not np.allclose(out["left"], base["left"], atol=1e-3)
    print(f"threshold {t:.4f}: {exits} of {len(entry.x)} exit, max abs diff {worst:.2e}; "
          f"register_single_gate {entry.seconds:.1f} s")  # fmt: skip


def test_tags_hold_the_cost_at_the_threshold(entry):
    net, client = entry.net, entry.client
    parts = branch_flops(net, entry.example[:1])
    full = parts["base"] + parts["gate"] + parts["expert"]
    rate = float((base_confidence(net, entry.example) >= entry.half).float().mean())
    assert 0 < rate < 1
    for t, on_rate in ((entry.half, rate), (1.0, 0.0)):
        tags = client.get_model_version(NAME, entry.versions[t].version).tags
        assert float(tags["threshold"]) == t and tags["num_experts"] == "2"
        assert tags["branch_at"] == "1"
        assert int(tags["flops_base"]) == parts["base"] and int(tags["flops_full"]) == full
        assert float(tags["exit_rate"]) == pytest.approx(on_rate)
        expected = float(tags["expected_flops_per_image"])
        assert expected == pytest.approx(expected_flops(parts, on_rate))
        assert parts["base"] < expected <= full and tags["flops_per_image"] == str(expected)
        assert float(tags["verified_max_abs_diff"]) <= single_gate_registry.ATOL
        assert tags["heads"] == "left,semseg,depth" and tags["input"] == f"float32 {SHAPE}"
        assert tags["serve_max_rows"] == "1024" and "outputs" in tags
        picture = tags["structure_picture"]
        folder = f"registry/{NAME}-v{entry.versions[t].version}"
        assert picture == f"runs:/{entry.run_id}/{folder}/structure.png"
    v1 = client.get_model_version(NAME, entry.versions[entry.half].version).tags
    v2 = client.get_model_version(NAME, entry.versions[1.0].version).tags
    assert v1["a"] == "1" and v1["exit_rate_on"] == "example (6 images)"
    assert v1["assignment_on"].endswith("groups: all samples)")
    assert v2["exit_rate_on"] == "assignment_batches (16 images)"
    assert v2["assignment_on"] == "assignment_batches (16 images, groups: left label)"
    counts = json.loads(v2["assignment"])  # K x 10 label counts
    assert len(counts) == 2 and sum(map(sum, counts)) == 16
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "2"
    assert client.get_run(entry.run_id).info.status == "RUNNING"


def test_entry_loads_and_predicts_without_mtl(entry, monkeypatch):
    # The wrapper and the dispatch are pickled by value, the parts are pt2 graphs.
    want = eval_forward(entry.net, entry.x, entry.half)
    for module in [m for m in sys.modules if m == "mtl" or m.startswith("mtl.")]:
        monkeypatch.setitem(sys.modules, module, None)
    out = _load(entry, entry.versions[entry.half].version).predict(entry.x.numpy())
    for head, value in want.items():
        np.testing.assert_allclose(out[head], value, atol=1e-5, rtol=0)


def test_wrong_shape_input_is_refused_with_the_expected_shape(entry):
    loaded = _load(entry)
    with pytest.raises(MlflowException, match=r"\(2, 1, 12, 12\).*\(-1, 1, 16, 16\)"):
        loaded.predict(np.zeros((2, 1, 12, 12), np.float32))
    with pytest.raises(MlflowException, match="int64 does not match expected dtype float32"):
        loaded.predict(np.zeros((2, 1, 16, 16), np.int64))
    wrapper = loaded.unwrap_python_model()  # the wrapper's own check, when MLflow is bypassed
    with pytest.raises(MlflowException, match=r"float32 array of shape \(batch >= 1, 1, 16, 16\)"):
        wrapper.predict(None, np.zeros((3, 16, 16), np.float32))


def test_programs_that_differ_from_the_model_are_refused(entry, monkeypatch):
    monkeypatch.setattr(single_gate_registry, "ATOL", -1.0)  # any difference is too much
    net = entry.net
    net.threshold = entry.half
    with pytest.raises(ValueError, match=r"max abs difference .* on head '\w+'"):
        register_single_gate(entry.uri, entry.run_id, net, entry.example, TASKSET, name=NAME,
                             tags={})  # fmt: skip
    assert len(entry.client.search_model_versions(f"name='{NAME}'")) == 2  # nothing logged


def test_a_model_before_stage_three_and_empty_batches_are_refused(entry):
    net = model(num_experts=2)
    with pytest.raises(ValueError, match="stage 'base'"):
        register_single_gate(entry.uri, entry.run_id, net, entry.example, TASKSET, name=NAME,
                             tags={})  # fmt: skip
    with pytest.raises(ValueError, match="assignment_batches is empty"):
        register_single_gate(entry.uri, entry.run_id, entry.net, entry.example, TASKSET,
                             name=NAME, tags={}, assignment_batches=[])  # fmt: skip
