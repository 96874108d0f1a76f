"""Resource use of a sweep: time-multiplexing a population and checkpoint retention.

``TrainSlots`` (a Ray actor during a sweep) queues the trials so that only as many train at
once as the cluster holds; ``prune_checkpoints`` runs after the sweep, when no checkpoint can
be exploited any more. Both are plain Python and are tested without Ray.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mtl.config import Config


class TrainSlots:
    """At most ``n`` trials train at once; the others wait in line (first come, first served).

    This is how a population larger than the cluster is time-multiplexed. Tune's own
    ``max_concurrent_trials`` would not create the rest of the population until some trial
    finished, so PBT would never compare them; and trials reserve no CPU, so Tune alone
    would start every Train job at once to wait for workers. A trial holds a slot only
    while its segment trains: it is released before the trial reports to Tune, where PBT
    may end the trial's process. (A trial process that dies while it holds or waits for a
    slot leaves it taken: Train worker failures do not, they raise and release.)
    """

    def __init__(self, n: int) -> None:
        self.n, self.holders, self.line = n, set(), []
        self.changed: Any = None  # asyncio.Condition, made in the actor's event loop

    async def acquire(self, token: str) -> None:
        import asyncio

        self.changed = self.changed or asyncio.Condition()
        async with self.changed:
            self.line.append(token)
            await self.changed.wait_for(
                lambda: self.line[0] == token and len(self.holders) < self.n
            )
            self.holders.add(self.line.pop(0))
            self.changed.notify_all()

    async def release(self, token: str) -> None:
        async with self.changed:
            self.holders.discard(token)
            self.changed.notify_all()


def trials_at_once(cfg: Config, use_gpu: bool) -> int:
    """``tune.max_concurrent_trials``, else as many Train jobs as the cluster holds at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    import ray

    t, resources = cfg.train, ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)) // t.num_workers)
    return max(1, int(resources.get("CPU", 1)) // (t.num_workers * t.cpus_per_worker))


def prune_checkpoints(sweep_dir: Path, keep: int) -> list[Path]:
    """After a sweep: delete all but each trial's ``keep`` newest checkpoints (0: keep all).

    Returns the deleted folders. Nothing can be exploited any more, and a trial's newest
    checkpoint is the one its model is registered or resumed from.
    """
    removed: list[Path] = []
    if keep <= 0:
        return removed
    for trial in sorted(sweep_dir.glob("trial_*")):
        found = sorted(trial.glob("checkpoint_[0-9]*"), key=lambda p: int(p.name.split("_")[1]))
        for old in found[:-keep]:
            shutil.rmtree(old)
            removed.append(old)
    return removed
