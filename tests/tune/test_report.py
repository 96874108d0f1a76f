"""After a sweep: the lineage of a trial's model through its donors, the trajectory table."""

from __future__ import annotations

from mtl.tune.report import best_trial, lineage, trajectory_figure, trajectory_table

KEYS = ("a", "b")


def row(trial, step, a, from_trial="", from_step=0, fitness=0.5):
    return {
        "trial_id": trial,
        "step": step,
        "fitness": fitness,
        "from_trial": from_trial,
        "from_step": from_step,
        "a": a,
        "b": 1 - a,
    }


# t0: fresh to 4, then copies t1@4; t1: fresh to 4, continues itself to 8, is exploited at 8
# (that report is abandoned) and continues from t0@8. Interval 4.
ROWS = [
    row("t0", 4, 0.5),
    row("t1", 4, 0.2),
    row("t0", 8, 0.3, "t1", 4),
    row("t1", 8, 0.2, "t1", 4),
    row("t0", 12, 0.3, "t0", 8),
    row("t1", 12, 0.35, "t0", 8),
]


def test_lineage_follows_exploits_back_through_the_donors():
    assert lineage(ROWS, "t1", KEYS) == [
        {"from_step": 0, "to_step": 4, "trial_id": "t1", "weights": {"a": 0.2, "b": 0.8}},
        {"from_step": 4, "to_step": 8, "trial_id": "t0", "weights": {"a": 0.3, "b": 0.7}},
        {"from_step": 8, "to_step": 12, "trial_id": "t1", "weights": {"a": 0.35, "b": 0.65}},
    ]


def test_lineage_merges_segments_with_the_same_weights():
    (only,) = lineage(ROWS[:1] + [row("t0", 8, 0.5, "t0", 4)], "t0", KEYS)
    assert (only["from_step"], only["to_step"], only["weights"]["a"]) == (0, 8, 0.5)


def test_best_trial_skips_failed_trials_and_follows_the_mode():
    trials = [
        {"trial_id": "x", "status": "ERROR", "fitness": 9.0, "error": "boom"},
        {"trial_id": "y", "status": "TERMINATED", "fitness": 0.4, "error": None},
        {"trial_id": "z", "status": "TERMINATED", "fitness": 0.6, "error": None},
    ]
    assert best_trial(trials, "max")["trial_id"] == "z"
    assert best_trial(trials, "min")["trial_id"] == "y"


def test_trajectory_table_and_figure():
    table = trajectory_table(ROWS, KEYS)
    assert table.count("\n") == 2 + len(ROWS) and "| t0 | 8 | 0.5000 | t1@4 |" in table
    figure = trajectory_figure(ROWS, KEYS)
    assert len(figure.axes) == 2 and len(figure.axes[0].lines) == 2  # one line per trial
