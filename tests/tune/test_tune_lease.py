"""A PBT trial process SIGKILLed while it holds the only train slot (an OOM kill, in effect):
its lease dies with it, the other trial gets the slot, and the sweep completes. Tiny: 2 trials
of 1 DeepSpeed worker, 1 training at a time, 8 steps perturbed every 4."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mtl.config import load_config
from mtl.tune.driver import SLOTS_ACTOR, tune_weights

pytestmark = pytest.mark.slow

SWEEP = "tiny-lease"


def tiny_sweep(tmp: Path, cache_dir: Path):
    return load_config(
        None,
        [
            "model.width=8",
            "model.depth=2",
            "data.train_size=512",
            "data.val_size=64",
            f"data.cache_dir={cache_dir}",
            "tasks.baseline=",
            "tasks.names=[left,right]",
            "train.num_workers=1",
            "train.micro_batch_size=16",
            "train.max_steps=8",
            "train.lr=0.01",
            "train.log_every_steps=2",
            "train.val_every_steps=4",
            "train.checkpoint_every_steps=4",
            "train.max_failures=0",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.experiment=tune-lease",
            "tracking.register=false",
            "tune.population=2",
            "tune.max_concurrent_trials=1",  # one slot: the other trial waits for it
            "tune.perturbation_interval=4",
            "tune.interval_unit=steps",
            "tune.metric=mean_accuracy",
            f"tune.name={SWEEP}",
        ],
    )


class Killer(threading.Thread):
    """Waits until some trial holds the slot and trains, SIGKILLs that trial's process, and
    times how long until another trial holds the slot."""

    def __init__(self, ray) -> None:
        super().__init__(daemon=True)
        self.ray, self.killed, self.recovered_s, self.error = ray, None, None, None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def _state(self, slots) -> dict:
        return self.ray.get(slots.state.remote(), timeout=30)

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        slots = None
        while slots is None and time.monotonic() < deadline:
            try:
                slots = self.ray.get_actor(f"{SLOTS_ACTOR}:{SWEEP}")
            except ValueError:  # not made yet
                time.sleep(0.2)
        while not self._state(slots)["holders"] and time.monotonic() < deadline:
            time.sleep(0.2)
        ((token, holder),) = self._state(slots)["holders"].items()
        time.sleep(3.0)  # inside trainer.fit(): its Train run is starting or training
        os.kill(holder["pid"], signal.SIGKILL)
        killed = time.monotonic()
        self.killed = {**holder, "token": token}
        while time.monotonic() < deadline:
            holders = self._state(slots)["holders"]
            if holders and token not in holders:
                self.recovered_s = time.monotonic() - killed
                self.state = self._state(slots)
                return
            time.sleep(0.05)


def test_a_trial_killed_while_it_holds_the_slot_releases_it_and_the_sweep_completes(
    tmp_path, cache_dir, ray_session
):
    killer = Killer(ray_session)
    killer.start()
    started = time.monotonic()
    result = tune_weights(tiny_sweep(tmp_path, cache_dir))
    took = time.monotonic() - started
    killer.join(timeout=30)
    assert killer.error is None, killer.error
    assert killer.killed is not None, "no trial ever held the slot"
    assert killer.recovered_s is not None, "the slot was never given to another trial"
    dead = killer.killed["trial_id"]
    print(
        f"\n[test] killed {dead} (pid {killer.killed['pid']}) holding the slot; another trial "
        f"held it {killer.recovered_s:.2f} s later; sweep took {took:.0f} s; "
        + ", ".join(f"{t['trial_id']}={t['status']}@{t['step']}" for t in result.trials)
    )
    assert killer.recovered_s < 30
    assert [r["token"] for r in killer.state["reclaimed"]] == [killer.killed["token"]]
    status = {t["trial_id"]: t for t in result.trials}
    assert status[dead]["status"] == "ERROR"
    survivors = [t for t in result.trials if t["trial_id"] != dead]
    assert [(t["status"], t["step"]) for t in survivors] == [("TERMINATED", 8)]
    assert result.best_trial == survivors[0]["trial_id"]
