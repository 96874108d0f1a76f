"""Standard backbones: torchvision's ResNet-18/34/50 and timm's ViT-S/16 (DESIGN.md §4.7).

The library builds the network; this module only re-cuts it to the project's contract:
``forward_features(x) -> (B, out_channels, h, w)``, the attributes ``out_channels`` and
``output_stride``, and ``parts()``, the stem / blocks / neck cut that InterroGate and the
task-expert MoE rebuild the trunk from. The blocks stay the library's own modules
(torchvision's ``BasicBlock`` and ``Bottleneck``, timm's ``Block``).

State-dict keys: the ResNet wrapper holds ``stem.*`` and ``blocks.<l>.*`` (the library's
``conv1``/``bn1`` and ``layer<s>.<i>`` flattened in order), the ViT wrapper holds timm's own
names. ``pretrained_state`` maps a library checkpoint to these keys (``mtl.models.pretrained``).

Nothing here downloads: the library models are built with random weights, and pretrained
weights come only from a local file (``model.pretrained``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl.models.backbones import TokenNeck, TrunkParts, tokens_to_map

# Per torchvision ResNet: blocks in each of its four stages and the block type's name.
RESNETS: dict[str, tuple[tuple[int, int, int, int], str]] = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
OUTPUT_STRIDES = (8, 16, 32)

# Where a user gets the published weights (read by the missing-file error; never fetched).
WEIGHT_SOURCES = {
    "resnet18": "torchvision ResNet18_Weights.IMAGENET1K_V1: "
    "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "torchvision ResNet34_Weights.IMAGENET1K_V1: "
    "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "torchvision ResNet50_Weights.IMAGENET1K_V2: "
    "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "vit_s16": "timm vit_small_patch16_224.augreg_in21k_ft_in1k: https://huggingface.co/timm/"
    "vit_small_patch16_224.augreg_in21k_ft_in1k/resolve/main/model.safetensors",
}


def dilate_stage(stage: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one, in place (DeepLab's trick).

    The stride-2 convolutions (a 3x3 and the shortcut's 1x1) get stride 1; the 3x3 that had
    the stride dilates by ``previous`` (the resolution it reads is unchanged) and every other
    3x3 of the stage by ``dilation``, so the stage computes the strided network's features
    sampled densely (tested). For bottleneck blocks this is exactly torchvision's
    ``replace_stride_with_dilation`` (tested); it is done after construction because
    torchvision's ``BasicBlock`` refuses a dilation, and ResNet-18/34 need one for dense tasks.
    """
    for block in stage:
        for conv in block.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            strided = conv.stride != (1, 1)
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                d = previous if strided else dilation
                conv.dilation, conv.padding = (d, d), (d, d)


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet without its classifier, optionally dilated.

    Args:
        arch: ``resnet18``, ``resnet34`` or ``resnet50``.
        in_channels: Image channels (3 for the published weights; grey images adapt them).
        output_stride: 32 (as published), 16 (last stage dilated) or 8 (last two dilated).
    """

    def __init__(self, arch: str, in_channels: int = 3, output_stride: int = 32) -> None:
        super().__init__()
        import torchvision.models  # imported here: the small trunks do not pay for it

        if arch not in RESNETS:
            raise ValueError(f"model.backbone={arch!r} is not one of {sorted(RESNETS)}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"model.output_stride={output_stride} is not one of {OUTPUT_STRIDES} "
                "(32: as published; 16 or 8: dilated last stages for dense tasks)"
            )
        net = getattr(torchvision.models, arch)(weights=None)
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        stages = [net.layer1, net.layer2, net.layer3, net.layer4]
        if output_stride <= 16:
            dilate_stage(net.layer4, 1 if output_stride == 16 else 2, 32 // output_stride)
        if output_stride == 8:
            dilate_stage(net.layer3, 1, 2)
        self.arch = arch
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.blocks = nn.Sequential(*(block for stage in stages for block in stage))
        self.out_channels = net.fc.in_features
        self.output_stride = output_stride
        self.stage_sizes = RESNETS[arch][0]

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, 512 or 2048, H/os, W/os) (rounded up)."""
        return self.blocks(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def parts(self) -> TrunkParts:
        """Stem (conv, BN, ReLU, max-pool), the residual blocks; maps gated on dim 1."""
        return TrunkParts(self.stem, list(self.blocks), nn.Identity(), channel_dim=1)

    def pretrained_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A torchvision (or timm) ResNet state dict in this module's keys: ``conv1``/``bn1``
        -> ``stem.0``/``stem.1``, ``layer<s>.<i>`` -> ``blocks.<l>``; ``fc.*`` is dropped.
        Keys that fit nothing are kept as they are, so the caller lists them as unexpected."""
        offsets = [sum(self.stage_sizes[:s]) for s in range(4)]
        out = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head == "fc":
                continue
            if head in ("conv1", "bn1"):
                out[f"stem.{0 if head == 'conv1' else 1}.{rest}"] = value
            elif head in ("layer1", "layer2", "layer3", "layer4") and "." in rest:
                index, _, tail = rest.partition(".")
                stage = int(head[-1]) - 1
                if index.isdigit() and int(index) < self.stage_sizes[stage]:
                    out[f"blocks.{offsets[stage] + int(index)}.{tail}"] = value
                else:
                    out[key] = value
            else:
                out[key] = value
        return out

    @property
    def first_conv(self) -> str:
        """The state-dict key of the first convolution's weight (grey inputs adapt it)."""
        return "stem.0.weight"


class ClassTokenStem(nn.Module):
    """A ViT's patch embedding, class token and position embedding: ``(B, C, H, W) ->
    (B, 1 + N, D)`` (timm's ``_pos_embed`` for its default: class token, embedded class)."""

    def __init__(self, patch_embed: nn.Module, cls_token: nn.Parameter, pos_embed: nn.Parameter):
        super().__init__()
        self.patch_embed = patch_embed
        self.cls_token = cls_token
        self.pos_embed = pos_embed

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, N, D); timm checks the image size
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D), as forward_features


class TimmViT(nn.Module):
    """timm's ViT-Small/16 (embedding 384, 12 blocks, 6 heads, MLP 4x) as a feature map.

    The class token is kept, since the published weights attend through it, and dropped from
    the output: every head, pooled or dense, reads the ``(B, 384, H/p, W/p)`` map of patch
    tokens. Patch and image size come from config; the position embedding is sized for the
    image and the published one is resampled to it on loading.

    Args:
        in_channels: Image channels.
        image_size: Input ``(height, width)``; both must be multiples of ``patch_size``.
        patch_size: Side of the square patches (16 as published).
    """

    def __init__(self, in_channels: int, image_size: tuple[int, int], patch_size: int = 16):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        height, width = image_size
        if patch_size < 1 or height % patch_size or width % patch_size:
            hint = (
                ", ".join(f"{(s // patch_size or 1) * patch_size}" for s in (height, width))
                if patch_size >= 1
                else "16"
            )
            raise ValueError(
                f"vit_s16: data.image_size={height}x{width} cannot be tiled by "
                f"model.patch_size={patch_size} patches: both sides must be multiples of the "
                f"patch size (e.g. data.image_size=[{hint}]), or pick a patch size that "
                "divides both"
            )
        vit = VisionTransformer(
            img_size=(height, width),
            patch_size=patch_size,
            in_chans=in_channels,
            num_classes=0,
            global_pool="",
            embed_dim=384,
            depth=12,
            num_heads=6,
            mlp_ratio=4.0,
        )
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.grid = tuple(vit.patch_embed.grid_size)
        self.patch_size = patch_size
        self.out_channels = vit.embed_dim
        self.output_stride = patch_size

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, 384, H/patch, W/patch)."""
        tokens = self.patch_embed(x)  # (B, N, D); timm checks the image size
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        tokens = self.blocks(torch.cat([cls, tokens], dim=1) + self.pos_embed)  # (B, 1 + N, D)
        return tokens_to_map(self.norm(tokens)[:, 1:], self.grid)  # (B, D, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def parts(self) -> TrunkParts:
        """Token stem, timm's blocks, final norm + class-token drop (one per task)."""
        stem = ClassTokenStem(self.patch_embed, self.cls_token, self.pos_embed)
        neck = TokenNeck(self.norm, self.grid, prefix_tokens=1)
        return TrunkParts(stem, list(self.blocks), neck, channel_dim=2)

    def pretrained_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A timm ViT state dict in this module's keys (timm's own): the classifier
        (``head.*``, ``fc_norm.*``) is dropped, and a position embedding for another grid is
        resampled to this one (timm's ``resample_abs_pos_embed``), as is a patch embedding
        for another patch size (``resample_patch_embed``, FlexiViT's resize)."""
        from timm.layers import resample_abs_pos_embed, resample_patch_embed

        out = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
        pos = out.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape[1] != self.pos_embed.shape[1]:
            out["pos_embed"] = resample_abs_pos_embed(pos, list(self.grid), num_prefix_tokens=1)
        weight = out.get("patch_embed.proj.weight")
        if weight is not None and weight.ndim == 4 and weight.shape[-1] != self.patch_size:
            size = [self.patch_size, self.patch_size]
            out["patch_embed.proj.weight"] = resample_patch_embed(weight, size)
        return out

    @property
    def first_conv(self) -> str:
        """The state-dict key of the patch embedding's weight (grey inputs adapt it)."""
        return "patch_embed.proj.weight"


def torchvision_resnet(arch: str):
    """A ``BACKBONES`` builder for one torchvision ResNet (``model.output_stride``)."""

    def build(cfg, in_channels: int, image_size: tuple[int, int]) -> TorchvisionResNet:
        del image_size  # fully convolutional
        return TorchvisionResNet(arch, in_channels, cfg.output_stride)

    build.__doc__ = f"torchvision's {arch} from config (``model.output_stride``)."
    return build


def vit_s16(cfg, in_channels: int, image_size: tuple[int, int]) -> TimmViT:
    """timm's ViT-S from config: ``model.patch_size`` (0 = 16, as published)."""
    return TimmViT(in_channels, image_size, cfg.patch_size or 16)
