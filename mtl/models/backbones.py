"""Small convolutional and transformer trunks for 28-36 px images, and the backbone contract.

Every backbone (these, and the standard ones in ``mtl.models.standard``) returns a feature
map, ``forward_features(x) -> (B, out_channels, h, w)``, so every head (pooled or dense)
reads the same interface, whichever trunk runs; it has ``out_channels`` and
``output_stride`` (input pixels per feature-map pixel), and ``parts()``, the cut into a
stem, blocks and a neck that InterroGate and the task-expert MoE rebuild the trunk from.
The small trunks are sized to train at hundreds of samples per second on one CPU thread
with the default ``ModelConfig``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.config import ModelConfig


def block_type_name(cls: type) -> str:
    """``module.QualName`` of a class (see ``block_type``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def block_type(block: nn.Module) -> str:
    """A block's exact class as ``module.QualName``: the key of the per-block-type registries
    (budget rows, pruners, MoE experts). A name, not the class, so that those registries
    list timm's block without importing timm for users of the small trunks; exact, because a
    subclass may compute something else."""
    return block_type_name(type(block))


class TrunkParts(NamedTuple):
    """A backbone cut into what InterroGate shares (stem) and duplicates (blocks, neck).

    ``neck(blocks(stem(x)))`` equals ``forward_features(x)``; the parts are the backbone's
    own modules (not copies).
    """

    stem: nn.Module
    blocks: list[nn.Module]
    neck: nn.Module  # stream -> (B, C, h, w) feature map for the heads; one copy per task
    channel_dim: int  # the gated dim of the stream


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch tokens ``(B, N, D)`` as a feature map ``(B, D, h, w)``, ``N = h * w``."""
    B, _, D = tokens.shape
    return tokens.transpose(1, 2).reshape(B, D, *grid)


class TokenStem(nn.Module):
    """A ViT's patch embedding and position embedding: ``(B, C, H, W) -> (B, N, D)``."""

    def __init__(
        self, patch_embed: nn.Module, pos_embed: nn.Parameter, grid: tuple[int, int]
    ) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.pos_embed = pos_embed
        self.grid = grid

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, D, h, w)
        if tuple(x.shape[-2:]) != tuple(self.grid):
            raise ValueError(
                f"vit was built for {self.grid[0]}x{self.grid[1]} patches, got "
                f"{tuple(x.shape[-2:])}: "
                "the input size must equal the task set's image_size"
            )
        return x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)


class TokenNeck(nn.Module):
    """A ViT's final norm, then patch tokens back to a map: ``(B, P + N, D) -> (B, D, h, w)``,
    dropping the ``prefix_tokens`` (class token) in front."""

    def __init__(self, norm: nn.Module, grid: tuple[int, int], prefix_tokens: int = 0) -> None:
        super().__init__()
        self.norm = norm
        self.grid = grid
        self.prefix_tokens = prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        return tokens_to_map(self.norm(x)[:, self.prefix_tokens :], self.grid)


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions and an identity (or projected) shortcut.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: a strided 3x3 stem, then ``depth`` basic blocks at 1/2 resolution.

    The first half of the blocks runs at ``width`` channels, the second half at
    ``2 * width``. The stem has stride 2 so that every block runs at half the input
    resolution, which is what makes the network fast on one CPU thread; a 3x3 kernel at
    stride 2 still reads every input pixel, so thin strokes of a 28 px digit are not skipped.

    Args:
        in_channels: Image channels.
        width: Channels of the first stage; the output has ``2 * width`` channels.
        depth: Number of basic blocks (at least 1).
    """

    def __init__(self, in_channels: int, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"resnet needs model.depth >= 1 and model.width >= 1, got {depth=}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        first_stage = depth // 2  # depth 1 gives a single (wide, strided) block
        blocks: list[nn.Module] = []
        channels = width
        for i in range(depth):
            out = width if i < first_stage else 2 * width
            blocks.append(BasicBlock(channels, out))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = 2 * width
        self.output_stride = 2
        _init_conv(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, 2*width, ceil(H/2), ceil(W/2))."""
        return self.blocks(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def parts(self) -> TrunkParts:
        """Stem, basic blocks; streams are ``(B, C, h, w)`` maps gated on dim 1."""
        return TrunkParts(self.stem, list(self.blocks), nn.Identity(), channel_dim=1)


def _init_conv(module: nn.Module) -> None:
    """He init for convolutions, as torchvision's ResNets do, because every conv feeds a ReLU.

    The last BN of a block is not zero-initialised: at 4 blocks it buys nothing, and it
    would leave exact-zero gradients that hide wiring bugs in the gradient tests.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class Attention(nn.Module):
    """Multi-head self-attention over tokens, with fused QKV.

    Args:
        dim: Token dimension.
        num_heads: Attention heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        y = y.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(y)


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

    Args:
        dim: Token dimension.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP as a multiple of ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer that returns its patch tokens as a feature map.

    There is no class token: classification heads pool the map like they pool a CNN's, so
    the same heads serve both trunks. The position embedding is learned and sized for
    ``image_size``; other input sizes are rejected rather than silently interpolated.

    Args:
        in_channels: Image channels.
        image_size: Input ``(height, width)`` (or one number for a square); both must be
            multiples of ``patch_size``.
        dim: Token (embedding) dimension, the output channels.
        depth: Number of transformer blocks.
        patch_size: Side of the square patches.
        num_heads: Attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width over ``dim``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | tuple[int, int],
        dim: int = 32,
        depth: int = 4,
        patch_size: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"vit: image size {height}x{width} is not a multiple of model.patch_size="
                f"{patch_size}; pick a patch size that divides both (e.g. 4 for 28 or 36 px)"
            )
        if dim % num_heads:
            raise ValueError(
                f"vit: model.width={dim} is not divisible by model.num_heads={num_heads}"
            )
        self.grid = (height // patch_size, width // patch_size)  # patches (rows, columns)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.blocks = nn.Sequential(
            *(TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.out_channels = dim
        self.output_stride = patch_size
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, dim, H/patch, W/patch)."""
        x = self.patch_embed(x)  # (B, D, h, w)
        B, D, h, w = x.shape
        if (h, w) != self.grid:
            raise ValueError(
                f"vit was built for {self.grid[0]}x{self.grid[1]} patches, got {h}x{w}: "
                "the input size must equal the task set's image_size"
            )
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        return tokens_to_map(self.norm(self.blocks(x)), (h, w))  # (B, D, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def parts(self) -> TrunkParts:
        """Patch + position embedding, transformer blocks, final norm; streams are
        ``(B, N, D)`` tokens gated on the embedding dim. The final norm goes to each task,
        so each task normalises its own stream."""
        stem = TokenStem(self.patch_embed, self.pos_embed, self.grid)
        return TrunkParts(stem, list(self.blocks), TokenNeck(self.norm, self.grid), 2)


def resnet(cfg: ModelConfig, in_channels: int, image_size: tuple[int, int]) -> ResNet:
    """ResNet from config: ``model.width`` and ``model.depth`` (``image_size`` is unused:
    the network is fully convolutional)."""
    del image_size
    return ResNet(in_channels, width=cfg.width, depth=cfg.depth)


def vit(cfg: ModelConfig, in_channels: int, image_size: tuple[int, int]) -> ViT:
    """ViT from config: ``model.width`` is the embedding dim, ``model.depth`` the blocks,
    ``model.patch_size`` the patch side (0 = 4)."""
    return ViT(
        in_channels,
        image_size,
        dim=cfg.width,
        depth=cfg.depth,
        patch_size=cfg.patch_size or 4,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
    )
