"""Synchronous PBT with a trial that failed: Ray's controller still lists it among the live
trials, and the sweep's scheduler (``_recovering``) must not wait for it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture
def pbt():
    from ray.tune.schedulers import PopulationBasedTraining

    from mtl.tune.driver import _recovering

    return _recovering(PopulationBasedTraining)(
        time_attr="step", metric="fitness", mode="max", perturbation_interval=4,
        hyperparam_mutations={}, custom_explore_fn=lambda c: c, synch=True,
    )  # fmt: skip


def _trials(pbt, *names):
    from ray.tune.experiment import Trial
    from ray.tune.schedulers.pbt import _PBTTrialState

    trials = [Trial("f", stub=True, trial_id=n, config={"weights": {}}) for n in names]
    controller = SimpleNamespace(get_live_trials=lambda: set(trials), get_trials=lambda: trials)
    pbt._trial_state = {t: _PBTTrialState(t) for t in trials}  # what on_trial_add adds
    return trials, controller


def test_a_trial_that_failed_before_the_first_perturbation_is_not_waited_for(pbt):
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    (dead, alive), controller = _trials(pbt, "dead", "alive")
    dead.set_status(Trial.RUNNING)
    pbt.on_trial_error(controller, dead)  # SIGKILLed before it reported anything
    dead.set_status(Trial.ERROR)  # what Tune does next; it stays in get_live_trials()
    alive.set_status(Trial.RUNNING)
    decision = pbt.on_trial_result(controller, alive, {"step": 4, "fitness": 0.5})
    assert decision == TrialScheduler.PAUSE  # synchronous PBT pauses at every perturbation
    assert pbt._next_perturbation_sync == 8  # ... but this one happened: on to the next
    alive.set_status(Trial.PAUSED)
    assert pbt.choose_trial_to_run(controller) is alive  # so the survivor runs on


def test_a_failed_trial_is_never_a_donor(pbt):
    from ray.tune.experiment import Trial

    trials, _ = _trials(pbt, "best", "mid", "low", "worst")
    for t, score in zip(trials, (0.9, 0.6, 0.3, 0.1), strict=True):
        pbt._trial_state[t].last_score = score
    trials[0].set_status(Trial.ERROR)  # e.g. a guard stopped it after its best report
    lower, upper = pbt._quantiles()
    assert trials[0] not in upper + lower and upper == [trials[1]] and lower == [trials[3]]
