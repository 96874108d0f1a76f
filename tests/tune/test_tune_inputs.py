"""Bad sweep input through the real CLI: one clear line, exit code 2, no Ray started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mtl.cli import main
from mtl.config import load_config

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _tune(capsys, cache_dir, *args: str) -> str:
    ray_before = _ray_up()  # the session's Ray may be up already when slow tests ran
    code = main(["tune", TINY, f"data.cache_dir={cache_dir}", *args])
    err = capsys.readouterr().err
    # One error line last; before it only progress lines (e.g. the tiny cache being built).
    *progress, last = err.splitlines()
    assert code == 2 and last.startswith("mtl: ") and "Traceback" not in err, err
    assert all(line.startswith("[mtl] ") for line in progress), err
    assert _ray_up() == ray_before  # failed before Ray was started ...
    assert not Path("mtl_runs").exists()  # ... and before any trial wrote anything
    return err


def test_weights_for_unknown_tasks(capsys, cache_dir):
    err = _tune(capsys, cache_dir, "tasks.names=[left,right]", "tasks.weights={left: 1, nose: 1}")
    assert "nose" in err and "tasks.weights" in err


def test_weights_missing_a_task(capsys, cache_dir):
    err = _tune(capsys, cache_dir, "tasks.names=[left,right]", "tasks.weights={left: 1}")
    assert "right" in err and "tasks.weights" in err


def test_a_fitness_metric_no_task_reports(capsys, cache_dir):
    err = _tune(capsys, cache_dir, "tasks.names=[left,right]", "tune.metric=depth/rmse")
    assert "tune.metric='depth/rmse'" in err and "left/accuracy" in err


def test_delta_mtl_without_a_baseline(capsys, cache_dir):
    err = _tune(capsys, cache_dir, "tasks.baseline=", "tune.metric=delta_mtl")
    assert "tasks.baseline" in err


def test_a_population_of_one(capsys, cache_dir):
    assert "tune.population=1" in _tune(capsys, cache_dir, "tune.population=1")


def test_bounds_that_no_weights_meet(capsys, cache_dir):
    err = _tune(capsys, cache_dir, "tasks.names=[left,right]", "tune.weight_max=0.4")
    assert "weight_max" in err


def test_an_interval_as_long_as_the_run(capsys, cache_dir):
    err = _tune(capsys, cache_dir, "tune.perturbation_interval=24", "tune.interval_unit=steps")
    assert "perturbation_interval" in err


def test_a_burn_in_as_long_as_the_run(capsys, cache_dir):
    err = _tune(
        capsys, cache_dir, "tune.perturbation_interval=5", "tune.interval_unit=steps",
        "tune.burn_in=21",
    )  # fmt: skip
    assert "tune.burn_in=21" in err and "at step 25" in err  # rounded up to whole intervals


def test_a_missing_replay_policy(capsys, cache_dir, tmp_path):
    err = _tune(capsys, cache_dir, "--replay", str(tmp_path / "pbt_policy_x.txt"))
    assert "does not exist" in err


@pytest.mark.parametrize("scheduler", ["pbt", "pb2"])
def test_both_schedulers_search_the_bounded_simplex(scheduler, cache_dir, tmp_path):
    from mtl.tune.driver import _scheduler, plan_sweep

    cfg = load_config(
        TINY,
        [
            f"data.cache_dir={cache_dir}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tune.scheduler={scheduler}",
            "tune.perturbation_interval=4",
            "tune.interval_unit=steps",
            "tune.weight_max=0.5",
        ],
    )
    plan = plan_sweep(cfg)
    assert plan.interval_steps == 4 and plan.total_steps == 24 and plan.keep == 1
    assert len(plan.population) == 4 and all(plan.space.contains(w) for w in plan.population)
    built = _scheduler(plan)
    proposal = {"weights": {k: 0.5 for k in plan.space.keys}}  # PBT: off the simplex
    proposal["sticks"] = {k: 1.0 for k in plan.space.keys[:-1]}  # PB2: a corner of its box
    assert plan.space.contains(built._custom_explore_fn(proposal)["weights"])
    if scheduler == "pb2":  # PB2's bandit must propose the key its explore function reads
        assert set(built._hyperparam_bounds) == {"sticks"}
    import ray.cloudpickle  # Tune saves the scheduler with the Tuner's state

    expected = "PB2" if scheduler == "pb2" else "PopulationBasedTraining"
    assert type(ray.cloudpickle.loads(ray.cloudpickle.dumps(built))).__name__ == expected


def test_asynchronous_pbt_on_a_time_multiplexed_population_is_warned_about(cache_dir, tmp_path):
    from mtl.tune.driver import _describe, _scheduler, plan_sweep

    def plan(*extra: str):
        uri = f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
        return plan_sweep(load_config(TINY, [f"data.cache_dir={cache_dir}", uri, *extra]))

    default = plan("tune.population=4")
    assert _scheduler(default)._synch  # ranks trials at equal steps unless told otherwise
    assert "warning" not in _describe(default, at_once=2)
    unsynced = plan("tune.population=4", "tune.synch=false")
    assert "set tune.synch=true" in _describe(unsynced, at_once=2)
    assert "warning" not in _describe(unsynced, at_once=4)  # every trial trains at once


def test_synchronous_pbt_goes_on_when_a_trial_fails_before_the_perturbation_point():
    from types import SimpleNamespace

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining

    from mtl.tune.driver import _recovering

    pbt = _recovering(PopulationBasedTraining)(
        time_attr="step", metric="fitness", mode="max", perturbation_interval=4,
        custom_explore_fn=lambda c: c, synch=True,
    )  # fmt: skip
    waiting, failed, other = (Trial("f", stub=True, trial_id=t) for t in "abc")
    pbt._trial_state = {t: SimpleNamespace(last_train_time=8) for t in (waiting, other)}
    pbt._trial_state[failed] = SimpleNamespace(last_train_time=4)
    pbt._next_perturbation_sync = 8  # "a" and "c" wait at step 8 for "b", which fails
    controller = SimpleNamespace(get_live_trials=lambda: [waiting, failed, other])
    pbt.on_trial_error(controller, failed)
    assert pbt._next_perturbation_sync == 12  # the waiting trials may run to the next point


def test_train_slots_let_n_trials_train_and_queue_the_rest_in_order():
    import asyncio

    from mtl.tune.resources import TrainSlots

    async def scenario() -> list[str]:
        slots, order = TrainSlots(2), []

        async def segment(token: str) -> None:
            await slots.acquire(token)
            order.append(f"+{token}")
            await asyncio.sleep(0.01)
            order.append(f"-{token}")
            await slots.release(token)

        await asyncio.gather(*(segment(t) for t in "abcd"))
        return order

    order = asyncio.run(scenario())
    assert order[:2] == ["+a", "+b"]  # two at once ...
    assert order.index("+c") > order.index("-a") and order.index("+d") > order.index("+c")
    running = 0
    for event in order:
        running += 1 if event[0] == "+" else -1
        assert running <= 2


def test_a_grid_trains_each_fixed_weight_vector_once_without_a_scheduler(cache_dir, tmp_path):
    from mtl.tune.driver import plan_sweep

    cfg = load_config(
        TINY,
        [
            f"data.cache_dir={cache_dir}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tune.scheduler=grid",
            "tune.grid_factors=[0.5,2.0]",
            "tune.weight_max=0.9",
        ],
    )
    plan = plan_sweep(cfg)
    keys = plan.space.keys
    assert plan.interval_steps == plan.total_steps == 24  # one Train run per trial
    assert len(plan.population) == 1 + 2 * len(keys)
    assert plan.population[0] == pytest.approx({k: 1 / len(keys) for k in keys})  # uniform


def test_grid_factors_of_one_are_refused(capsys, cache_dir):
    err = _tune(capsys, cache_dir, "tune.scheduler=grid", "tune.grid_factors=[1.0]")
    assert "tune.grid_factors" in err


def test_pb2s_bandit_proposes_new_weights_on_the_bounded_simplex(cache_dir, tmp_path):
    """Ray's PB2 with our bounds and explore function, fed a history of 4 trials' reports."""
    import random

    from ray.tune.experiment import Trial
    from ray.tune.schedulers.pbt import _PBTTrialState

    from mtl.tune.driver import _scheduler, plan_sweep

    cfg = load_config(
        TINY,
        [
            f"data.cache_dir={cache_dir}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tune.scheduler=pb2",
            "tune.perturbation_interval=4",
            "tune.interval_unit=steps",
            "tune.weight_max=0.6",
        ],
    )
    plan = plan_sweep(cfg)
    pb2, space = _scheduler(plan), plan.space
    trials = [
        Trial("run_trial", config={"weights": w, "sticks": space.to_sticks(w)}, stub=True)
        for w in plan.population
    ]
    rng = random.Random(0)
    for t in trials:
        pb2._trial_state[t] = _PBTTrialState(t)
    for step in (4, 8):  # two reports each with unchanged weights: PB2 can fit its GP
        for i, t in enumerate(trials):
            fitness = 0.01 * step * (4 - i) + 0.01 * rng.random()
            pb2._save_trial_state(pb2._trial_state[t], step, {"step": step, "fitness": fitness}, t)
    donor = plan.population[0]
    proposals = [pb2._get_new_config(trials[-1], trials[0])[0] for _ in range(3)]
    for p in proposals:
        assert space.contains(p["weights"])
        assert p["sticks"] == pytest.approx(space.to_sticks(p["weights"]))
    assert any(p["weights"] != pytest.approx(donor, abs=1e-4) for p in proposals)


def test_after_a_sweep_each_trial_keeps_its_newest_checkpoints(tmp_path):
    from mtl.storage import prune_checkpoints

    for trial in ("trial_a_00000", "trial_a_00001"):
        for index in (0, 1, 2, 10):  # numeric order, not string order
            (tmp_path / trial / f"checkpoint_{index:06d}").mkdir(parents=True)
    removed = prune_checkpoints(str(tmp_path), keep=2)
    assert len(removed) == 4
    for trial in ("trial_a_00000", "trial_a_00001"):
        left = sorted(p.name for p in (tmp_path / trial).iterdir())
        assert left == ["checkpoint_000002", "checkpoint_000010"]
    assert prune_checkpoints(str(tmp_path), keep=0) == []  # 0: keep all


def test_no_perturbation_before_the_burn_in(cache_dir, tmp_path):
    """Ray's synchronous PBT as ``_scheduler`` builds it: with a burn-in, a report before it
    goes on training; without one, the same report waits for the others to be ranked."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.pbt import _PBTTrialState

    from mtl.tune.driver import _describe, _scheduler, plan_sweep

    def first_report(*extra: str) -> tuple[str, object]:
        uri = f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
        cfg = load_config(
            TINY,
            [f"data.cache_dir={cache_dir}", uri, "tune.perturbation_interval=4",
             "tune.interval_unit=steps", *extra],
        )  # fmt: skip
        plan = plan_sweep(cfg)
        pbt = _scheduler(plan)

        class Trial(SimpleNamespace):
            __hash__ = object.__hash__  # Ray keys its per-trial state by trial

        trials = [
            Trial(experiment_tag=str(i), status="RUNNING", is_finished=lambda: False)
            for i in range(2)
        ]
        controller = SimpleNamespace(get_live_trials=lambda: trials, get_trials=lambda: trials)
        pbt._trial_state = {t: _PBTTrialState(t) for t in trials}  # what on_trial_add adds
        decision = pbt.on_trial_result(controller, trials[0], {"step": 4, "fitness": 0.5})
        return decision, plan

    decision, plan = first_report("tune.burn_in=6")  # rounded up to 8: two intervals
    assert plan.burn_in_steps == 8 and "perturbation every 4 steps from step 8" in _describe(
        plan, at_once=2
    )
    assert decision == TrialScheduler.CONTINUE
    decision, plan = first_report()
    assert plan.burn_in_steps == 0 and decision == TrialScheduler.PAUSE
