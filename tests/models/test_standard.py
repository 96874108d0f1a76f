"""Standard backbones (torchvision ResNet-18/34/50, timm ViT-S/16): shapes, dilation against
torchvision's own, the published sizes, local pretrained files and their errors, ASPP heads.

Weights files are written here in the published formats (torchvision ``.pth``, timm
``.safetensors``) from seeded random networks; nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP, ASPPConv

from mtl.config import ModelConfig
from mtl.models import BACKBONES, STANDARD_BACKBONES, build_heads, build_model, dense_decoder
from mtl.models.flops import count_flops
from mtl.models.heads import aspp_rates
from mtl.models.pretrained import PretrainedWeightsError, load_pretrained
from mtl.models.standard import TimmViT, TorchvisionResNet
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_KINDS,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
    TASK_KINDS,
    TaskSet,
    TaskSpec,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RESNETS = ("resnet18", "resnet34", "resnet50")
CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "vit_s16": 384}
# Published weights' metadata (held by torchvision, no download): the versions WEIGHT_SOURCES names.
WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
}
RECT = (40, 56)  # odd multiples of 8: every stride rounds up somewhere
VIT_SIZE = (32, 48)  # a 2x3 grid of 16 px patches

SPECS = {
    CLASSIFICATION: TaskSpec("label", CLASSIFICATION, 10, "accuracy", True),
    DENSE_CLASSIFICATION: TaskSpec("semseg", DENSE_CLASSIFICATION, 5, "miou", True),
    DENSE_REGRESSION: TaskSpec("recon", DENSE_REGRESSION, 2, "rmse", False),
    BINARY: TaskSpec("smiling", BINARY, 1, "accuracy", True),
    DEPTH: TaskSpec("depth", DEPTH, 1, "abs_err", False),
    NORMALS: TaskSpec("normals", NORMALS, 3, "mean_angle", False),
    SALIENCY: TaskSpec("sal", SALIENCY, 1, "max_f", True),
}


def make_taskset(
    size: tuple[int, int] = VIT_SIZE, channels: int = 3, kinds: tuple[str, ...] = (CLASSIFICATION,)
) -> TaskSet:
    return TaskSet("toy", tuple(SPECS[k] for k in kinds), channels, size)


def expected_shape(spec: TaskSpec, batch: int, size: tuple[int, int]) -> tuple[int, ...]:
    if spec.kind == CLASSIFICATION:
        return (batch, spec.num_outputs)
    if spec.kind == BINARY:
        return (batch,)
    return (batch, spec.num_outputs, *size)


def seeded_torchvision(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    """A torchvision ResNet with seeded weights and non-trivial BatchNorm parameters and
    statistics (fresh ones are the identity in eval mode and would hide a mis-mapped BN)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, **kwargs)
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.1)
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def torchvision_features(net: nn.Module, x: Tensor) -> Tensor:
    """torchvision's ResNet run by hand from conv1 to layer4 (its forward pools and classifies)."""
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def timm_vit(seed: int = 0, **kwargs) -> nn.Module:
    """timm's ViT-S/16 with its ImageNet classifier, random seeded weights (no download)."""
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    now = module.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), f"{key} changed"


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A torchvision-format resnet18 .pth (fc included, as published) and its network."""
    net = seeded_torchvision("resnet18")
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A timm-format ViT-S/16 .safetensors (head.* included, as published) and its network."""
    net = timm_vit()
    path = tmp_path_factory.mktemp("weights") / "vit_s16.safetensors"
    save_file(net.state_dict(), str(path))
    return path, net


# --- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("arch", RESNETS)
def test_resnet_feature_map(arch: str, output_stride: int) -> None:
    cfg = ModelConfig(backbone=arch, output_stride=output_stride)
    net = BACKBONES[arch](cfg, 3, RECT)
    features = net.forward_features(torch.rand(2, 3, *RECT))
    side = tuple(math.ceil(s / output_stride) for s in RECT)
    assert features.shape == (2, CHANNELS[arch], *side)
    assert (net.out_channels, net.output_stride) == (CHANNELS[arch], output_stride)


@pytest.mark.parametrize("patch_size, grid", [(0, (2, 3)), (8, (4, 6))])
def test_vit_feature_map(patch_size: int, grid: tuple[int, int]) -> None:
    net = BACKBONES["vit_s16"](ModelConfig(backbone="vit_s16", patch_size=patch_size), 3, VIT_SIZE)
    features = net.forward_features(torch.rand(2, 3, *VIT_SIZE))
    assert features.shape == (2, 384, *grid)
    assert net.out_channels == 384 and net.output_stride == (patch_size or 16)
    assert net.pos_embed.shape == (1, 1 + grid[0] * grid[1], 384)  # class token + one per patch


def test_resnet_rejects_other_output_strides() -> None:
    with pytest.raises(ValueError, match="model.output_stride=4"):
        TorchvisionResNet("resnet18", output_stride=4)


@pytest.mark.parametrize("backbone", ["resnet18", "vit_s16"])
def test_parts_compose_to_forward_features(backbone: str) -> None:
    net = BACKBONES[backbone](ModelConfig(backbone=backbone), 3, VIT_SIZE).eval()
    x = torch.rand(2, 3, *VIT_SIZE)
    parts = net.parts()
    with torch.no_grad():
        stream = parts.stem(x)
        for block in parts.blocks:
            stream = block(stream)
        torch.testing.assert_close(parts.neck(stream), net.forward_features(x), rtol=0, atol=0)
    own = {id(p) for p in net.parameters()}
    cut = [parts.stem, *parts.blocks, parts.neck]
    assert {id(p) for m in cut for p in m.parameters()} == own  # the net's own modules, all


# --- dilation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output_stride, replace", [(16, [False, False, True]), (8, [False, True, True])]
)
def test_dilated_resnet50_is_torchvisions(output_stride: int, replace: list[bool]) -> None:
    reference = seeded_torchvision("resnet50", replace_stride_with_dilation=replace)
    net = TorchvisionResNet("resnet50", 3, output_stride).eval()
    net.load_state_dict(net.pretrained_state(reference.state_dict()))  # strict
    ours = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    theirs = [m for m in reference.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.stride, c.dilation, c.padding) for c in ours] == [
        (c.stride, c.dilation, c.padding) for c in theirs
    ]
    x = torch.rand(2, 3, *RECT)
    with torch.no_grad():
        features = net.forward_features(x)
    assert features.shape[2:] == tuple(math.ceil(s / output_stride) for s in RECT)
    torch.testing.assert_close(features, torchvision_features(reference, x), rtol=0, atol=0)


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("arch", RESNETS)
def test_dilated_is_the_strided_net_sampled_densely(arch: str, output_stride: int) -> None:
    """A strided conv is a dense conv subsampled, and a conv after it a dilated dense conv
    (zero padding included): the dilated net, same weights, sampled every 32/os pixels is the
    published net exactly. This is what lets dilated stages keep pretrained weights."""
    torch.manual_seed(0)
    strided = TorchvisionResNet(arch).eval()
    dilated = TorchvisionResNet(arch, output_stride=output_stride).eval()
    dilated.load_state_dict(strided.state_dict())
    x = torch.rand(1, 3, *RECT)
    step = 32 // output_stride
    with torch.no_grad():
        sampled = dilated.forward_features(x)[..., ::step, ::step]
        # fp32: a dilated and a strided conv run different CPU kernels (other summation
        # orders); up to 2.8e-5 apart after 50 layers on one machine. A wrong padding or
        # dilation is off by O(1).
        torch.testing.assert_close(sampled, strided.forward_features(x), atol=1e-4, rtol=1e-4)


def test_dilated_basic_block_resnet_runs() -> None:
    with pytest.raises(NotImplementedError):  # why standard.py dilates after construction
        torchvision.models.resnet18(weights=None, replace_stride_with_dilation=[False, True, True])
    net = TorchvisionResNet("resnet18", output_stride=8)
    convs = [m for block in net.blocks[4:] for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)  # layer3 and layer4, shortcuts included
    assert all(c.padding == c.dilation for c in convs if c.kernel_size == (3, 3))
    assert net.blocks[-1].conv2.dilation == (4, 4)  # stride 32 / 8
    assert net.forward_features(torch.rand(2, 3, *RECT)).shape == (2, 512, 5, 7)


# --- published sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", RESNETS)
def test_resnet_trunk_is_published_minus_classifier(arch: str) -> None:
    meta = WEIGHTS[arch].meta
    fc_macs = CHANNELS[arch] * 1000
    net = TorchvisionResNet(arch)
    assert sum(p.numel() for p in net.parameters()) == meta["num_params"] - (fc_macs + 1000)
    macs = count_flops(net, torch.zeros(1, 3, 224, 224)) / 2  # 2 FLOPs per multiply-accumulate
    assert macs == pytest.approx(meta["_ops"] * 1e9 - fc_macs, rel=0.01)


def test_vit_s16_trunk_size() -> None:
    net = TimmViT(3, (224, 224), 16)
    params = sum(p.numel() for p in net.parameters())
    headless = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    assert params == sum(p.numel() for p in headless.parameters()) == 21_665_664
    # MACs by hand: patch embedding, then per block qkv, QK^T and AV, projection, 4x MLP.
    patches, tokens, dim = 196, 197, 384
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim
    block += 2 * tokens * dim * 4 * dim
    expected = patches * dim * 16 * 16 * 3 + 12 * block
    assert count_flops(net, torch.zeros(1, 3, 224, 224)) == 2 * expected


# --- pretrained files -----------------------------------------------------------------------


def test_torchvision_file_loads_exactly(resnet18_file) -> None:
    path, reference = resnet18_file
    model = build_model(ModelConfig(backbone="resnet18", pretrained=str(path)), make_taskset(RECT))
    x = torch.rand(2, 3, *RECT)
    with torch.no_grad():
        features = model.backbone.eval().forward_features(x)
    torch.testing.assert_close(features, torchvision_features(reference, x), rtol=0, atol=0)


def test_old_torchvision_layout_without_batch_counters(resnet18_file, tmp_path: Path) -> None:
    _, reference = resnet18_file
    state = {k: v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    backbone = TorchvisionResNet("resnet18")
    load_pretrained(backbone, path, "resnet18")
    loaded = backbone.state_dict()
    for key, value in backbone.pretrained_state(state).items():
        assert torch.equal(loaded[key], value), key
    x = torch.rand(2, 3, *RECT)
    with torch.no_grad():
        features = backbone.eval().forward_features(x)
    torch.testing.assert_close(features, torchvision_features(reference, x), rtol=0, atol=0)


def test_grey_input_sums_rgb_filters(resnet18_file, vit_file) -> None:
    path, reference = resnet18_file
    cfg = ModelConfig(backbone="resnet18", pretrained=str(path))
    backbone = build_model(cfg, make_taskset(RECT, channels=1)).backbone
    rgb = reference.conv1.weight
    torch.testing.assert_close(backbone.stem[0].weight, rgb.sum(1, keepdim=True), rtol=0, atol=0)
    assert torch.equal(backbone.blocks[7].conv2.weight, reference.layer4[1].conv2.weight)
    path, reference = vit_file
    cfg = ModelConfig(backbone="vit_s16", pretrained=str(path))
    backbone = build_model(cfg, make_taskset(VIT_SIZE, channels=1)).backbone
    rgb = reference.patch_embed.proj.weight
    torch.testing.assert_close(
        backbone.patch_embed.proj.weight, rgb.sum(1, keepdim=True), rtol=0, atol=0
    )


@pytest.mark.parametrize("size", [(224, 224), VIT_SIZE])
def test_timm_safetensors_matches_timm(vit_file, size: tuple[int, int]) -> None:
    """Our ViT from the file equals timm's own model loaded through timm's checkpoint filter
    (which resamples the position embedding to another image size the same way)."""
    path, published = vit_file
    cfg = ModelConfig(backbone="vit_s16", pretrained=str(path))
    backbone = build_model(cfg, make_taskset(size)).backbone.eval()
    grid = (size[0] // 16, size[1] // 16)
    assert backbone.pos_embed.shape == (1, 1 + grid[0] * grid[1], 384)
    reference = timm_vit(seed=1, img_size=size)
    reference.load_state_dict(checkpoint_filter_fn(published.state_dict(), reference))
    torch.testing.assert_close(backbone.pos_embed, reference.pos_embed, rtol=0, atol=0)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        tokens = reference.forward_features(x)[:, 1:]  # (B, N, D) after the final norm
        expected = tokens.transpose(1, 2).reshape(2, 384, *grid)
        torch.testing.assert_close(backbone.forward_features(x), expected)


@pytest.mark.parametrize(
    "file_arch, backbone, problem, guess",
    [
        ("resnet50", "resnet18", "unexpected keys", "resnet50"),
        ("resnet18", "resnet50", "missing keys", "resnet18"),
        ("vit", "resnet18", "missing keys", "a ViT with 384-dim tokens, 12 blocks, patch 16"),
    ],
)
def test_wrong_architecture_is_named_and_nothing_loads(
    vit_file, tmp_path: Path, file_arch: str, backbone: str, problem: str, guess: str
) -> None:
    if file_arch == "vit":
        path = vit_file[0]
    else:
        path = tmp_path / f"{file_arch}.pth"
        torch.save(seeded_torchvision(file_arch).state_dict(), path)
    net = BACKBONES[backbone](ModelConfig(backbone=backbone), 3, VIT_SIZE)
    before = snapshot(net)
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(net, path, backbone)
    message = str(err.value)
    assert problem in message and f"looks like weights for {guess}" in message
    assert f"model.backbone={backbone}" in message and "Nothing was loaded" in message
    assert_same_state(net, before)


def test_one_bad_shape_loads_nothing(resnet18_file, tmp_path: Path) -> None:
    _, reference = resnet18_file
    state = reference.state_dict()
    state["layer4.1.conv2.weight"] = state["layer4.1.conv2.weight"][..., :1, :1].clone()
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    net = TorchvisionResNet("resnet18")
    before = snapshot(net)
    with pytest.raises(PretrainedWeightsError, match="1 shape mismatches") as err:
        load_pretrained(net, path, "resnet18")
    assert "blocks.7.conv2.weight (512, 512, 1, 1) != (512, 512, 3, 3)" in str(err.value)
    assert_same_state(net, before)  # every other key fit, and still none was loaded


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(resnet18_file, tmp_path: Path, suffix: str) -> None:
    state = resnet18_file[1].state_dict()
    whole = tmp_path / f"whole{suffix}"
    torch.save(state, whole) if suffix == ".pth" else save_file(state, str(whole))
    data = whole.read_bytes()
    path = tmp_path / f"half{suffix}"
    path.write_bytes(data[: len(data) // 2])
    cfg = ModelConfig(backbone="resnet18", pretrained=str(path))
    with pytest.raises(PretrainedWeightsError, match="truncated") as err:
        build_model(cfg, make_taskset(RECT))
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "backbone, source",
    [
        ("resnet18", "https://download.pytorch.org/models/resnet18-"),
        ("resnet34", "https://download.pytorch.org/models/resnet34-"),
        ("resnet50", "https://download.pytorch.org/models/resnet50-"),
        ("vit_s16", "https://huggingface.co/timm/vit_small_patch16_224"),
    ],
)
def test_missing_file_says_where_to_get_it(tmp_path: Path, backbone: str, source: str) -> None:
    path = tmp_path / "weights" / "missing.pth"
    cfg = ModelConfig(backbone=backbone, pretrained=str(path))
    with pytest.raises(FileNotFoundError) as err:
        build_model(cfg, make_taskset(VIT_SIZE))
    message = str(err.value)
    assert source in message and "Nothing is downloaded" in message and str(path) in message


def _spring(marker: str) -> None:
    Path(marker).write_text("code in the weights file ran")


class Trap:
    """Unpickling it calls ``_spring``: what a malicious ``.pth`` does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_spring, (self.marker,))


def test_pickled_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "sprung"
    path = tmp_path / "trap.pth"
    torch.save({"conv1.weight": torch.zeros(1), "a": Trap(marker)}, path)
    with pytest.raises(PretrainedWeightsError, match="cannot read it as weights"):
        load_pretrained(TorchvisionResNet("resnet18"), path, "resnet18")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the trap is real: an unsafe load runs it
    assert marker.exists()


def test_file_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)  # loadable with weights_only, but no weights
    with pytest.raises(PretrainedWeightsError, match="no state dict of tensors"):
        load_pretrained(TorchvisionResNet("resnet18"), path, "resnet18")


@pytest.mark.parametrize("size, patch_size", [((30, 48), 0), ((32, 48), 5)])
def test_vit_tiling_error_names_both_keys(size: tuple[int, int], patch_size: int) -> None:
    cfg = ModelConfig(backbone="vit_s16", patch_size=patch_size)
    with pytest.raises(ValueError, match="data.image_size") as err:
        build_model(cfg, make_taskset(size))
    assert "model.patch_size" in str(err.value)


# --- heads ----------------------------------------------------------------------------------


def test_dense_decoder_defaults() -> None:
    for backbone in STANDARD_BACKBONES:
        assert dense_decoder(ModelConfig(backbone=backbone)) == ("aspp", 256)
    for backbone in ("resnet", "vit"):
        assert dense_decoder(ModelConfig(backbone=backbone)) == ("conv", 32)
    assert dense_decoder(ModelConfig(backbone="resnet18", dense_head="conv")) == ("conv", 32)
    assert dense_decoder(ModelConfig(backbone="resnet", dense_head="aspp")) == ("aspp", 256)
    assert dense_decoder(ModelConfig(backbone="resnet50", head_channels=8)) == ("aspp", 8)
    with pytest.raises(ValueError, match="model.dense_head"):
        dense_decoder(ModelConfig(dense_head="fpn"))


def test_aspp_rates_cover_the_same_area() -> None:
    assert [aspp_rates(s) for s in (8, 16, 32)] == [(12, 24, 36), (6, 12, 18), (3, 6, 9)]


def test_resnet50_os8_dense_heads_are_torchvision_aspp() -> None:
    cfg = ModelConfig(backbone="resnet50", output_stride=8, head_channels=8)
    taskset = make_taskset(kinds=TASK_KINDS)
    heads = build_heads(cfg, taskset, BACKBONES["resnet50"](cfg, 3, VIT_SIZE))
    for spec in taskset.heads:
        aspps = [m for m in heads[spec.name].modules() if isinstance(m, ASPP)]
        if spec.kind not in DENSE_KINDS:
            assert not aspps, spec.name
            continue
        (aspp,) = aspps
        rates = tuple(m[0].dilation[0] for m in aspp.convs if isinstance(m, ASPPConv))
        assert rates == (12, 24, 36), spec.name
        assert aspp.convs[0][0].in_channels == 2048 and aspp.project[0].out_channels == 8


def test_aspp_heads_output_input_resolution() -> None:
    cfg = ModelConfig(backbone="resnet18", output_stride=8, head_channels=8)
    taskset = make_taskset(RECT, kinds=TASK_KINDS)
    backbone = BACKBONES["resnet18"](cfg, 3, RECT)
    heads = build_heads(cfg, taskset, backbone)
    features = backbone.forward_features(torch.rand(2, 3, *RECT))
    assert features.shape[2:] == (5, 7)
    for spec in taskset.heads:
        assert heads[spec.name](features, RECT).shape == expected_shape(spec, 2, RECT), spec.name


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", STANDARD_BACKBONES)
def test_backward_reaches_every_parameter(backbone: str) -> None:
    size = VIT_SIZE if backbone == "vit_s16" else (64, 96)  # ResNets: a 2x3 map at stride 32
    taskset = make_taskset(size, kinds=TASK_KINDS)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, head_channels=8), taskset)
    outputs = model(torch.rand(2, 3, *size))
    for spec in taskset.heads:
        assert outputs[spec.name].shape == expected_shape(spec, 2, size), spec.name
    sum(o.square().mean() for o in outputs.values()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
