"""Metrics against hand-computed values, additivity of the sums, Δ_MTL and baseline tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtl.losses import IGNORE_INDEX
from mtl.metrics import (
    MetricAccumulator,
    baseline_table,
    baseline_values,
    check_baseline,
    delta_mtl,
    load_baseline,
    primary_metrics,
    save_baseline,
)
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

MULTI_TASK = TaskSet(
    "toy",
    (
        TaskSpec("left", CLASSIFICATION, 3, "accuracy", True),
        TaskSpec("semseg", DENSE_CLASSIFICATION, 4, "miou", True),
        TaskSpec("recon", DENSE_REGRESSION, 1, "rmse", False),
    ),
    in_channels=1,
    image_size=2,
)
DIGITS = TaskSet(
    "digits",
    (TaskSpec("digit", CLASSIFICATION, 3, "accuracy", True),),
    in_channels=1,
    image_size=2,
    domains=("a", "b", "c"),
)


def logits_for(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``labels``: (B,) -> (B, K), (B, H, W) -> (B, K, H, W)."""
    one_hot = F.one_hot(labels, num_classes).float()
    return one_hot if labels.ndim == 1 else one_hot.permute(0, 3, 1, 2)


def multi_task_batch() -> tuple[dict[str, torch.Tensor], dict]:
    outputs = {
        "left": logits_for(torch.tensor([0, 1, 2, 2]), 3),
        "semseg": logits_for(torch.tensor([[[0, 1], [2, 2]]]).repeat(4, 1, 1), 4),
        "recon": torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).repeat(4, 1, 1, 1),
    }
    targets = {
        "left": torch.tensor([0, 1, 1, 0]),
        "semseg": torch.tensor([[[0, 1], [1, 2]]]).repeat(4, 1, 1),
        "recon": torch.zeros(4, 1, 2, 2),
    }
    return outputs, {"targets": targets}


def test_multi_task_metrics_match_hand_computation() -> None:
    acc = MetricAccumulator(MULTI_TASK)
    acc.update(*multi_task_batch())
    m = acc.compute()
    assert m["left/accuracy"] == pytest.approx(0.5)
    # class 0: I=1,U=1; class 1: I=1,U=2; class 2: I=1,U=2; class 3 never occurs: left out
    assert m["semseg/miou"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["semseg/pixel_accuracy"] == pytest.approx(0.75)
    assert m["recon/rmse"] == pytest.approx(math.sqrt((1 + 4 + 9 + 16) / 4))
    assert m["recon/mae"] == pytest.approx(2.5)
    assert m["mean_accuracy"] == pytest.approx(0.5)
    assert primary_metrics(m, MULTI_TASK) == {
        "left": m["left/accuracy"],
        "semseg": m["semseg/miou"],
        "recon": m["recon/rmse"],
    }


def test_ignored_pixels_do_not_count() -> None:
    taskset = MULTI_TASK.subset(["semseg"])
    acc = MetricAccumulator(taskset)
    pred = torch.tensor([[[0, 1], [1, 1]]])
    target = torch.tensor([[[0, IGNORE_INDEX], [1, 0]]])
    acc.update({"semseg": logits_for(pred, 4)}, {"targets": {"semseg": target}})
    m = acc.compute()
    assert m["semseg/pixel_accuracy"] == pytest.approx(2 / 3)
    assert m["semseg/miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert "mean_accuracy" not in m  # no classification head


def test_multi_domain_metrics_per_domain() -> None:
    acc = MetricAccumulator(DIGITS)
    outputs = {"digit": logits_for(torch.tensor([0, 1, 2, 2, 0]), 3)}
    batch = {
        "targets": {"digit": torch.tensor([0, 1, 0, 2, 1])},
        "domain": torch.tensor([0, 0, 1, 1, 1]),
    }
    acc.update(outputs, batch)
    m = acc.compute()
    assert m["a/accuracy"] == pytest.approx(1.0)
    assert m["b/accuracy"] == pytest.approx(1 / 3)
    assert math.isnan(m["c/accuracy"])  # absent domain: NaN, and left out of the mean
    assert m["mean_accuracy"] == pytest.approx((1 + 1 / 3) / 2)


@pytest.mark.parametrize("taskset", [MULTI_TASK, DIGITS], ids=["multi_task", "multi_domain"])
def test_totals_round_trip_and_additivity(taskset: TaskSet) -> None:
    torch.manual_seed(0)
    batches = [random_batch(taskset, n) for n in (5, 3, 7)]
    whole, first, second = (MetricAccumulator(taskset) for _ in range(3))
    for i, (outputs, batch) in enumerate(batches):
        whole.update(outputs, batch)
        (first if i == 0 else second).update(outputs, batch)
    totals = whole.totals()
    assert totals.dtype == torch.float64 and totals.ndim == 1
    assert whole.compute(totals) == whole.compute()
    # What an all-reduce over two ranks does: add their sums.
    torch.testing.assert_close(first.totals() + second.totals(), totals)
    reduced = whole.compute(first.totals() + second.totals())
    for key, value in whole.compute().items():
        assert reduced[key] == pytest.approx(value, nan_ok=True)


def random_batch(taskset: TaskSet, n: int) -> tuple[dict, dict]:
    outputs, targets = {}, {}
    size = taskset.image_size
    for spec in taskset.heads:
        k = spec.num_outputs
        if spec.kind == CLASSIFICATION:
            outputs[spec.name], targets[spec.name] = torch.randn(n, k), torch.randint(0, k, (n,))
        elif spec.kind == DENSE_CLASSIFICATION:
            outputs[spec.name] = torch.randn(n, k, size, size)
            targets[spec.name] = torch.randint(0, k, (n, size, size))
        else:
            outputs[spec.name] = torch.randn(n, k, size, size)
            targets[spec.name] = torch.randn(n, k, size, size)
    batch = {"targets": targets, "domain": torch.randint(0, max(len(taskset.domains), 1), (n,))}
    return outputs, batch


def test_empty_accumulator_and_shape_check() -> None:
    acc = MetricAccumulator(MULTI_TASK)
    assert (acc.totals() == 0).all()
    assert math.isnan(acc.compute()["left/accuracy"])
    with pytest.raises(ValueError, match="shape"):
        acc.compute(torch.zeros(3, dtype=torch.float64))


def test_delta_mtl_sign_and_value() -> None:
    metrics = {"left/accuracy": 0.9, "semseg/miou": 0.4, "recon/rmse": 0.12}
    baseline = {"left": 0.8, "semseg": 0.5, "recon": 0.1}
    # left +12.5 %, semseg -20 %, recon: rmse rose 20 % and lower is better -> -20 %
    expected = 100 / 3 * (0.125 - 0.2 - 0.2)
    assert delta_mtl(metrics, baseline, MULTI_TASK) == pytest.approx(expected)
    better = {"left/accuracy": 0.8, "semseg/miou": 0.5, "recon/rmse": 0.05}
    assert delta_mtl(better, baseline, MULTI_TASK) == pytest.approx(100 / 3 * 0.5)
    assert delta_mtl(better, baseline, MULTI_TASK) > 0


def test_delta_mtl_errors() -> None:
    metrics = {"left/accuracy": 0.9, "semseg/miou": 0.4, "recon/rmse": 0.12}
    with pytest.raises(ValueError, match=r"no value for \['recon'\]"):
        delta_mtl(metrics, {"left": 0.8, "semseg": 0.5}, MULTI_TASK)
    with pytest.raises(ValueError, match="0"):
        delta_mtl(metrics, {"left": 0.8, "semseg": 0.0, "recon": 0.1}, MULTI_TASK)
    with pytest.raises(ValueError, match="recon/rmse"):
        delta_mtl(
            {"left/accuracy": 1.0, "semseg/miou": 1.0},
            {"left": 1, "semseg": 1, "recon": 1},
            MULTI_TASK,
        )


def test_baseline_save_load_round_trip(tmp_path: Path) -> None:
    metrics = {"left/accuracy": 0.8, "semseg/miou": 0.5, "recon/rmse": 0.1, "recon/mae": 0.05}
    table = baseline_table(MULTI_TASK, metrics, {"model": {"backbone": "resnet"}})
    path = tmp_path / "sub" / "baseline.json"
    save_baseline(path, table)
    loaded = load_baseline(path)
    assert loaded == table
    check_baseline(loaded, MULTI_TASK)
    assert baseline_values(loaded) == {"left": 0.8, "semseg": 0.5, "recon": 0.1}
    assert loaded["tasks"]["recon"] == {
        "metric": "recon/rmse",
        "value": 0.1,
        "higher_is_better": False,
    }
    assert delta_mtl(metrics, baseline_values(loaded), MULTI_TASK) == pytest.approx(0.0)


GOOD = {
    "benchmark": "toy",
    "tasks": {"left": {"metric": "left/accuracy", "value": 0.8, "higher_is_better": True}},
    "config": {},
}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"benchmark": None}, "'benchmark' is missing"),
        ({"tasks": {}}, "'tasks' is empty"),
        ({"config": "x"}, "'config'"),
        (
            {
                "tasks": {
                    "left": {"metric": "left/accuracy", "value": "high", "higher_is_better": True}
                }
            },
            "tasks.left.value",
        ),
        ({"tasks": {"left": {"metric": "left/accuracy", "value": 0.8}}}, "higher_is_better"),
        ({"tasks": {"left": {"value": 0.8, "higher_is_better": True}}}, "tasks.left.metric"),
    ],
)
def test_load_baseline_validation_errors(tmp_path: Path, change: dict, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ValueError, match=match) as err:
        load_baseline(path)
    assert str(path) in str(err.value)


def test_load_baseline_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_baseline(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_baseline(tmp_path / "broken.json")


def test_check_baseline_against_taskset() -> None:
    with pytest.raises(ValueError, match="benchmark 'toy', not 'digits'"):
        check_baseline(GOOD, DIGITS)
    with pytest.raises(ValueError, match=r"no entry for \['semseg', 'recon'\]"):
        check_baseline(GOOD, MULTI_TASK)
    flipped = {**GOOD, "tasks": {"left": {**GOOD["tasks"]["left"], "higher_is_better": False}}}
    with pytest.raises(ValueError, match="expected 'left/accuracy'"):
        check_baseline(flipped, MULTI_TASK.subset(["left"]))
