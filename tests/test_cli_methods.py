"""Bad weighting-method input through the real CLI: one line, exit 2, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl.cli import main
from mtl.methods import METHODS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _ray_up() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _train(capsys, config: str, *args: str) -> str:
    ray_before = _ray_up()  # the session's Ray is up already when slow tests ran first
    assert main(["train", str(CONFIGS / config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl: ") and "Traceback" not in err and err.count("\n") == 1
    assert _ray_up() == ray_before, "Ray was started before the bad input was refused"
    return err


def test_an_unknown_method_lists_the_registry(capsys):
    err = _train(capsys, "tiny.yaml", "tasks.method=gradnorm")
    assert "tasks.method='gradnorm'" in err
    assert all(name in err for name in METHODS), err


def test_a_gradient_method_with_sampling_weights(capsys):
    err = _train(capsys, "digits.yaml", "tasks.method=pcgrad", "tasks.weighting=sampling")
    assert "tasks.weighting=sampling" in err and "tasks.weighting=loss" in err


def test_a_method_option_of_the_wrong_type(capsys):
    err = _train(capsys, "tiny.yaml", "tasks.method=cagrad", "tasks.cagrad.c=abc")
    assert "tasks.cagrad.c" in err and "abc" in err


def test_an_option_out_of_range(capsys):
    assert "tasks.famo.update" in _train(capsys, "tiny.yaml", "tasks.famo.update=later")


def test_a_gradient_method_with_gradient_accumulation(capsys):
    err = _train(capsys, "tiny.yaml", "tasks.method=imtl_g", "train.grad_accum_steps=2")
    assert "train.grad_accum_steps=1" in err


def test_the_representation_variant_needs_hard_sharing(capsys):
    err = _train(
        capsys,
        "tiny.yaml",
        "tasks.method=mgda_ub",
        "tasks.gradients=representation",
        "model.name=interrogate",
    )
    assert "model.name=interrogate" in err and "tasks.gradients=params" in err


def test_a_gradient_method_with_token_routed_experts(capsys):
    err = _train(capsys, "multimnist_moe_ep.yaml", "tasks.method=pcgrad")
    assert "moe.routing=token" in err
