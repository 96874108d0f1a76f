"""An in-memory split that serves whole batches by array indexing.

Columns are loaded from the Arrow cache once, as compact uint8 / int64 tensors (MultiMNIST
at 20k samples is about 100 MB). ``__getitems__`` receives a batch of indices (the
``DataLoader`` calls it instead of ``__getitem__`` per sample) and decodes the stored codes
to the batch contract, so the hot path is a handful of vectorised ops per batch. They run
in numpy on views of the same memory: single-threaded by design, because torch's intra-op
threads on batch-sized copies slow down by 20-100x when the cores are busy with training
(about 50 us per MultiMNIST batch of 64 either way when idle). The batch:

    {"image": float32 (B, C, H, W) in [0, 1],
     "targets": {head: int64 (B,) | int64 (B, H, W) | float32 (B, C, H, W)},
     "domain": int64 (B,)}            # multi-domain only; indexes ``domains``
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl.tasks import DENSE_REGRESSION, TaskSpec


def decode_target(stored: np.ndarray, spec: TaskSpec, scale: float = 1.0) -> Tensor:
    """Stored integer codes -> the dtype and shape of ``spec``'s target."""
    if spec.kind == DENSE_REGRESSION:
        values = stored.astype(np.float32)
        values *= np.float32(scale)
        return torch.from_numpy(values[:, None] if values.ndim == 3 else values)  # (B, 1, H, W)
    return torch.from_numpy(stored.astype(np.int64, copy=False))


def only_sample(batch: dict) -> dict:
    """A batch of one sample without its leading dimension."""
    sample = {"image": batch["image"][0], "targets": {k: v[0] for k, v in batch["targets"].items()}}
    if "domain" in batch:
        sample["domain"] = batch["domain"][0]
    return sample


class ArrayDataset(Dataset):
    """A split held as tensors; samples are rows.

    Args:
        images: ``uint8 (N, C, H, W)``.
        targets: head name -> stored tensor with N rows (int64 labels, uint8 codes).
        specs: head name -> its ``TaskSpec`` (decides the decoded dtype and shape).
        scales: dense-regression head -> factor from stored code to served value.
        domains: Domain names for a multi-domain split, else empty.
        domain: ``int64 (N,)`` index into ``domains`` (multi-domain only).
    """

    decodes_per_batch = False  # batches are array lookups: no loader processes needed

    def __init__(
        self,
        images: Tensor,
        targets: dict[str, Tensor],
        specs: dict[str, TaskSpec],
        scales: dict[str, float] | None = None,
        domains: tuple[str, ...] = (),
        domain: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if set(targets) != set(specs):
            raise ValueError(
                f"targets {sorted(targets)} and specs {sorted(specs)} name different heads"
            )
        if bool(domains) != (domain is not None):
            raise ValueError("give both domains and domain (multi-domain) or neither")
        for name, column in {**targets, "domain": domain}.items():
            if column is not None and len(column) != len(images):
                raise ValueError(
                    f"column {name!r} has {len(column)} rows, images have {len(images)}"
                )
        self.images = images
        self.targets = targets
        # numpy views sharing the tensors' memory, for the hot path
        self._arrays = {name: t.numpy() for name, t in {**targets, "image": images}.items()}
        self._domain = None if domain is None else domain.numpy()
        self.specs = specs
        self.scales = dict(scales or {})
        self.domains = tuple(domains)
        self.domain = domain

    @property
    def multi_domain(self) -> bool:
        return bool(self.domains)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """No-op: in-memory splits are not augmented (same interface as a streamed split)."""

    def __getitems__(self, indices: Sequence[int] | Tensor) -> dict:
        """One batch in the contract of the module docstring."""
        index = indices.numpy() if isinstance(indices, Tensor) else np.asarray(indices, np.int64)
        image = np.take(self._arrays["image"], index, axis=0).astype(np.float32)
        image *= np.float32(1.0 / 255.0)
        batch = {"image": torch.from_numpy(image), "targets": {}}
        for name, spec in self.specs.items():
            stored = np.take(self._arrays[name], index, axis=0)
            batch["targets"][name] = decode_target(stored, spec, self.scales.get(name, 1.0))
        if self._domain is not None:
            batch["domain"] = torch.from_numpy(np.take(self._domain, index))
        return batch

    def __getitem__(self, index: int) -> dict:
        """One sample (batch layout without the leading dimension); for inspection only."""
        return only_sample(self.__getitems__([index]))

    def domain_indices(self) -> list[Tensor]:
        """Row indices of each domain, in ``domains`` order (for domain-weighted sampling)."""
        if self.domain is None:
            raise ValueError("not a multi-domain dataset")
        return [torch.nonzero(self.domain == d).flatten() for d in range(len(self.domains))]
