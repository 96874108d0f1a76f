"""A PBT exploit hands the donor's weighting-method state to the receiver: local Ray Train
workers, DeepSpeed on CPU, an MLflow SQLite store, configs/tiny.yaml for a handful of steps.

(The resume path is tests/methods/test_method_state_e2e.py; this one goes through the Tune
driver's own trainer builder with another run's checkpoint as ``initial_checkpoint``.)

The closed form used to check continuity: FAMO's logged weight is z_k / L_k normalised,
z = softmax(logits) (fresh: z uniform), with L_k the step's loss, logged as
``train/loss/<key>`` (one worker, one micro-batch per step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtl.config import load_config, to_dict
from mtl.train.engine import DS_SUBDIR, verify_checkpoint
from mtl.train.launch import fit

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEYS = ["left", "right", "semseg"]


def tiny(tmp: Path, cache_dir: Path, *extra: str):
    return load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            f"tasks.names=[{','.join(KEYS)}]",
            "data.train_size=256",
            f"data.cache_dir={cache_dir}",
            "train.num_workers=1",
            "train.max_steps=4",
            "train.lr_schedule=constant",  # no warm-up: the methods' state moves from step 1
            "train.log_every_steps=1",
            "train.val_every_steps=100",  # validation at the last step only
            "train.checkpoint_every_steps=2",
            "train.keep_checkpoints=4",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.experiment=methods-e2e",
            "tracking.register=false",
            "tracking.register_above_chance=false",
            *extra,
        ],
    )


def history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """MLflow's metric history of ``key``: step -> value."""
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


def method_state(checkpoint: Path) -> dict:
    """The ``method`` entry of a checkpoint's client state, as a worker restores it: the
    checkpoint verified first (checksums and the pickle-opcode scan), then DeepSpeed's model
    state file read tensors-only."""
    verify_checkpoint(checkpoint)
    tag = json.loads((checkpoint / "mtl_state.json").read_text())["tag"]
    saved = torch.load(
        checkpoint / DS_SUBDIR / tag / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=True,
    )
    return saved["mtl"]["method"]


def adam_steps(state: dict) -> int:
    """How many updates the method's own Adam (one parameter tensor) has taken."""
    (only,) = state["adam"]["state"].values()
    return int(only["step"])


def _famo_weights(
    logits: torch.Tensor, losses: dict[str, float], priors: dict[str, float]
) -> dict[str, float]:
    """FAMO's logged weight per key from its logits and the step's raw losses L_k: FAMO sees
    L̃_k = T·p_k·L_k (mtl.methods.combine), weights w_k ∝ z_k / L̃_k summing to 1, and the
    logged weight is the effective one, w_k·T·p_k."""
    z = torch.softmax(logits.double(), dim=0)
    scale = {k: len(KEYS) * priors[k] for k in KEYS}
    inverse = {k: float(z[i]) / (scale[k] * losses[k]) for i, k in enumerate(KEYS)}
    total = sum(inverse.values())
    return {k: scale[k] * v / total for k, v in inverse.items()}


def test_a_pbt_exploit_restores_the_donors_famo_state(tmp_path, cache_dir, ray_session):
    """What ``mtl.tune.driver._train_segments`` does after an exploit, without a sweep: a new
    Train run (its own name and storage, so Ray has no checkpoint of its own to hand over)
    gets the donor's checkpoint as ``initial_checkpoint``, the receiver's mutated weights in
    its config, and ``stop_at_step``, through the driver's own ``TorchTrainer`` builder."""
    from ray.train import Checkpoint

    from mtl.tracking import finish_run, start_run
    from mtl.train.guards import check_result
    from mtl.train.launch import _trainer, pin_paths, preflight

    donor = fit(tiny(tmp_path, cache_dir, "tasks.method=famo"), run_name="donor")
    given = method_state(Path(donor.checkpoint))
    assert given["name"] == "famo" and adam_steps(given["state"]) == 4
    logits4 = given["state"]["logits"]
    assert logits4.abs().max() > 0.01, logits4  # moved from the fresh zeros

    weights = {"left": 0.5, "right": 0.3, "semseg": 0.2}  # the exploit's explored weights
    cfg = pin_paths(tiny(tmp_path, cache_dir, "tasks.method=famo", "train.max_steps=8",
                         f"tasks.weights={json.dumps(weights)}",
                         f"train.storage_path={tmp_path / 'receiver'}"))  # fmt: skip
    extras = {**preflight(cfg), "use_gpu": False}
    run_id = start_run(cfg, extras["tracking_uri"])
    loop_config = {**extras, "config": to_dict(cfg), "mlflow_run_id": run_id}
    loop_config.update(trial_id="receiver_00001", initial_checkpoint=Checkpoint(donor.checkpoint))
    loop_config["stop_at_step"] = 6  # the next perturbation boundary
    result = _trainer(cfg, loop_config, "receiver-seg", cfg.train.storage_path).fit()
    check_result(result)
    finish_run(extras["tracking_uri"], run_id, ok=True)
    assert result.metrics["resumed_from_step"] == 4 and result.metrics["step"] == 6

    uri = extras["tracking_uri"]
    logged = {k: history(uri, run_id, f"method/weight/{k}") for k in KEYS}
    assert all(sorted(logged[k]) == [5, 6] for k in KEYS)
    assert history(uri, run_id, "weight/left") == {5: 0.5, 6: 0.5}  # weights: the receiver's
    # Step 5's weights follow from the donor's logits and that step's losses; a fresh FAMO
    # (uniform z) would give other ones.
    losses5 = {k: history(uri, run_id, f"train/loss/{k}")[5] for k in KEYS}
    expected = _famo_weights(logits4, losses5, weights)
    fresh = _famo_weights(torch.zeros(len(KEYS)), losses5, weights)
    for k in KEYS:
        assert logged[k][5] == pytest.approx(expected[k], rel=1e-4)
    assert max(abs(logged[k][5] - fresh[k]) for k in KEYS) > 1e-3
    row = {name: [round(w[k], 5) for k in KEYS]
           for name, w in (("logged", {k: logged[k][5] for k in KEYS}), ("donor-based", expected),
                           ("fresh", fresh))}  # fmt: skip
    print(f"famo step 5: {row}")
    received = method_state(Path(result.checkpoint.path))
    assert adam_steps(received["state"]) == 6  # 4 of the donor's + 2 of its own (fresh: 2)
