"""The README's scaling tables are what benchmarks/scaling.py renders from its stored results
(benchmarks/results/scaling.json), never typed by hand."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_holds_the_rendered_scaling_tables():
    spec = importlib.util.spec_from_file_location(
        "bench_scaling", ROOT / "benchmarks" / "scaling.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = json.loads((ROOT / "benchmarks" / "results" / "scaling.json").read_text())
    rendered = module.table(result).strip()
    assert "| 4 | 2 nodes |" in rendered and "namespaces" in rendered
    assert rendered in (ROOT / "README.md").read_text(), (
        "README.md's scaling tables differ from the stored results: paste the output of "
        "`python benchmarks/scaling.py --table benchmarks/results/scaling.json`"
    )
