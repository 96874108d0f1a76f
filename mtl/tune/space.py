"""The space PBT and PB2 search: scalarization weights on a bounded simplex (DESIGN.md §4.2).

A point is ``{loss key: weight}`` with every weight in ``[low, high]`` and the weights summing
to 1 (``tasks.weights``: loss weights, or domain sampling probabilities). Explore steps move
in log space, so weights stay positive and a step changes them by factors, not by amounts;
every new point is projected back onto the bounded simplex. Everything here is pure Python
(plus ``mtl.metrics`` for the metric names), so it runs and is tested without Ray.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Primary and secondary metric names whose lower values are better; all others: higher.
LOWER_IS_BETTER = frozenset({"rmse", "mae", "abs_err", "rel_err", "mean_angle", "median_angle"})
_TOL = 1e-9


@dataclass(frozen=True)
class WeightSpace:
    """The bounded simplex over ``keys`` and how to explore it.

    Args:
        keys: Loss keys (``taskset.loss_keys``), in order.
        low: Smallest allowed weight (``tune.weight_min``).
        high: Largest allowed weight (``tune.weight_max``).
        sigma: Standard deviation of the Gaussian step on each log-weight.
        resample_probability: Chance that explore draws fresh weights instead.

    Raises:
        ValueError: Fewer than two keys, or bounds no point of the simplex satisfies.
    """

    keys: tuple[str, ...]
    low: float
    high: float
    sigma: float = 0.3
    resample_probability: float = 0.25

    def __post_init__(self) -> None:
        n = len(self.keys)
        if n < 2:
            raise ValueError(
                f"searching weights needs at least 2 loss keys, got {list(self.keys)}: "
                "add tasks to tasks.names (or domains for a multi-domain benchmark)"
            )
        if not 0 < self.low < self.high:
            raise ValueError(f"weight bounds [{self.low}, {self.high}]: need 0 < low < high")
        if n * self.low > 1 + _TOL or n * self.high < 1 - _TOL:
            raise ValueError(
                f"tune.weight_min={self.low} and tune.weight_max={self.high} leave no room for "
                f"{n} weights summing to 1: need weight_min <= 1/{n} <= weight_max"
            )

    def contains(self, weights: Mapping[str, float]) -> bool:
        """Whether ``weights`` has exactly our keys, lies in the bounds and sums to 1."""
        if set(weights) != set(self.keys):
            return False
        values = [weights[k] for k in self.keys]
        in_bounds = all(self.low - _TOL <= w <= self.high + _TOL for w in values)
        return in_bounds and abs(sum(values) - 1.0) <= 1e-6

    def project(self, weights: Mapping[str, float]) -> dict[str, float]:
        """The point ``w_k = clip(c·u_k, low, high)`` whose weights sum to 1.

        ``u`` is ``weights`` (any positive scale); the scale ``c`` is found by bisection:
        the sum is continuous and non-decreasing in ``c``, from ``n·low <= 1`` to
        ``n·high >= 1``, so it crosses 1. Ratios between unclipped weights are kept.
        """
        missing = [k for k in self.keys if k not in weights]
        if missing or len(weights) != len(self.keys):
            raise ValueError(f"weights {dict(weights)} do not have exactly the keys {self.keys}")
        u = [max(float(weights[k]), 1e-12) for k in self.keys]
        if any(not math.isfinite(x) for x in u):
            raise ValueError(f"weights {dict(weights)} must be finite")
        lo, hi = math.log(self.low / max(u)), math.log(self.high / min(u))
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if self._clipped_sum(u, math.exp(mid)) < 1.0:
                lo = mid
            else:
                hi = mid
        scale = math.exp(0.5 * (lo + hi))
        clipped = [min(max(scale * x, self.low), self.high) for x in u]
        total = sum(clipped)
        return {k: w / total for k, w in zip(self.keys, clipped, strict=True)}

    def _clipped_sum(self, u: list[float], scale: float) -> float:
        return sum(min(max(scale * x, self.low), self.high) for x in u)

    def perturb(self, weights: Mapping[str, float], rng: random.Random) -> dict[str, float]:
        """A Gaussian step of std ``sigma`` on every log-weight, projected back."""
        steps = {
            k: math.log(max(weights[k], 1e-12)) + rng.gauss(0.0, self.sigma) for k in self.keys
        }
        top = max(steps.values())  # exp of the shifted logs cannot overflow
        return self.project({k: math.exp(z - top) for k, z in steps.items()})

    def resample(self, rng: random.Random) -> dict[str, float]:
        """Fresh weights: uniform on the simplex (Dirichlet(1)), projected into the bounds."""
        return self.project({k: rng.expovariate(1.0) + 1e-12 for k in self.keys})

    def explore(self, weights: Mapping[str, float], rng: random.Random) -> dict[str, float]:
        """PBT's explore step: resample with ``resample_probability``, else perturb."""
        if rng.random() < self.resample_probability:
            return self.resample(rng)
        return self.perturb(weights, rng)

    def initial(self, first: Mapping[str, float], size: int, rng: random.Random) -> list[dict]:
        """The starting population: ``first`` (the configured weights), then fresh draws."""
        return [self.project(first)] + [self.resample(rng) for _ in range(size - 1)]

    def spread(
        self, first: Mapping[str, float], size: int, factor: float, rng: random.Random
    ) -> list[dict]:
        """A starting population spread over the simplex: ``first`` with one key's weight
        times ``factor``, for each key in turn; then ``first`` itself; then fresh draws.

        A few random points of a K-simplex often all lie near its centre; these lean
        towards every corner, so the first rankings compare every key upweighted.
        """
        leaning = [
            {k: w * (factor if k == key else 1.0) for k, w in first.items()} for key in self.keys
        ]
        points = [self.project(p) for p in [*leaning, first]][:size]
        return points + [self.resample(rng) for _ in range(size - len(points))]

    def grid(self, first: Mapping[str, float], factors: Collection[float]) -> list[dict]:
        """The fixed-weight grid: ``first``, then each key's weight times each factor.

        Every point is projected onto the bounded simplex; points that coincide after
        projection (a factor pushing a weight past a bound both ways) are kept once.
        """
        points = [self.project(first)]
        for key in self.keys:
            for factor in factors:
                point = self.project(
                    {k: w * (factor if k == key else 1.0) for k, w in points[0].items()}
                )
                if all(max(abs(point[k] - p[k]) for k in self.keys) > 1e-6 for p in points):
                    points.append(point)
        return points

    def pb2_bounds(self) -> dict[str, list[float]]:
        """PB2's box: the stick-breaking fractions (``to_sticks``), one per key but the last.

        A box over the weights themselves would be redundant (every point of a ray from the
        origin is the same normalised weights), and the bandit's favourite corners would all
        be the uniform weights; the fractions map the unit box onto the simplex one to one.
        """
        return {k: [0.0, 1.0] for k in self.keys[:-1]}

    def to_sticks(self, weights: Mapping[str, float]) -> dict[str, float]:
        """Weights as stick-breaking fractions: each key's share of what the keys before it
        left over (the last key takes the rest)."""
        rest, sticks = 1.0, {}
        for k in self.keys[:-1]:
            sticks[k] = min(max(weights[k] / rest, 0.0), 1.0) if rest > _TOL else 0.5
            rest -= weights[k]
        return sticks

    def from_sticks(self, sticks: Mapping[str, float]) -> dict[str, float]:
        """The weights of stick-breaking fractions, projected into the bounds."""
        rest, weights = 1.0, {}
        for k in self.keys[:-1]:
            weights[k] = rest * min(max(sticks[k], 0.0), 1.0)
            rest -= weights[k]
        weights[self.keys[-1]] = rest
        return self.project(weights)


class Explorer:
    """PBT's ``custom_explore_fn``: explores ``config["weights"]`` with its own seeded RNG.

    A class rather than a closure so that Tune can pickle the scheduler's state.
    """

    def __init__(self, space: WeightSpace, seed: int = 0) -> None:
        self.space = space
        self.rng = random.Random(seed)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "weights": self.space.explore(config["weights"], self.rng)}


class Projector:
    """PB2's ``custom_explore_fn``: PB2 proposes stick-breaking fractions in the unit box
    (``config["sticks"]``); this turns them into bounded weights and re-encodes those, so
    that PB2's model sees the weights the trial really trains with."""

    def __init__(self, space: WeightSpace) -> None:
        self.space = space

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        weights = self.space.from_sticks(config["sticks"])
        return {**config, "weights": weights, "sticks": self.space.to_sticks(weights)}


def reported_metrics(taskset: Any, with_baseline: bool) -> set[str]:
    """The validation metric names (without ``val/``) a run on ``taskset`` reports."""
    from mtl.metrics import MetricAccumulator

    names = set(MetricAccumulator(taskset).compute())
    return names | {"delta_mtl"} if with_baseline else names


def fitness(metric: str, reported: Collection[str]) -> tuple[str, str]:
    """The result key and mode (``"max"``/``"min"``) of the fitness ``tune.metric``.

    Args:
        metric: ``tune.metric``, e.g. ``"mean_accuracy"``, ``"delta_mtl"``, ``"depth/rmse"``.
        reported: The validation metric names the task set reports (without ``val/``).

    Raises:
        ValueError: No task reports ``metric``; the message lists the ones that exist.
    """
    if metric not in reported:
        hint = ""
        if metric == "delta_mtl":
            hint = " (delta_mtl needs tasks.baseline, a table from `mtl baseline`)"
        elif metric == "mean_accuracy":
            hint = " (mean_accuracy needs at least one classification or binary task)"
        raise ValueError(
            f"tune.metric={metric!r}: no task reports it{hint}; choose one of {sorted(reported)}"
        )
    name = metric.rsplit("/", 1)[-1]
    return f"val/{metric}", "min" if name in LOWER_IS_BETTER else "max"


def interval_in_steps(interval: int, unit: str, steps_per_epoch: int) -> int:
    """``tune.perturbation_interval`` in optimizer steps (PBT's clock is the step)."""
    return interval * steps_per_epoch if unit == "epochs" else interval


def read_policy(path: str | Path) -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]]:
    """A PBT policy file (``pbt_policy_<trial>.txt``, local or ``s3://``) as (first config,
    [(iteration, config)]).

    Each line is Ray's JSON list ``[trial tag, donor tag, trial iteration, donor iteration,
    donor config, new config]``; like Ray's ``PopulationBasedTrainingReplay`` the chain is
    read from the end, and a line whose trial is not the next one's donor ends it.

    Raises:
        ValueError: The file is missing, not a policy file, or holds no perturbation.
    """
    from mtl import storage

    path = str(path) if storage.is_remote(str(path)) else str(Path(path).expanduser())
    storage.check_scheme(path, "the policy file")
    if not storage.is_file(path):
        raise ValueError(f"policy file {path!r} does not exist (look for pbt_policy_*.txt)")
    rows = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        try:
            row = json.loads(line)
            _, _, _, _, old, new = row
            weights_ok = isinstance(old.get("weights"), dict) and isinstance(
                new.get("weights"), dict
            )
        except (ValueError, TypeError, AttributeError):
            weights_ok = False
        if not weights_ok:
            raise ValueError(f"{path}:{number}: not a PBT policy line with weights")
        rows.append(row)
    if not rows:
        raise ValueError(f"policy file {path} holds no perturbation: nothing to replay")
    policy, next_donor, first = [], None, None
    for trial_tag, donor_tag, _, donor_iteration, old, new in reversed(rows):
        if next_donor is not None and trial_tag != next_donor:
            break
        next_donor, first = donor_tag, old
        policy.append((int(donor_iteration), new))
    return first, list(reversed(policy))


def replay_schedule(path: str | Path, interval_steps: int) -> list[tuple[int, dict[str, float]]]:
    """The weights a policy file replays, as ``[(first step, weights)]`` from step 0.

    Ray's ``PopulationBasedTrainingReplay`` semantics: trials report once per interval
    (iteration ``r`` ends at step ``r * interval_steps``); a logged change applies after the
    first report whose iteration reaches the one it names, at most one change per report.
    """
    first, changes = read_policy(path)
    schedule = [(0, dict(first["weights"]))]
    report = 1
    for change_at, config in changes:
        report = max(report, change_at)
        schedule.append((report * interval_steps, dict(config["weights"])))
        report += 1
    return schedule


def weights_at(config: Mapping[str, Any], step: int) -> dict[str, float]:
    """A trial's weights for the interval that starts at ``step``: ``config["weights"]``, or
    for a replay the last ``config["schedule"]`` entry starting at or before ``step``."""
    current = config["weights"]
    for start, weights in config.get("schedule") or ():
        if start <= step:
            current = weights
    return dict(current)


def trial_index(trial_id: str) -> int:
    """A Tune trial's index in its sweep (``"3f2a1_00002"`` -> 2); -1 for no trial."""
    return int(trial_id.rsplit("_", 1)[-1]) if trial_id else -1


def segment_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """What a trial logs to its MLflow run at the end of every interval: its fitness, the
    checkpoint it started from (trial index and step) and the weights it trained with."""
    fitness = report.get("fitness")
    metrics = {
        "tune/fitness": math.nan if fitness is None else float(fitness),
        "tune/from_trial": float(trial_index(report.get("resumed_from_trial") or "")),
        "tune/from_step": float(max(report.get("resumed_from_step", -1), 0)),
    }
    metrics.update({f"tune/{k}": float(v) for k, v in report.items() if k.startswith("weight/")})
    return metrics
