"""`python jobs/*.py` (what `ray job submit` runs) fails like the CLI: one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.yaml")


def _job(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def broken(tmp_path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 0.01\n  epochs: [1,\n")
    return path


CASES = {
    "broken_yaml": lambda tmp, broken: ([str(broken)], ["broken.yaml", "line 4", "not valid YAML"]),
    "list_top_level": lambda tmp, broken: (
        [_write(tmp / "list.yaml", "- train\n- model\n")],
        ["list.yaml", "line 1", "top level is a list"],
    ),
    "missing_file": lambda tmp, broken: ([str(tmp / "nope.yaml")], ["nope.yaml", "does not exist"]),
    "lr_inf": lambda tmp, broken: ([TINY, "train.lr=inf"], ["train.lr=inf", "finite"]),
    "unknown_key": lambda tmp, broken: ([TINY, "train.epocs=1"], ["train.epocs"]),
    "bad_flag": lambda tmp, broken: ([TINY, "--bogus"], ["--bogus", "--help"]),
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("script", ["train.py", "tune.py"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(script, case, tmp_path, broken):
    args, expected = CASES[case](tmp_path, broken)
    done = _job(script, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mtl: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for text in expected:
        assert text in done.stderr
    assert not (tmp_path / "mtl_runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_verbose_adds_the_traceback(tmp_path, broken):
    done = _job("train.py", str(broken), "--verbose", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" in done.stderr and done.stderr.splitlines()[-1].startswith("mtl: config")
