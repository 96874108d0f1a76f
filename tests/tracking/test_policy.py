"""Registry names and the champion policy, on a real MLflow store (SQLite, no server)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mtl.config import DataConfig
from mtl.tasks import CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from mtl.tracking import policy  # noqa: E402
from mtl.tracking.registry import register_fixed_model  # noqa: E402

TASKS = TaskSet(
    "tiny",
    (
        TaskSpec("digit", CLASSIFICATION, 3, "accuracy", True),
        TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),
    ),
    in_channels=1,
    image_size=12,
)


class Heads(nn.Module):
    def __init__(self, heads: tuple[str, ...] = ("digit", "depth")) -> None:
        super().__init__()
        self.heads = heads
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.cls = nn.Linear(4, 3)
        self.reg = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv(x))
        out = {"digit": self.cls(h.mean(dim=(2, 3))), "depth": self.reg(h)}
        return {k: out[k] for k in self.heads}


def test_default_names_carry_a_non_default_source_and_a_task_subset():
    full = ("left", "right", "semseg")

    def name(tasks=full, **data):
        return policy.default_name("multimnist", DataConfig(**data), tasks, full, "hard_sharing")

    assert name() == "multimnist-hard_sharing"
    assert name(source="fashion_mnist") == "multimnist-fashion_mnist-hard_sharing"
    assert name(("left", "semseg")) == "multimnist-left+semseg-hard_sharing"
    files = DataConfig(benchmark="files", root="/data/my set")
    assert policy.default_name("files", files, ("a",), ("a",), "moe") == "files-my_set-moe"
    celeba = DataConfig(benchmark="celeba", root="/anywhere")
    assert policy.data_source(celeba) == "celeba"  # a published layout wherever it lives


def test_evaluation_data_names_what_the_metrics_were_measured_on():
    base = policy.eval_data(DataConfig())
    assert base == "mnist, val split, val_size=2000 seed=0"
    assert policy.eval_data(DataConfig(val_size=500)) != base
    assert policy.eval_data(DataConfig(), val_batches=3).endswith("first 3 batches")


def test_a_decision_names_every_compared_and_left_out_version():
    decision = policy.Decision("3", "left/accuracy", "max", "4", {"1": 0.5, "3": 0.8, "2": 0.7})
    decision.skipped["4"] = "other task set"
    lines = decision.lines("m")
    assert lines[0].startswith("promote m --best left/accuracy (max is best, among versions")
    assert lines[0].endswith("version 4's task set and evaluation data) chose version 3")
    assert decision.summary() == (
        "v3 by left/accuracy (max) among versions like v4: v1=0.5, v2=0.7, v3=0.8; "
        "left out v4: other task set"
    )
    assert lines[1:] == [
        "  version 1: left/accuracy = 0.5",
        "  version 2: left/accuracy = 0.7",
        "  version 3: left/accuracy = 0.8 <- champion",
        "  version 4: left out (other task set)",
    ]


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("policy", artifact_location=str(tmp_path / "art"))
    return uri, client, experiment


def _register(store, name, metrics, *, taskset=TASKS, source="mnist", eval_data="val A"):
    """One run with ``metrics`` logged as val/..., its model registered under ``name``."""
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, f"val/{key}", value)
    torch.manual_seed(0)
    model = Heads(tuple(h.name for h in taskset.heads)).eval()
    identity = policy.identity(taskset, source, with_domain=False)
    return register_fixed_model(
        uri, run_id, model, torch.randn(2, 1, *taskset.image_size), taskset, name=name,
        tags={"eval_data": eval_data}, identity=identity,
    )  # fmt: skip


def test_a_new_name_carries_its_identity_description_and_head_kinds(store):
    uri, client, _ = store
    version = _register(store, "tiny-hs", {"digit/accuracy": 0.5})
    model = client.get_registered_model("tiny-hs")
    assert model.tags["data_source"] == "mnist" and model.tags["task_set"] == "digit,depth"
    assert model.tags["input"] == "float32 (-1, 1, 12, 12)"
    assert model.tags["outputs"] == "digit=classification(3),depth=dense_regression(1)"
    assert "| data_source | `mnist` |" in model.description and "champion" in model.description
    assert version.tags["head_kinds"] == "digit=classification,depth=dense_regression"
    assert version.tags["benchmark"] == "tiny" and version.tags["eval_data"] == "val A"


@pytest.mark.parametrize(
    "change, fields",
    [
        ({"taskset": TASKS.subset(["digit"])}, ["task_set", "outputs"]),
        ({"source": "fashion_mnist"}, ["data_source"]),
        ({"taskset": dataclasses.replace(TASKS, image_size=(12, 16))}, ["input"]),
    ],
)
def test_another_source_task_set_or_input_never_takes_an_existing_names_alias(
    store, change, fields
):
    uri, client, _ = store
    _register(store, "tiny-hs", {"digit/accuracy": 0.5})
    with pytest.raises(policy.NameTaken) as refused:
        _register(store, "tiny-hs", {"digit/accuracy": 0.9}, **change)
    message = str(refused.value)
    for name in fields:
        assert f"{name} is " in message
    assert "tracking.model_name=tiny-hs-" in message and "mtl register CHECKPOINT --name" in message
    assert "nothing was registered" in message
    versions = client.search_model_versions("name='tiny-hs'")
    assert [str(v.version) for v in versions] == ["1"]  # no version logged, candidate unmoved
    assert client.get_registered_model("tiny-hs").aliases == {"candidate": 1}


def test_promote_best_picks_the_best_comparable_version_and_records_why(store):
    uri, client, _ = store
    _register(store, "m", {"digit/accuracy": 0.6, "depth/rmse": 0.30})
    _register(store, "m", {"digit/accuracy": 0.9, "depth/rmse": 0.50}, eval_data="val B")
    _register(store, "m", {"digit/accuracy": 0.7, "depth/rmse": 0.20})
    _register(store, "m", {"digit/accuracy": 0.7, "depth/rmse": 0.40})  # candidate: v4

    best = policy.promote_best(uri, "m", "digit/accuracy")
    assert (best.version, best.mode, best.reference) == ("4", "max", "4")  # the tie goes newer
    assert best.compared == {"1": 0.6, "3": pytest.approx(0.7), "4": pytest.approx(0.7)}
    assert "evaluation data 'val B', not version 4's 'val A'" in best.skipped["2"]
    assert client.get_registered_model("m").aliases == {"candidate": 4, "champion": 4}

    lowest = policy.promote_best(uri, "m", "depth/rmse")  # lower is better: its direction
    assert (lowest.version, lowest.mode) == ("3", "min")
    model = client.get_registered_model("m")
    assert model.aliases == {"candidate": 4, "champion": 3}
    assert model.tags["champion_decision"].startswith(
        "v3 by depth/rmse (min) among versions like v4: v1=0.3, v3=0.2, v4=0.4; left out v2: "
        "evaluation data 'val B'"
    )
    assert client.get_model_version("m", "3").tags["champion_metric"] == "depth/rmse=0.2"

    forced = policy.promote_best(uri, "m", "depth/rmse", mode="max")
    assert forced.version == "4"
    with pytest.raises(ValueError, match="no version of 'm' can be ranked on 'semseg/miou'"):
        policy.promote_best(uri, "m", "semseg/miou")
    with pytest.raises(ValueError, match="has no versions"):
        policy.promote_best(uri, "nothing-here", "digit/accuracy")


def test_a_run_whose_name_stands_for_another_source_is_refused_in_preflight(store):
    from mtl.config import Config
    from mtl.train.register import check_model_name, identity, model_name

    uri, client, _ = store
    other = Config()
    other.data.source = "fashion_mnist"
    client.create_registered_model("multimnist-hard_sharing", tags=identity(other))
    cfg = Config()  # data.source=mnist, default name multimnist-hard_sharing
    with pytest.raises(policy.NameTaken) as refused:
        check_model_name(cfg, uri)
    message = str(refused.value)
    assert "data_source is 'fashion_mnist' there, 'mnist' here" in message
    assert "tracking.model_name=multimnist-hard_sharing-mnist" in message
    assert model_name(other) == "multimnist-fashion_mnist-hard_sharing"
    check_model_name(other, uri)  # its own default name is free
    cfg.tracking.register = False
    check_model_name(cfg, uri)  # nothing will be registered: nothing to refuse
