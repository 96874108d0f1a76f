"""Geometry that moves every target with its image: torchvision transforms v2 and typed targets.

One v2 pipeline transforms a sample dict ``{"image": Image, <head>: target, ...}``; each
value's type decides how (the v2 design: geometry is written once per type, not once per
task). Label maps are ``tv_tensors.Mask`` (nearest neighbour). Two target types are ours,
because their values change with the geometry, not only their positions:

- ``Depth`` ``(1, H, W)``: nearest neighbour; a random resized crop that magnifies the scene
  by ``s`` divides depth by ``s`` (the scene looks ``s`` times closer), as LibMTL's
  ``RandomScaleCrop`` does. A plain resize of the whole image does not change depth.
- ``Normals`` ``(3, H, W)``: nearest neighbour (so no unit vector is averaged with an
  unlabelled zero vector); a horizontal flip negates the x component.

Scalar targets (class ids, attributes) are not in the transformed dict at all.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from mtl.tasks import (
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
)

NEAREST = v2.InterpolationMode.NEAREST


class Depth(tv_tensors.TVTensor):
    """A depth map ``(1, H, W)``, float; 0 marks pixels without a measurement."""

    def __new__(cls, data: Any) -> Depth:
        return torch.as_tensor(data).as_subclass(cls)


class Normals(tv_tensors.TVTensor):
    """Surface normals ``(3, H, W)`` (x right, y, z), unit vectors; 0 marks unlabelled pixels."""

    def __new__(cls, data: Any) -> Normals:
        return torch.as_tensor(data).as_subclass(cls)


def _plain(x: Tensor) -> Tensor:
    return x.as_subclass(Tensor)


def _resize_nearest(x: Tensor, size: list[int]) -> Tensor:
    return F.resize(_plain(x), size, interpolation=NEAREST, antialias=False)


def _zoom(height: int, width: int, crop_h: int, crop_w: int) -> float:
    """How much a crop of ``crop_h x crop_w`` out of ``height x width`` magnifies the scene."""
    return math.sqrt((height * width) / (crop_h * crop_w))


for _cls in (Depth, Normals):

    @F.register_kernel(F.resize, _cls)
    def _resize(x: Tensor, size: list[int], *args: Any, **kwargs: Any) -> Tensor:
        return tv_tensors.wrap(_resize_nearest(x, size), like=x)

    @F.register_kernel(F.crop, _cls)
    def _crop(x: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
        return tv_tensors.wrap(F.crop(_plain(x), top, left, height, width), like=x)


@F.register_kernel(F.resized_crop, Depth)
def _resized_crop_depth(
    x: Tensor, top: int, left: int, height: int, width: int, size: list[int], **kwargs: Any
) -> Tensor:
    out = _resize_nearest(F.crop(_plain(x), top, left, height, width), size)
    return tv_tensors.wrap(out / _zoom(x.shape[-2], x.shape[-1], height, width), like=x)


@F.register_kernel(F.resized_crop, Normals)
def _resized_crop_normals(
    x: Tensor, top: int, left: int, height: int, width: int, size: list[int], **kwargs: Any
) -> Tensor:
    out = _resize_nearest(F.crop(_plain(x), top, left, height, width), size)
    return tv_tensors.wrap(out, like=x)


@F.register_kernel(F.horizontal_flip, Depth)
def _flip_depth(x: Tensor) -> Tensor:
    return tv_tensors.wrap(_plain(x).flip(-1), like=x)


@F.register_kernel(F.horizontal_flip, Normals)
def _flip_normals(x: Tensor) -> Tensor:
    out = _plain(x).flip(-1).clone()
    out[0] = -out[0]  # x points the other way in a mirrored scene
    return tv_tensors.wrap(out, like=x)


def typed_target(kind: str, value: Tensor) -> Tensor:
    """Wrap a dense target so v2 transforms it as its kind requires."""
    if kind == DEPTH:
        return Depth(value)
    if kind == NORMALS:
        return Normals(value)
    if kind in (DENSE_CLASSIFICATION, SALIENCY, DENSE_REGRESSION):
        return tv_tensors.Mask(value)
    raise ValueError(f"task kind {kind!r} has no dense target type")


class RandomScaleCrop(v2.Transform):
    """Crop a random region with the input's own aspect ratio, then resize it to ``size``.

    ``torchvision``'s ``RandomResizedCrop`` draws the crop's aspect ratio from a fixed range;
    here it is the input's, so a crop distorts the image exactly as the validation resize of
    the whole image does, and only the magnification differs (as LibMTL's ``RandomScaleCrop``).

    Args:
        size: Output ``(height, width)``.
        scale: Crop area as a fraction of the input area, ``(min, max)``.
    """

    def __init__(self, size: tuple[int, int], scale: tuple[float, float]) -> None:
        super().__init__()
        self.size = list(size)
        self.scale = scale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        area = float(torch.empty(1).uniform_(self.scale[0], self.scale[1]))
        crop_h = max(1, round(height * math.sqrt(area)))
        crop_w = max(1, round(width * math.sqrt(area)))
        top = int(torch.randint(0, height - crop_h + 1, (1,)))
        left = int(torch.randint(0, width - crop_w + 1, (1,)))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resized_crop, inpt, **params, size=self.size, antialias=True)


def sample_transform(
    size: tuple[int, int], *, train: bool, scale: tuple[float, float], hflip: bool
) -> v2.Transform:
    """The pipeline of one split: train crops and flips at random; val only resizes.

    Args:
        size: Output ``(height, width)``.
        train: Augment (``RandomScaleCrop``, then a horizontal flip).
        scale: Crop area as a fraction of the image, ``(min, max)``.
        hflip: Flip horizontally with probability 1/2 (train only).
    """
    if not train:
        return v2.Resize(list(size), antialias=True)
    steps: list[v2.Transform] = [RandomScaleCrop(size, scale)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)
