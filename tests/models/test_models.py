"""Backbones, heads and hard sharing: shapes, gradients, registries, single-task subsets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mtl.config import ModelConfig
from mtl.models import BACKBONES, HEADS, MODELS, HardSharing, build_heads, build_model
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
    TASK_KINDS,
    TaskSet,
    TaskSpec,
)

TINY = {"width": 8, "depth": 2, "num_heads": 2}  # fast on CPU, still every code path
SMALL = ("resnet", "vit")  # the small trunks; the standard ones are in test_standard.py
VIT_PATCH = 4  # the small ViT's default patch side

SPECS = {
    CLASSIFICATION: TaskSpec("left", CLASSIFICATION, 10, "accuracy", True),
    DENSE_CLASSIFICATION: TaskSpec("semseg", DENSE_CLASSIFICATION, 11, "miou", True),
    DENSE_REGRESSION: TaskSpec("recon", DENSE_REGRESSION, 2, "rmse", False),
    BINARY: TaskSpec("smiling", BINARY, 1, "accuracy", True),
    DEPTH: TaskSpec("depth", DEPTH, 1, "abs_err", False),
    NORMALS: TaskSpec("normals", NORMALS, 3, "mean_angle", False),
    SALIENCY: TaskSpec("sal", SALIENCY, 1, "max_f", True),
}


def make_taskset(
    size: int | tuple[int, int] = 36, channels: int = 1, kinds: tuple[str, ...] = TASK_KINDS
) -> TaskSet:
    return TaskSet("toy", tuple(SPECS[k] for k in kinds), channels, size)


def expected_shape(spec: TaskSpec, batch: int, size: int | tuple[int, int]) -> tuple[int, ...]:
    height, width = (size, size) if isinstance(size, int) else size
    if spec.kind == CLASSIFICATION:
        return (batch, spec.num_outputs)
    if spec.kind == BINARY:
        return (batch,)
    return (batch, spec.num_outputs, height, width)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 36])
@pytest.mark.parametrize("backbone", SMALL)
def test_backbone_feature_map(backbone: str, size: int, channels: int) -> None:
    net = BACKBONES[backbone](ModelConfig(backbone=backbone, **TINY), channels, size)
    features = net.forward_features(torch.rand(2, channels, size, size))
    assert features.ndim == 4 and features.shape[:2] == (2, net.out_channels)
    # resnet: 1/2 resolution; vit: one token per patch
    side = size // 2 if backbone == "resnet" else size // VIT_PATCH
    assert features.shape[2:] == (side, side)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 36])
@pytest.mark.parametrize("backbone", SMALL)
def test_hard_sharing_output_shapes(backbone: str, size: int, channels: int) -> None:
    taskset = make_taskset(size, channels)
    model = build_model(ModelConfig(backbone=backbone, **TINY), taskset)
    outputs = model(torch.rand(3, channels, size, size))
    assert list(outputs) == [h.name for h in taskset.heads]
    for spec in taskset.heads:
        assert outputs[spec.name].shape == expected_shape(spec, 3, size)


@pytest.mark.parametrize("backbone", SMALL)
def test_rectangular_input(backbone: str) -> None:
    size = (24, 40)  # ViT: patch 4 divides both sides
    taskset = make_taskset(size, channels=3)
    model = build_model(ModelConfig(backbone=backbone, **TINY), taskset)
    features = model.backbone.forward_features(torch.rand(2, 3, *size))
    side = 2 if backbone == "resnet" else VIT_PATCH
    assert features.shape[2:] == (size[0] // side, size[1] // side)
    outputs = model(torch.rand(2, 3, *size))
    for spec in taskset.heads:
        assert outputs[spec.name].shape == expected_shape(spec, 2, size), spec.name


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_head_shapes(kind: str) -> None:
    spec = SPECS[kind]
    head = HEADS[kind](16, spec.num_outputs)
    out = head(torch.rand(2, 16, 9, 11), (36, 44))
    assert out.shape == expected_shape(spec, 2, (36, 44))


@pytest.mark.parametrize("kind, outputs", [(BINARY, 2), (DEPTH, 3), (NORMALS, 1), (SALIENCY, 2)])
def test_fixed_size_heads_reject_other_output_counts(kind: str, outputs: int) -> None:
    with pytest.raises(ValueError, match=f"a {kind} head has"):
        HEADS[kind](16, outputs)


def test_dense_regression_sigmoid_option() -> None:
    head = HEADS[DENSE_REGRESSION](16, 1, activation="sigmoid")
    out = head(torch.randn(2, 16, 9, 9) * 100, (28, 28))
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="activation"):
        HEADS[DENSE_REGRESSION](16, 1, activation="tanh")


@pytest.mark.parametrize("backbone", SMALL)
def test_backward_reaches_every_parameter(backbone: str) -> None:
    taskset = make_taskset()
    model = build_model(ModelConfig(backbone=backbone, **TINY), taskset)
    outputs = model(torch.rand(4, 1, 36, 36))
    sum(o.square().mean() for o in outputs.values()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("backbone", SMALL)
def test_single_task_is_hard_sharing_on_a_subset(backbone: str) -> None:
    full = make_taskset()
    single = full.subset(["semseg"])
    model = build_model(ModelConfig(backbone=backbone, **TINY), single)
    assert isinstance(model, HardSharing) and list(model.heads) == ["semseg"]
    outputs = model(torch.rand(2, 1, 36, 36))
    assert list(outputs) == ["semseg"] and outputs["semseg"].shape == (2, 11, 36, 36)
    # Same backbone as the multi-task model, so the baseline differs only in its heads.
    multi = build_model(ModelConfig(backbone=backbone, **TINY), full)
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert n_backbone == sum(p.numel() for p in multi.backbone.parameters())


def test_domain_is_accepted_and_ignored() -> None:
    taskset = TaskSet("digits", (SPECS[CLASSIFICATION],), 3, 28, domains=("a", "b"))
    model = build_model(ModelConfig(**TINY), taskset).eval()
    x = torch.rand(4, 3, 28, 28)
    torch.testing.assert_close(model(x)["left"], model(x, torch.tensor([0, 1, 1, 0]))["left"])


def test_forward_features_forward_head_split() -> None:
    taskset = make_taskset()
    model = build_model(ModelConfig(**TINY), taskset).eval()
    x = torch.rand(2, 1, 36, 36)
    split = model.forward_head(model.forward_features(x), (36, 36))
    for name, out in model(x).items():
        torch.testing.assert_close(out, split[name])


def test_constructor_takes_ready_modules_without_config() -> None:
    taskset = make_taskset(kinds=(CLASSIFICATION,))
    backbone = BACKBONES["resnet"](ModelConfig(**TINY), 1, 36)
    model = HardSharing(backbone, build_heads(ModelConfig(**TINY), taskset, backbone), taskset)
    assert model(torch.rand(2, 1, 36, 36))["left"].shape == (2, 10)
    with pytest.raises(ValueError, match="do not match"):
        HardSharing(backbone, nn.ModuleDict({"other": nn.Identity()}), taskset)


def test_registry_errors_name_the_config_key() -> None:
    taskset = make_taskset()
    assert "hard_sharing" in MODELS
    with pytest.raises(ValueError, match="model.name"):
        build_model(ModelConfig(name="nope"), taskset)
    with pytest.raises(ValueError, match="model.backbone"):
        build_model(ModelConfig(backbone="nope"), taskset)
    with pytest.raises(ValueError, match="model.patch_size"):
        build_model(ModelConfig(backbone="vit", patch_size=5), taskset)


def test_vit_rejects_other_input_sizes() -> None:
    model = build_model(ModelConfig(backbone="vit", **TINY), make_taskset(36))
    with pytest.raises(ValueError, match="image_size"):
        model(torch.rand(1, 1, 28, 28))


def test_pure_core_imports_no_distributed_stack() -> None:
    code = (
        "import sys, mtl.models, mtl.losses, mtl.metrics; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'deepspeed', 'mlflow'}))"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
