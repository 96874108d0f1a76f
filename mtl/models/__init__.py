"""Models: registries of backbones, heads and multi-task architectures, and ``build_model``.

Constructors take ready-built modules (``HardSharing(backbone, heads, taskset)``), so tests
build models without a config; the builders in ``MODELS`` map a ``ModelConfig`` to them.

Registry signatures:
    ``BACKBONES[name](cfg, in_channels, image_size) -> backbone`` (``mtl.models.backbones``
        states the contract: ``forward_features``, ``out_channels``, ``output_stride``,
        ``parts()``)
    ``HEADS[kind](in_channels, num_outputs[, hidden, decoder=, rates=]) -> head`` (the
        bracketed options for dense kinds only)
    ``MODELS[name](cfg, taskset) -> model``, where ``model(x, domain) -> {head: output}``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mtl.config import ModelConfig
from mtl.models.backbones import ResNet, ViT, resnet, vit
from mtl.models.heads import (
    DECODERS,
    BinaryHead,
    ClassificationHead,
    DenseClassificationHead,
    DenseRegressionHead,
    aspp_rates,
    depth_head,
    normals_head,
    saliency_head,
)
from mtl.models.interrogate import interrogate
from mtl.models.moe import TaskMoE, moe
from mtl.models.multitask import HardSharing
from mtl.models.pretrained import load_pretrained
from mtl.models.standard import RESNETS, torchvision_resnet, vit_s16
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_KINDS,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
    TaskSet,
)

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet": resnet,  # small trunks for 28-36 px images (mtl.models.backbones)
    "vit": vit,
    **{arch: torchvision_resnet(arch) for arch in RESNETS},  # torchvision (standard.py)
    "vit_s16": vit_s16,  # timm
}
# The library backbones, which take published weights and get the ASPP decoder by default.
STANDARD_BACKBONES = (*RESNETS, "vit_s16")

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
    """The backbone named by ``model.backbone``, sized for the task set's images, with the
    weights of ``model.pretrained`` if set (every model family builds its trunk from this
    one, so InterroGate's task blocks and the MoE's experts start from those weights)."""
    builder = _lookup(BACKBONES, cfg.backbone, "model.backbone")
    backbone = builder(cfg, taskset.in_channels, taskset.image_size)
    if cfg.pretrained:
        load_pretrained(backbone, cfg.pretrained, cfg.backbone)
    return backbone


def dense_decoder(cfg: ModelConfig) -> tuple[str, int]:
    """(decoder, hidden channels) of the dense heads: ``model.dense_head`` and
    ``model.head_channels``, resolving "auto" (ASPP on the standard backbones, the 3x3 conv
    block on the small trunks) and 0 (256 for ASPP, as DeepLabv3; 32 for conv)."""
    decoder = cfg.dense_head
    if decoder == "auto":
        decoder = "aspp" if cfg.backbone in STANDARD_BACKBONES else "conv"
    if decoder not in DECODERS:
        raise ValueError(f"model.dense_head={decoder!r} is not one of {['auto', *DECODERS]}")
    return decoder, cfg.head_channels or (256 if decoder == "aspp" else 32)


def build_heads(cfg: ModelConfig, taskset: TaskSet, backbone: nn.Module) -> nn.ModuleDict:
    """One head per task, keyed by head name, chosen by the task's kind; dense heads get
    the configured decoder at the backbone's output stride."""
    decoder, hidden = dense_decoder(cfg)
    dense = {"hidden": hidden, "decoder": decoder, "rates": aspp_rates(backbone.output_stride)}
    heads = {}
    for spec in taskset.heads:
        options = dense if spec.kind in DENSE_KINDS else {}
        heads[spec.name] = HEADS[spec.kind](backbone.out_channels, spec.num_outputs, **options)
    return nn.ModuleDict(heads)


def hard_sharing(cfg: ModelConfig, taskset: TaskSet) -> HardSharing:
    """Hard parameter sharing from config (also the single-task model on a subset)."""
    backbone = build_backbone(cfg, taskset)
    return HardSharing(backbone, build_heads(cfg, taskset, backbone), taskset)


def single_gate(cfg: ModelConfig, taskset: TaskSet) -> nn.Module:
    """The single-gated MoE from config, over any backbone's blocks (``mtl.models.single_gate``)."""
    from mtl.models.single_gate import from_backbone

    backbone = build_backbone(cfg, taskset)
    sg = cfg.single_gate
    branch_at = sg.branch_at or len(backbone.parts().blocks) // 2
    return from_backbone(
        backbone, build_heads(cfg, taskset, backbone), taskset, branch_at=branch_at,
        num_experts=sg.num_experts, threshold=sg.threshold, freeze_base=sg.freeze_base,
        gate_weight=sg.gate_weight,
    )  # fmt: skip


MODELS: dict[str, Callable[..., nn.Module]] = {
    "hard_sharing": hard_sharing,
    "interrogate": interrogate,
    "moe": moe,
    "single_gate": single_gate,
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
    "STANDARD_BACKBONES",
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
    "dense_decoder",
    "hard_sharing",
]
