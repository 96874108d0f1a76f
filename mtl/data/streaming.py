"""A split streamed from files: samples are read, decoded and augmented per batch.

A split is a *sample table*: equal-length numpy columns of per-sample references (relative
file paths, class ids, attribute rows, domain codes), never pixels. Fixed-width numpy
columns rather than Python lists: they cost a few bytes per sample and, unlike lists of
``str`` objects, are not copied page by page into forked loader processes by reference
counting. So a worker's memory does not grow with the dataset, and nothing is built before
the first step; the price is decoding every image every epoch, which ``DataLoader`` worker
processes (``data.loader_workers``) do ahead of the training step.

A benchmark supplies a *reader*, ``read(row) -> {"image": (C, H, W) uint8 or float in [0, 1],
<head>: raw target}`` for one row (a dict of the table's values), that opens the files in
the dataset's published layout. This module turns raw targets into typed tensors, applies
one ``torchvision.transforms.v2`` pipeline to the image and all dense targets together
(``mtl.data.transforms``) and collates the batch contract of ``mtl.data.dataset``.

Augmentation is seeded per sample by ``(seed, epoch, index)``, not by the process's random
state, so it is the same with any number of loader processes and after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from mtl.data.dataset import only_sample
from mtl.data.errors import DatasetCorruptError
from mtl.data.samplers import mixed_seed
from mtl.data.transforms import sample_transform, typed_target
from mtl.losses import IGNORE_INDEX
from mtl.tasks import BINARY, DENSE_CLASSIFICATION, DENSE_KINDS, TaskSpec

Rows = dict[str, np.ndarray]  # column -> (N, ...) values, one row per sample
Reader = Callable[[dict[str, Any]], dict[str, Any]]
UNLABELLED_PIXEL = 255  # how published label maps mark pixels without a label


def take_rows(rows: Rows, keep: np.ndarray) -> Rows:
    """The rows at ``keep`` (indices or a boolean mask) of every column."""
    return {name: values[keep] for name, values in rows.items()}


def describe_row(row: dict[str, Any]) -> str:
    """The row's file references, for error messages."""
    files = [str(v) for v in row.values() if isinstance(v, (str, np.str_))]
    return ", ".join(files) if files else repr(row)


class FileDataset(Dataset):
    """A split read from files batch by batch (see the module docstring).

    Args:
        rows: The sample table; ``domain`` (int64 codes into ``domains``) for multi-domain.
        read: Opens one row's files (``Reader``).
        specs: Head name -> its task; only these heads' targets are served.
        size: Output ``(height, width)`` of every image and dense target.
        train: Augment (random scale crop, flip) or only resize.
        scale: Crop area fraction ``(min, max)`` for augmentation.
        hflip: Flip horizontally at random (train only).
        seed: Base seed of the per-sample augmentation.
        domains: Domain names (multi-domain), else empty.
    """

    decodes_per_batch = True  # make_loader may hand batches to loader processes

    def __init__(
        self,
        rows: Rows,
        read: Reader,
        specs: dict[str, TaskSpec],
        size: tuple[int, int],
        *,
        train: bool,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        seed: int = 0,
        domains: tuple[str, ...] = (),
    ) -> None:
        lengths = {name: len(v) for name, v in rows.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"sample table columns differ in length: {lengths}")
        if bool(domains) != ("domain" in rows):
            raise ValueError("give both domains and a 'domain' column (multi-domain) or neither")
        self.rows, self.read, self.specs = rows, read, specs
        self.size, self.train, self.seed = tuple(size), train, seed
        self.domains = tuple(domains)
        self.transform = sample_transform(self.size, train=train, scale=scale, hflip=hflip)
        self.epoch = 0
        self._length = next(iter(lengths.values()), 0)

    @property
    def multi_domain(self) -> bool:
        return bool(self.domains)

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation; the loop calls it before each epoch's iterator starts."""
        self.epoch = epoch

    def domain_indices(self) -> list[Tensor]:
        """Row indices of each domain, in ``domains`` order (for domain-weighted sampling)."""
        if not self.multi_domain:
            raise ValueError("not a multi-domain dataset")
        codes = torch.from_numpy(np.asarray(self.rows["domain"], dtype=np.int64))
        return [torch.nonzero(codes == d).flatten() for d in range(len(self.domains))]

    def row(self, index: int) -> dict[str, Any]:
        return {name: values[index] for name, values in self.rows.items()}

    def sample(self, index: int) -> dict[str, Any]:
        """One decoded, transformed sample: ``image`` float (C, H, W), targets by head."""
        row = self.row(index)
        try:
            raw = self.read(row)
        except DatasetCorruptError:
            raise
        except Exception as err:  # a decoder's own message rarely names the file
            raise DatasetCorruptError(
                f"cannot read sample {index} ({describe_row(row)}): {err}. Replace or remove "
                "the file, or fix its entry in the split list."
            ) from err
        dense = {"image": _as_image(torch.as_tensor(raw["image"]))}
        scalars: dict[str, Tensor] = {}
        for name, spec in self.specs.items():
            value = raw[name]
            if spec.kind in DENSE_KINDS:
                value = torch.as_tensor(value)
                if tuple(value.shape[-2:]) != tuple(dense["image"].shape[-2:]):
                    raise DatasetCorruptError(
                        f"sample {index} ({describe_row(row)}): target {name!r} is "
                        f"{tuple(value.shape[-2:])} pixels but the image is "
                        f"{tuple(dense['image'].shape[-2:])}; dense targets must match "
                        "their image's height and width"
                    )
                dense[name] = typed_target(spec.kind, value)
            else:
                dtype = torch.float32 if spec.kind == BINARY else torch.int64
                scalars[name] = torch.as_tensor(value, dtype=dtype)
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mixed_seed(self.seed, self.epoch, index))
                dense = self.transform(dense)
        else:
            dense = self.transform(dense)
        out = {"image": F.to_dtype(dense.pop("image"), torch.float32, scale=True)}
        for name, value in dense.items():
            value = value.as_subclass(Tensor)
            if self.specs[name].kind == DENSE_CLASSIFICATION:
                value = value.long()
                value[(value == UNLABELLED_PIXEL) | (value < 0)] = IGNORE_INDEX
            else:
                value = value.float()
            out[name] = value
        out.update(scalars)
        return out

    def __getitems__(self, indices: Sequence[int] | Tensor) -> dict:
        """One batch in the contract of ``mtl.data.dataset``."""
        index = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        samples = [self.sample(int(i)) for i in index]
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in samples]),
            "targets": {name: torch.stack([s[name] for s in samples]) for name in self.specs},
        }
        if self.multi_domain:
            batch["domain"] = torch.as_tensor(self.rows["domain"][index], dtype=torch.int64)
        return batch

    def __getitem__(self, index: int) -> dict:
        """One sample (batch layout without the leading dimension); for inspection only."""
        return only_sample(self.__getitems__([index]))


def _as_image(image: Tensor) -> Tensor:
    """A ``tv_tensors.Image`` from ``(C, H, W)`` or ``(H, W)``; floats must lie in [0, 1]."""
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise DatasetCorruptError(f"images must be uint8 or float, got {image.dtype}")
    return tv_tensors.Image(image if image.ndim == 3 else image[None])
