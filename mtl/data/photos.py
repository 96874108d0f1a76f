"""Real colour photographs that ship inside scikit-image and scikit-learn, for ``mnist_m``.

Only files inside the installed packages are read (by path, with PIL), so nothing triggers
``skimage.data``'s pooch downloads. Synthetic pictures (logo, chessboard, phantom, colour
wheel) and grey ones are left out. Train and val use disjoint photos; the two motorcycle
stereo views show one scene, so they stay on the same side.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from mtl.data.errors import DatasetMissingError

# (package, path inside the package)
TRAIN_PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/retina.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
)
VAL_PHOTOS = (
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
PHOTOS = {"train": TRAIN_PHOTOS, "val": VAL_PHOTOS}
# Photos are scaled so their short side is this long: close to the BSDS500 photos of the
# published MNIST-M, so a 28x28 crop holds texture rather than one flat colour.
SHORT_SIDE = 256


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (skimage is slow)
    if spec is None or spec.origin is None:
        raise DatasetMissingError(f"package {package!r} is not installed; mnist_m needs its photos")
    return Path(spec.origin).parent


def photo_path(package: str, relative: str) -> Path:
    return _package_dir(package) / relative


def package_files(files: tuple[tuple[str, str], ...], why: str) -> dict[str, Path]:
    """``"<package>:<relative path>"`` -> the installed file, for a cache fingerprint.

    Raises:
        DatasetMissingError: A file is missing from its installed package.
    """
    out = {}
    for package, relative in files:
        path = photo_path(package, relative)
        if not path.is_file():
            raise DatasetMissingError(
                f"{path} is missing from the installed {package}; {why} needs it: reinstall "
                f"scikit-image and scikit-learn (the files ship inside them)"
            )
        out[f"{package}:{relative}"] = path
    return out


def load_photo(package: str, relative: str) -> np.ndarray:
    """One photo as ``uint8 (H, W, 3)`` with short side ``SHORT_SIDE``."""
    path = photo_path(package, relative)
    if not path.is_file():
        raise DatasetMissingError(
            f"mnist_m photo {path} is missing from the installed {package}; reinstall "
            f"scikit-image and scikit-learn (the photos ship inside them)"
        )
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = SHORT_SIDE / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def random_crops(photo: np.ndarray, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random ``uint8 (size, size, 3)`` crops of one photo, by one gather."""
    height, width = photo.shape[:2]
    ys = rng.integers(0, height - size + 1, size=count)
    xs = rng.integers(0, width - size + 1, size=count)
    rows = ys[:, None] + np.arange(size)  # (count, size)
    cols = xs[:, None] + np.arange(size)
    return photo[rows[:, :, None], cols[:, None, :]]  # (count, size, size, 3)


def blend(digits: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """MNIST-M style ``|patch - digit|`` per RGB channel.

    Args:
        digits: ``uint8 (N, H, W)`` gray digits.
        patches: ``uint8 (N, H, W, 3)`` photo crops.

    Returns:
        ``uint8 (N, 3, H, W)``.
    """
    blended = np.abs(patches.astype(np.int16) - digits[..., None].astype(np.int16))
    return np.ascontiguousarray(blended.astype(np.uint8).transpose(0, 3, 1, 2))
