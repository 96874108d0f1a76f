"""End to end: a tiny config through Ray Train with 2 workers and DeepSpeed on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mtl.config import load_config
from mtl.train.engine import CheckpointError
from mtl.train.launch import fit

pytestmark = pytest.mark.slow


def tiny(tmp: Path, cache_dir: Path, *extra: str):
    return load_config(
        None,
        [
            "model.width=8",
            "model.depth=2",
            "data.train_size=512",
            "data.val_size=64",
            f"data.cache_dir={cache_dir}",
            "tasks.baseline=",
            "train.num_workers=2",
            "train.micro_batch_size=16",
            "train.max_steps=24",
            "train.lr=0.01",
            "train.log_every_steps=4",
            "train.val_every_steps=12",
            "train.checkpoint_every_steps=12",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "deepspeed.zero_stage=1",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, ray_session):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tiny(tmp, cache_dir, "tracking.auto_promote=mean_accuracy")
    return tmp, cfg, fit(cfg, run_name="tiny")


def _load_candidate(uri: str, name: str):
    """``models:/NAME@candidate`` from ``uri``'s registry; the process-wide registry URI is
    put back afterwards, so later tests do not read this test's store."""
    import mlflow

    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    finally:
        mlflow.set_registry_uri(previous)


def _history(result, key):
    from mlflow.tracking import MlflowClient

    return [
        m.value
        for m in MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, key)
    ]


def test_loss_falls_and_mlflow_holds_one_run_with_task_metrics(trained):
    from mlflow.tracking import MlflowClient

    _, cfg, result = trained
    losses = _history(result, "train/loss")
    assert len(losses) == 6  # steps 4, 8, ..., 24
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id]
    )
    assert len(runs) == 1  # rank 0 logs, the other worker does not open a run
    metrics = runs[0].data.metrics
    for key in ("left/accuracy", "right/accuracy", "semseg/miou", "depth/rmse", "recon_left/rmse"):
        assert f"val/{key}" in metrics
    assert runs[0].data.params["train.num_workers"] == "2"
    assert "config.json" in [a.path for a in client.list_artifacts(result.mlflow_run_id)]
    assert runs[0].info.run_name == "tiny"  # the name mtl gave the job, not a random one


def test_auto_promote_moves_champion_and_records_the_decision(trained):
    from mlflow.tracking import MlflowClient

    _, _, result = trained
    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    model = client.get_registered_model("multimnist-hard_sharing")
    assert model.aliases["champion"] == model.aliases["candidate"] == int(result.model_version)
    assert model.tags["champion_decision"].startswith("v1 by mean_accuracy (max)")
    assert model.tags["data_source"] == "mnist" and model.tags["input"] == "float32 (-1, 1, 36, 36)"
    run = client.get_run(result.mlflow_run_id)
    champion = run.data.tags["mtl.champion"]
    assert champion == f"multimnist-hard_sharing version {result.model_version}"


def test_checkpoint_holds_every_rank_shard(trained):
    _, _, result = trained
    ckpt = Path(result.checkpoint)
    assert ckpt.name == "checkpoint_00000024"
    assert (ckpt / "manifest.rank0.json").is_file() and (ckpt / "manifest.rank1.json").is_file()
    assert result.metrics["step"] == 24


def test_resume_continues_from_latest_checkpoint(trained, cache_dir):
    tmp, _, first = trained
    cfg = tiny(tmp, cache_dir, "train.max_steps=28", "train.checkpoint_every_steps=4")
    result = fit(cfg, resume="tiny")
    assert result.metrics["resumed_from_step"] == 24
    assert result.metrics["step"] == 28
    assert result.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    steps = [m.step for m in _metric_objects(result, "train/loss")]
    assert steps == sorted(steps) and steps[-1] == 28


def _metric_objects(result, key):
    from mlflow.tracking import MlflowClient

    return MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, key)


def test_corrupt_checkpoint_is_refused_before_ray_loads_it(trained, cache_dir):
    tmp, cfg, _ = trained
    runs = tmp / "runs"
    shutil.copytree(runs / "tiny", runs / "tiny-corrupt")
    latest = sorted((runs / "tiny-corrupt").glob("checkpoint_[0-9]*"))[-1]
    victim = next(p for p in latest.rglob("*.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        fit(cfg, resume="tiny-corrupt")
    assert victim.read_bytes() == bytes(data)  # nothing rewritten


def test_worker_crash_recovers_from_checkpoint(tmp_path, cache_dir, ray_session, monkeypatch):
    monkeypatch.setenv("MTL_TEST_FAULTS", "1")
    monkeypatch.setenv("MTL_FAIL_AT_STEP", "10")
    monkeypatch.setenv("MTL_FAIL_MARKER", str(tmp_path / "crashed"))
    cfg = tiny(
        tmp_path,
        cache_dir,
        "train.max_steps=14",
        "train.checkpoint_every_steps=4",
        "train.max_failures=1",
    )
    result = fit(cfg, run_name="crash")
    assert (tmp_path / "crashed").exists()  # a worker really died
    assert result.metrics["step"] == 14
    # Restarted from a checkpoint, not from scratch. Which one depends on whether Ray's
    # controller had collected the step-8 report before the crash at step 10.
    assert result.metrics["resumed_from_step"] in (4, 8)


def test_baseline_table_feeds_delta_mtl(tmp_path, cache_dir, ray_session):
    from mtl.baselines import baseline_values
    from mtl.metrics import delta_mtl
    from mtl.train.baseline import run_baselines
    from mtl.train.loop import active_taskset

    short = ["tasks.names=[left,semseg]", "train.max_steps=4", "train.checkpoint_every_steps=4"]
    table = run_baselines(tiny(tmp_path, cache_dir, *short), tmp_path / "baseline.json")
    assert {k: v["metric"] for k, v in table["tasks"].items()} == {
        "left": "left/accuracy",
        "semseg": "semseg/miou",
    }
    cfg = tiny(tmp_path, cache_dir, *short, f"tasks.baseline={tmp_path / 'baseline.json'}")
    result = fit(cfg, run_name="with-baseline")
    measured = {
        k.removeprefix("val/"): v for k, v in result.metrics.items() if k.startswith("val/")
    }
    expected = delta_mtl(measured, baseline_values(table), active_taskset(cfg))
    assert result.metrics["val/delta_mtl"] == pytest.approx(expected)
    assert result.model_version == "1"  # single-task references were not registered


def test_interrogate_trains_under_zero2_then_registers_fixed_model(
    tmp_path, cache_dir, ray_session
):
    """Straight-through gates start shared, so task blocks get all-zero gradients: ZeRO-2 copes.

    After training the driver consolidates the ZeRO-2 shards, fixes and prunes the gates,
    verifies the fixed model and registers it; it then loads by alias and predicts every task.
    """
    import numpy as np

    cfg = tiny(
        tmp_path,
        cache_dir,
        "model.name=interrogate",
        "deepspeed.zero_stage=2",
        "train.max_steps=8",
        "tracking.register_above_chance=false",  # 8 steps: registration's path is tested
        "train.checkpoint_every_steps=8",
        "train.val_every_steps=8",
    )
    result = fit(cfg, run_name="interrogate-zero2")
    assert result.metrics["step"] == 8
    rates = _history(result, "rate/left")
    assert rates and all(0.0 <= r <= 1.0 for r in rates)
    assert result.model_version == "1"
    model = _load_candidate(result.tracking_uri, "multimnist-interrogate")
    x = np.random.default_rng(0).random((3, 1, 36, 36), dtype=np.float32)
    predictions = model.predict(x)
    assert predictions["left"].shape == (3, 10) and predictions["semseg"].shape == (3, 11, 36, 36)


def test_moe_trains_under_zero2_then_registers_fixed_routes(tmp_path, cache_dir, ray_session):
    """Top-1 of 3 experts: experts no task picks get no gradient at all (None), and ZeRO-2
    still steps. The driver fixes each task's route, drops unused experts, verifies, and
    registers; the model then loads by alias and predicts every task."""
    import numpy as np

    cfg = tiny(
        tmp_path,
        cache_dir,
        "model.name=moe",
        "model.moe.num_experts=3",
        "model.moe.top_k=1",
        "model.moe.router_dim=8",
        "deepspeed.zero_stage=2",
        "train.max_steps=8",
        "tracking.register_above_chance=false",  # 8 steps: registration's path is tested
        "train.checkpoint_every_steps=8",
        "train.val_every_steps=8",
    )
    result = fit(cfg, run_name="moe-zero2")
    assert result.metrics["step"] == 8
    usage = [_history(result, f"experts/left/layer0/e{e}")[-1] for e in range(3)]
    assert sum(usage) == pytest.approx(1.0, abs=1e-5)
    assert _history(result, "train/loss/aux/load_balance")
    assert result.model_version == "1"
    model = _load_candidate(result.tracking_uri, "multimnist-moe")
    x = np.random.default_rng(0).random((3, 1, 36, 36), dtype=np.float32)
    predictions = model.predict(x)
    assert predictions["left"].shape == (3, 10) and predictions["depth"].shape == (3, 1, 36, 36)


def test_digits_multi_domain_with_sampling_weights(tmp_path, cache_dir, ray_session):
    cfg = tiny(
        tmp_path,
        cache_dir,
        "data.benchmark=digits",
        "data.image_size=28",
        "tasks.names=[mnist,mnist_m,optdigits]",
        "tasks.weighting=sampling",
        "tasks.weights={mnist: 0.5, mnist_m: 0.3, optdigits: 0.2}",
        "train.max_steps=6",
        "train.checkpoint_every_steps=6",
        "train.val_every_steps=6",
        "tracking.register_above_chance=false",  # 6 steps: registration's path is tested
    )
    result = fit(cfg, run_name="digits")
    for domain in ("mnist", "mnist_m", "optdigits"):
        assert 0.0 <= result.metrics[f"val/{domain}/accuracy"] <= 1.0
    assert _history(result, "weight/optdigits") == [0.2, 0.2]  # logged at steps 4 and 6


def test_sweep_budget_logs_tradeoff_table_and_figure(tmp_path, cache_dir, ray_session):
    from mlflow.tracking import MlflowClient

    from mtl.baselines import save_baseline
    from mtl.train.sweep import sweep_budget

    baseline = tmp_path / "baseline.json"  # an input to the mechanism under test, not a result
    save_baseline(baseline, {"benchmark": "multimnist", "config": {}, "tasks": {
        "left": {"metric": "left/accuracy", "value": 0.5, "higher_is_better": True},
        "semseg": {"metric": "semseg/miou", "value": 0.5, "higher_is_better": True}}})  # fmt: skip
    cfg = tiny(
        tmp_path, cache_dir, "tasks.names=[left,semseg]", f"tasks.baseline={baseline}",
        "train.max_steps=4", "train.checkpoint_every_steps=4", "train.val_every_steps=4",
    )  # fmt: skip
    rows = sweep_budget(cfg, [0.0, 1.0])
    single, hard, *curve = rows
    assert [r["model"] for r in curve] == ["InterroGate tau=0", "InterroGate tau=1"]
    assert single["delta_mtl"] == 0.0 and hard["gflops"] < single["gflops"]
    for r in curve:  # between all-shared and all-specific
        assert 0.95 * hard["gflops"] <= r["gflops"] <= 1.05 * single["gflops"]
        assert r["delta_mtl"] is not None
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("mtl").experiment_id],
        "tags.`mlflow.runName` = 'sweep-budget'",
    )[0]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "tradeoff")}
    assert files == {"tradeoff/table.md", "tradeoff/delta_mtl_vs_flops.png"}
