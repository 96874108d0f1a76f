"""The train-slot lease on the session's local Ray: a holder process that is SIGKILLed gives
its slot (or its place in line) back, and the next trial in line gets it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mtl.tune.resources import TrainSlots, hold_lease

pytestmark = pytest.mark.slow  # starts Ray; the test itself takes seconds


@pytest.fixture(scope="module")
def trial_cls(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Trial:
        """Stands in for a Tune trial process: it owns its lease, as ``run_trial`` does."""

        def pid(self) -> int:
            self.lease = hold_lease()
            return os.getpid()

        def acquire(self, slots, token: str) -> bool:
            return ray.get(slots.acquire.remote(token, self.lease, {"pid": os.getpid()}))

        def release(self, slots, token: str) -> None:
            ray.get(slots.release.remote(token))

    return Trial


def _pending(ray, ref, wait_s: float = 1.0) -> bool:
    ready, _ = ray.wait([ref], timeout=wait_s)
    return not ready


def test_a_killed_holder_gives_its_slot_and_its_place_in_line_back(ray_session, trial_cls):
    ray = ray_session
    slots = ray.remote(num_cpus=0)(TrainSlots).remote(1)
    a, b, c = (trial_cls.remote() for _ in range(3))
    pid_a, _, pid_c = ray.get([t.pid.remote() for t in (a, b, c)])
    assert ray.get(a.acquire.remote(slots, "a"))  # the one slot
    got_b = b.acquire.remote(slots, "b")
    assert _pending(ray, got_b)  # b waits for a
    got_c = c.acquire.remote(slots, "c")
    assert _pending(ray, got_c, 0.5)
    assert ray.get(slots.state.remote())["line"] == ["b", "c"]

    killed = time.monotonic()
    os.kill(pid_a, signal.SIGKILL)  # a dies holding the slot (as an OOM kill would)
    assert ray.get(got_b, timeout=30)
    recovered_s = time.monotonic() - killed
    state = ray.get(slots.state.remote())
    assert list(state["holders"]) == ["b"] and state["line"] == ["c"]
    assert [(r["token"], r["pid"], r["held"]) for r in state["reclaimed"]] == [("a", pid_a, True)]
    assert recovered_s < 10, f"the slot came back {recovered_s:.1f} s after the kill"

    os.kill(pid_c, signal.SIGKILL)  # c dies while it waits: its place in line goes
    deadline = time.monotonic() + 30
    while ray.get(slots.state.remote())["line"] and time.monotonic() < deadline:
        time.sleep(0.1)
    state = ray.get(slots.state.remote())
    assert state["line"] == [] and list(state["holders"]) == ["b"]
    assert [(r["token"], r["held"]) for r in state["reclaimed"]] == [("a", True), ("c", False)]

    # A holder that releases normally and then ends is not "reclaimed".
    ray.get(b.release.remote(slots, "b"))
    ray.kill(b)
    time.sleep(1.0)
    state = ray.get(slots.state.remote())
    assert state["holders"] == {} and len(state["reclaimed"]) == 2
    d = trial_cls.remote()
    ray.get(d.pid.remote())
    assert ray.get(d.acquire.remote(slots, "d"), timeout=30)  # the slot is free again
    for actor in (d, slots):
        ray.kill(actor)
