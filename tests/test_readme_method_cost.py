"""The README's method-cost table is what benchmarks/method_cost.py renders from its stored
results (benchmarks/results/method_cost.json), never typed by hand."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_holds_the_rendered_method_cost_table():
    spec = importlib.util.spec_from_file_location(
        "bench_method_cost", ROOT / "benchmarks" / "method_cost.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rows = json.loads((ROOT / "benchmarks" / "results" / "method_cost.json").read_text())["rows"]
    table = module.table(rows).strip()
    assert table.count("\n") >= len(rows)  # a header, a rule and one line per stored row
    assert table in (ROOT / "README.md").read_text(), (
        "README.md's method-cost table differs from the stored results: paste the output of "
        "`python benchmarks/method_cost.py --table benchmarks/results/method_cost.json`"
    )
