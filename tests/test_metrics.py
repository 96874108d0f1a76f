"""Metrics against hand-computed values, additivity of the sums, Δ_MTL and baseline tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.baselines import (
    baseline_table,
    baseline_values,
    check_baseline,
    load_baseline,
    save_baseline,
)
from mtl.losses import IGNORE_INDEX
from mtl.metrics import (
    ANGLE_BINS,
    SALIENCY_THRESHOLDS,
    MetricAccumulator,
    delta_mtl,
    primary_metrics,
)
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
    TaskSet,
    TaskSpec,
)

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
DENSE = TaskSet(  # the kinds of NYUD-v2, PASCAL-Context and CelebA, at a rectangular size
    "dense",
    (
        TaskSpec("attr", BINARY, 1, "accuracy", True),
        TaskSpec("depth", DEPTH, 1, "abs_err", False),
        TaskSpec("normals", NORMALS, 3, "mean_angle", False),
        TaskSpec("sal", SALIENCY, 1, "max_f", True),
    ),
    in_channels=3,
    image_size=(5, 7),
)
SAL_DOMAINS = TaskSet(
    "sal_domains",
    (TaskSpec("sal", SALIENCY, 1, "max_f", True),),
    in_channels=3,
    image_size=(4, 6),
    domains=("a", "b"),
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


@pytest.mark.parametrize(
    "taskset",
    [MULTI_TASK, DIGITS, DENSE, SAL_DOMAINS],
    ids=["multi_task", "multi_domain", "new_kinds", "saliency_domains"],
)
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
    for spec in taskset.heads:
        outputs[spec.name], targets[spec.name] = random_pair(spec, n, taskset.image_size)
    batch = {"targets": targets, "domain": torch.randint(0, max(len(taskset.domains), 1), (n,))}
    return outputs, batch


def random_pair(spec: TaskSpec, n: int, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Random (output, target) of one head; new kinds leave about a quarter unlabelled."""
    k = spec.num_outputs
    drop = (torch.rand(n, 1, *size) < 0.25).float()  # (B, 1, H, W)
    if spec.kind == CLASSIFICATION:
        return torch.randn(n, k), torch.randint(0, k, (n,))
    if spec.kind == DENSE_CLASSIFICATION:
        return torch.randn(n, k, *size), torch.randint(0, k, (n, *size))
    if spec.kind == BINARY:
        return torch.randn(n), torch.randint(-1, 2, (n,)).float()  # -1: unlabelled
    if spec.kind == DEPTH:
        target = (torch.rand(n, 1, *size) * 4 + 0.1) * (1 - drop)  # 0: no measurement
        return target + torch.randn(n, 1, *size) * 0.3, target
    if spec.kind == NORMALS:
        target = F.normalize(torch.randn(n, 3, *size), dim=1) * (1 - drop)  # 0: unlabelled
        return target + torch.randn(n, 3, *size) * 0.4, target
    if spec.kind == SALIENCY:
        gt = (torch.rand(n, 1, *size) < 0.4).float()
        # logits that lean towards the truth, so that max F is not trivial
        return torch.randn(n, 1, *size) + 2 * gt - 1, gt + drop * 254  # 255: unlabelled
    return torch.randn(n, k, *size), torch.randn(n, k, *size)


def accumulate(taskset: TaskSet, batches: list[tuple[dict, dict]]) -> dict[str, float]:
    acc = MetricAccumulator(taskset)
    for outputs, batch in batches:
        acc.update(outputs, batch)
    return acc.compute()


def stacked(batches: list[tuple[dict, dict]], name: str) -> tuple[Tensor, Tensor]:
    """One head's outputs and targets of several batches, concatenated."""
    outputs = torch.cat([o[name] for o, _ in batches])
    return outputs, torch.cat([b["targets"][name] for _, b in batches])


def test_binary_accuracy_and_mean_accuracy() -> None:
    taskset = TaskSet(
        "celeba",
        (
            TaskSpec("smiling", BINARY, 1, "accuracy", True),
            TaskSpec("young", BINARY, 1, "accuracy", True),
            TaskSpec("id", CLASSIFICATION, 2, "accuracy", True),
        ),
        3,
        8,
    )
    outputs = {
        "smiling": torch.tensor([2.0, -1.0, 0.5, -3.0]),
        "young": torch.tensor([1.0, 1.0, 1.0, 1.0]),
        "id": logits_for(torch.tensor([0, 1, 1, 1]), 2),
    }
    targets = {
        "smiling": torch.tensor([1.0, 1.0, -1.0, 0.0]),  # 2 of 3 labelled right
        "young": torch.tensor([1.0, 0.0, 0.0, 0.0]),
        "id": torch.tensor([0, 1, 0, 0]),
    }
    m = accumulate(taskset, [(outputs, {"targets": targets})])
    assert m["smiling/accuracy"] == pytest.approx(2 / 3)
    assert m["young/accuracy"] == pytest.approx(1 / 4)
    assert m["mean_accuracy"] == pytest.approx((2 / 3 + 1 / 4 + 2 / 4) / 3)


def test_depth_metrics_match_direct_computation() -> None:
    torch.manual_seed(2)
    batches = [random_batch(DENSE, n) for n in (3, 4)]
    m = accumulate(DENSE.subset(["depth"]), batches)
    output, target = (t.double().numpy() for t in stacked(batches, "depth"))
    valid = target > 0
    err = np.abs(output - target)[valid]
    assert 0 < valid.mean() < 1
    assert m["depth/abs_err"] == pytest.approx(err.mean(), rel=1e-9)
    assert m["depth/rel_err"] == pytest.approx((err / target[valid]).mean(), rel=1e-9)


def direct_angles(output: Tensor, target: Tensor) -> Tensor:
    """Angles in degrees at the labelled pixels, with boolean indexing (the reference)."""
    pred = output.double().permute(0, 2, 3, 1).reshape(-1, 3)
    gt = target.double().permute(0, 2, 3, 1).reshape(-1, 3)
    labelled = gt.abs().sum(1) > 0
    pred, gt = pred[labelled], gt[labelled]
    cosine = (pred * gt).sum(1) / (pred.norm(dim=1) * gt.norm(dim=1))
    return torch.rad2deg(torch.acos(cosine.clamp(-1, 1)))


def test_normals_metrics_match_direct_computation() -> None:
    torch.manual_seed(3)
    batches = [random_batch(DENSE, n) for n in (4, 5)]
    m = accumulate(DENSE.subset(["normals"]), batches)
    angles = direct_angles(*stacked(batches, "normals"))
    assert m["normals/mean_angle"] == pytest.approx(angles.mean().item(), rel=1e-9)
    for t in (11.25, 22.5, 30):
        assert m[f"normals/within_{t:g}"] == pytest.approx((angles < t).double().mean().item())
    assert 0 < m["normals/within_11.25"] < m["normals/within_30"] < 1  # the data spreads


def test_median_angle_is_within_one_histogram_bin() -> None:
    resolution = 180 / ANGLE_BINS
    assert resolution <= 0.1
    errors = []
    for seed in range(5):
        torch.manual_seed(seed)
        outputs, batch = random_batch(DENSE.subset(["normals"]), 6)
        m = accumulate(DENSE.subset(["normals"]), [(outputs, batch)])
        exact = torch.median(direct_angles(outputs["normals"], batch["targets"]["normals"]))
        errors.append(abs(m["normals/median_angle"] - exact.item()))
    assert max(errors) <= resolution + 1e-9


def test_normals_by_hand() -> None:
    # angles 0, 45, 90 and 20 degrees, then one unlabelled pixel
    tan20 = math.tan(math.radians(20))
    pred = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 1, 0], [1, tan20, 0], [0, 0, 1]])
    gt = torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
    outputs = {"normals": pred.T.reshape(1, 3, 1, 5)}
    batch = {"targets": {"normals": gt.T.reshape(1, 3, 1, 5)}}
    m = accumulate(DENSE.subset(["normals"]), [(outputs, batch)])
    assert m["normals/mean_angle"] == pytest.approx((0 + 45 + 90 + 20) / 4, rel=1e-5)
    assert m["normals/median_angle"] == pytest.approx(20, abs=180 / ANGLE_BINS)  # lower median
    assert m["normals/within_11.25"] == 0.25
    assert m["normals/within_22.5"] == 0.5
    assert m["normals/within_30"] == 0.5


def direct_saliency(output: Tensor, target: Tensor, beta2: float = 0.3) -> tuple[float, float]:
    """(max F, IoU at 0.5) from precision and recall at each threshold, with numpy."""
    prob = torch.sigmoid(output).numpy().ravel()
    gt = target.numpy().ravel()
    labelled = gt <= 1
    prob, gt = prob[labelled], gt[labelled].astype(bool)
    fs, iou = [], math.nan
    for t in SALIENCY_THRESHOLDS.numpy():
        pred = prob >= t
        tp, fp, fn = (pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()
        precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        denom = beta2 * precision + recall
        fs.append((1 + beta2) * precision * recall / denom if denom > 0 else 0.0)
        if t == 0.5:
            iou = tp / (tp + fp + fn)
    return max(fs), iou


def test_saliency_metrics_match_direct_computation() -> None:
    torch.manual_seed(4)
    batches = [random_batch(DENSE, n) for n in (3, 6)]
    m = accumulate(DENSE.subset(["sal"]), batches)
    max_f, iou = direct_saliency(*stacked(batches, "sal"))
    assert 0.3 < max_f < 1 and 0 < iou < 1
    assert m["sal/max_f"] == pytest.approx(max_f, rel=1e-9)
    assert m["sal/iou"] == pytest.approx(iou, rel=1e-9)


def test_saliency_by_hand() -> None:
    # probabilities 0.9, 0.6, 0.3, 0.2 against truth 1, 0, 1, 0; one pixel ignored (255)
    probs = torch.tensor([0.9, 0.6, 0.3, 0.2, 0.99])
    outputs = {"sal": torch.logit(probs).view(1, 1, 1, 5)}
    batch = {"targets": {"sal": torch.tensor([1.0, 0, 1, 0, 255]).view(1, 1, 1, 5)}}
    m = accumulate(DENSE.subset(["sal"]), [(outputs, batch)])
    # t <= 0.3: TP 2, FP 1 -> P 2/3, R 1; t in (0.6, 0.9]: TP 1, FP 0 -> P 1, R 1/2
    f_low = 1.3 * (2 / 3) / (0.3 * 2 / 3 + 1)
    f_high = 1.3 * 0.5 / (0.3 + 0.5)
    assert m["sal/max_f"] == pytest.approx(max(f_low, f_high))
    assert m["sal/iou"] == pytest.approx(1 / 3)  # at 0.5: TP 1, FP 1 (0.6), FN 1 (0.3)


def test_unlabelled_dense_kinds_read_nan() -> None:
    n, (h, w) = 2, DENSE.image_size
    outputs, _ = random_batch(DENSE, n)
    targets = {
        "attr": torch.full((n,), -1.0),
        "depth": torch.zeros(n, 1, h, w),
        "normals": torch.zeros(n, 3, h, w),
        "sal": torch.full((n, 1, h, w), 255.0),
    }
    m = accumulate(DENSE, [(outputs, {"targets": targets})])
    assert all(math.isnan(v) for v in m.values()), m
    assert set(m) == {
        "attr/accuracy",
        "depth/abs_err",
        "depth/rel_err",
        "normals/mean_angle",
        "normals/median_angle",
        "normals/within_11.25",
        "normals/within_22.5",
        "normals/within_30",
        "sal/max_f",
        "sal/iou",
        "mean_accuracy",
    }


def test_primary_metrics_of_the_new_kinds() -> None:
    torch.manual_seed(5)
    m = accumulate(DENSE, [random_batch(DENSE, 4)])
    assert primary_metrics(m, DENSE) == {
        "attr": m["attr/accuracy"],
        "depth": m["depth/abs_err"],
        "normals": m["normals/mean_angle"],
        "sal": m["sal/max_f"],
    }


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
