"""benchmarks/method_cost.py: its stored results render every row, and a --quick run of
ew and pcgrad measures well-formed rows (real steps of the workers' step code)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_ROOT = _BENCHMARKS.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_method_cost", _BENCHMARKS / "method_cost.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


method_cost = _load()


def _data_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[0] == method_cost.HEADER
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_stored_results_render_every_row():
    stored = json.loads((_BENCHMARKS / "results" / "method_cost.json").read_text())
    rows = stored["rows"]
    cells = _data_rows(method_cost.table(rows))
    assert len(cells) == len(rows)
    for r, c in zip(rows, cells, strict=True):
        assert c[:4] == [r["benchmark"], str(r["tasks"]), r["method"], r["variant"]]
        assert float(c[4]) == round(r["ms_per_step"], 1)
    # every method of the registry, in every variant, on both benchmarks
    from mtl.methods import METHODS

    expected = set(method_cost.variants(list(METHODS)))
    for bench in method_cost.BENCHMARKS:
        assert {(r["method"], r["variant"]) for r in rows if r["benchmark"] == bench} == expected
    assert {"torch", "machine", "rounds", "loadavg_end"} <= set(stored["meta"])


def test_quick_run_of_ew_and_pcgrad_gives_well_formed_rows(tmp_path):
    out = tmp_path / "cost.json"
    subprocess.run(
        [sys.executable, str(_BENCHMARKS / "method_cost.py"), "--quick"]
        + ["--methods", "ew", "pcgrad", "--out", str(out)],
        cwd=_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    rows = json.loads(out.read_text())["rows"]
    for bench, tasks in (("multimnist", 5), ("celeba40", 40)):
        mine = [r for r in rows if r["benchmark"] == bench]
        assert [(r["method"], r["variant"]) for r in mine] == [
            ("ew", "-"),
            ("pcgrad", "params"),
            ("pcgrad", "representation"),
        ]
        for r in mine:
            assert r["tasks"] == tasks
            assert r["ms_per_step"] > 0 and math.isfinite(r["ms_per_step"])
            assert r["ms_p25"] <= r["ms_per_step"] <= r["ms_p75"]
            assert r["peak_mb"] >= 0 and r["peak_rss_mb"] >= r["rss_before_mb"]
            assert r["timed_steps"] >= 1
        assert mine[0]["x_ew_time"] == 1.0 and mine[0]["x_ew_memory"] == 1.0
        # the ratios are the rows' own numbers over ew's
        for r in mine[1:]:
            assert math.isclose(r["x_ew_time"], r["ms_per_step"] / mine[0]["ms_per_step"])
    assert len(_data_rows(method_cost.table(rows))) == 6
