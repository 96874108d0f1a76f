"""What the training log reports between two log lines: losses, throughput, data wait.

Kept on device where it can be (loss sums), so the step never syncs with the host; the
host sync happens in ``flush``, only when logging.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from typing import Any

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB); Linux reports ``ru_maxrss`` in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StatsWindow:
    """Running loss sums between two log lines, kept on device to avoid host syncs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: tuple[str, ...] = ()  # loss names, fixed by the first batch
        self._reset()

    def _reset(self) -> None:
        self.sums: torch.Tensor | None = None
        self.samples = 0
        self.batches = 0
        self.data_wait = 0.0  # seconds spent waiting for the loader's next batch
        self.start = time.perf_counter()

    def timed(self, loader: Any) -> Iterator[Any]:
        """The loader's batches, adding the time each one kept the step waiting."""
        iterator = iter(loader)  # starts loader processes: counted as waiting too
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            self.data_wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    def add(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], n: int) -> None:
        self.keys = self.keys or tuple(losses)
        values = torch.stack([loss.float()] + [losses[k].float() for k in self.keys]).double()
        self.sums = values if self.sums is None else self.sums + values
        self.samples += n
        self.batches += 1

    def flush(self, world: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        means = (self.sums / self.batches).tolist() if self.sums is not None else [0.0]
        stats = {"train/loss": means[0]}
        stats.update({f"train/loss/{k}": m for k, m in zip(self.keys, means[1:], strict=False)})
        # Every rank processes the same number of samples per step, so global = local x world.
        stats["train/samples_per_s"] = self.samples * world / max(elapsed, 1e-9)
        stats["train/data_wait_fraction"] = min(1.0, self.data_wait / max(elapsed, 1e-9))
        self._reset()
        return stats
