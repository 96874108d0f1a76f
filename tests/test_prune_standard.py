"""Pruning and fixing on the standard backbones (torchvision ResNet-18/34/50, timm ViT-S/16).

The same properties as tests/test_prune.py and tests/test_prune_moe.py check on the small
trunks, on the library's own blocks: the fixed InterroGate equals the binarised gated model,
pruned torchvision and timm blocks compute exactly the kept rows, FLOPs at the extremes are
hard sharing's and T task trunks', the budget weights are the real blocks' FLOPs, the fixed
models export, the fixed MoE equals the routed model, and pretrained weights seed every task
block and expert.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torchvision
from timm.models.vision_transformer import Block as TimmBlock
from torch import Tensor, nn

from mtl.config import ModelConfig, MoEConfig
from mtl.models import build_model
from mtl.models.backbones import block_type
from mtl.models.flops import count_flops, count_flops_by_module
from mtl.models.interrogate import ROW_SLICED, InterroGate
from mtl.models.moe import MoEBlock, TaskMoE
from mtl.models.standard import TorchvisionResNet
from mtl.prune import ChannelSelect, PrunedTimmBlock, fix_interrogate, prune_block, verify_fixed
from mtl.prune_moe import FixedMoELayer, fix_moe
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DEPTH, TaskSet, TaskSpec

SIZE = (32, 48)  # vit_s16: a 2x3 grid of 16 px patches, plus the class token
TASKSET = TaskSet(
    "toy",
    (
        TaskSpec("label", CLASSIFICATION, 10, "accuracy", True),
        TaskSpec("semseg", DENSE_CLASSIFICATION, 5, "miou", True),
        TaskSpec("depth", DEPTH, 1, "abs_err", False),
    ),
    3,
    SIZE,
)
T = len(TASKSET.heads)
BASIC = "torchvision.models.resnet.BasicBlock"
BOTTLENECK = "torchvision.models.resnet.Bottleneck"
TIMM = "timm.models.vision_transformer.Block"
# Per backbone, the first block of its second stage: a ResNet's strided block with a
# projection shortcut (layer2.0), a ViT's middle block.
SECOND_STAGE = {"resnet18": 2, "resnet34": 3, "resnet50": 3, "vit_s16": 5}

R18, R34, R50 = ("resnet18", 32), ("resnet34", 32), ("resnet50", 32)
R50_OS8, VIT = ("resnet50", 8), ("vit_s16", 32)
ARCHS = [R18, R50, R50_OS8, VIT]  # every property; resnet34 once (InterroGate equality)


def arch_id(arch: tuple[str, int]) -> str:
    return arch[0] if arch[1] == 32 else f"{arch[0]}-os{arch[1]}"


pytestmark = pytest.mark.usefixtures("one_thread")


def config(name: str, arch: tuple[str, int], **kwargs: object) -> ModelConfig:
    backbone, output_stride = arch
    return ModelConfig(
        name=name, backbone=backbone, output_stride=output_stride, head_channels=8, **kwargs
    )


def images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


@functools.cache
def gated(arch: tuple[str, int]) -> InterroGate:
    """A gated model with distinct task blocks, random β and BatchNorm statistics of mixed
    streams, in eval mode. Built once per module (the tests set every gate they read)."""
    torch.manual_seed(0)
    model = build_model(config("interrogate", arch), TASKSET)
    with torch.no_grad():
        for p in model.task_blocks.parameters():  # relative, so deep stacks stay in range
            p.mul_(1 + 0.2 * torch.randn_like(p))
        for beta in model.beta:
            beta.normal_()
        for alpha in model.alpha:
            alpha.normal_()  # the statistics see mixed streams, as after training
        model.train()
        for seed in range(2):
            model(images(4, seed=10 + seed))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    gated.cache_clear()


def set_gates(model: InterroGate, pattern: list[Tensor]) -> None:
    """Binary pattern per layer, ``(T, C_l)`` bool, True = shared feature."""
    with torch.no_grad():
        for alpha, shared in zip(model.alpha, pattern, strict=True):
            alpha.copy_(torch.where(shared, 1.0, -1.0))


def random_pattern(model: InterroGate, p_shared: float, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(a.shape, generator=gen) < p_shared for a in model.alpha]


def uniform_pattern(model: InterroGate, shared: bool) -> list[Tensor]:
    return [torch.full(a.shape, shared) for a in model.alpha]


def last_conv(block: nn.Module) -> nn.Module:
    """The row-sliced layer of a (pruned) torchvision or timm block."""
    if isinstance(block, PrunedTimmBlock):
        return block.fc2
    if isinstance(block, TimmBlock):
        return block.mlp.fc2
    return block.conv3 if hasattr(block, "conv3") else block.conv2


def out_rows(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# --- 1. InterroGate: fixed == binarised gated -------------------------------------------


@pytest.mark.parametrize("arch", [*ARCHS, R34], ids=arch_id)
def test_fixed_interrogate_equals_binarised_gated_model(arch: tuple[str, int]) -> None:
    model = gated(arch)
    k = SECOND_STAGE[arch[0]]
    if arch[0] != "vit_s16":
        assert model.shared_blocks[k].downsample is not None  # a projection shortcut
    x = images(2, seed=1)
    with torch.no_grad():
        set_gates(model, uniform_pattern(model, shared=True))
        all_shared = model(x)
    fractions = (0.5,) if arch == R34 else (0.2, 0.5, 0.85)  # resnet34: as resnet18, deeper
    for seed, p_shared in enumerate(fractions):
        pattern = random_pattern(model, p_shared, seed=seed)
        pattern[k][:] = False  # every task task-specific: the shared block goes
        pattern[k + 1][0] = True  # label takes every shared channel: no task block
        pattern[k + 1][1] = False  # semseg computes every channel itself
        set_gates(model, pattern)
        fixed = fix_interrogate(model)
        assert fixed.layers[k].shared is None
        assert not fixed.layers[k - 1].mixes  # nothing reads x_s^{k-1} any more
        assert fixed.layers[k + 1].streams["label"].block is None
        assert not fixed.layers[k + 1].streams["semseg"].reads_shared
        for layer, shared in enumerate(model.binary_gates()):
            for i, task in enumerate(model.task_blocks):
                block, specific = fixed.layers[layer].streams[task].block, int((~shared[i]).sum())
                if 0 < specific < shared.shape[1]:  # pruned to exactly its open rows
                    assert out_rows(last_conv(block)) == specific, (layer, task)
        assert verify_fixed(model, fixed, x, atol=1e-5) <= 1e-5
        with torch.no_grad():
            expected, actual = model(x), fixed(x)
        for task in expected:
            torch.testing.assert_close(actual[task], expected[task], atol=1e-5, rtol=0)
            # the gates matter: the streams are not all the shared one
            assert (expected[task] - all_shared[task]).abs().max() > 1e-4, task


# --- 2. Pruned torchvision and timm blocks -----------------------------------------------


def randomise_bn(module: nn.Module, seed: int) -> None:
    """Affine parameters and running statistics away from their init, so that slicing
    the wrong BatchNorm channels shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                C = bn.num_features
                bn.weight.copy_(1 + 0.3 * torch.randn(C, generator=gen))
                bn.bias.copy_(0.3 * torch.randn(C, generator=gen))
                bn.running_mean.copy_(0.3 * torch.randn(C, generator=gen))
                bn.running_var.copy_(0.5 + torch.rand(C, generator=gen))


def random_keep(channels: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(channels, generator=gen)[: channels // 3]
    return keep.sort().values


def check_pruned(block: nn.Module, x: Tensor, channel_dim: int, seed: int) -> nn.Module:
    """Prune ``block`` to random rows and check they equal the full block's; return it."""
    block.eval()
    with torch.no_grad():
        full = block(x)
        keep = random_keep(full.shape[channel_dim], seed)
        pruned = prune_block(block, keep, full.shape[channel_dim]).eval()
        torch.testing.assert_close(pruned(x), full.index_select(channel_dim, keep))
    assert out_rows(last_conv(pruned)) == len(keep)
    return pruned


# (arch, output stride, block index): identity and projection shortcuts of both block
# types, strided and dilated.
TORCHVISION_BLOCKS = {
    "basic-identity": ("resnet18", 32, 1),
    "basic-projection": ("resnet18", 32, 2),
    "basic-dilated-projection": ("resnet18", 8, 4),
    "bottleneck-projection": ("resnet50", 32, 0),
    "bottleneck-identity": ("resnet50", 32, 1),
    "bottleneck-strided-projection": ("resnet50", 32, 3),
    "bottleneck-dilated-identity": ("resnet50", 8, 15),
}


@pytest.mark.parametrize("case", sorted(TORCHVISION_BLOCKS))
def test_pruned_torchvision_block_equals_the_full_blocks_rows(case: str) -> None:
    arch, output_stride, index = TORCHVISION_BLOCKS[case]
    torch.manual_seed(0)
    backbone = TorchvisionResNet(arch, 3, output_stride).eval()
    randomise_bn(backbone, seed=index)
    with torch.no_grad():
        x = backbone.stem(images(2))
        for block in backbone.blocks[:index]:
            x = block(x)
    block = backbone.blocks[index]
    pruned = check_pruned(block, x, channel_dim=1, seed=index)
    assert type(pruned) is type(block)  # torchvision's own forward runs
    last = "3" if block_type(block) == BOTTLENECK else "2"
    assert block_type(block) == (BOTTLENECK if arch == "resnet50" else BASIC)
    kept = getattr(pruned, f"conv{last}").out_channels
    assert getattr(pruned, f"bn{last}").num_features == kept
    for name in ("conv1", "conv2") if last == "3" else ("conv1",):  # they stay whole
        assert getattr(pruned, name).out_channels == getattr(block, name).out_channels
    if block.downsample is None:
        assert isinstance(pruned.downsample, ChannelSelect)
    else:
        assert pruned.downsample[0].out_channels == pruned.downsample[1].num_features == kept


@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_pruned_timm_block_equals_the_full_blocks_channels(layer_scale: float | None) -> None:
    torch.manual_seed(0)
    block = TimmBlock(48, num_heads=4, init_values=layer_scale)
    if layer_scale is not None:  # per-channel factors, so slicing the wrong ones shows
        with torch.no_grad():
            block.ls2.gamma.uniform_(0.2, 2.0)
    x = torch.randn(3, 7, 48)  # 6 patch tokens and the class token
    pruned = check_pruned(block, x, channel_dim=2, seed=1)
    assert isinstance(pruned, PrunedTimmBlock)
    assert pruned.hidden[0].out_features == block.mlp.fc1.out_features  # fc1 stays whole


# --- 3. FLOPs at the extremes and in between ----------------------------------------------


def flops(model: nn.Module) -> int:
    return count_flops(model, images(1))


@pytest.mark.parametrize("arch", ARCHS, ids=arch_id)
def test_flops_at_the_extremes_and_monotone_in_between(arch: tuple[str, int]) -> None:
    """All shared (τ = 0) costs what hard sharing costs; all task-specific (τ = 1) costs the
    stem once plus T task trunks plus the heads; with one task kept shared (so its shared
    block stays whole), closing nested sets of the others' channels lowers the FLOPs at
    every step, from τ = 1 down to the τ = 0 pattern."""
    model = gated(arch)
    hard = build_model(config("hard_sharing", arch), TASKSET)
    hard_flops, trunk, stem = flops(hard), flops(hard.backbone), flops(hard.backbone.parts().stem)
    heads = hard_flops - trunk
    set_gates(model, uniform_pattern(model, shared=True))
    assert flops(fix_interrogate(model)) == hard_flops
    set_gates(model, uniform_pattern(model, shared=False))
    assert flops(fix_interrogate(model)) == stem + T * (trunk - stem) + heads
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(a.shape, generator=gen) for a in model.alpha]
    history = [stem + T * (trunk - stem) + heads]
    for fraction in (0.75, 0.4, 0.1, 0.0):  # task-specific fraction of label and semseg
        pattern = [s >= fraction for s in scores]
        for shared in pattern:
            shared[2] = True  # depth reads every shared channel
        set_gates(model, pattern)
        history.append(flops(fix_interrogate(model)))
    assert all(a > b for a, b in itertools.pairwise(history)), history
    assert history[-1] == hard_flops


# --- 4. The budget weights are the real blocks' FLOPs -------------------------------------


def inputs_of(block: nn.Module, names: tuple[str, ...], x: Tensor) -> dict[str, Tensor]:
    """What each named submodule of ``block`` reads when ``block(x)`` runs."""
    seen: dict[str, Tensor] = {}
    modules = dict(block.named_modules())

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            seen[name] = inputs[0]

        return record

    hooks = [modules[n].register_forward_hook(hook(n)) for n in names if n in modules]
    try:
        with torch.no_grad():
            block(x)
    finally:
        for handle in hooks:
            handle.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS, ids=arch_id)
def test_block_flops_are_measured_on_the_real_blocks(arch: tuple[str, int]) -> None:
    model = gated(arch)
    expected_rows = {BASIC: ("conv2", "downsample"), BOTTLENECK: ("conv3", "downsample")}
    expected_rows[TIMM] = ("mlp.fc2",)
    total = sum(model.block_flops)
    with torch.no_grad():
        h = model.stem(torch.zeros(1, 3, *SIZE))
    for layer, block in enumerate(model.shared_blocks):
        kind = block_type(block)
        assert ROW_SLICED[kind] == expected_rows[kind]
        assert model.block_flops[layer] == count_flops(block, h)
        seen = inputs_of(block, ROW_SLICED[kind], h)
        modules = dict(block.named_modules())
        rows = sum(count_flops(modules[n], x) for n, x in seen.items())
        assert 0 < rows < model.block_flops[layer]
        weights = (model.whole_weights[layer].item(), model.row_weights[layer].item())
        assert weights[1] * total == pytest.approx(rows, rel=1e-6), layer
        assert sum(weights) * total == pytest.approx(model.block_flops[layer], rel=1e-6)
        with torch.no_grad():
            h = block(h)
    # r_t · Σ F is what the fixed model spends in task t's blocks (one open block pays its
    # whole pre-layers, the rows only as open)
    set_gates(model, random_pattern(model, 0.7, seed=3))
    spent = count_flops_by_module(fix_interrogate(model), images(1))
    L = len(model.shared_blocks)
    for task, rate in model.task_rates().items():
        blocks = sum(spent.get(f"layers.{i}.streams.{task}.block", 0) for i in range(L))
        assert rate.item() * total == pytest.approx(blocks, rel=1e-5), task


# --- 5. The fixed models export -------------------------------------------------------------


def check_export(fixed: nn.Module) -> None:
    """``export_fixed`` (how registration exports: a dynamic batch), then the program on
    another batch size equals the module."""
    from mtl.tracking.registry import export_fixed  # imports MLflow: only this test pays

    program, _ = export_fixed(fixed, images(2, seed=4))
    x = images(3, seed=5)
    with torch.no_grad():
        direct, exported = fixed(x), program.module()(x)
    assert list(exported) == list(direct)
    for task in direct:
        torch.testing.assert_close(exported[task], direct[task])


@pytest.mark.parametrize("arch", [R18, VIT], ids=arch_id)
def test_fixed_interrogate_exports(arch: tuple[str, int]) -> None:
    model = gated(arch)
    k = SECOND_STAGE[arch[0]]
    # Task-specific channels only around the second stage: the export's graph stays small
    # and still holds every kind of fixed layer (dropped shared block, channel selects,
    # concatenation with a permutation, the β mix).
    pattern = uniform_pattern(model, shared=True)
    mixed = random_pattern(model, 0.5, seed=6)
    pattern[k - 1], pattern[k + 1] = mixed[k - 1], mixed[k + 1]
    pattern[k][:] = False
    set_gates(model, pattern)
    check_export(fix_interrogate(model))


# --- 6. Task-expert MoE: fixed == routed --------------------------------------------------

# Per backbone, the MoE layers: resnet18's block 2 and resnet50's blocks 0 and 3 have a
# projection shortcut (3 and 13 also a stride or a dilation).
MOE_LAYERS = {R18: [1, 2, 5], R50: [0, 3, 7], R50_OS8: [7, 13], VIT: [0, 5, 11]}
EXPERT_TYPES = {R18: BASIC, R50: BOTTLENECK, R50_OS8: BOTTLENECK}


def routed(arch: tuple[str, int], top_k: int, layers: list[int] | None = None) -> TaskMoE:
    """A routed model whose tasks route differently, with BatchNorm statistics, in eval."""
    torch.manual_seed(0)
    layers = MOE_LAYERS[arch] if layers is None else layers
    moe = MoEConfig(moe_layers=layers, num_experts=3, top_k=top_k)
    model = build_model(config("moe", arch, moe=moe), TASKSET)
    L = len(layers)
    # Task t's experts at layer l: (t + l) mod 3 first, (t + l + 1) mod 3 second, so that
    # every task's route differs at every layer for top_k 1 and 2 alike.
    ranks = torch.tensor([[[(t + layer + j) % 3 for j in range(2)] for layer in range(L)]
                          for t in range(T)])  # fmt: skip
    one_hot = nn.functional.one_hot(ranks, 3).float()  # (T, L, 2, 3)
    logits = 4.0 * one_hot[:, :, 0] + 3.0 * one_hot[:, :, 1] + 0.5 * torch.rand(T, L, 3)
    router = model.router
    with torch.no_grad():  # key t embeds to 10·onehot(t) and projects to logits[t]
        router.key_embed.weight.zero_()
        router.key_embed.weight[:, :T] = 10 * torch.eye(T)
        router.proj.weight.zero_()
        router.proj.weight[:, :T] = logits.reshape(T, L * 3).T / 10
        router.proj.bias.zero_()
        model.train()
        for s in range(2):
            model(images(4, seed=20 + s))
    return model.eval()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("arch", ARCHS, ids=arch_id)
def test_fixed_moe_equals_routed_model(arch: tuple[str, int], top_k: int) -> None:
    model = routed(arch, top_k)
    moe_blocks = [b for b in model.blocks if isinstance(b, MoEBlock)]
    assert [i for i, b in enumerate(model.blocks) if isinstance(b, MoEBlock)] == MOE_LAYERS[arch]
    for block in moe_blocks:
        for expert in block.experts:
            if arch in EXPERT_TYPES:  # whole torchvision blocks
                assert block_type(expert) == EXPERT_TYPES[arch]
            else:  # timm's MLP (and its layer scale)
                assert block_type(expert[0]) == "timm.layers.mlp.Mlp"
    routes = model.routes()
    for layer in range(len(moe_blocks)):  # every task has its own experts at every layer
        assert len({tuple(r[layer]) for r in routes.values()}) == T, routes
    fixed = fix_moe(model)
    layers = [layer for layer in fixed.layers if isinstance(layer, FixedMoELayer)]
    assert [len(layer.sources) for layer in layers] == [T] * len(moe_blocks)
    x = images(3, seed=2)
    assert verify_fixed(model, fixed, x, 1e-5) <= 1e-5


@pytest.mark.parametrize("arch", [R18, VIT], ids=arch_id)
def test_fixed_moe_exports(arch: tuple[str, int]) -> None:
    # Two MoE layers (resnet18: the projection block and an identity one) keep the graph small.
    check_export(fix_moe(routed(arch, top_k=2, layers=MOE_LAYERS[arch][1:])))


# --- 7. Pretrained weights seed every task block and expert -----------------------------


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[str, dict[str, Tensor]]:
    """A torchvision-format resnet18 file (seeded random weights, BN statistics moved)."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    randomise_bn(net, seed=1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return str(path), net.state_dict()


def block_state(state: dict[str, Tensor], stage: int, index: int) -> dict[str, Tensor]:
    prefix = f"layer{stage}.{index}."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


RESNET18_BLOCKS = [(s, i) for s in (1, 2, 3, 4) for i in (0, 1)]  # blocks.<l> in order


def assert_same_state(module: nn.Module, state: dict[str, Tensor], what: object) -> None:
    actual = module.state_dict()
    assert sorted(actual) == sorted(state), what
    for key, value in state.items():
        assert torch.equal(actual[key], value), (what, key)


def test_pretrained_interrogate_task_blocks_start_as_the_pretrained_blocks(
    resnet18_file: tuple[str, dict[str, Tensor]],
) -> None:
    path, state = resnet18_file
    model = build_model(config("interrogate", R18, pretrained=path), TASKSET)
    assert torch.equal(model.stem[0].weight, state["conv1.weight"])
    for layer, (stage, index) in enumerate(RESNET18_BLOCKS):
        source = block_state(state, stage, index)
        assert_same_state(model.shared_blocks[layer], source, ("shared", layer))
        for task, blocks in model.task_blocks.items():
            assert_same_state(blocks[layer], source, (task, layer))


def test_pretrained_moe_experts_are_copies_and_fresh_ones_differ(
    resnet18_file: tuple[str, dict[str, Tensor]],
) -> None:
    path, state = resnet18_file
    moe = MoEConfig(moe_layers=[1, 2, 5], num_experts=3)
    pretrained = build_model(config("moe", R18, moe=moe, pretrained=path), TASKSET)
    fresh = build_model(config("moe", R18, moe=moe), TASKSET)
    for layer in moe.moe_layers:
        source = block_state(state, *RESNET18_BLOCKS[layer])
        for e, expert in enumerate(pretrained.blocks[layer].experts):
            assert_same_state(expert, source, (layer, e))
        experts = fresh.blocks[layer].experts
        for name in ("conv1.weight", "conv2.weight"):
            weights = [expert.state_dict()[name] for expert in experts]
            assert not any(torch.equal(weights[0], w) for w in weights[1:]), (layer, name)
    for layer in (0, 3):  # not MoE layers: the pretrained block itself
        source = block_state(state, *RESNET18_BLOCKS[layer])
        assert_same_state(pretrained.blocks[layer], source, layer)
