"""The single-gated MoE's three stages in one run: Ray Train x DeepSpeed on CPU, tiny config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl.config import load_config
from mtl.train.engine import consolidated_weights, read_state
from mtl.train.launch import fit

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _cfg(tmp: Path, cache_dir: Path, *extra: str):
    return load_config(
        TINY,
        [
            "model.name=single_gate",
            "model.single_gate.num_experts=2",
            "model.single_gate.cluster_samples=64",
            "tasks.names=[left,right]",  # heads the base can exit on; no dense decoders
            "train.max_steps=8",
            "train.val_every_steps=4",
            "train.checkpoint_every_steps=4",
            "train.log_every_steps=2",
            "train.warmup_steps=2",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            f"data.cache_dir={cache_dir}",
            "tracking.register_above_chance=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def staged(tmp_path_factory, cache_dir, ray_session):
    tmp = tmp_path_factory.mktemp("single-gate")
    return tmp, fit(_cfg(tmp, cache_dir), run_name="sg")


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return consolidated_weights(Path(checkpoint))


def test_the_base_trains_first_then_the_experts_from_its_copy(staged):
    tmp, result = staged
    runs = tmp / "runs" / "sg"
    base_ckpt, last = runs / "checkpoint_00000004", Path(result.checkpoint)
    assert read_state(base_ckpt)["progress"]["stage"] == "base"
    assert read_state(last)["progress"]["stage"] == "experts" and result.metrics["step"] == 8
    before, after = _weights(str(base_ckpt)), _weights(str(last))
    # Stage 3 froze the base (freeze_base): the prefix and the base branch are stage 1's.
    for key in before:
        if (
            key.startswith(("prefix.", "base."))
            and "running" not in key
            and "num_batches" not in key
        ):
            assert torch.equal(before[key], after[key]), key
    # The experts started as copies of the base and then trained away from it.
    moved = [
        k for k in after
        if k.startswith("experts.0.") and after[k].is_floating_point()
        and not torch.equal(after[k], after[k.replace("experts.0.", "base.", 1)])
    ]  # fmt: skip
    assert moved, "expert 0 never left the base's weights"
    assert after["centroids"].abs().sum() > 0  # stage 2 set the gate's centroids


def test_the_fixed_model_is_registered_with_its_expected_flops(staged):
    from mlflow.tracking import MlflowClient

    _, result = staged
    assert result.model_version == "1"
    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    name = "multimnist-left+right-single_gate"  # a task subset: the default name says so
    version = client.get_model_version_by_alias(name, "candidate")
    tags = version.tags
    assert float(tags["verified_max_abs_diff"]) <= 1e-5
    assert tags["threshold"] == "0.9" and tags["num_experts"] == "2"
    base, full = int(tags["flops_base"]), int(tags["flops_full"])
    expected, rate = float(tags["expected_flops_per_image"]), float(tags["exit_rate"])
    assert base < full and expected == pytest.approx(full - rate * (full - base), rel=1e-6)
    files = {a.path for a in client.list_artifacts(result.mlflow_run_id, "threshold_sweep")}
    assert files == {"threshold_sweep/rows.json", "threshold_sweep/mean_accuracy.png"}


def test_a_resume_from_stage_three_continues_there(staged, cache_dir):
    tmp, first = staged
    cfg = _cfg(tmp, cache_dir, "train.max_steps=12")  # 4 more steps of stage 3
    again = fit(cfg, resume="sg")
    assert again.metrics["resumed_from_step"] == 8 and again.metrics["step"] == 12
    progress = read_state(Path(again.checkpoint))["progress"]
    assert (progress["stage"], progress["stage_start"]) == ("experts", 4)
    assert again.mlflow_run_id == first.mlflow_run_id
