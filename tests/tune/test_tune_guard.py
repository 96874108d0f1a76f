"""A trial whose workers report that a guard stopped training fails at once: its result never
reaches Tune, so PBT never ranks it or copies its checkpoint, and the sweep summary names it."""

from __future__ import annotations

import json
import math

import pytest

from mtl.train.guards import STOPPED_KEY, TrainingStopped
from mtl.tune.driver import segment_report
from mtl.tune.report import _trials, error_line, stopped_reason, trial_lines


def test_a_stopped_result_raises_before_it_is_reported():
    stopped = {"step": 4, "val/mean_accuracy": 0.9, STOPPED_KEY: "loss=nan at step 4"}
    with pytest.raises(TrainingStopped, match="loss=nan at step 4"):
        segment_report(stopped, "val/mean_accuracy")
    report = segment_report({**stopped, STOPPED_KEY: ""}, "val/mean_accuracy")  # not stopped
    assert report["fitness"] == 0.9 and report["step"] == 4


def test_a_train_v2_result_is_stopped_by_the_record_in_its_folder(tmp_path):
    """Under Ray Train V2 a report without a checkpoint never reaches ``Result.metrics``
    (those are the latest checkpoint's), so the stop is read from the run's folder."""
    from ray.train import Result

    from mtl.train.guards import write_stop

    good = {"step": 4, "val/mean_accuracy": 0.5}  # the last checkpoint's metrics
    result = Result(metrics=good, checkpoint=None, error=None, path=str(tmp_path))
    assert segment_report(result, "val/mean_accuracy")["fitness"] == 0.5  # not stopped
    write_stop(str(tmp_path), {STOPPED_KEY: "step 6: non-finite loss (left=nan)"})
    with pytest.raises(TrainingStopped, match="step 6: non-finite loss"):
        segment_report(result, "val/mean_accuracy")


def test_the_summary_names_a_stopped_trial_and_why():
    stopped = TrainingStopped("step 8: loss 6.5e+28 > 1000 x its early level 2.3")
    assert stopped_reason(stopped) == str(stopped)
    assert stopped_reason(RuntimeError("boom")) == "" and stopped_reason(None) == ""
    assert error_line(ValueError("bad\nsecond line")) == "ValueError: bad"
    trial = {"trial_id": "x_00001", "status": "ERROR", "fitness": math.nan, "step": 4}
    trial.update(mlflow_run_id="r1", error=error_line(stopped), stopped=stopped_reason(stopped))
    (line,) = trial_lines([trial])
    assert "x_00001 ERROR" in line and "stopped by a guard" in line and "6.5e+28" in line


@pytest.mark.slow
def test_pbt_never_ranks_or_exploits_a_guard_stopped_trial(tmp_path, ray_session):
    """Three trials under the sweep's own PBT (synchronous, perturbed every 4 of 12 steps)
    with constant scores 0.9, 0.6, 0.3. Trial 0 is the best at step 4 and at step 8 reports a
    perfect score together with a guard's stop: without the guard it would be the donor from
    then on, and Ray's PBT would keep ranking its last score if it stayed in the population.
    The others reach step 8 a little later, so they are ranked there without it."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from mtl.tune.driver import _recovering

    def trainable(config: dict) -> None:
        import tempfile
        import time
        from pathlib import Path

        start = 0
        if (restored := tune.get_checkpoint()) is not None:
            with restored.as_directory() as d:
                start = int((Path(d) / "step").read_text())
        diverges = tune.get_context().get_trial_id().endswith("_00000")
        for step in range(start + 4, 13, 4):
            metrics = {"step": step, "val/acc": config["score"]}
            if diverges and step == 8:  # diverged: its numbers mean nothing
                metrics.update({"val/acc": 1.0, STOPPED_KEY: "step 8: non-finite loss (nan)"})
            elif step == 8:
                time.sleep(3.0)
            report = segment_report(metrics, "val/acc")
            with tempfile.TemporaryDirectory() as d:
                Path(d, "step").write_text(str(step))
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    pbt = _recovering(PopulationBasedTraining)(
        time_attr="step", metric="fitness", mode="max", perturbation_interval=4,
        hyperparam_mutations={}, custom_explore_fn=lambda c: c, quantile_fraction=0.34,
        synch=True, log_config=True,
    )  # fmt: skip
    grid = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0, "memory": 64 * 1024**2}),
        param_space={"score": tune.grid_search([0.9, 0.6, 0.3])},
        tune_config=tune.TuneConfig(scheduler=pbt, reuse_actors=True),
        run_config=tune.RunConfig(
            name="guard", storage_path=str(tmp_path), stop={"step": 12},
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    ).fit()  # fmt: skip
    results = sorted(grid, key=lambda r: r.path)  # trial 0, 1, 2
    trials = sorted(_trials(grid, {}), key=lambda t: t["trial_id"])
    assert [t["status"] for t in trials] == ["ERROR", "TERMINATED", "TERMINATED"]
    assert trials[0]["stopped"] == "step 8: non-finite loss (nan)"
    assert results[0].metrics["step"] == 4  # its stopped step-8 result never reached Tune
    assert [t["step"] for t in trials[1:]] == [12, 12]
    # Ray's policy log, in order: [trial tag, donor tag, trial iteration, donor iteration, ...]
    # (tags start with the trial's index). Trial 0 donated its step-4 checkpoint, its only
    # report, from before it diverged, and never again, though its last ranked score (0.9)
    # stays the best; the others went on perturbing among themselves.
    log = tmp_path / "guard" / "pbt_global.txt"
    donors = [json.loads(x)[1].split("_")[0] for x in log.read_text().splitlines()]
    assert donors[0] == "0" and len(donors) >= 2 and "0" not in donors[1:], donors
    line = trial_lines([trials[0]])[0]
    assert "stopped by a guard" in line and "non-finite loss" in line


@pytest.mark.slow
def test_a_sweep_whose_trials_all_diverge_fails_naming_each_guard(tmp_path, cache_dir, ray_session):
    """The whole stack: train.lr=1e30 makes every trial's DeepSpeed workers trip a guard in
    their first segment; each trial fails at once (its MLflow run FAILED with the reason) and
    the sweep ends with an error naming them, instead of ranking, exploiting or registering."""
    from mlflow.tracking import MlflowClient

    from mtl.config import load_config
    from mtl.tune.driver import tune_weights

    cfg = load_config(
        None,
        [
            "model.width=8", "model.depth=2", "data.train_size=256", "data.val_size=32",
            f"data.cache_dir={cache_dir}", "tasks.baseline=", "tasks.names=[left,right]",
            "train.num_workers=1", "train.micro_batch_size=16", "train.max_steps=8",
            "train.lr=1e30", "train.divergence_window=2", "train.log_every_steps=2",
            "train.val_every_steps=4", "train.checkpoint_every_steps=4",
            "train.max_failures=0", f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=tune-diverge", "tune.population=2",
            "tune.max_concurrent_trials=2", "tune.perturbation_interval=4",
            "tune.interval_unit=steps", "tune.metric=mean_accuracy", "tune.name=diverge",
        ],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="no trial finished") as failed:
        tune_weights(cfg)
    assert str(failed.value).count("TrainingStopped: step ") == 2, failed.value
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tune-diverge").experiment_id
    children = [r for r in client.search_runs([experiment]) if "mtl.trial_id" in r.data.tags]
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FAILED"
        assert run.data.tags["mtl.failure"].startswith("training stopped: step ")
