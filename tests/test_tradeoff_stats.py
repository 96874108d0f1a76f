"""The expert-utilisation statistics that benchmarks/tradeoff.py reports for MoE arms."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "tradeoff.py"
_spec = importlib.util.spec_from_file_location("tradeoff", _PATH)
tradeoff = importlib.util.module_from_spec(_spec)
sys.modules["tradeoff"] = tradeoff  # its dataclasses look their module up
_spec.loader.exec_module(tradeoff)


def _row(routes, usage, num_experts=4):
    return {"routes": routes, "expert_usage": usage, "num_experts": num_experts}


def test_collapse_onto_one_expert_has_full_share_and_no_information():
    routes = {t: [[0], [0]] for t in ("a", "b", "c")}
    usage = {t: [[1.0, 0.0, 0.0, 0.0]] * 2 for t in routes}
    stats = tradeoff.utilisation(_row(routes, usage))
    assert stats["max_share"] == [1.0, 1.0]
    assert stats["experts_used"] == [1, 1]
    assert stats["mi_bits"] == pytest.approx([0.0, 0.0])
    assert stats["distinct_routes"] == 1


def test_disjoint_experts_carry_log2_tasks_bits():
    tasks = ("a", "b", "c", "d")
    routes = {t: [[i]] for i, t in enumerate(tasks)}
    usage = {t: [[1.0 if e == i else 0.0 for e in range(4)]] for i, t in enumerate(tasks)}
    stats = tradeoff.utilisation(_row(routes, usage))
    assert stats["max_share"] == [0.25]
    assert stats["experts_used"] == [4]
    assert stats["mi_bits"] == pytest.approx([math.log2(4)])
    assert stats["distinct_routes"] == 4


def test_top2_counts_every_slot_and_soft_usage_lowers_information():
    routes = {"a": [[0, 1]], "b": [[0, 2]]}
    usage = {"a": [[0.5, 0.5, 0.0, 0.0]], "b": [[0.5, 0.0, 0.5, 0.0]]}
    stats = tradeoff.utilisation(_row(routes, usage))
    assert stats["max_share"] == [0.5]  # expert 0 takes 2 of the 4 decisions
    assert stats["experts_used"] == [3]
    # H(mean) = H(0.5, 0.25, 0.25) = 1.5 bits; each task's entropy is 1 bit.
    assert stats["mi_bits"] == pytest.approx([0.5])
