"""The stored results of benchmarks/backbones.py and benchmarks/inference.py render as the
README's tables, and the stored backbone counts are still what the code counts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


backbones = _load("backbones")
inference = _load("inference")


def _rows(name: str) -> list[dict]:
    return json.loads((_BENCHMARKS / "results" / name).read_text())["rows"]


def test_backbone_tables_render_every_stored_row():
    rows = _rows("backbones.json")
    text = backbones.table(rows)
    for r in rows:
        assert f"| {r['backbone']}" in text
    lines = text.splitlines()
    assert sum(line.startswith("| ") and "---" not in line for line in lines) == len(rows) + 2
    assert {len(line.split("|")) for line in lines if line} == {10, 11}  # 8 and 9 columns


def test_inference_table_renders_one_table_per_run():
    rows = _rows("inference_standard.json")
    text = inference.table(rows)
    assert text.count(inference.HEADER) == len({inference.run_title(r) for r in rows})
    assert sum(line.startswith("| τ = ") for line in text.splitlines()) == len(rows)


@pytest.mark.parametrize("backbone", ["resnet18"])
def test_stored_backbone_row_matches_a_fresh_count(backbone):
    stored = next(r for r in _rows("backbones.json") if r.get("backbone") == backbone)
    fresh = backbones.trunk_row(backbone)
    assert fresh == stored
    assert abs(fresh["params"] / fresh["published_params"] - 1) < 1e-3
