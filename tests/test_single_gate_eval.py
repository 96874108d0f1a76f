"""Single-gated MoE evaluation: the one-pass threshold sweep against the model's own forward,
the gate's assignment and its collapse flag, and the two figures."""

from __future__ import annotations

import io
import math

import pytest
import torch

from mtl.config import ModelConfig
from mtl.losses import IGNORE_INDEX
from mtl.metrics import MetricAccumulator
from mtl.models import build_backbone, build_heads
from mtl.models.single_gate import SingleGateMoE, branch_flops, confidence, from_backbone
from mtl.single_gate_eval import (
    assignment,
    assignment_figure,
    group_names,
    sweep_figure,
    threshold_sweep,
)
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

TASKSET = TaskSet(
    "toy",
    (
        TaskSpec("left", CLASSIFICATION, 10, "accuracy", True),
        TaskSpec("semseg", DENSE_CLASSIFICATION, 5, "miou", True),
        TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),
    ),
    1,
    16,
)
DIGITS = TaskSet(
    "digits", (TaskSpec("digit", CLASSIFICATION, 10, "accuracy", True),), 1, 16, ("a", "b")
)
REGRESSION_ONLY = TaskSet("reg", (TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),), 1, 16)

pytestmark = pytest.mark.usefixtures("one_thread")


def model(taskset: TaskSet = TASKSET, **options) -> SingleGateMoE:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet", width=8, depth=3, num_heads=2)
    trunk = build_backbone(cfg, taskset)
    kw = {"branch_at": 1, "num_experts": 3, "threshold": 0.9, **options}
    return from_backbone(trunk, build_heads(cfg, taskset, trunk), taskset, **kw)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def batch(x: torch.Tensor, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    return {
        "image": x,
        "targets": {
            "left": torch.randint(0, 10, (n,), generator=gen),
            "semseg": torch.randint(0, 5, (n, 16, 16), generator=gen),
            "depth": torch.rand(n, 1, 16, 16, generator=gen),
        },
    }


def stage3(net: SingleGateMoE, x: torch.Tensor, perturb: bool = True) -> SingleGateMoE:
    """Stage 2 by hand (centroids: three samples' features), experts moved off the base."""
    net.eval()  # features with the running statistics, as the gate sees them in eval
    net.init_from_base(net.features(x)[:3].clone())
    net.set_stage("experts")
    if perturb:
        with torch.no_grad():
            for expert in net.experts:
                for p in expert.parameters():
                    p.add_(0.3 * torch.randn_like(p))
    return net


def reference(net: SingleGateMoE, batches: list[dict], threshold: float) -> dict[str, float]:
    """The model's own forward at ``threshold``: what every sweep row must equal."""
    net.threshold = threshold
    acc = MetricAccumulator(TASKSET)
    with torch.no_grad():
        for b in batches:
            acc.update(net(b["image"], b.get("domain")), b)
    return acc.compute()


@pytest.fixture(scope="module")
def swept():
    net = model()
    batches = [batch(images(12, seed), seed) for seed in (1, 2)]
    stage3(net, batches[0]["image"])
    net.eval()
    net.set_stage("base")
    with torch.no_grad():
        conf = torch.cat([confidence(net(b["image"]), TASKSET) for b in batches])
    net.set_stage("experts")
    net.train()  # the sweep must switch to eval itself and switch back
    middle = float(conf.median())
    thresholds = [1.0, middle, 1e-6]
    rows = threshold_sweep(net, batches, TASKSET, thresholds)
    return net, batches, conf, thresholds, rows


def test_sweep_rows_equal_the_models_own_forward_at_each_threshold(swept):
    net, batches, _, thresholds, rows = swept
    assert net.threshold == 0.9  # mode and threshold left as they were, in every module
    assert net.training and all(m.training for m in net.modules())
    net.eval()
    for t, row in zip(thresholds, rows, strict=True):
        expected = reference(net, batches, t)
        assert row["threshold"] == t
        assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-6, nan_ok=True)
        assert "mean_accuracy" in row and "semseg/miou" in row
    # the experts differ from the base, so never exiting and always exiting differ
    assert rows[0]["depth/rmse"] != pytest.approx(rows[2]["depth/rmse"], rel=1e-6)


def test_sweep_exit_rates_and_expected_flops(swept):
    net, batches, conf, thresholds, rows = swept
    parts = branch_flops(net, batches[0]["image"][:1])
    full = parts["base"] + parts["gate"] + parts["expert"]
    assert rows[0]["exit_rate"] == 0.0 and rows[0]["flops"] == full  # threshold 1: none exit
    assert rows[0]["flops_ratio"] == pytest.approx(full / parts["base"])
    assert rows[0]["flops_ratio"] > 1.5  # one expert costs about as much as the base branch
    assert rows[2]["exit_rate"] == 1.0 and rows[2]["flops_ratio"] == 1.0
    rate = float((conf >= thresholds[1]).double().mean())
    assert 0 < rate < 1 and rows[1]["exit_rate"] == pytest.approx(rate)
    assert rows[1]["flops"] == pytest.approx(parts["base"] + (1 - rate) * (full - parts["base"]))


def test_sweep_reports_delta_mtl_against_a_baseline(swept):
    net, batches, _, _, _ = swept
    baseline = {"left": 0.5, "semseg": 0.3, "depth": 1.0}
    (row,) = threshold_sweep(net, batches, TASKSET, [1.0], baseline)
    by_hand = (
        100
        / 3
        * (
            (row["left/accuracy"] - 0.5) / 0.5
            + (row["semseg/miou"] - 0.3) / 0.3
            - (row["depth/rmse"] - 1.0) / 1.0
        )
    )
    assert row["delta_mtl"] == pytest.approx(by_hand)


def test_sweep_refuses_an_unready_model_and_bad_thresholds(swept):
    net, batches, *_ = swept
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        threshold_sweep(net, batches, TASKSET, [0.0, 0.5])
    with pytest.raises(ValueError, match="no batches"):
        threshold_sweep(net, [], TASKSET, [0.5])
    net.set_stage("base")
    try:
        with pytest.raises(ValueError, match="set_stage"):
            threshold_sweep(net, batches, TASKSET, [0.5])
    finally:
        net.set_stage("experts")
    with pytest.raises(ValueError, match="never exit"):
        threshold_sweep(net, batches, REGRESSION_ONLY, [0.5])


def test_a_gate_that_sends_everything_to_one_expert_is_collapsed():
    net = model()
    x = images(10)
    stage3(net, x, perturb=False)
    with torch.no_grad():
        net.gate.weight.zero_()
        net.gate.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    b = batch(x, 3)
    result = assignment(net, [b], TASKSET)
    assert result["usage"] == [10, 0, 0] and result["samples"] == 10
    assert sum(map(sum, result["counts"])) == 10 and result["collapsed"]
    assert result["counts"][0] == b["targets"]["left"].bincount(minlength=10).tolist()
    assert result["usage_entropy"] == pytest.approx(0.0)
    p = torch.tensor([10.0, 0.0, 0.0]).softmax(0)
    assert result["gate_entropy"] == pytest.approx(float(-(p * p.log()).sum()) / math.log(3))
    assert result["min_share"] == pytest.approx(1 / 12)


def test_a_balanced_gate_is_not_collapsed_and_counts_follow_the_labels():
    net = model()
    three = images(3, seed=5)
    stage3(net, three, perturb=False)  # nearest centroid: copy i of sample j goes to expert j
    n = 12
    x = three[[i % 3 for i in range(n)]]
    labels = torch.tensor([(i // 3) % 4 for i in range(n)])
    labels[-1] = IGNORE_INDEX  # an unlabelled sample counts in the usage, not in a group
    batches = [batch(x[:6], 1), batch(x[6:], 2)]
    batches[0]["targets"]["left"], batches[1]["targets"]["left"] = labels[:6], labels[6:]
    result = assignment(net, batches, TASKSET)
    expected = [[0] * 10 for _ in range(3)]
    for i in range(n - 1):
        expected[i % 3][int(labels[i])] += 1
    assert result["counts"] == expected and result["group_by"] == "left label"
    assert result["usage"] == [4, 4, 4] and result["share"] == pytest.approx([1 / 3] * 3)
    assert result["usage_entropy"] == pytest.approx(1.0) and not result["collapsed"]
    assert 0 < result["gate_entropy"] < 1
    assert assignment(net, batches, TASKSET, min_share=0.5)["collapsed"]  # 1/3 < 0.5


def test_multi_domain_assignment_groups_by_domain():
    net = model(DIGITS)
    x = images(6)
    stage3(net, x, perturb=False)
    with torch.no_grad():
        net.gate.weight.zero_()
        net.gate.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    b = {"image": x, "targets": {"digit": torch.zeros(6, dtype=torch.long)}}
    b["domain"] = torch.tensor([0, 1, 1, 0, 1, 1])
    result = assignment(net, [b], DIGITS)
    assert result["counts"] == [[0, 0], [2, 4], [0, 0]] and result["group_by"] == "domain"
    assert group_names(DIGITS) == ["a", "b"] and group_names(TASKSET)[:2] == ["0", "1"]


def test_assignment_figure_is_a_heatmap_with_every_count_written():
    result = {
        "counts": [[5, 0], [1, 3], [0, 7]],
        "group_by": "domain",
        "share": [5 / 16, 4 / 16, 7 / 16],
        "usage_entropy": 0.97,
        "gate_entropy": 0.4,
        "collapsed": False,
    }
    fig = assignment_figure(result, ["a", "b"], "model v1")
    ax = fig.axes[0]
    assert ax.images[0].get_array().tolist() == [[5, 0], [1, 3], [0, 7]]
    assert [t.get_text() for t in ax.texts] == ["5", "0", "1", "3", "0", "7"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 (31%)", "1 (25%)", "2 (44%)"]
    fig.savefig(io.BytesIO(), format="png")  # it renders
    with pytest.raises(ValueError, match="3 group names for 2"):
        assignment_figure(result, ["a", "b", "c"], "model v1")


def test_sweep_figure_plots_the_curve_thresholds_and_references():
    rows = [
        {"threshold": 1.0, "flops": 300.0, "mean_accuracy": 0.90},
        {"threshold": 0.5, "flops": 120.0, "mean_accuracy": 0.80},
        {"threshold": 0.8, "flops": 200.0, "mean_accuracy": 0.88},
    ]
    refs = {"hard sharing": (100.0, 0.82), "task MoE": (400.0, 0.91)}
    fig = sweep_figure(rows, "mean_accuracy", refs)
    ax = fig.axes[0]
    curve, *markers = ax.lines
    assert list(curve.get_xdata()) == [120.0, 200.0, 300.0]  # sorted by cost
    assert list(curve.get_ydata()) == [0.80, 0.88, 0.90]
    assert [t.get_text() for t in ax.texts] == ["t=0.5", "t=0.8", "t=1"]
    assert [(m.get_xdata()[0], m.get_ydata()[0]) for m in markers] == list(refs.values())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["single-gated MoE", "hard sharing", "task MoE"]
    fig.savefig(io.BytesIO(), format="png")
    assert len(sweep_figure(rows, "mean_accuracy").axes[0].lines) == 1
    with pytest.raises(ValueError, match="delta_mtl"):
        sweep_figure(rows, "delta_mtl")
