"""The weight space of PBT/PB2: the bounded simplex, log-space explore, fitness, policy files.

Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import statistics

import pytest

from mtl.tasks import CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec
from mtl.tune.space import (
    Explorer,
    Projector,
    WeightSpace,
    fitness,
    interval_in_steps,
    read_policy,
    replay_schedule,
    reported_metrics,
    segment_metrics,
    trial_index,
    weights_at,
)

KEYS = ("left", "right", "semseg", "depth")


def space(**kw) -> WeightSpace:
    return WeightSpace(KEYS, kw.pop("low", 0.05), kw.pop("high", 0.7), **kw)


def _on_simplex(s: WeightSpace, w: dict[str, float]) -> bool:
    return s.contains(w) and math.isclose(sum(w.values()), 1.0, abs_tol=1e-12)


def test_projection_lands_in_bounds_and_keeps_unclipped_ratios():
    s = space()
    w = s.project({"left": 100.0, "right": 3.0, "semseg": 2.0, "depth": 0.0})
    assert _on_simplex(s, w)
    assert w["left"] == pytest.approx(0.7)  # clipped at the top
    assert w["depth"] == pytest.approx(0.05)  # zero lifted to the floor
    assert w["right"] / w["semseg"] == pytest.approx(3.0 / 2.0)  # free weights keep ratios


def test_projection_is_the_identity_inside_and_scale_free():
    s = space()
    inside = {"left": 0.4, "right": 0.3, "semseg": 0.2, "depth": 0.1}
    assert s.project(inside) == pytest.approx(inside)
    assert s.project({k: 7.0 * v for k, v in inside.items()}) == pytest.approx(inside)


def test_bounds_that_no_point_meets_and_a_single_key_are_refused():
    with pytest.raises(ValueError, match="weight_min"):
        WeightSpace(KEYS, 0.3, 0.9)  # 4 x 0.3 > 1
    with pytest.raises(ValueError, match="weight_max"):
        WeightSpace(KEYS, 0.01, 0.2)  # 4 x 0.2 < 1
    with pytest.raises(ValueError, match="at least 2"):
        WeightSpace(("left",), 0.1, 1.0)


def test_project_refuses_other_keys():
    with pytest.raises(ValueError, match="keys"):
        space().project({"left": 1.0, "nose": 1.0})


def test_perturbation_is_a_gaussian_step_in_log_space():
    s = space(low=1e-6, high=1.0, sigma=0.2)  # bounds far away: no clipping
    rng = random.Random(0)
    start = {"left": 0.4, "right": 0.3, "semseg": 0.2, "depth": 0.1}
    log_ratio_steps = []
    for _ in range(2000):
        w = s.perturb(start, rng)
        assert _on_simplex(s, w)
        # renormalising cancels in ratios: log(w_l/w_r) moves by N(0, 2 sigma^2)
        moved = math.log(w["left"] / w["right"]) - math.log(start["left"] / start["right"])
        log_ratio_steps.append(moved)
    assert abs(statistics.mean(log_ratio_steps)) < 0.02
    assert statistics.stdev(log_ratio_steps) == pytest.approx(0.2 * math.sqrt(2), rel=0.05)


def test_explore_resamples_with_the_configured_probability():
    start = {"left": 0.4, "right": 0.3, "semseg": 0.2, "depth": 0.1}
    never = space(resample_probability=0.0, sigma=1e-4)
    near = never.explore(start, random.Random(1))
    assert near == pytest.approx(start, abs=1e-3)
    always = space(resample_probability=1.0)
    a, b = (always.explore(start, random.Random(seed)) for seed in (1, 1))
    assert a == b and a != pytest.approx(start, abs=1e-2)  # fresh draw, seeded
    assert _on_simplex(always, a)


def test_initial_population_starts_at_the_configured_weights_then_draws():
    s = space()
    first = {"left": 0.25, "right": 0.25, "semseg": 0.25, "depth": 0.25}
    population = s.initial(first, 4, random.Random(3))
    assert population[0] == pytest.approx(first)
    assert len(population) == 4 and all(_on_simplex(s, w) for w in population)
    assert len({tuple(sorted(w.items())) for w in population}) == 4
    assert s.initial(first, 4, random.Random(3)) == population  # reproducible


def test_spread_population_leans_towards_each_key_then_the_centre_then_draws():
    s = space()
    first = {"left": 0.25, "right": 0.25, "semseg": 0.25, "depth": 0.25}
    population = s.spread(first, 6, 4.0, random.Random(3))
    assert all(_on_simplex(s, w) for w in population)
    for key, point in zip(s.keys, population[:4], strict=True):
        assert point[key] == pytest.approx(4 / 7)  # 4 x 0.25 against three times 0.25
        assert all(point[k] == pytest.approx(1 / 7) for k in s.keys if k != key)
    assert population[4] == pytest.approx(first)
    assert population[5] not in population[:5]  # a random draw fills the rest
    assert s.spread(first, 2, 4.0, random.Random(0)) == population[:2]


def test_grid_scales_one_weight_at_a_time_and_drops_points_the_bounds_merge():
    s = space()
    first = {k: 0.25 for k in KEYS}
    grid = s.grid(first, [0.25, 4.0])
    assert grid[0] == pytest.approx(first) and len(grid) == 1 + len(KEYS) * 2
    assert all(_on_simplex(s, w) for w in grid)
    down = grid[1]  # left x 0.25, the others unchanged relative to each other
    assert down["left"] == pytest.approx(0.25 * 0.25 / (0.25 * 0.25 + 0.75))
    assert down["right"] == pytest.approx(down["semseg"]) == pytest.approx(down["depth"])
    assert grid[2]["left"] == pytest.approx(1.0 / 1.75)  # x4: 4/7 of the mass, under high
    # With high = 0.3, x4 and x8 both clip at the bound: the same point, kept once.
    tight = space(high=0.3).grid(first, [4.0, 8.0])
    assert len(tight) == 1 + len(KEYS) and all(w <= 0.3 + 1e-9 for p in tight for w in p.values())


def test_explorer_and_projector_are_picklable_tune_explore_functions():
    s = space()
    explorer = pickle.loads(pickle.dumps(Explorer(s, seed=5)))
    config = {"weights": {"left": 0.4, "right": 0.3, "semseg": 0.2, "depth": 0.1}, "other": 1}
    new = explorer(config)
    assert new["other"] == 1 and _on_simplex(s, new["weights"])
    assert new["weights"] != config["weights"]
    assert s.pb2_bounds() == {k: [0.0, 1.0] for k in KEYS[:-1]}  # PB2: stick fractions
    proposed = {"weights": config["weights"], "sticks": {"left": 0.9, "right": 0.5, "semseg": 0.0}}
    projected = Projector(s)(proposed)
    assert _on_simplex(s, projected["weights"])
    assert projected["sticks"] == pytest.approx(s.to_sticks(projected["weights"]))


def test_stick_fractions_map_the_unit_box_onto_the_simplex_one_to_one():
    s = space(low=1e-6, high=1.0)
    w = {"left": 0.4, "right": 0.3, "semseg": 0.2, "depth": 0.1}
    sticks = s.to_sticks(w)
    assert sticks == pytest.approx({"left": 0.4, "right": 0.5, "semseg": 2 / 3})
    assert s.from_sticks(sticks) == pytest.approx(w)
    corners = {s.from_sticks(dict(zip(KEYS[:-1], c, strict=True)))["left"] for c in
               [(0, 0, 0), (1, 1, 1), (0.5, 0.5, 0.5)]}  # fmt: skip
    assert len(corners) == 3  # unlike a box over the weights, corners differ


def _taskset(*heads: TaskSpec) -> TaskSet:
    return TaskSet("multimnist", heads, 1, 36)


def test_fitness_direction_follows_the_metric():
    ts = _taskset(
        TaskSpec("left", CLASSIFICATION, 10, "accuracy", True),
        TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False),
    )
    reported = reported_metrics(ts, with_baseline=True)
    assert fitness("mean_accuracy", reported) == ("val/mean_accuracy", "max")
    assert fitness("delta_mtl", reported) == ("val/delta_mtl", "max")
    assert fitness("depth/rmse", reported) == ("val/depth/rmse", "min")
    assert fitness("left/accuracy", reported) == ("val/left/accuracy", "max")


def test_a_fitness_metric_no_task_reports_is_refused_with_the_choices():
    only_depth = _taskset(TaskSpec("depth", DENSE_REGRESSION, 1, "rmse", False))
    with pytest.raises(ValueError, match="depth/rmse") as err:
        fitness("mean_accuracy", reported_metrics(only_depth, with_baseline=False))
    assert "classification" in str(err.value)
    with pytest.raises(ValueError, match="tasks.baseline"):
        fitness("delta_mtl", reported_metrics(only_depth, with_baseline=False))
    with pytest.raises(ValueError, match="nose/accuracy"):
        fitness("nose/accuracy", reported_metrics(only_depth, with_baseline=False))


def test_interval_in_steps():
    assert interval_in_steps(2, "epochs", 30) == 60
    assert interval_in_steps(7, "steps", 30) == 7


def _policy(tmp_path, rows):
    path = tmp_path / "pbt_policy_t2.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_policy_file_chain_is_read_like_rays_replay(tmp_path):
    w = [{"weights": {"left": x, "right": 1 - x}} for x in (0.5, 0.6, 0.3, 0.7)]
    rows = [
        ["t1", "t0", 2, 2, w[0], w[1]],  # an older exploit of another chain
        ["t2", "t1", 4, 4, w[1], w[2]],  # t2 copies t1 at iteration 4 ...
        ["t2", "t0", 6, 6, w[2], w[3]],  # ... and t0 at iteration 6: the chain restarts
    ]
    assert read_policy(_policy(tmp_path, rows)) == (w[2], [(6, w[3])])


def test_bad_policy_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_policy(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="nothing to replay"):
        read_policy(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_text('["a", "b", 1, 1, {"lr": 1}, {"lr": 2}]\n')
    with pytest.raises(ValueError, match="weights"):
        read_policy(tmp_path / "bad.txt")


def test_replay_schedule_applies_one_change_per_report_like_ray(tmp_path):
    w = [{"weights": {"left": x, "right": 1 - x}} for x in (0.5, 0.6, 0.3)]
    rows = [
        ["t1", "t0", 1, 0, w[0], w[1]],  # t1 copies t0 (Ray logs t0 at iteration 0) ...
        ["t0", "t1", 1, 2, w[1], w[2]],  # ... then t0 copies t1 at t1's iteration 2
    ]
    schedule = replay_schedule(_policy(tmp_path, rows), interval_steps=4)
    assert schedule == [(0, w[0]["weights"]), (4, w[1]["weights"]), (8, w[2]["weights"])]
    config = {"weights": w[0]["weights"], "schedule": schedule}
    assert [weights_at(config, s)["left"] for s in (0, 3, 4, 7, 8, 12)] == [
        0.5, 0.5, 0.6, 0.6, 0.3, 0.3
    ]  # fmt: skip
    assert weights_at({"weights": {"left": 1.0}}, 99) == {"left": 1.0}


def test_segment_metrics_name_the_donor_by_its_trial_index():
    report = {"fitness": 0.7, "resumed_from_trial": "ab12c_00002", "resumed_from_step": 8}
    report.update({"weight/left": 0.25, "weight/right": 0.75, "val/left/accuracy": 0.9})
    assert segment_metrics(report) == {
        "tune/fitness": 0.7,
        "tune/from_trial": 2.0,
        "tune/from_step": 8.0,
        "tune/weight/left": 0.25,
        "tune/weight/right": 0.75,
    }
    fresh = segment_metrics({"fitness": None, "resumed_from_trial": "", "resumed_from_step": -1})
    assert fresh["tune/from_trial"] == -1 and fresh["tune/from_step"] == 0
    assert math.isnan(fresh["tune/fitness"])
    assert trial_index("ab12c_00013") == 13 and trial_index("") == -1
