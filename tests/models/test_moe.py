"""Task-expert MoE: routed shapes, expert-aware execution against a per-sample reference,
gradients, top-k, stream sharing, the auxiliary losses, usage and routes, config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mtl.config import ConfigError, ModelConfig, MoEConfig, load_config
from mtl.losses import load_balance_loss, mutual_info_loss
from mtl.models import MODELS, build_model
from mtl.models.moe import MoEBlock, TaskMoE
from mtl.models.router import top_k_routes
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

MULTI_TASK = TaskSet(
    "toy",
    (
        TaskSpec("left", CLASSIFICATION, 10, "accuracy", True),
        TaskSpec("semseg", DENSE_CLASSIFICATION, 11, "miou", True),
        TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),
    ),
    1,
    16,
)
MULTI_DOMAIN = TaskSet(
    "digits", (TaskSpec("digit", CLASSIFICATION, 10, "accuracy", True),), 3, 16, ("a", "b", "c")
)
TASKSETS = {"multi_task": MULTI_TASK, "multi_domain": MULTI_DOMAIN}
# depth 3 at width 8: resnet blocks 8->8, 8->16 (projection shortcut), 16->16
SIZES = {"width": 8, "depth": 3, "num_heads": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


def routed(backbone: str, taskset: TaskSet, seed: int = 0, **moe: object) -> TaskMoE:
    """A routed model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **moe})
    model = build_model(ModelConfig(name="moe", backbone=backbone, moe=cfg, **SIZES), taskset)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(*batch(taskset, 6, seed=seed + 1))
    return model.eval()


def batch(taskset: TaskSet, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, taskset.in_channels, *taskset.image_size, generator=gen)
    if not taskset.multi_domain:
        return x, None
    return x, torch.randint(len(taskset.domains), (n,), generator=gen)


def force_routes(model: TaskMoE, logits: torch.Tensor) -> None:
    """Make the router's logits for key i equal ``logits[i]`` ``(K, L, E)``: key i embeds
    to 10·onehot(i), gelu(10) = 10, and the projection reads logits / 10 off it."""
    K, L, E = logits.shape
    router = model.router
    with torch.no_grad():
        router.key_embed.weight.zero_()
        router.key_embed.weight[:, :K] = 10 * torch.eye(K)
        router.proj.weight.zero_()
        router.proj.weight[:, :K] = logits.reshape(K, L * E).T / 10
        router.proj.bias.zero_()


def one_hot_routes(routes: list[list[int]], num_experts: int = 4) -> torch.Tensor:
    """Key -> per layer -> its one expert, as router logits ``(K, L, E)``."""
    return 8.0 * torch.nn.functional.one_hot(torch.tensor(routes), num_experts).float()


@torch.no_grad()
def reference(model: TaskMoE, x: torch.Tensor, domain: torch.Tensor | None) -> dict:
    """Per sample and per head, the MoE layers as plain sums over the top-k experts."""
    size = (x.shape[-2], x.shape[-1])
    outputs = {}
    for i, head in enumerate(model.heads):
        rows = []
        for b in range(x.shape[0]):
            key = int(domain[b]) if model.by_domain else i
            xb = x[b : b + 1]
            if model.router.input_embed is None:
                probs = model.key_probs()[key]  # (L, E)
            else:
                probs = model.router(torch.tensor([[key]]), xb)[0, 0]
            ids, weights = top_k_routes(probs, model.top_k, model.renormalize)
            h, layer = model.stem(xb), 0
            for block in model.blocks:
                if isinstance(block, MoEBlock):
                    residual, inner = block.pre(h)
                    mixed = sum(
                        w * block.experts[e](inner)
                        for e, w in zip(ids[layer].tolist(), weights[layer], strict=True)
                    )
                    h, layer = block.post(residual, mixed), layer + 1
                else:
                    h = block(h)
            rows.append(model.heads[head](model.neck(h), size))
        outputs[head] = torch.cat(rows)
    return outputs


def expected_shape(spec: TaskSpec, n: int, size: tuple[int, int]) -> tuple[int, ...]:
    if spec.kind == CLASSIFICATION:
        return (n, spec.num_outputs)
    return (n, spec.num_outputs, *size)


def test_registered() -> None:
    assert "moe" in MODELS


@pytest.mark.parametrize("kind", sorted(TASKSETS))
@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_routed_forward_shapes(backbone: str, kind: str) -> None:
    taskset = TASKSETS[kind]
    model = routed(backbone, taskset)
    outputs = model(*batch(taskset, 5))
    assert list(outputs) == [h.name for h in taskset.heads]
    for spec in taskset.heads:
        assert outputs[spec.name].shape == expected_shape(spec, 5, taskset.image_size)


@pytest.mark.parametrize("input_routing", [False, True])
@pytest.mark.parametrize("kind", sorted(TASKSETS))
@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_expert_aware_equals_per_sample_reference(
    backbone: str, kind: str, input_routing: bool
) -> None:
    taskset = TASKSETS[kind]
    model = routed(backbone, taskset, input_routing=input_routing)
    x, domain = batch(taskset, 7, seed=3)
    with torch.no_grad():
        actual = model(x, domain)
    expected = reference(model, x, domain)
    for head in expected:
        torch.testing.assert_close(actual[head], expected[head])


def test_expert_aware_equals_reference_in_training_mode() -> None:
    """No BatchNorm in a ViT, so training-mode outputs are per sample as well (the dense
    heads have BatchNorm: they stay in eval mode)."""
    model = routed("vit", MULTI_TASK).train()
    model.heads.eval()
    x, _ = batch(MULTI_TASK, 5)
    actual = model(x)
    for head, value in reference(model, x, None).items():
        torch.testing.assert_close(actual[head], value)


@pytest.mark.parametrize("kind", sorted(TASKSETS))
def test_each_expert_runs_once_per_layer_on_distinct_rows(kind: str) -> None:
    taskset = TASKSETS[kind]
    model = routed("resnet", taskset, top_k=1)
    # key 0 -> 0,1,2; key 1 -> 0,1,3; key 2 -> 0,2,3 (shared prefixes)
    force_routes(model, one_hot_routes([[0, 1, 2], [0, 1, 3], [0, 2, 3]]))
    calls: dict[tuple[int, int], list[int]] = {}
    moe_blocks = [b for b in model.blocks if isinstance(b, MoEBlock)]
    for layer, block in enumerate(moe_blocks):
        for e, expert in enumerate(block.experts):
            expert.register_forward_hook(
                lambda _m, inputs, _o, key=(layer, e): calls.setdefault(key, []).append(
                    inputs[0].shape[0]
                )
            )
    n = 6
    x, _ = batch(taskset, n)
    domain = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        model(x, domain if taskset.multi_domain else None)
    if taskset.multi_domain:  # one stream; samples grouped by their domain's expert
        expected = {(0, 0): [6], (1, 1): [4], (1, 2): [2], (2, 2): [2], (2, 3): [4]}
    else:  # three task streams; shared prefixes are computed once
        expected = {(0, 0): [n], (1, 1): [n], (1, 2): [n], (2, 2): [n], (2, 3): [2 * n]}
    assert calls == expected


def test_top_k_routes_respect_k_and_renormalise() -> None:
    probs = torch.softmax(torch.randn(5, 3, 6), dim=-1)
    ids, weights = top_k_routes(probs, 2)
    assert ids.shape == (5, 3, 2)
    assert (ids[..., 0] < ids[..., 1]).all()  # distinct, ascending
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, 3))
    best = probs.topk(2, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(ids, best)
    raw_ids, raw = top_k_routes(probs, 1, renormalize=False)
    torch.testing.assert_close(raw[..., 0], probs.max(dim=-1).values)
    assert torch.equal(top_k_routes(probs, 1)[1], torch.ones(5, 3, 1))  # exactly 1


@pytest.mark.parametrize("kind", sorted(TASKSETS))
def test_routes_have_k_experts_and_match_usage(kind: str) -> None:
    model = routed("vit", TASKSETS[kind], top_k=2)
    usage, routes = model.expert_usage(), model.routes()
    assert list(usage) == list(routes) == model.keys
    for key, layers in routes.items():
        assert len(layers) == 3 and all(len(set(e)) == 2 for e in layers)
        for probs, chosen in zip(usage[key], layers, strict=True):
            assert sum(probs) == pytest.approx(1.0, abs=1e-6)
            assert sorted(chosen) == sorted(torch.tensor(probs).topk(2).indices.tolist())
    pictures = pytest.importorskip("mtl.tracking.pictures")
    assert pictures.routes_figure(routes, model.num_experts, "routes") is not None


def test_input_routing_usage_is_the_last_batch_mean_per_key() -> None:
    model = routed("resnet", MULTI_DOMAIN, input_routing=True)
    x = batch(MULTI_DOMAIN, 4)[0]
    model(x, torch.tensor([0, 0, 2, 2]))
    usage = model.expert_usage()
    assert list(usage) == ["a", "c"]  # b is absent from the batch
    probs = model.router(torch.tensor([[0, 0]]), x[:2])[0].mean(dim=0)  # (L, E)
    torch.testing.assert_close(torch.tensor(usage["a"]), probs)
    assert list(model.routes()) == ["a", "c"]


def test_gradients_reach_router_and_the_experts_in_use() -> None:
    model = routed("resnet", MULTI_TASK, top_k=2, load_balance_weight=0.0, mutual_info_weight=0.0)
    force_routes(model, one_hot_routes([[0, 1, 2], [0, 1, 3], [0, 2, 3]]) / 4)  # soft, k=2
    model.train()
    outputs = model(batch(MULTI_TASK, 4)[0])
    sum(o.square().mean() for o in outputs.values()).backward()  # task losses only
    for name, param in model.router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    used = model.routes()
    for layer, block in enumerate(b for b in model.blocks if isinstance(b, MoEBlock)):
        in_use = {e for layers in used.values() for e in layers[layer]}
        for e, expert in enumerate(block.experts):
            grads = [p.grad for p in expert.parameters()]
            if e in in_use:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), (layer, e)
            else:
                assert all(g is None for g in grads), (layer, e)


def test_auxiliary_losses_reach_the_router_and_are_weighted() -> None:
    model = routed("vit", MULTI_DOMAIN, load_balance_weight=0.5, mutual_info_weight=0.25)
    model.train()
    model(*batch(MULTI_DOMAIN, 8))
    aux = model.auxiliary_losses()
    assert set(aux) == {"load_balance", "mutual_info"}
    probs, ids, keys = model._routing
    p = probs.flatten(0, 1).float()
    torch.testing.assert_close(aux["load_balance"], 0.5 * load_balance_loss(p, ids.flatten(0, 1)))
    torch.testing.assert_close(aux["mutual_info"], 0.25 * mutual_info_loss(p, keys.flatten(), 3))
    sum(aux.values()).backward()
    assert model.router.proj.weight.grad.abs().sum() > 0


def test_load_balance_is_one_when_uniform_and_grows_when_collapsed() -> None:
    E, N = 4, 8
    uniform = torch.full((N, 2, E), 1 / E)
    spread = torch.arange(N).remainder(E).view(N, 1, 1).expand(N, 2, 1)  # each expert N/E times
    assert load_balance_loss(uniform, spread).item() == pytest.approx(1.0)
    balanced = 0.1 / (E - 1) + (0.9 - 0.1 / (E - 1)) * torch.nn.functional.one_hot(
        spread[..., 0], E
    )  # confident, but every expert gets the same share
    assert load_balance_loss(balanced, spread).item() == pytest.approx(1.0)
    collapsed = torch.zeros(N, 2, E)
    collapsed[..., 0] = 1.0
    zero = torch.zeros(N, 2, 1, dtype=torch.long)
    assert load_balance_loss(collapsed, zero).item() == pytest.approx(E)
    half = torch.softmax(torch.tensor([2.0, 0, 0, 0]), 0).expand(N, 2, E)
    assert 1.0 < load_balance_loss(half, zero).item() < E


def test_load_balance_of_the_model_is_one_for_balanced_routes() -> None:
    taskset = TaskSet("four", tuple(TaskSpec(f"t{i}", CLASSIFICATION, 2, "accuracy", True)
                                    for i in range(4)), 1, 16)  # fmt: skip
    model = routed("resnet", taskset, top_k=1)
    force_routes(model, one_hot_routes([[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1]]))
    model(batch(taskset, 2)[0])
    balanced = model.auxiliary_losses()["load_balance"] / model.load_balance_weight
    force_routes(model, one_hot_routes([[0, 0, 0]] * 4))
    model(batch(taskset, 2)[0])
    collapsed = model.auxiliary_losses()["load_balance"] / model.load_balance_weight
    assert balanced.item() == pytest.approx(1.0, abs=1e-4)
    assert collapsed.item() == pytest.approx(4.0, abs=1e-2)


def test_mutual_information_is_lower_for_disjoint_experts() -> None:
    K, E = 2, 4
    keys = torch.tensor([0, 0, 1, 1])
    shared = torch.full((4, 1, E), 1 / E)
    disjoint = torch.tensor([[0.5, 0.5, 0, 0]] * 2 + [[0, 0, 0.5, 0.5]] * 2)
    overlapping = torch.tensor([[0.4, 0.4, 0.2, 0]] * 2 + [[0, 0.2, 0.4, 0.4]] * 2)
    mi_shared = mutual_info_loss(shared, keys, K).item()
    mi_disjoint = mutual_info_loss(disjoint[:, None], keys, K).item()
    mi_overlap = mutual_info_loss(overlapping[:, None], keys, K).item()
    assert mi_shared == pytest.approx(0.0, abs=1e-6)
    assert mi_disjoint == pytest.approx(-torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert mi_disjoint < mi_overlap < mi_shared


def test_multi_domain_needs_the_domain() -> None:
    model = routed("resnet", MULTI_DOMAIN)
    with pytest.raises(ValueError, match="domain"):
        model(batch(MULTI_DOMAIN, 2)[0])


def test_moe_layers_selects_the_routed_blocks() -> None:
    model = routed("vit", MULTI_TASK, moe_layers=[1])
    assert [isinstance(b, MoEBlock) for b in model.blocks] == [False, True, False]
    assert model.router.num_layers == 1
    assert all(len(layers) == 1 for layers in model.routes().values())
    model(batch(MULTI_TASK, 2)[0])


def test_experts_start_independent_and_deepcopy_after_training_forward() -> None:
    model = routed("resnet", MULTI_TASK)
    block = next(b for b in model.blocks if isinstance(b, MoEBlock))
    w = [expert.conv1.weight for expert in block.experts]
    assert not torch.equal(w[0], w[1])
    model.train()
    model(batch(MULTI_TASK, 2)[0])  # leaves routing with autograd history behind
    clone = copy.deepcopy(model)
    assert clone._routing is None


def test_config_validation_and_shipped_configs() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        load_config(None, ["model.moe.num_experts=2", "model.moe.top_k=3"])
    with pytest.raises(ConfigError, match="moe_layers"):
        load_config(None, ["model.depth=2", "model.moe.moe_layers=[2]"])
    for name in ("multimnist_moe", "digits_moe"):
        cfg = load_config(Path(__file__).parents[2] / "configs" / f"{name}.yaml")
        assert cfg.model.name == "moe"
