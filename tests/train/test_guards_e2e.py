"""The guards through the real driver: Ray Train x DeepSpeed (CPU) x MLflow (SQLite).

Issue 17: ``train.lr=1e8`` on ``configs/tiny.yaml`` reached a loss of 6.5e28, exited 0 and
was registered. Now it stops at the step it blew up, FAILED, unregistered, and no checkpoint
is written from that step on.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from mtl.config import load_config
from mtl.train.guards import STOP_FILE, STOPPED_KEY, RunFailed

pytestmark = pytest.mark.slow  # each case is a Ray Train run (~30-60 s on 2 busy cores)


def _overrides(tmp: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.cache_dir={cache_dir}",
        f"train.storage_path={tmp / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        *extra,
    ]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_[0-9]*"))


def test_lr_1e8_stops_at_the_step_it_blew_up_failed_and_unregistered(
    tmp_path, cache_dir, ray_session
):
    from mlflow.tracking import MlflowClient

    from mtl.train.launch import fit

    # register=true: without the guard this run registered its model as @candidate; a
    # checkpoint every 2 steps: one would be written at the stop step if the guard let it.
    cfg = load_config(
        "configs/tiny.yaml",
        _overrides(
            tmp_path, cache_dir, "train.lr=1e8", "tracking.register=true",
            "train.checkpoint_every_steps=2",
        ),
    )  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(RunFailed, match=r"training stopped: step \d+: ") as failed:
        fit(cfg, run_name="lr1e8")
    wall = time.perf_counter() - started
    message = str(failed.value)
    assert len(message.splitlines()) == 1
    step = int(re.search(r"training stopped: step (\d+):", message).group(1))
    assert 1 < step < 24  # stopped early, not at the end of the run
    for task in cfg.tasks.names:  # every task's loss is named
        assert f"{task}=" in message
    print(f"\n[guards e2e] lr=1e8: stopped at step {step} after {wall:.1f} s: {message}")

    run_dir = tmp_path / "runs" / "lr1e8"
    stop = json.loads((run_dir / STOP_FILE).read_text())
    assert stop["step"] == step and stop[STOPPED_KEY] in message
    assert all(s < step for s in _checkpoint_steps(run_dir)), _checkpoint_steps(run_dir)

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(stop["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert f"step {step}:" in run.data.tags["mtl.failure"]
    assert client.search_model_versions() == []  # nothing registered


def test_the_cli_exits_1_in_one_line_for_a_run_the_guard_stopped(
    tmp_path, cache_dir, ray_session, capsys
):
    from mtl.cli import main

    # Divergence off: the non-finite guard alone still stops this run.
    args = _overrides(tmp_path, cache_dir, "train.lr=1e8", "train.divergence_factor=0")
    code = main(["train", "configs/tiny.yaml", *args, "--name", "cli-lr1e8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    failure = [line for line in err if line.startswith("mtl: train failed:")]
    assert len(failure) == 1, err
    assert re.search(r"training stopped: step \d+: non-finite", failure[0]), failure[0]


def test_a_resumed_run_keeps_the_early_level_of_its_first_steps(tmp_path, cache_dir, ray_session):
    from mtl.train.launch import fit

    base = _overrides(
        tmp_path, cache_dir, "tasks.names=[left,right]", "data.train_size=256",
        "train.num_workers=1", "train.max_steps=6", "train.checkpoint_every_steps=3",
        "train.divergence_window=4", "tracking.register=false",
    )  # fmt: skip
    fit(load_config("configs/tiny.yaml", base), run_name="keep")
    run_dir = tmp_path / "runs" / "keep"
    first = json.loads((run_dir / "checkpoint_00000006" / "mtl_state.json").read_text())
    assert first["guard"]["reference_steps"] == 4
    resumed = fit(load_config("configs/tiny.yaml", [*base, "train.max_steps=9"]), resume="keep")
    assert resumed.metrics["resumed_from_step"] == 6 and resumed.metrics["step"] == 9
    after = json.loads((run_dir / "checkpoint_00000009" / "mtl_state.json").read_text())
    # The early level is still that of steps 1-4; a reset one would hold steps 7-9.
    assert after["guard"]["reference_sum"] == first["guard"]["reference_sum"]
    assert after["guard"]["reference_steps"] == 4
    assert len(after["guard"]["recent"]) == 4 and after["guard"]["recent"][:1] == [
        first["guard"]["recent"][-1]
    ]
