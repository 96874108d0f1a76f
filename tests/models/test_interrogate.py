"""InterroGate: gate functions, gated forward/backward, the compute budget, task-block loading."""

from __future__ import annotations

import pytest
import torch

from mtl.config import InterroGateConfig, ModelConfig
from mtl.models import MODELS, build_model
from mtl.models.flops import count_flops_by_module
from mtl.models.gates import GATES, AnnealedSigmoidGate, StraightThroughGate, build_gate
from mtl.models.interrogate import InterroGate
from mtl.prune import fix_interrogate
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

HEADS = (
    TaskSpec("left", CLASSIFICATION, 10, "accuracy", True),
    TaskSpec("semseg", DENSE_CLASSIFICATION, 11, "miou", True),
    TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),
)
TASKSET = TaskSet("toy", HEADS, 1, 16)  # small images keep every test fast


pytestmark = pytest.mark.usefixtures("one_thread")


def make(backbone: str = "resnet", gate: str = "straight_through", **icfg) -> InterroGate:
    cfg = ModelConfig(
        name="interrogate",
        backbone=backbone,
        width=8,
        depth=2,
        num_heads=2,
        interrogate=InterroGateConfig(gate=gate, **icfg),
    )
    return build_model(cfg, TASKSET)


def diversify(model: InterroGate, seed: int = 0) -> InterroGate:
    """Perturb task blocks and set random gates, so streams differ (copies of the shared
    init with all gates shut give φ_s == φ_t and hence exactly zero gate gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.task_blocks.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for alpha in model.alpha:
            alpha.copy_(torch.randn(alpha.shape, generator=gen))
    return model


def test_registered() -> None:
    assert "interrogate" in MODELS and sorted(GATES) == ["annealed_sigmoid", "straight_through"]
    with pytest.raises(ValueError, match="model.interrogate.gate"):
        build_gate(InterroGateConfig(gate="nope"))
    with pytest.raises(ValueError, match="tau_per_task"):
        make(tau_per_task={"nope": 0.5})


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_forward_shapes_and_gradients(backbone: str, gate: str) -> None:
    model = diversify(make(backbone, gate)).train()
    with torch.no_grad():
        for beta in model.beta:
            beta.normal_()
    outputs = model(torch.rand(3, 1, 16, 16))
    assert list(outputs) == ["left", "semseg", "depth"]
    assert outputs["left"].shape == (3, 10)
    assert outputs["semseg"].shape == (3, 11, 16, 16)
    assert outputs["depth"].shape == (3, 1, 16, 16)
    sum(o.square().mean() for o in outputs.values()).backward()
    for name, param in [*model.alpha.named_parameters(), *model.beta.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert len(model.beta) == len(model.alpha) - 1  # nothing reads the last shared stream


def test_straight_through_is_hard_forward_sigmoid_backward() -> None:
    gate = StraightThroughGate().train()
    alpha = torch.tensor([-2.0, -0.1, 0.3, 4.0], requires_grad=True)
    g = gate(alpha)
    assert torch.equal(g, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    g.sum().backward()
    s = torch.sigmoid(alpha.detach())
    torch.testing.assert_close(alpha.grad, s * (1 - s))


def test_annealed_temperature_follows_progress_and_eval_is_binary() -> None:
    gate = AnnealedSigmoidGate(1.0, 0.01).train()
    alpha = torch.tensor([-0.5, 0.2, 1.0])
    before = gate(alpha)
    gate.set_progress(0.5)
    assert gate.temperature.item() == pytest.approx(0.1)
    gate.set_progress(1.0)
    assert gate.temperature.item() == pytest.approx(0.01)
    after = gate(alpha)
    assert (after - (alpha > 0).float()).abs().max() < (before - (alpha > 0).float()).abs().max()
    assert torch.equal(gate.eval()(alpha), torch.tensor([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("gate", sorted(GATES))
def test_model_progress_and_binary_gates_in_eval(gate: str) -> None:
    model = diversify(make(gate=gate))
    model.set_progress(0.3)
    if gate == "annealed_sigmoid":
        assert model.gate.temperature.item() == pytest.approx(0.01**0.3)
    for g in model.eval().gate_values():
        assert set(g.unique().tolist()) <= {0.0, 1.0}


def test_sparsity_zero_under_budget_positive_with_gradient_over_it() -> None:
    model = make(gate="annealed_sigmoid", tau=0.3, lambda_s=2.0).train()
    with torch.no_grad():
        for alpha in model.alpha:
            alpha.fill_(5.0)  # nearly all shared: r_t ≈ 0.007 < 0.3
    assert model.auxiliary_losses()["sparsity"].item() == 0.0
    with torch.no_grad():
        for alpha in model.alpha:
            alpha.fill_(-0.5)  # mostly task-specific: r_t = sigmoid(0.5) ≈ 0.62 > 0.3
    loss = model.auxiliary_losses()["sparsity"]
    rates = model.task_rates()
    expected = 2.0 * sum(r.item() - 0.3 for r in rates.values())
    assert loss.item() == pytest.approx(expected, rel=1e-5) and loss.item() > 0
    loss.backward()
    # Descent raises α (towards the shared feature), so the gradient is negative everywhere.
    assert all(alpha.grad is not None and (alpha.grad < 0).all() for alpha in model.alpha)


def test_tau_per_task_overrides() -> None:
    model = make(tau=0.2, tau_per_task={"depth": 0.9})
    assert model.tau.tolist() == pytest.approx([0.2, 0.2, 0.9])


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_rates_equal_the_task_block_flops_pruning_keeps(backbone: str) -> None:
    """r_t · Σ_l F_l is exactly what the fixed model spends in task t's blocks, for a random
    gate pattern: whole pre-layers of open blocks plus the open rows of the last layer."""
    model = make(backbone).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for alpha in model.alpha:
            alpha.copy_(torch.rand(alpha.shape, generator=generator) - 0.6)
        model.alpha[0][1].fill_(1.0)  # semseg: layer 0 fully shared, so its block is pruned
    fixed = fix_interrogate(model)
    x = torch.rand(1, 1, 16, 16)
    spent = count_flops_by_module(fixed, x)
    rates = model.task_rates()
    total = sum(model.block_flops)
    for t, rate in rates.items():
        blocks = sum(spent.get(f"layers.{layer}.streams.{t}.block", 0) for layer in range(2))
        assert rate.item() * total == pytest.approx(blocks, rel=1e-6), t
    assert "layers.0.streams.semseg.block" not in spent and rates["semseg"].item() > 0


def test_an_open_block_costs_its_whole_pre_layers() -> None:
    """One open channel already pays conv1 in full (a mean over channels would say 1/C)."""
    model = make().eval()
    with torch.no_grad():
        for alpha in model.alpha:
            alpha.fill_(1.0)
        model.alpha[1][0, 0] = -1.0  # left: one channel of layer 1 task-specific
    rate = model.task_rates()["left"].item()
    assert rate > model.whole_weights[1].item() > 1 / 16


def test_all_shared_equals_shared_path_of_each_task() -> None:
    model = diversify(make()).eval()
    with torch.no_grad():
        for alpha in model.alpha:
            alpha.fill_(1.0)
    x = torch.rand(2, 1, 16, 16)
    features = model.forward_features(x)
    shared = model.stem(x)
    for block in model.shared_blocks:
        shared = block(shared)
    for t in features:
        torch.testing.assert_close(features[t], shared)


def test_multi_domain_task_set_has_one_stream() -> None:
    taskset = TaskSet("digits", (HEADS[0],), 3, 16, domains=("a", "b"))
    cfg = ModelConfig(name="interrogate", width=8, depth=2)
    model = build_model(cfg, taskset).eval()
    x = torch.rand(4, 3, 16, 16)
    out = model(x, torch.tensor([0, 1, 1, 0]))
    assert list(out) == ["left"] and out["left"].shape == (4, 10)
    torch.testing.assert_close(out["left"], model(x)["left"])


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_load_task_blocks_round_trip(backbone: str) -> None:
    cfg = ModelConfig(backbone=backbone, width=8, depth=2, num_heads=2)
    single = build_model(cfg, TASKSET.subset(["semseg"]))
    state = single.backbone.state_dict()
    model = make(backbone)
    before = {k: v.clone() for k, v in model.task_blocks["left"].state_dict().items()}
    model.load_task_blocks({"semseg": state})
    for layer, block in enumerate(model.task_blocks["semseg"]):
        for key, value in block.state_dict().items():
            assert torch.equal(value, state[f"blocks.{layer}.{key}"]), key
    for key, value in model.necks["semseg"].state_dict().items():  # ViT: the final norm
        assert torch.equal(value, state[key])
    for key, value in model.task_blocks["left"].state_dict().items():
        assert torch.equal(value, before[key])  # other tasks untouched
    # Reading the task blocks back under backbone keys gives the loaded blocks exactly.
    restored = {
        f"blocks.{i}.{k}": v
        for i, block in enumerate(model.task_blocks["semseg"])
        for k, v in block.state_dict().items()
    }
    assert sorted(restored) == sorted(k for k in state if k.startswith("blocks."))
    with pytest.raises(KeyError, match="not a head"):
        model.load_task_blocks({"nope": state})
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(KeyError, match="blocks.1"):
        model.load_task_blocks({"left": partial})
