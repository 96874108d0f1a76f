"""Fixing a task-expert MoE: the static model equals the routed model (eval, hard top-k),
shares route prefixes, drops exactly the unused experts, costs less for all tasks in one pass
than for each task alone, and exports with torch.export."""

from __future__ import annotations

import pytest
import torch

from mtl.config import ModelConfig, MoEConfig
from mtl.models import build_model
from mtl.models.moe import MoEBlock, TaskMoE
from mtl.prune import (
    FixedMoE,
    PruneVerificationError,
    count_flops,
    count_params,
    fix_moe,
    moe_flops,
    verify_fixed,
)
from mtl.prune_moe import FixedMoELayer
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

# The same toy task sets and helpers as tests/models/test_moe.py (tests are not a package).
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
SIZES = {"width": 8, "depth": 3, "num_heads": 2}


def batch(taskset: TaskSet, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, taskset.in_channels, *taskset.image_size, generator=gen)
    if not taskset.multi_domain:
        return x, None
    return x, torch.randint(len(taskset.domains), (n,), generator=gen)


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


def force_routes(model: TaskMoE, logits: torch.Tensor) -> None:
    """Router logits of key i := ``logits[i]`` ``(K, L, E)`` (see tests/models/test_moe.py)."""
    K, L, E = logits.shape
    router = model.router
    with torch.no_grad():
        router.key_embed.weight.zero_()
        router.key_embed.weight[:, :K] = 10 * torch.eye(K)
        router.proj.weight.zero_()
        router.proj.weight[:, :K] = logits.reshape(K, L * E).T / 10
        router.proj.bias.zero_()


def one_hot_routes(routes: list[list[int]], num_experts: int = 4) -> torch.Tensor:
    return 8.0 * torch.nn.functional.one_hot(torch.tensor(routes), num_experts).float()


pytestmark = pytest.mark.usefixtures("one_thread")

# key 0 -> 0,1,2; key 1 -> 0,1,3; key 2 -> 0,2,3: one stream, then two, then three
PREFIXES = [[0, 1, 2], [0, 1, 3], [0, 2, 3]]


def moe_layers(fixed: FixedMoE) -> list[FixedMoELayer]:
    return [layer for layer in fixed.layers if isinstance(layer, FixedMoELayer)]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("kind", sorted(TASKSETS))
@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_fixed_equals_routed_model(backbone: str, kind: str, top_k: int) -> None:
    taskset = TASKSETS[kind]
    model = routed(backbone, taskset, top_k=top_k)
    fixed = fix_moe(model)
    assert not any("router" in name for name, _ in fixed.named_modules())
    x, domain = batch(taskset, 9, seed=5)
    assert verify_fixed(model, fixed, x, 1e-5, domain) <= 1e-5


@pytest.mark.parametrize("kind", sorted(TASKSETS))
@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_shared_prefixes_are_one_stream_and_unused_experts_go(backbone: str, kind: str) -> None:
    taskset = TASKSETS[kind]
    model = routed(backbone, taskset, top_k=1)
    force_routes(model, one_hot_routes(PREFIXES))
    fixed = fix_moe(model)
    layers = moe_layers(fixed)
    assert [len(layer.sources) for layer in layers] == [1, 2, 3]  # output streams per layer
    assert [len(layer.block.experts) for layer in layers] == [1, 2, 2]
    assert layers[2].inputs == [[0], [0, 1]]  # expert 2 reads stream 0, expert 3 both
    blocks = [b for b in model.blocks if isinstance(b, MoEBlock)]
    unused = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 3), (2, 0), (2, 1)]
    dropped = sum(count_params(blocks[layer].experts[e]) for layer, e in unused)
    assert count_params(fixed) == count_params(model) - count_params(model.router) - dropped
    x, domain = batch(taskset, 6, seed=2)
    assert verify_fixed(model, fixed, x, 1e-5, domain) <= 1e-5


def test_flops_all_tasks_in_one_pass_share_prefixes() -> None:
    model = routed("resnet", MULTI_TASK, top_k=1)
    force_routes(model, one_hot_routes(PREFIXES))
    x = batch(MULTI_TASK, 1)[0]
    flops = moe_flops(model, x)
    assert set(flops) == {"all", "left", "semseg", "depth"}
    single = [flops[t] for t in ("left", "semseg", "depth")]
    assert max(single) < flops["all"] < sum(single)


def test_flops_with_one_route_are_one_network_plus_the_heads() -> None:
    model = routed("vit", MULTI_TASK, top_k=2)
    force_routes(model, one_hot_routes([[1, 2, 3]] * 3) + one_hot_routes([[0, 0, 0]] * 3) / 2)
    x = batch(MULTI_TASK, 1)[0]
    flops = moe_flops(model, x)
    fixed = fix_moe(model)
    assert [len(layer.sources) for layer in moe_layers(fixed)] == [1, 1, 1]
    features = torch.rand(1, 8, 4, 4)  # the neck's output for one 16 px image (patch 4)
    heads = {t: count_flops(fixed.heads[t], features, (16, 16)) for t in fixed.heads}
    assert flops["all"] - flops["left"] == heads["semseg"] + heads["depth"]


def test_flops_per_domain() -> None:
    model = routed("resnet", MULTI_DOMAIN, top_k=1)
    force_routes(model, one_hot_routes(PREFIXES))
    flops = moe_flops(model, batch(MULTI_DOMAIN, 1)[0])
    assert flops["a"] == flops["b"] == flops["c"]  # same architecture, other experts
    assert flops["a"] < flops["all"] < 3 * flops["a"]


def test_multi_domain_fixed_model_needs_the_domain_only_when_routes_differ() -> None:
    model = routed("resnet", MULTI_DOMAIN, top_k=1)
    force_routes(model, one_hot_routes(PREFIXES))
    x, domain = batch(MULTI_DOMAIN, 4)
    with pytest.raises(ValueError, match="domain"):
        fix_moe(model)(x)
    force_routes(model, one_hot_routes([[2, 1, 0]] * 3))
    fixed = fix_moe(model)
    torch.testing.assert_close(fixed(x)["digit"], model(x, domain)["digit"])


@pytest.mark.parametrize("kind", sorted(TASKSETS))
@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_fixed_model_exports_with_a_dynamic_batch(backbone: str, kind: str) -> None:
    taskset = TASKSETS[kind]
    model = routed(backbone, taskset, top_k=2)
    force_routes(model, one_hot_routes(PREFIXES) + torch.rand(3, 3, 4))
    fixed = fix_moe(model)
    x, domain = batch(taskset, 4)
    batch_dim = torch.export.Dim("batch")
    if domain is None:  # how mtl.train.register exports: fixed(x)
        program = torch.export.export(fixed, (x,), dynamic_shapes=({0: batch_dim},))
    else:
        shapes = ({0: batch_dim}, {0: batch_dim})
        program = torch.export.export(fixed, (x, domain), dynamic_shapes=shapes)
    x2, domain2 = batch(taskset, 7, seed=9)
    args = (x2,) if domain2 is None else (x2, domain2)
    exported, direct = program.module()(*args), fixed(*args)
    assert list(exported) == list(direct)
    for head in direct:
        torch.testing.assert_close(exported[head], direct[head])


def test_fix_refuses_input_routing_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="input_routing"):
        fix_moe(routed("resnet", MULTI_TASK, input_routing=True))
    with pytest.raises(ValueError, match="subset"):
        fix_moe(routed("resnet", MULTI_TASK), ["nope"])


def test_fixed_for_one_task_predicts_only_it() -> None:
    model: TaskMoE = routed("vit", MULTI_TASK)
    fixed = fix_moe(model, ["semseg"])
    x = batch(MULTI_TASK, 3)[0]
    out = fixed(x)
    assert list(out) == ["semseg"]
    torch.testing.assert_close(out["semseg"], model(x)["semseg"])


def test_verify_fixed_raises_on_a_tampered_model() -> None:
    model = routed("resnet", MULTI_TASK)
    fixed = fix_moe(model)
    with torch.no_grad():
        moe_layers(fixed)[1].weights.mul_(1.5)
    with pytest.raises(PruneVerificationError, match="differs"):
        verify_fixed(model, fixed, batch(MULTI_TASK, 3)[0], 1e-5)
