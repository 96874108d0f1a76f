"""Resource use of a sweep: time-multiplexing a population over the cluster.

``TrainSlots`` (a Ray actor during a sweep) queues the trials so that only as many train at
once as the cluster holds, each slot a lease that a dead trial process gives back;
checkpoint retention after the sweep is ``mtl.storage.prune_checkpoints`` (local or S3).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mtl.config import Config

log = logging.getLogger(__name__)


class TrainSlots:
    """At most ``n`` trials train at once; the others wait in line (first come, first served).

    This is how a population larger than the cluster is time-multiplexed. Tune's own
    ``max_concurrent_trials`` would not create the rest of the population until some trial
    finished, so PBT would never compare them; and trials reserve no CPU, so Tune alone
    would start every Train job at once to wait for workers. A trial holds a slot only
    while its segment trains: it is released before the trial reports to Tune, where PBT
    may end the trial's process.

    A slot is a lease, not a count: ``acquire`` takes the caller's ``SlotLease`` (an actor
    that Ray kills when the process that created it dies, see ``hold_lease``), and when that
    actor dies the slot, or the caller's place in line, is given back. So a trial process
    that is SIGKILLed or OOM-killed while it trains, or while it waits, cannot stall the
    population; Ray's ownership tracking does this on one node and across a cluster alike.
    """

    def __init__(self, n: int) -> None:
        self.n, self.holders, self.line = n, {}, []
        self.reclaimed: list[dict[str, Any]] = []  # slots (or places) of dead holders
        self.watchers: dict[str, Any] = {}  # token -> the task watching its lease
        self.changed: Any = None  # asyncio.Condition, made in the actor's event loop

    def _condition(self) -> Any:
        import asyncio

        self.changed = self.changed or asyncio.Condition()
        return self.changed

    async def acquire(
        self, token: str, lease: Any = None, holder: dict[str, Any] | None = None
    ) -> bool:
        """Wait for a slot; False if ``lease`` died first (its holder is gone).

        Args:
            token: Names this hold (unique per segment).
            lease: The caller's ``SlotLease`` handle; None holds the slot until ``release``.
            holder: Shown by ``state`` (e.g. the holder's pid and node).
        """
        import asyncio

        changed = self._condition()
        self.line.append(token)
        if lease is not None:
            self.watchers[token] = asyncio.ensure_future(self._watch(token, lease, holder))
        async with changed:
            await changed.wait_for(
                lambda: (
                    token not in self.line or (self.line[0] == token and len(self.holders) < self.n)
                )
            )
            if token not in self.line:  # its lease died while it waited
                return False
            self.holders[self.line.pop(0)] = {**(holder or {}), "since": time.time()}
            changed.notify_all()
        return True

    async def release(self, token: str) -> None:
        """Give the slot (or place in line) of ``token`` back; a no-op if it is not held."""
        watcher = self.watchers.pop(token, None)
        if watcher is not None:
            watcher.cancel()
        await self._drop(token)

    def state(self) -> dict[str, Any]:
        """Who holds a slot, who waits, and which dead holders' slots were reclaimed."""
        return {
            "slots": self.n,
            "holders": dict(self.holders),
            "line": list(self.line),
            "reclaimed": list(self.reclaimed),
        }

    async def _drop(self, token: str) -> bool:
        async with self._condition():
            found = self.holders.pop(token, None) is not None or token in self.line
            if token in self.line:
                self.line.remove(token)
            self.changed.notify_all()
        return found

    async def _watch(self, token: str, lease: Any, holder: dict[str, Any] | None) -> None:
        """Wait for ``lease`` to die, then reclaim what ``token`` holds."""
        import asyncio

        import ray
        from ray.exceptions import ActorUnavailableError

        while True:
            call = lease.held.remote()
            try:
                await call  # never returns while the lease lives
            except asyncio.CancelledError:  # released: end the call in the lease too
                ray.cancel(call)
                raise
            except ActorUnavailableError:  # unreachable for now (a network blip): not dead
                await asyncio.sleep(1.0)
                continue
            except Exception:  # noqa: BLE001 - ActorDiedError (or any failure): the lease is gone
                break
        self.watchers.pop(token, None)
        was_holding = token in self.holders
        if await self._drop(token):
            self.reclaimed.append(
                {**(holder or {}), "token": token, "held": was_holding, "at": time.time()}
            )
            what = "train slot" if was_holding else "place in line"
            log.warning("%s: its trial process died; its %s is given back", token, what)


class SlotLease:
    """Held by a trial process for as long as it lives: ``held`` never returns.

    Made by ``hold_lease`` in the trial's own process, which owns it, so Ray kills it when
    that process dies (and with its node), and ``TrainSlots`` sees the call fail.
    """

    async def held(self) -> None:
        import asyncio

        await asyncio.Event().wait()

    def ready(self) -> bool:
        return True


def hold_lease() -> Any:
    """A ``SlotLease`` owned by (and placed on the node of) the calling Ray worker process."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    lease = (
        ray.remote(num_cpus=0, max_restarts=0)(SlotLease).options(scheduling_strategy=here).remote()
    )
    ray.get(lease.ready.remote())  # fails here, not in the slot table, if it cannot start
    return lease


def trials_at_once(cfg: Config, use_gpu: bool) -> int:
    """``tune.max_concurrent_trials``, else as many Train jobs as the cluster holds at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    import ray

    t, resources = cfg.train, ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)) // t.num_workers)
    return max(1, int(resources.get("CPU", 1)) // (t.num_workers * t.cpus_per_worker))
