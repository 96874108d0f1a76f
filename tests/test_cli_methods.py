"""More bad weighting-method input through the real CLI (one line, exit 2, before Ray
starts) than tests/methods/test_methods_cli.py covers: option values and token experts."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl.cli import main

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


def test_an_option_out_of_range(capsys):
    assert "tasks.famo.update" in _train(capsys, "tiny.yaml", "tasks.famo.update=later")


def test_a_gradient_method_with_token_routed_experts(capsys):
    err = _train(capsys, "multimnist_moe_ep.yaml", "tasks.method=pcgrad")
    assert "moe.routing=token" in err
