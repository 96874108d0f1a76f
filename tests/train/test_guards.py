"""The training guards' logic in pure PyTorch (no Ray, no DeepSpeed)."""

from __future__ import annotations

import json
import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mtl.train.guards import (
    STOP_FILE,
    STOPPED_KEY,
    Guard,
    StepMonitor,
    StepValues,
    TrainingStopped,
    check_result,
    clear_stop,
    nonfinite_parameters,
    read_stop,
    write_stop,
)
from mtl.train.step import gradient_norm

NAN, INF = math.nan, math.inf


def _steps(guard: Guard, totals, start: int = 1) -> tuple[int, str]:
    """Feed ``totals`` (one per step, a single task ``a`` equal to the total); the first stop."""
    for i, total in enumerate(totals, start):
        reason = guard.check(StepValues(i, total, {"a": total}, grad_norm=1.0))
        if reason:
            return i, reason
    return -1, ""


def test_a_steady_or_falling_loss_never_stops():
    noisy = [2.0 + 0.5 * math.sin(i) for i in range(200)]
    assert _steps(Guard(1000.0, 8), noisy) == (-1, "")
    assert _steps(Guard(2.0, 4), [3.0 / (1 + i) for i in range(200)]) == (-1, "")


def test_a_non_finite_task_loss_stops_at_that_step_naming_every_loss():
    guard = Guard(1000.0, 8)
    ok = StepValues(1, 1.5, {"left": 1.0, "right": 2.0, "depth": 0.1}, grad_norm=3.0)
    assert guard.check(ok) == ""
    bad = StepValues(4, NAN, {"left": NAN, "right": INF, "depth": 0.25}, grad_norm=NAN)
    reason = guard.check(bad)
    assert reason.startswith("step 4: non-finite loss (total=nan, left=nan, right=inf, depth=0.25)")
    assert "gradient norm nan" in reason and "lower train.lr" in reason


def test_a_non_finite_gradient_norm_with_finite_losses_stops():
    reason = Guard(1000.0, 8).check(StepValues(7, 1.0, {"a": 1.0}, grad_norm=INF))
    assert reason.startswith("step 7: non-finite gradient norm inf (losses total=1, a=1)")


def test_many_losses_name_the_non_finite_ones_first():
    losses = {f"attr{i}": float(i) for i in range(40)}
    losses["attr33"] = NAN
    reason = Guard(1000.0, 8).check(StepValues(2, NAN, losses))
    assert "(total=nan, attr33=nan, attr0=0, attr1=1," in reason
    assert "+32 finite" in reason  # 40 losses: the NaN one and 7 finite are shown


def test_fp16_skipped_steps_are_the_loss_scaler_at_work_not_a_stop():
    overflow = StepValues(3, 1.0, {"a": 1.0}, grad_norm=INF, skipped=True)
    fp16 = Guard(1000.0, 8, fp16=True)
    assert fp16.check(overflow) == "" and fp16.skipped == 1
    assert fp16.reference_steps == 0  # not counted into the early level either
    # fp32 and bf16 have no loss scaler: an overflowed (skipped) step there is a stop.
    assert Guard(1000.0, 8, fp16=False).check(overflow).startswith("step 3: non-finite")
    # fp16 still stops on a non-finite loss of a step it did apply.
    applied = StepValues(4, NAN, {"a": NAN}, grad_norm=1.0)
    reason = fp16.check(applied)
    assert reason.startswith("step 4: non-finite loss") and "use bf16" in reason
    assert "bf16" not in Guard(1000.0, 8).check(applied)  # the fp16 hint only under fp16


def test_divergence_after_the_window_compares_the_running_mean_with_the_early_level():
    # Steps 1-8 at 1.0 set the early level to 1; at step 9 the mean of the last 8 steps is
    # (7 x 1 + 1e4) / 8 = 1250.9 > 1000 x 1.
    step, reason = _steps(Guard(1000.0, 8), [1.0] * 8 + [1e4] * 4)
    assert step == 9
    assert reason.startswith(
        "step 9: the loss diverged: mean 1.25e+03 over the last 8 steps > "
        "train.divergence_factor=1000 x its early level 1 (this step total=1e+04, a=1e+04);"
    )
    # A single spike below factor x window x level is absorbed by the running mean.
    assert _steps(Guard(1000.0, 8), [1.0] * 8 + [5000.0] + [1.0] * 20) == (-1, "")


def test_a_blow_up_inside_the_first_window_is_caught():
    # configs/tiny.yaml with train.lr=1e8 before the guard: 1.49, 1.45, 1.42, then 6.5e28.
    step, reason = _steps(Guard(1000.0, 8), [1.49, 1.45, 1.42, 6.5e28, 6.4e28])
    assert step == 4 and "early level 1.45 " in reason


def test_factor_zero_turns_divergence_off_but_never_the_non_finite_guard():
    assert _steps(Guard(0.0, 8), [1.0] * 8 + [1e30] * 8) == (-1, "")
    step, reason = _steps(Guard(0.0, 8), [1.0] * 8 + [1e30, INF])
    assert step == 10 and "non-finite loss" in reason


def test_bad_guard_settings_are_refused():
    with pytest.raises(ValueError, match="divergence_factor=-1.0"):
        Guard(-1.0, 8)
    with pytest.raises(ValueError, match="divergence_window=0"):
        Guard(1000.0, 0)


def test_a_resumed_guard_keeps_its_early_level_and_stops_where_an_unbroken_one_does():
    totals = [2.0, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1] + [10.0**k for k in range(1, 8)]
    unbroken = _steps(Guard(1000.0, 8), totals)
    assert unbroken[0] > 0
    first = Guard(1000.0, 8)
    assert _steps(first, totals[:12]) == (-1, "")
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint's mtl_state.json
    resumed = Guard(1000.0, 8)
    resumed.load_state_dict(saved)
    assert resumed.reference == pytest.approx(sum(totals[:8]) / 8)
    assert _steps(resumed, totals[12:], start=13) == unbroken
    fresh = Guard(1000.0, 8)  # what a reset reference would do: the blow-up becomes "early"
    assert _steps(fresh, totals[12:], start=13) != unbroken


def test_a_checkpoint_from_before_the_guard_loads_as_a_fresh_guard():
    guard = Guard(1000.0, 8)
    guard.load_state_dict({})
    assert guard.reference is None and not guard.recent


def test_the_monitor_averages_micro_batches_and_uses_the_engine_norm():
    monitor = StepMonitor(Guard(1000.0, 2), world=1)
    for total in (1.0, 3.0):  # two micro-batches of one step
        monitor.add(torch.tensor(total), {"a": torch.tensor(total / 2), "b": torch.tensor(0.5)})
    assert monitor.end_step(1, engine_norm=torch.tensor(0.5), skipped_steps=0) == ""
    assert monitor.guard.recent[-1] == pytest.approx(2.0)
    monitor.add(torch.tensor(1.0), {"a": torch.tensor(1.0), "b": torch.tensor(NAN)})
    reason = monitor.end_step(2, engine_norm=0.25, skipped_steps=0)
    assert reason.startswith("step 2: non-finite loss (total=1, b=nan, a=1), gradient norm 0.25")


def test_the_monitor_counts_skips_from_the_engine_counter():
    monitor = StepMonitor(Guard(1000.0, 8, fp16=True), world=1)
    monitor.skipped_steps = 5  # a resumed engine's counter
    monitor.add(torch.tensor(INF), {"a": torch.tensor(INF)})
    assert monitor.end_step(9, engine_norm=INF, skipped_steps=6) == ""  # skipped: fine
    monitor.add(torch.tensor(INF), {"a": torch.tensor(INF)})
    assert monitor.end_step(10, engine_norm=INF, skipped_steps=6).startswith("step 10:")


def _regression(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(64, 4), torch.randn(64, 2)
    return model, x, y


def _train(model, opt, x, y, monitor: StepMonitor, steps: int) -> tuple[int, str]:
    for step in range(1, steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        monitor.record_norm(gradient_norm(model))
        opt.step()
        monitor.add(loss, {"y": loss})
        reason = monitor.end_step(step)
        if reason:
            return step, reason
    return -1, ""


def test_plain_torch_training_stops_on_divergence_and_on_nan():
    model, x, y = _regression()
    sane = _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), x, y,
                  StepMonitor(Guard(1000.0, 8), own_norm=True), 100)  # fmt: skip
    assert sane == (-1, "")
    model, x, y = _regression()
    wild = torch.optim.AdamW(model.parameters(), lr=1e8)  # issue 17's train.lr=1e8
    step, reason = _train(model, wild, x, y, StepMonitor(Guard(1000.0, 8), own_norm=True), 50)
    assert 1 < step <= 8 and "diverged" in reason
    model, x, y = _regression()
    sgd = torch.optim.SGD(model.parameters(), lr=1e30)
    step, reason = _train(model, sgd, x, y, StepMonitor(Guard(0.0, 8), own_norm=True), 50)
    assert step > 1 and "non-finite" in reason
    assert nonfinite_parameters(model)  # what the loop checks before a checkpoint


def test_gradient_norm_is_the_global_l2_norm():
    model, x, y = _regression()
    nn.functional.mse_loss(model(x), y).backward()
    expected = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    torch.testing.assert_close(gradient_norm(model), expected)
    assert gradient_norm(nn.Linear(2, 2)).item() == 0.0  # no gradients yet


def test_nonfinite_parameters_names_them_buffers_included():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[0].weight[1, 2] = NAN
        model[1].running_var[0] = INF
    assert nonfinite_parameters(model) == ["0.weight", "1.running_var"]


def test_the_stop_record_round_trips_and_is_cleared(tmp_path):
    run = tmp_path / "runs" / "r1"
    assert read_stop(str(run)) == {}
    write_stop(str(run), {STOPPED_KEY: "step 4: non-finite loss (a=nan)", "step": 4})
    assert json.loads((run / STOP_FILE).read_text())["step"] == 4
    assert read_stop(str(run))[STOPPED_KEY].startswith("step 4")
    clear_stop(str(run))
    clear_stop(str(run))  # nothing left: no error
    assert read_stop(str(run)) == {}


def test_check_result_reads_the_metrics_or_the_run_folder(tmp_path):
    check_result(None)
    check_result({"step": 24})
    with pytest.raises(TrainingStopped, match="step 3: diverged"):
        check_result({STOPPED_KEY: "step 3: diverged"})  # Ray Train V1: the last report
    # Ray Train V2: a report without a checkpoint never reaches Result.metrics (those of the
    # latest checkpoint), so the driver reads the run folder (Result.path).
    write_stop(str(tmp_path), {STOPPED_KEY: "step 5: non-finite loss (a=nan)"})
    result = SimpleNamespace(metrics={"step": 4}, path=str(tmp_path), filesystem=None)
    with pytest.raises(TrainingStopped, match="step 5: non-finite loss"):
        check_result(result)
    clear_stop(str(tmp_path))
    check_result(result)


# --- two ranks over gloo: one rank's NaN stops both at the same step ---


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    monitor = StepMonitor(Guard(1000.0, 8), world=2)
    stopped = (-1, "")
    for step in range(1, 10):
        value = NAN if (rank == 1 and step == 3) else 1.0 + rank  # only rank 1 goes bad
        monitor.add(torch.tensor(value), {"a": torch.tensor(value)})
        reason = monitor.end_step(step, engine_norm=1.0)
        if reason:
            stopped = (step, reason)
            break
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(stopped, f)


@pytest.mark.slow  # two spawned processes import torch
def test_ranks_agree_to_stop_at_the_step_one_of_them_went_non_finite(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stop")
    mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
    results = [json.loads(open(f"{out}.{r}").read()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0][0] == 3 and results[0][1].startswith("step 3: non-finite loss")
    assert os.path.exists(f"{out}.0")
