"""Registration floors: a model with non-finite validation metrics, below a
``tracking.register_if`` floor, or (``tracking.register_above_chance``) at chance accuracy is
refused; through the driver the MLflow run ends FAILED with the reason and nothing is
registered. The end-to-end part trains a real tiny run on Ray x DeepSpeed into SQLite."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mtl.config import load_config
from mtl.train.register import check_register_floors, refusal_reasons

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
DIGITS = REPO / "configs" / "digits_moe.yaml"
# A tiny run's validation metrics as the gate reads them (inputs to the gate, not results).
GOOD = {
    "val/left/accuracy": 0.5,
    "val/right/accuracy": 0.4,
    "val/semseg/miou": 0.2,
    "val/semseg/pixel_accuracy": 0.7,
    "val/depth/rmse": 0.3,
    "val/depth/mae": 0.2,
    "val/recon_left/rmse": 0.25,
    "val/recon_left/mae": 0.1,
    "val/mean_accuracy": 0.45,
    "train/loss": 1.0,  # not a validation metric: never checked
}


def test_unknown_floor_names_are_an_input_error_listing_the_metrics():
    cfg = load_config(TINY, ["tracking.register_if={mean_acc: 0.5, depth/rmse: 0.4}"])
    with pytest.raises(ValueError, match=r"register_if names \['mean_acc'\]") as info:
        check_register_floors(cfg)
    assert "'left/accuracy'" in str(info.value) and "'mean_accuracy'" in str(info.value)
    with pytest.raises(ValueError, match="delta_mtl needs tasks.baseline"):
        check_register_floors(load_config(TINY, ["tracking.register_if={delta_mtl: 0}"]))
    check_register_floors(load_config(DIGITS, ["tracking.register_if={mnist_m/accuracy: 0.5}"]))


def test_good_metrics_pass_and_train_metrics_are_not_checked():
    cfg = load_config(TINY, ["tracking.register_if={mean_accuracy: 0.4, depth/rmse: 0.35}"])
    assert refusal_reasons(cfg, {**GOOD, "train/loss": math.nan}) == []


def test_floors_follow_the_metric_direction():
    cfg = load_config(TINY, ["tracking.register_if={mean_accuracy: 0.45, depth/rmse: 0.3}"])
    reasons = refusal_reasons(cfg, GOOD)  # equal to a floor does not beat it
    assert reasons == [
        "val/depth/rmse=0.3 is not below 0.3 (tracking.register_if)",
        "val/mean_accuracy=0.45 is not above 0.45 (tracking.register_if)",
    ]


def test_non_finite_metrics_refuse_even_without_floors():
    cfg = load_config(TINY, ["tracking.register_above_chance=false"])
    broken = {**GOOD, "val/depth/rmse": math.inf, "val/semseg/miou": math.nan}
    reasons = refusal_reasons(cfg, broken)
    assert reasons == ["val/depth/rmse=inf is not finite", "val/semseg/miou=nan is not finite"]
    assert refusal_reasons(cfg, {"train/loss": 1.0}) == ["the run reported no validation metrics"]


def test_chance_is_one_over_the_classes_per_task_and_per_domain():
    tiny = load_config(TINY, [])
    assert refusal_reasons(tiny, {**GOOD, "val/right/accuracy": 0.1}) == [
        "val/right/accuracy=0.1 is not above chance 0.1 (tracking.register_above_chance)"
    ]
    digits = load_config(DIGITS, [])
    metrics = {"val/mnist/accuracy": 0.9, "val/mnist_m/accuracy": 0.08}
    metrics |= {"val/optdigits/accuracy": 0.7, "val/mean_accuracy": 0.56}
    assert refusal_reasons(digits, metrics) == [
        "val/mnist_m/accuracy=0.08 is not above chance 0.1 (tracking.register_above_chance)"
    ]
    off = load_config(DIGITS, ["tracking.register_above_chance=false"])
    assert refusal_reasons(off, metrics) == []


def test_a_missing_floor_metric_refuses():
    cfg = load_config(TINY, ["tracking.register_if={left/accuracy: 0.2}"])
    metrics = {k: v for k, v in GOOD.items() if k != "val/left/accuracy"}
    assert refusal_reasons(cfg, metrics) == [
        "val/left/accuracy was not reported (tracking.register_if)"
    ]


@pytest.fixture(scope="module")
def refused(tmp_path_factory, cache_dir, data_root, ray_session):
    """A tiny run whose floor (mean accuracy above 0.999) it cannot reach: (error, tmp, uri)."""
    from mtl.train.guards import RunFailed
    from mtl.train.launch import fit

    tmp = tmp_path_factory.mktemp("floors")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(
        TINY,
        [
            "train.num_workers=1",
            "train.max_steps=8",
            "train.checkpoint_every_steps=8",
            "train.val_every_steps=8",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri={uri}",
            "tracking.register_if={mean_accuracy: 0.999}",
            "tracking.model_name=floors",
            f"data.cache_dir={cache_dir}",
            f"data.root={data_root}",
        ],
    )
    with pytest.raises(RunFailed) as info:
        fit(cfg, run_name="floors")
    return info.value, tmp, uri


def _run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    return client, run


@pytest.mark.slow
def test_driver_ends_a_refused_run_failed_with_the_reason(refused):
    from mtl.tracking import FAILURE_TAG

    error, _, uri = refused
    assert "val/mean_accuracy=" in str(error) and "tracking.register_if" in str(error)
    client, run = _run(uri)
    assert run.info.status == "FAILED"
    reason = run.data.tags[FAILURE_TAG]
    assert "RegistrationRefused" in reason and "is not above 0.999 (tracking.register_if)" in reason
    assert client.search_registered_models() == []  # nothing registered


@pytest.mark.slow
def test_register_checkpoint_checks_the_metrics_it_is_given(refused):
    from mtl.train.register import RegistrationRefused, register_checkpoint

    _, _, uri = refused
    client, run = _run(uri)
    checkpoint = Path(run.data.tags["mtl.checkpoint"])
    metrics = run.data.metrics
    with pytest.raises(RegistrationRefused, match=r"val/depth/rmse=nan is not finite"):
        broken = {**metrics, "val/depth/rmse": math.nan}
        register_checkpoint(checkpoint, uri, run.info.run_id, broken)
    assert client.search_registered_models() == []
    # The same checkpoint with metrics that pass every floor registers, serving limit tagged.
    passing = {**metrics, "val/mean_accuracy": 1.0, "val/left/accuracy": 1.0}
    passing["val/right/accuracy"] = 1.0
    version = register_checkpoint(checkpoint, uri, run.info.run_id, passing, "floors-passed")
    assert version.tags["serve_max_rows"] == "1024"
    assert str(client.get_model_version_by_alias("floors-passed", "candidate").version) == "1"


@pytest.mark.slow
def test_mtl_register_of_the_refused_run_exits_1_in_one_line(refused, capsys):
    from mtl.cli import main

    _, tmp, uri = refused
    _, run = _run(uri)
    argv = ["register", run.info.run_id, "--tracking-uri", uri, "--storage-path", str(tmp / "runs")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mtl: register failed: RegistrationRefused:")
    assert "is not above 0.999 (tracking.register_if)" in err
