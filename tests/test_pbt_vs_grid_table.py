"""How benchmarks/pbt_vs_grid.py merges stored results and compares the search with uniform
and the grid's best seed by seed (pure Python; the sweeps themselves are tested in tests/tune)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "pbt_vs_grid.py"
_spec = importlib.util.spec_from_file_location("pbt_vs_grid", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["pbt_vs_grid"] = bench
_spec.loader.exec_module(bench)


def _sweep(name: str, best: float, first: float = 0.0, trials: int = 4) -> dict:
    return {
        "sweep": name,
        "best": best,
        "best_select": best,
        "first": first,
        "first_select": first,
        "trials": trials,
        "trial_epochs": 3.0 * trials,
        "wall_s": 60.0,
    }


def _row(seed: int, search_best: float, grid_best: float, uniform: float, variant="") -> dict:
    return {
        "seed": seed,
        "scheduler": "pbt",
        "grid": _sweep(f"t-grid-s{seed}", grid_best, uniform, trials=13),
        "search": _sweep(f"t-pbt{variant}-s{seed}", search_best),
    }


def test_paired_counts_ties_and_follows_the_metric_direction():
    search = [_sweep("a", 0.80), _sweep("b", 0.70), _sweep("c", 0.60)]
    grid = [_sweep("a", 0.80), _sweep("b", 0.75), _sweep("c", 0.50)]
    # higher is better: +0.0, -0.05, +0.10
    assert bench.paired(search, grid, "best", 1.0) == "0.0167 ± 0.0764 | 1 / 1 / 1"
    # lower is better (e.g. an rmse): the same numbers flip sign
    assert bench.paired(search, grid, "best", -1.0) == "-0.0167 ± 0.0764 | 1 / 1 / 1"


def test_table_compares_with_uniform_and_grid_best_per_seed():
    rows = [_row(0, 0.78, 0.80, 0.76), _row(1, 0.81, 0.81, 0.81)]
    text = bench.table(rows, "mean_accuracy")
    assert "| uniform | 0.0100 ± 0.0141 | 1 / 1 / 0 |" in text
    assert "| grid best | -0.0100 ± 0.0141 | 0 / 1 / 1 |" in text
    assert "| grid best of 13 | 0.8050 ± 0.0071 |" in text


def test_merge_rows_sorts_seeds_from_several_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([_row(3, 0.7, 0.7, 0.7), _row(4, 0.7, 0.7, 0.7)]))
    b.write_text(json.dumps([_row(0, 0.7, 0.7, 0.7)]))
    assert [r["seed"] for r in bench.merge_rows([str(a), str(b)])] == [0, 3, 4]


def test_merge_rows_refuses_a_seed_twice(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([_row(0, 0.7, 0.7, 0.7)]))
    b.write_text(json.dumps([_row(0, 0.8, 0.7, 0.7)]))
    with pytest.raises(ValueError, match="seed 0 is in more than one"):
        bench.merge_rows([str(a), str(b)])


def test_merge_rows_refuses_to_average_different_searches(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([_row(0, 0.7, 0.7, 0.7, variant="-burn_in_84")]))
    b.write_text(json.dumps([_row(1, 0.7, 0.7, 0.7)]))
    with pytest.raises(ValueError, match="different searches"):
        bench.merge_rows([str(a), str(b)])
