"""Dense target files of the generic ``files`` layout: PNG or ``.npy``, per task kind.

The encodings are documented in ``mtl.data.files``; this module decodes one file into the
raw target ``FileDataset`` expects: ``(H, W)`` class ids for dense classification,
``(C, H, W)`` floats for the other dense kinds, in served units (metres, unit vectors,
[0, 1]). Every error names the file and what the task needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode

from mtl.data.errors import DatasetCorruptError
from mtl.data.layout_io import load_npy, normals_from_rgb, read_image, read_label_png
from mtl.data.streaming import UNLABELLED_PIXEL
from mtl.tasks import DENSE_CLASSIFICATION, DEPTH, NORMALS, SALIENCY

DEPTH_PNG_UNIT = 1000.0  # a 16-bit depth PNG holds millimetres; served in metres
SUFFIXES = (".png", ".npy")


def channels_of(kind: str, outputs: int) -> int:
    """Channels of a kind's target file (label maps have one)."""
    if kind in (DENSE_CLASSIFICATION, DEPTH, SALIENCY):
        return 1
    return 3 if kind == NORMALS else outputs


def read_target(path: Path, kind: str, outputs: int, size: tuple[int, int]) -> Tensor:
    """One dense target file of ``kind`` that must be ``size`` = the image's (H, W).

    Raises:
        DatasetCorruptError: The file is missing, does not decode, or has the wrong size,
            channels or values.
    """
    if path.suffix.lower() == ".npy":
        target = _from_npy(path, kind, outputs, size)
    else:
        target = _from_png(path, kind, outputs)
    if tuple(target.shape[-2:]) != tuple(size):
        raise DatasetCorruptError(
            f"{path} is {tuple(target.shape[-2:])} pixels (H, W) but its image is "
            f"{tuple(size)}; a dense target must have its image's height and width"
        )
    if kind == DENSE_CLASSIFICATION:
        bad = (target >= outputs) & (target != UNLABELLED_PIXEL)
        if bad.any():
            raise DatasetCorruptError(
                f"{path} holds class id {int(target[bad].max())}, outside [0, {outputs}) and "
                f"not {UNLABELLED_PIXEL} (unlabelled); fix the map or num_outputs"
            )
    return target


def _from_png(path: Path, kind: str, outputs: int) -> Tensor:
    if kind == NORMALS:
        rgb = read_image(path, ImageReadMode.RGB)
        return normals_from_rgb(rgb) * (rgb != 0).any(dim=0)  # black pixels are unlabelled
    if kind == DENSE_CLASSIFICATION:
        return read_label_png(path).long()
    raw = read_image(path, ImageReadMode.UNCHANGED)
    wide = raw.dtype == torch.uint16
    want = channels_of(kind, outputs)
    if raw.shape[0] != want:
        raise DatasetCorruptError(
            f"{path} has {raw.shape[0]} channel(s); a {kind} PNG needs {want}"
        )
    if kind == DEPTH and not wide:
        raise DatasetCorruptError(
            f"{path} is an 8-bit PNG; depth PNGs are 16-bit millimetres (or give a .npy in metres)"
        )
    value = raw.float()
    if kind == DEPTH:
        return value / DEPTH_PNG_UNIT
    if kind == SALIENCY and not wide and value.max() <= 1:
        return value  # a 0/1 mask
    return value / (65535.0 if wide else 255.0)


def _from_npy(path: Path, kind: str, outputs: int, size: tuple[int, int]) -> Tensor:
    array = torch.from_numpy(load_npy(path))
    want = channels_of(kind, outputs)
    shape, size = tuple(array.shape), tuple(size)
    if array.ndim == 2 and want == 1 and shape == size:
        chw = array[None]
    elif array.ndim == 3 and shape[0] == want and shape[1:] == size:
        chw = array
    elif array.ndim == 3 and shape[2] == want and shape[:2] == size:
        chw = array.permute(2, 0, 1)
    else:
        raise DatasetCorruptError(
            f"{path} has shape {shape}; a {kind} target of this sample needs "
            f"{'(H, W), ' if want == 1 else ''}({want}, H, W) or (H, W, {want}) with (H, W) "
            f"= its image's {size}"
        )
    if kind == DENSE_CLASSIFICATION:
        return chw[0].round().long() if chw.is_floating_point() else chw[0].long()
    return chw.float()
