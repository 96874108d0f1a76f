"""Single-gated MoE (pure PyTorch): stages, clustering initialisation, routing by cluster in
training and by gate in eval, the early exit at its threshold extremes, frozen base, bounds."""

from __future__ import annotations

import pytest
import torch

from mtl.config import ModelConfig
from mtl.models import build_backbone, build_heads
from mtl.models.single_gate import SingleGateMoE, confidence, from_backbone
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
REGRESSION_ONLY = TaskSet("reg", (TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),), 1, 16)

pytestmark = pytest.mark.usefixtures("one_thread")


def model(backbone: str = "resnet", taskset: TaskSet = TASKSET, **options) -> SingleGateMoE:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, width=8, depth=3, num_heads=2)
    trunk = build_backbone(cfg, taskset)
    kw = {"branch_at": 1, "num_experts": 3, "threshold": 0.9, **options}
    return from_backbone(trunk, build_heads(cfg, taskset, trunk), taskset, **kw)


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def to_stage3(net: SingleGateMoE, x: torch.Tensor) -> None:
    """Stage 2 by hand: centroids are three of the samples' own features."""
    net.init_from_base(net.features(x)[:3].clone())
    net.set_stage("experts")


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_stage_one_is_the_base_and_trains_only_the_base(backbone):
    net = model(backbone).train()
    net.set_stage("base")
    out = net(images())
    assert out["left"].shape == (8, 10) and out["semseg"].shape == (8, 5, 16, 16)
    sum(v.float().mean() for v in out.values()).backward()
    trained = {n.split(".")[0] for n, p in net.named_parameters() if p.grad is not None}
    assert trained == {"prefix", "base"}


def test_clustering_init_copies_the_base_and_the_gate_is_nearest_centroid():
    net = model().eval()
    x = images(16)
    to_stage3(net, x)
    z = net.features(x)
    assert torch.equal(net.assignment(x), net.clusters(z))
    # every expert equals the base, so the ensemble (base + expert) / 2 equals the base
    net.threshold = 1.0  # never exit: every sample goes through its expert
    net.set_stage("base")
    base = net(x)
    net.set_stage("experts")
    mixed = net(x)
    for name in base:
        torch.testing.assert_close(mixed[name], base[name], rtol=1e-5, atol=1e-6)


def test_stage_three_routes_by_cluster_and_trains_only_assigned_experts_and_gate():
    net = model().train()
    x = images(16)
    to_stage3(net, x)
    with torch.no_grad():  # no sample is nearest to centroid 2, yet the gate prefers expert 2
        net.centroids[2] = 1e3
        net.gate.bias[2] = 1e6
    route = net.clusters(net.features(x))
    used = set(route.tolist())
    assert 2 not in used and set(net.assignment(x).tolist()) == {2}
    out = net(x)
    loss = sum(v.float().mean() for v in out.values()) + net.auxiliary_losses()["gate"]
    loss.backward()
    for k, expert in enumerate(net.experts):
        has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())
        assert has_grad == (k in used), (k, used)
    assert net.gate.weight.grad is not None and net.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*net.prefix.parameters(), *net.base.parameters()])


def test_unfrozen_base_trains_in_stage_three():
    net = model(freeze_base=False).train()
    x = images()
    to_stage3(net, x)
    sum(v.float().mean() for v in net(x).values()).backward()
    assert any(p.grad is not None for p in net.prefix.parameters())


def test_exit_threshold_extremes_and_the_mixed_case():
    net = model().train()
    x = images(16)
    to_stage3(net, x)
    with torch.no_grad():  # make the experts differ from the base
        for expert in net.experts:
            for p in expert.parameters():
                p.add_(0.3 * torch.randn_like(p))
    net.eval()
    net.set_stage("base")
    base = net(x)
    net.set_stage("experts")
    conf = confidence(base, TASKSET)
    net.threshold = 1e-6  # everyone exits: the base's outputs
    for name, value in net(x).items():
        torch.testing.assert_close(value, base[name])
    net.threshold = float(conf.detach().median())
    out, gate = net(x), net.assignment(x)
    h = net.prefix(x)
    for b in range(16):
        if conf[b] >= net.threshold:
            torch.testing.assert_close(out["left"][b], base["left"][b])
        else:
            expert = net.experts[int(gate[b])](h[b : b + 1], (16, 16))["left"][0]
            torch.testing.assert_close(out["left"][b], (base["left"][b] + expert) / 2)


def test_confidence_is_the_least_confident_classification_head():
    outputs = {
        "left": torch.tensor([[10.0, 0.0], [0.0, 0.0]]),
        "semseg": torch.zeros(2, 4, 2, 2),
        "depth": torch.ones(2, 1, 2, 2),
    }
    torch.testing.assert_close(confidence(outputs, TASKSET), torch.tensor([0.25, 0.25]))
    outputs["semseg"] = torch.full((2, 4, 2, 2), 0.0).index_fill(1, torch.tensor([0]), 50.0)
    torch.testing.assert_close(
        confidence(outputs, TASKSET), torch.tensor([1.0, 0.5]), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"branch_at": 0}, "outside the trunk"),
        ({"branch_at": 3}, "allow 1..2"),
        ({"num_experts": 1}, "K >= 2"),
        ({"threshold": 0.0}, r"\(0, 1\]"),
        ({"threshold": 1.5}, r"\(0, 1\]"),
    ],
)
def test_bad_options_name_the_key_and_the_bounds(options, message):
    with pytest.raises(ValueError, match=message):
        model(**options)


def test_a_regression_only_task_set_must_never_exit():
    with pytest.raises(ValueError, match="threshold=1"):
        model(taskset=REGRESSION_ONLY)
    assert model(taskset=REGRESSION_ONLY, threshold=1.0).threshold == 1.0


def test_kmeans_finds_separated_clusters_and_refuses_too_few_samples():
    from mtl.models.single_gate import kmeans_centroids

    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=gen) for c in centres])
    found = kmeans_centroids(points, 3)
    nearest = torch.cdist(centres, found).amin(1)
    assert nearest.max() < 0.2
    with pytest.raises(ValueError, match="at least K=3"):
        kmeans_centroids(points[:2], 3)


def test_expected_flops_fall_linearly_with_the_exit_rate():
    from mtl.models.flops import count_flops
    from mtl.models.single_gate import branch_flops, expected_flops

    net = model().train()
    parts = branch_flops(net, images(1))
    assert net.training and net.prefix.training  # counting leaves the mode alone
    net.set_stage("base")
    assert parts["base"] == count_flops(net, images(1))  # the base model's own cost
    assert parts["expert"] > 0 and parts["gate"] == 2 * net.gate.in_features * 3
    assert expected_flops(parts, 1.0) == parts["base"]
    full = parts["base"] + parts["gate"] + parts["expert"]
    assert expected_flops(parts, 0.0) == full
    assert expected_flops(parts, 0.25) == pytest.approx(
        parts["base"] + 0.75 * (full - parts["base"])
    )


def test_counting_flops_leaves_an_eval_model_in_eval():
    """The FLOP counter's wrapper must not switch the branches' BatchNorms to train mode."""
    from mtl.models.single_gate import branch_flops

    net = model().eval()
    branch_flops(net, images(1))
    assert not any(m.training for m in net.modules())


def test_an_expert_no_sample_chose_still_gets_a_zero_gradient():
    """Workers all-reduce the same gradients whichever experts their samples chose."""
    net = model().train()
    x = images(8)
    to_stage3(net, x)
    net.centroids.copy_(torch.stack([net.features(x).mean(0), *[torch.full_like(
        net.centroids[0], 1e6)] * 2]))  # fmt: skip
    out = net(x)  # every sample's nearest centroid is 0: experts 1 and 2 are unused
    sum(v.float().mean() for v in out.values()).backward()
    for k in (1, 2):
        grads = [p.grad for p in net.experts[k].parameters()]
        assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert any(torch.count_nonzero(p.grad) for p in net.experts[0].parameters())
