"""Models: registries of backbones, heads and multi-task architectures, and ``build_model``.

Constructors take ready-built modules (``HardSharing(backbone, heads, taskset)``), so tests
build models without a config; the builders in ``MODELS`` map a ``ModelConfig`` to them.

Registry signatures:
    ``BACKBONES[name](cfg, in_channels, image_size) -> backbone``
    ``HEADS[kind](in_channels, num_outputs) -> head``
    ``MODELS[name](cfg, taskset) -> model``, where ``model(x, domain) -> {head: output}``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mtl.config import ModelConfig
from mtl.models.backbones import ResNet, ViT, resnet, vit
from mtl.models.heads import (
    BinaryHead,
    ClassificationHead,
    DenseClassificationHead,
    DenseRegressionHead,
    depth_head,
    normals_head,
    saliency_head,
)
from mtl.models.interrogate import interrogate
from mtl.models.moe import TaskMoE, moe
from mtl.models.multitask import HardSharing
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
    TaskSet,
)

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet": resnet,
    "vit": vit,
}

HEADS: dict[str, Callable[..., nn.Module]] = {
    CLASSIFICATION: ClassificationHead,
    DENSE_CLASSIFICATION: DenseClassificationHead,
    DENSE_REGRESSION: DenseRegressionHead,
    BINARY: BinaryHead,
    DEPTH: depth_head,
    NORMALS: normals_head,
    SALIENCY: saliency_head,
}


def _lookup(
    registry: dict[str, Callable[..., nn.Module]], key: str, config_key: str
) -> Callable[..., nn.Module]:
    if key not in registry:
        raise ValueError(f"{config_key}={key!r} is not one of {sorted(registry)}")
    return registry[key]


def build_backbone(cfg: ModelConfig, taskset: TaskSet) -> nn.Module:
    """The backbone named by ``model.backbone``, sized for the task set's images."""
    builder = _lookup(BACKBONES, cfg.backbone, "model.backbone")
    return builder(cfg, taskset.in_channels, taskset.image_size)


def build_heads(taskset: TaskSet, in_channels: int) -> nn.ModuleDict:
    """One head per task, keyed by head name, chosen by the task's kind."""
    return nn.ModuleDict(
        {spec.name: HEADS[spec.kind](in_channels, spec.num_outputs) for spec in taskset.heads}
    )


def hard_sharing(cfg: ModelConfig, taskset: TaskSet) -> HardSharing:
    """Hard parameter sharing from config (also the single-task model on a subset)."""
    backbone = build_backbone(cfg, taskset)
    return HardSharing(backbone, build_heads(taskset, backbone.out_channels), taskset)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "hard_sharing": hard_sharing,
    "interrogate": interrogate,
    "moe": moe,
}


def build_model(cfg: ModelConfig, taskset: TaskSet) -> nn.Module:
    """The model named by ``model.name``, built for ``taskset``.

    Raises:
        ValueError: Unknown ``model.name`` or ``model.backbone``, or sizes the backbone
            cannot use (e.g. a ViT patch size that does not divide the image size).
    """
    return _lookup(MODELS, cfg.name, "model.name")(cfg, taskset)


__all__ = [
    "BACKBONES",
    "HEADS",
    "MODELS",
    "BinaryHead",
    "ClassificationHead",
    "DenseClassificationHead",
    "DenseRegressionHead",
    "HardSharing",
    "ResNet",
    "TaskMoE",
    "ViT",
    "build_backbone",
    "build_heads",
    "build_model",
    "hard_sharing",
]
