"""Whole-array image operations used while building a cache (never on the training path)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 4096  # bounds the float32 copy made while resizing


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``uint8 (N, C, H, W)`` images to ``size`` x ``size`` (bilinear, antialiased).

    A no-op when the size already matches, so the default sizes store the source pixels.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = np.empty(images.shape[:2] + (size, size), dtype=np.uint8)
    for start in range(0, len(images), _CHUNK):
        chunk = torch.from_numpy(images[start : start + _CHUNK]).float()
        # antialias only acts when shrinking; it keeps thin strokes from aliasing away
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Resize ``uint8 (N, H, W)`` label maps with nearest neighbour, so codes stay exact."""
    if labels.shape[-2:] == (size, size):
        return labels
    out = np.empty((len(labels), size, size), dtype=labels.dtype)
    for start in range(0, len(labels), _CHUNK):
        chunk = torch.from_numpy(labels[start : start + _CHUNK])[:, None].float()
        resized = F.interpolate(chunk, size=(size, size), mode="nearest-exact")
        out[start : start + _CHUNK] = resized[:, 0].to(torch.uint8).numpy()
    return out


def gray_to_rgb(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` or ``(N, 1, H, W)`` gray -> ``(N, 3, H, W)`` by replication."""
    if images.ndim == 3:
        images = images[:, None]
    return np.ascontiguousarray(np.repeat(images, 3, axis=1))
