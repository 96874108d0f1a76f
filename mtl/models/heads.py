"""Task heads: one small module per task kind, reading a backbone's feature map.

Every head has the same call signature, ``head(features, size) -> output``, where ``size`` is
the input image's ``(H, W)``; pooled heads ignore it and dense heads upsample to it. Sharing
one signature lets a model keep its heads in an ``nn.ModuleDict`` and call them in a loop.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("none", "sigmoid")


def conv_decoder(in_channels: int, hidden: int, rates: tuple[int, ...]) -> nn.Sequential:
    """One 3x3 conv block: enough for the small trunks' 1/2-resolution maps."""
    del rates
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, 1, 1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
    )


def aspp_decoder(in_channels: int, hidden: int, rates: tuple[int, ...]) -> nn.Sequential:
    """DeepLabv3's head without its classifier (Chen et al. 2017, arXiv 1706.05587):
    torchvision's ASPP (a 1x1, three atrous 3x3 and an image-pooling branch, projected to
    ``hidden``), then a 3x3 conv block. It is ``torchvision``'s ``DeepLabHead`` with its width
    as a parameter; one per dense task, as in the dense multi-task literature (Vandenhende et
    al. 2021). Its image-pooling branch normalises a 1x1 map, so it trains with micro-batches
    of 2 or more."""
    from torchvision.models.segmentation.deeplabv3 import ASPP

    return nn.Sequential(
        ASPP(in_channels, rates, hidden),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
    )


DECODERS = {"conv": conv_decoder, "aspp": aspp_decoder}


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLabv3's atrous rates: (6, 12, 18) at output stride 16, doubled at 8, halved at 32
    (the rates cover the same image area whatever the stride)."""
    return tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))


class ClassificationHead(nn.Module):
    """Global average pool and a linear layer: ``(B, C, h, w) -> (B, num_outputs)``.

    Args:
        in_channels: Channels of the feature map.
        num_outputs: Number of classes.
    """

    def __init__(self, in_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_outputs)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        del size  # a pooled prediction has no spatial size
        return self.fc(features.mean(dim=(2, 3)))  # (B, K)


class DenseHead(nn.Module):
    """A decoder at the backbone's output stride, a 1x1 projection, and bilinear upsampling
    to the input size.

    Predicting at feature resolution and upsampling the (few) output channels is far cheaper
    than upsampling the features; at 1/2 to 1/4 resolution on digit images the loss of
    detail is small, and at 1/8 or 1/16 the ASPP decoder's atrous context carries the
    detail, as in DeepLabv3. The decoder gives each task some private spatial capacity.

    Args:
        in_channels: Channels of the feature map.
        num_outputs: Output channels (classes, or regression channels).
        hidden: Channels of the decoder.
        activation: "none" for logits or unbounded values, "sigmoid" for targets in [0, 1]
            (e.g. image reconstruction).
        decoder: A key of ``DECODERS``: "conv" (one 3x3 conv block) or "aspp".
        rates: The ASPP's atrous rates (``aspp_rates``); unused by "conv".
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        hidden: int = 32,
        activation: str = "none",
        decoder: str = "conv",
        rates: tuple[int, ...] = (6, 12, 18),
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"dense head activation {activation!r} is not one of {ACTIVATIONS}")
        if decoder not in DECODERS:
            raise ValueError(f"model.dense_head={decoder!r} is not one of {sorted(DECODERS)}")
        self.activation = activation
        self.conv = DECODERS[decoder](in_channels, hidden, tuple(rates))
        self.proj = nn.Conv2d(hidden, num_outputs, 1)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        out = self.proj(self.conv(features))  # (B, K, h, w)
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)
        return out.sigmoid() if self.activation == "sigmoid" else out


class DenseClassificationHead(DenseHead):
    """Per-pixel class logits at the input resolution: ``(B, num_outputs, H, W)``."""

    def __init__(self, in_channels: int, num_outputs: int, hidden: int = 32, **decoder) -> None:
        super().__init__(in_channels, num_outputs, hidden, activation="none", **decoder)


class DenseRegressionHead(DenseHead):
    """Per-pixel values at the input resolution: ``(B, num_outputs, H, W)``.

    ``activation="sigmoid"`` bounds the output to [0, 1]; the default leaves it unbounded.
    """


def _check_outputs(kind: str, num_outputs: int, expected: int) -> None:
    if num_outputs != expected:
        raise ValueError(f"a {kind} head has {expected} output(s), got num_outputs={num_outputs}")


class BinaryHead(nn.Module):
    """Global average pool and ``Linear(C, 1)``: one attribute's logit, ``(B, C, h, w) -> (B,)``.

    Kept to one linear layer because a benchmark such as CelebA has 40 of them.

    Args:
        in_channels: Channels of the feature map.
        num_outputs: Must be 1 (one attribute per head).
    """

    def __init__(self, in_channels: int, num_outputs: int = 1) -> None:
        super().__init__()
        _check_outputs("binary", num_outputs, 1)
        self.fc = nn.Linear(in_channels, 1)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        del size  # a pooled prediction has no spatial size
        return self.fc(features.mean(dim=(2, 3))).squeeze(1)  # (B,)


def depth_head(in_channels: int, num_outputs: int = 1, hidden: int = 32, **decoder) -> DenseHead:
    """Per-pixel depth ``(B, 1, H, W)``, unbounded: the L1 loss needs no activation."""
    _check_outputs("depth", num_outputs, 1)
    return DenseHead(in_channels, 1, hidden, **decoder)


def normals_head(in_channels: int, num_outputs: int = 3, hidden: int = 32, **decoder) -> DenseHead:
    """Per-pixel surface normals ``(B, 3, H, W)``, unnormalised: loss and metrics normalise."""
    _check_outputs("normals", num_outputs, 3)
    return DenseHead(in_channels, 3, hidden, **decoder)


def saliency_head(in_channels: int, num_outputs: int = 1, hidden: int = 32, **decoder) -> DenseHead:
    """Per-pixel saliency logits ``(B, 1, H, W)``: BCE with logits, sigmoid for metrics."""
    _check_outputs("saliency", num_outputs, 1)
    return DenseHead(in_channels, 1, hidden, **decoder)
