"""Bad ``tasks.method`` input through the real CLI: one line, exit code 2, and no Ray started.

Each case is refused by the config checks (``mtl.config_checks._validate_method``) before
``fit`` imports Ray: in process, Ray's state is the same before and after; as a subprocess of
the installed ``mtl`` script, Ray's temporary folder (``RAY_TMPDIR``) is never created.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtl.cli import main
from mtl.methods import GRADIENT_METHODS, LOSS_METHODS, METHODS

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
DIGITS = str(REPO / "configs" / "digits.yaml")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a refused run might write lands in the checkout
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _refused(capsys, config: str, *args: str) -> str:
    """``mtl train CONFIG ARGS`` exits 2 with one line on stderr, Ray untouched."""
    ray_before = _ray_up()  # the session's Ray is up already when slow tests ran first
    assert main(["train", config, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert _ray_up() == ray_before, "Ray was started before the bad input was refused"
    return err


def test_the_registry_splits_into_loss_and_gradient_methods():
    assert set(METHODS) == set(LOSS_METHODS) | set(GRADIENT_METHODS)
    assert not set(LOSS_METHODS) & set(GRADIENT_METHODS)
    issue = {"ew", "uw", "dwa", "rlw", "famo", "pcgrad", "cagrad", "mgda_ub", "imtl_g", "nash_mtl"}
    assert issue <= set(METHODS)


def test_an_unknown_method_lists_the_registry(capsys):
    err = _refused(capsys, TINY, "tasks.method=gradnorm")
    assert "tasks.method='gradnorm' is not a method" in err
    assert str(sorted(METHODS)) in err  # every registered name, in one list


def test_a_gradient_method_with_sampling_weights_names_the_fix(capsys):
    err = _refused(capsys, DIGITS, "tasks.method=pcgrad", "tasks.weighting=sampling")
    assert "tasks.method=pcgrad with tasks.weighting=sampling" in err
    assert "set tasks.weighting=loss" in err


def test_a_method_option_of_the_wrong_type_names_the_key(capsys):
    err = _refused(capsys, TINY, "tasks.method=cagrad", "tasks.cagrad.c=abc")
    assert err.startswith("mtl: config error: ") and "tasks.cagrad.c" in err and "abc" in err


def test_a_gradient_method_with_gradient_accumulation_names_the_fix(capsys):
    err = _refused(capsys, TINY, "tasks.method=cagrad", "train.grad_accum_steps=2")
    assert "train.grad_accum_steps=2" in err and "set train.grad_accum_steps=1" in err


def test_the_representation_variant_needs_hard_sharing(capsys):
    err = _refused(
        capsys,
        TINY,
        "tasks.method=pcgrad",
        "tasks.gradients=representation",
        "model.name=interrogate",
    )
    assert "tasks.gradients=representation with model.name=interrogate" in err
    assert "use tasks.gradients=params" in err


@pytest.mark.slow  # a fresh interpreter: the console script's real start-up, ~seconds
def test_the_installed_script_refuses_before_ray_creates_anything(tmp_path):
    script = Path(sys.executable).with_name("mtl")
    ray_tmp = tmp_path / "ray-tmp"  # where Ray would put its session folder
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [str(script), "train", TINY, "tasks.method=nope", f"train.storage_path={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "tasks.method='nope' is not a method; choose one of" in proc.stderr
    assert not ray_tmp.exists(), "Ray started a session before the bad input was refused"
    assert not list(tmp_path.glob("*/checkpoint_*")) and not (tmp_path / "mlflow.db").exists()
    print(f"refused in {elapsed:.1f} s (interpreter start-up included)")
