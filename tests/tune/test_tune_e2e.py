"""A tiny PBT sweep end to end on the session's local Ray: 3 trials of 1 DeepSpeed worker,
2 training at a time, perturbed every 4 of 12 steps (synchronous PBT, the default: 2
perturbation rounds, at steps 4 and 8); one trial's worker is killed at step 10. Then a
replay of a discovered schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtl.config import load_config
from mtl.tune.driver import tune_weights
from mtl.tune.space import replay_schedule

pytestmark = pytest.mark.slow

KEYS = ("left", "right", "semseg")
CRASHED = "_00002"  # the trial whose worker is killed at step 10, after both perturbations


def tiny_sweep(tmp: Path, cache_dir: Path, *extra: str):
    return load_config(
        None,
        [
            "model.width=8",
            "model.depth=2",
            "data.train_size=512",
            "data.val_size=64",
            f"data.cache_dir={cache_dir}",
            "tasks.baseline=",
            "tasks.names=[left,right,semseg]",
            "train.num_workers=1",
            "train.micro_batch_size=16",
            "train.max_steps=12",
            "train.lr=0.01",
            "train.log_every_steps=2",
            "train.val_every_steps=4",
            "train.checkpoint_every_steps=4",
            "train.max_failures=0",  # a killed worker ends its trial
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.experiment=tune-tiny",
            "tracking.register_above_chance=false",  # 12 steps: some accuracy may be at chance
            "tune.population=3",
            "tune.max_concurrent_trials=2",
            "tune.perturbation_interval=4",
            "tune.interval_unit=steps",
            "tune.metric=semseg/miou",
            "tune.name=tiny-pbt",
            "tune.keep_checkpoints=0",  # keep every checkpoint: the tests read the donors'
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir, ray_session):
    tmp = tmp_path_factory.mktemp("tune")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MTL_TEST_FAULTS", "1")
        env.setenv("MTL_FAIL_AT_STEP", "10")
        env.setenv("MTL_FAIL_MARKER", str(tmp / "crashed"))
        env.setenv("MTL_FAIL_TRIAL", CRASHED)
        result = tune_weights(tiny_sweep(tmp, cache_dir))
    return tmp, result


def _weights(row) -> dict[str, float]:
    return {k: row[k] for k in KEYS}


def _exploits(rows: list[dict]) -> list[dict]:
    """The intervals a trial trained from another trial's checkpoint."""
    return [r for r in rows if r["from_trial"] and r["from_trial"] != r["trial_id"]]


def test_exploit_restores_the_donors_checkpoint_but_keeps_the_receivers_weights(sweep):
    tmp, result = sweep
    rows = result.trajectories  # every interval of every trial, from the MLflow child runs
    exploits = _exploits(rows)
    assert exploits, "synchronous PBT exploits once per round"
    for row in exploits:
        receiver, donor, start = row["trial_id"], row["from_trial"], row["from_step"]
        assert start in (4, 8) and row["step"] == start + 4  # continued from the donor's step
        # Synchronous PBT (the default) ranked the receiver at the donor's step, not behind it.
        assert any(r["trial_id"] == receiver and r["step"] == start for r in rows)
        donated = [r for r in rows if r["trial_id"] == donor and r["step"] == start][-1]
        # The checkpoint held the donor's weights in its saved config ...
        state = _checkpoint_state(tmp, donor, start)
        assert state["trial_id"] == donor
        assert state["config"]["tasks"]["weights"] == pytest.approx(_weights(donated))
        # ... but the receiver trained with its own, mutated config: one of PBT's new configs.
        used = _weights(row)
        assert used != pytest.approx(_weights(donated))
        policy = tmp / "runs" / "tiny-pbt" / f"pbt_policy_{receiver}.txt"
        new_configs = [json.loads(line)[5]["weights"] for line in policy.read_text().splitlines()]
        assert any(used == pytest.approx(w) for w in new_configs)


def _checkpoint_state(tmp: Path, trial: str, step: int) -> dict:
    for path in (tmp / "runs" / "tiny-pbt" / f"trial_{trial}").glob("checkpoint_*"):
        state = json.loads((path / "mtl_state.json").read_text())
        if state["progress"]["step"] == step:
            return state
    raise AssertionError(f"no checkpoint of {trial} at step {step} kept")


def test_one_parent_run_with_one_child_per_trial_weights_as_metrics(sweep):
    from mlflow.tracking import MlflowClient

    tmp, result = sweep
    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name("tune-tiny").experiment_id
    runs = client.search_runs([experiment])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    assert len(children) == 3 and len(runs) == 4  # PBT restarts reuse a trial's run
    status = {c.data.tags["mtl.trial_id"]: c.info.status for c in children}
    assert sorted(status.values()) == ["FAILED", "FINISHED", "FINISHED"]
    assert all(not k.startswith("tasks.weights") for c in children for k in c.data.params)
    receiver = _exploits(result.trajectories)[0]["trial_id"]
    run_id = next(c.info.run_id for c in children if c.data.tags["mtl.trial_id"] == receiver)
    history = client.get_metric_history(run_id, "weight/left")
    assert len({round(m.value, 9) for m in history}) >= 2  # PBT changed it mid-run
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/fitness"] == pytest.approx(result.fitness)
    files = _artifacts(client, result.parent_run_id)
    for name in (
        "weights/trajectories.md",
        "weights/trajectories.png",
        "weights/trajectories.json",
        "best_schedule.json",
        "trials.json",
        "pbt/pbt_global.txt",
        f"pbt/pbt_policy_{receiver}.txt",
    ):
        assert name in files


def _artifacts(client, run_id: str, folder: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, folder):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_killed_worker_ends_one_trial_and_the_sweep_completes(sweep):
    tmp, result = sweep
    assert (tmp / "crashed").exists()  # a worker really died
    by_status = {t["trial_id"]: t["status"] for t in result.trials}
    assert [s for t, s in by_status.items() if t.endswith(CRASHED)] == ["ERROR"]
    finished = [t for t in result.trials if t["status"] == "TERMINATED"]
    assert len(finished) == 2 and all(t["step"] == 12 for t in finished)
    assert not result.best_trial.endswith(CRASHED)
    assert result.fitness == max(t["fitness"] for t in finished)  # semseg/miou: max


def test_best_trial_is_registered_with_its_schedule(sweep):
    from mlflow.tracking import MlflowClient

    _, result = sweep
    assert result.model_version == "1"
    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    version = client.get_model_version_by_alias(
        "multimnist-left+right+semseg-hard_sharing", "candidate"
    )  # a task subset: its default name says so
    assert version.run_id == next(
        t["mlflow_run_id"] for t in result.trials if t["trial_id"] == result.best_trial
    )
    schedule = result.schedule  # its model's lineage through the donors, steps 0 to 12
    assert schedule[0]["from_step"] == 0 and schedule[-1]["to_step"] == 12
    assert [s["from_step"] for s in schedule[1:]] == [s["to_step"] for s in schedule[:-1]]
    assert schedule[-1]["weights"] == pytest.approx(result.weights)
    assert sum(result.weights.values()) == pytest.approx(1.0)


def test_replay_retrains_one_model_on_the_discovered_schedule(sweep, cache_dir):
    from mtl.tune.report import lineage

    tmp, result = sweep
    receiver = _exploits(result.trajectories)[-1]["trial_id"]
    policy = tmp / "runs" / "tiny-pbt" / f"pbt_policy_{receiver}.txt"
    cfg = tiny_sweep(tmp, cache_dir, "tune.name=replay", "tracking.register=false")
    replay = tune_weights(cfg, replay=str(policy))
    rows = replay.trajectories
    assert [r["step"] for r in rows] == [4, 8, 12] and len(replay.trials) == 1
    schedule = replay_schedule(policy, 4)  # Ray's replay semantics, as (first step, weights)
    for r in rows:
        expected = [w for start, w in schedule if start <= r["step"] - 4][-1]
        assert _weights(r) == pytest.approx(expected)
    # ... which is the schedule the receiver's own model was trained under in the sweep.
    discovered = lineage(result.trajectories, receiver, KEYS)
    assert len(replay.schedule) == len(discovered)
    for replayed, found in zip(replay.schedule, discovered, strict=True):
        assert replayed["from_step"] == found["from_step"]
        assert replayed["weights"] == pytest.approx(found["weights"])


def test_pb2_sweep_runs_on_the_bounded_simplex(tmp_path, cache_dir, ray_session):
    """PB2 end to end (its bandit's proposals: tests/tune/test_tune_inputs.py). PB2 models the
    change in fitness between two reports of a trial with unchanged weights; at the first
    perturbation (step 4) no trial has one yet, and Ray's PB2 copies the donor's weights."""
    cfg = tiny_sweep(
        tmp_path,
        cache_dir,
        "tune.scheduler=pb2",
        "tune.name=tiny-pb2",
        "tune.population=2",  # the bottom one exploits the top one at step 4
        "train.max_steps=8",
        "tune.weight_max=0.6",
        "tracking.register=false",
    )
    result = tune_weights(cfg)
    assert [t["status"] for t in result.trials] == ["TERMINATED"] * 2
    assert all(t["step"] == 8 for t in result.trials)
    exploits = _exploits(result.trajectories)
    assert [r["from_step"] for r in exploits] == [4]
    weights = _weights(exploits[0])
    assert sum(weights.values()) == pytest.approx(1.0)
    assert all(0.02 - 1e-9 <= w <= 0.6 + 1e-9 for w in weights.values())
