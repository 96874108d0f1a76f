"""``mtl tune``: PBT (or PB2) over the scalarization weights; every trial is a Ray Train job.

The only ``ray.tune`` user. Each Tune trial runs ``run_trial``, a light driver process (no
CPU, a little memory) that launches ``TorchTrainer`` jobs itself (Ray's Train V2 pattern, not
the deprecated ``Tuner(trainer)``), one per perturbation interval, and reports each one's
final metrics and checkpoint to Tune, so that PBT can copy checkpoints between trials:

    Tune controller (PBT) --config {"weights"}, checkpoint--> run_trial (one per trial)
      run_trial --initial_checkpoint, stop_at_step--> TorchTrainer workers (mtl.train.loop)
      TorchTrainer.fit() --metrics, checkpoint at the boundary--> run_trial
      run_trial --ray.tune.report(metrics + fitness, checkpoint)--> PBT: continue/exploit

After an exploit Tune restarts the receiving trial with the donor's checkpoint
(``ray.tune.get_checkpoint()``) and the mutated config: model and optimizer state come from
the checkpoint, the weights always from the config. Every trial of the population is live
from the start; ``TrainSlots`` lets ``tune.max_concurrent_trials`` of them train at a time,
each holding a lease that its process gives back by dying (``mtl.tune.resources``). A trial
whose workers report that a guard stopped training (``mtl.train.guards``) fails at once
(``TrainingStopped``): Tune marks it ERROR, so PBT never exploits from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl import log as mtl_log
from mtl import storage
from mtl.config import Config, from_dict, to_dict
from mtl.data import load_splits, make_loader
from mtl.losses import normalize_weights
from mtl.tracking import RunLogger, finish_run, start_child_run, start_run
from mtl.train.guards import TrainingStopped, check_result
from mtl.train.launch import FORWARDED_ENV, _trainer, _use_gpu, init_ray, pin_paths, preflight
from mtl.train.loop import active_taskset, total_steps
from mtl.tune.resources import TrainSlots, hold_lease, trials_at_once
from mtl.tune.space import (
    Explorer,
    Projector,
    WeightSpace,
    fitness,
    interval_in_steps,
    replay_schedule,
    reported_metrics,
    segment_metrics,
    weights_at,
)

log = logging.getLogger(__name__)

# A trial only drives its Train run. It reserves no CPU: with fractional CPUs (Ray's usual
# 0.01) two trials on a 2-CPU machine would leave 1.98 CPUs, room for one 1-CPU worker, not
# two. "memory" is a logical resource every node has, so the request is never empty.
TRIAL_RESOURCES = {"CPU": 0, "memory": 128 * 1024**2}
TRAIN_RUNS = "train_runs"  # inside the sweep's folder; Tune keeps its own checkpoint copies
SLOTS_ACTOR = "mtl-train-slots"  # the sweep's TrainSlots actor is named "<this>:<sweep name>"


@dataclass
class SweepPlan:
    """Everything checked and derived on the driver before any trial starts."""

    cfg: Config
    name: str
    space: WeightSpace
    population: list[dict[str, float]]  # initial weights, one per trial
    fitness_key: str  # e.g. "val/mean_accuracy"
    mode: str  # "max" | "min"
    interval_steps: int  # a trial reports (and may be perturbed) every this many steps
    burn_in_steps: int  # no perturbation before this step (a multiple of interval_steps)
    total_steps: int
    keep: int  # checkpoints per trial left after the sweep; 0 = all
    extras: dict[str, Any]  # from preflight: baseline, tracking_uri
    replay: str | None = None  # a PBT policy file to replay instead of searching
    schedule: list[tuple[int, dict[str, float]]] | None = None  # the replay: (step, weights)


def _steps_per_epoch(cfg: Config) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of every trial, as the workers count them."""
    train_set, _ = load_splits(cfg.data, active_taskset(cfg))
    t = cfg.train
    loader = make_loader(
        train_set, t.micro_batch_size, train=True, rank=0, world_size=t.num_workers, seed=t.seed
    )
    return len(loader) // t.grad_accum_steps, total_steps(cfg, len(loader))


def plan_sweep(cfg: Config, replay: str | None = None) -> SweepPlan:
    """Every input check of a sweep, before Ray starts; raises ``ValueError`` naming the key.

    Besides ``preflight`` (weights that fit the task set, data, tracking store): weight
    bounds the simplex can meet, a fitness metric some task reports, a perturbation interval
    shorter than the run, checkpoint retention, and a replay policy for this task set.
    """
    extras = preflight(cfg)
    taskset, tu = active_taskset(cfg), cfg.tune
    keys = taskset.loss_keys
    space = WeightSpace(
        keys, tu.weight_min, tu.weight_max, tu.perturb_sigma, tu.resample_probability
    )
    base = normalize_weights(cfg.tasks.weights, keys)
    if not space.contains(base):
        raise ValueError(
            f"tasks.weights {base} (normalised) lie outside [tune.weight_min, tune.weight_max]"
            f" = [{tu.weight_min}, {tu.weight_max}]: widen the bounds or change the weights"
        )
    key, mode = fitness(tu.metric, reported_metrics(taskset, bool(extras["baseline"])))
    per_epoch, total = _steps_per_epoch(cfg)
    interval = interval_in_steps(tu.perturbation_interval, tu.interval_unit, per_epoch)
    # Perturbations fall on report steps, so the burn-in is rounded up to whole intervals.
    burn_in = math.ceil(interval_in_steps(tu.burn_in, tu.interval_unit, per_epoch) / interval)
    burn_in *= interval
    if tu.scheduler == "grid" and replay is None:
        interval = total  # fixed weights: one Train run per trial, nothing to perturb
    elif max(interval, burn_in) >= total:
        raise ValueError(
            f"tune.perturbation_interval={tu.perturbation_interval} and tune.burn_in="
            f"{tu.burn_in} {tu.interval_unit} put the first perturbation at step "
            f"{max(interval, burn_in)}, not before the run's {total} steps end: no trial would "
            "ever be perturbed; shorten them or train longer"
        )
    keep = tu.keep_checkpoints
    schedule = None
    if replay is not None:
        schedule = replay_schedule(replay, interval)
        for _, weights in schedule:
            if set(weights) != set(keys):
                raise ValueError(
                    f"policy {replay} searches weights {sorted(weights)}, but this config "
                    f"trains {list(keys)}: replay it with the sweep's task set"
                )
    scheduler = "replay" if replay else tu.scheduler
    name = tu.name or f"{cfg.data.benchmark}-{scheduler}-{time.strftime('%Y%m%d-%H%M%S')}"
    if tu.scheduler == "grid":
        population = space.grid(base, tu.grid_factors)
    elif tu.initial == "spread":
        population = space.spread(base, tu.population, tu.spread_factor, random.Random(tu.seed))
    else:
        population = space.initial(base, tu.population, random.Random(tu.seed))
    return SweepPlan(
        cfg, name, space, population, key, mode, interval, burn_in, total, keep, extras, replay,
        schedule,
    )  # fmt: skip


def _with_weights(cfg: Config, weights: dict[str, float]) -> Config:
    keys = active_taskset(cfg).loss_keys
    tasks = dataclasses.replace(cfg.tasks, weights=normalize_weights(weights, keys))
    return dataclasses.replace(cfg, tasks=tasks)


def _stored_in(cfg: Config, where: str) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=where))


def _step_of(checkpoint: Any) -> int:
    """The optimizer step a checkpoint was saved at (0 without one)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        return int(json.loads((Path(directory) / "mtl_state.json").read_text())["progress"]["step"])


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: Ray Train jobs with this trial's weights, one per perturbation interval.

    Each segment's ``TorchTrainer`` ends cleanly at the next interval boundary before the
    result goes to Tune, because PBT pauses a trial by ending its process: a Train run still
    alive then would leave its workers' placement group behind.
    """
    import ray.tune

    # The driver's AWS_* (an s3:// storage path) and the like: this trial's actor, a process
    # of its own that ends with the trial, does not inherit the driver's environment.
    os.environ.update(setup["env"])
    mtl_log.configure_from_env()  # the driver's --quiet / --verbose (MTL_VERBOSITY)
    ctx = ray.tune.get_context()
    trial_id, uri = ctx.get_trial_id(), setup["extras"]["tracking_uri"]
    base = from_dict(setup["config"])
    run_id = start_child_run(uri, setup["parent_run_id"], base, trial_id, ctx.get_trial_name())
    try:
        _train_segments(config, setup, base, trial_id, run_id)
    except SystemExit:  # Tune paused or stopped the trial while it reported: no failure
        raise
    except TrainingStopped as err:
        finish_run(uri, run_id, ok=False, reason=f"training stopped: {err}")
        raise
    except BaseException as err:
        finish_run(uri, run_id, ok=False, reason=f"{type(err).__name__}: {err}")
        raise
    finish_run(uri, run_id, ok=True)


def _train_segments(
    config: dict[str, Any], setup: dict[str, Any], base: Config, trial_id: str, run_id: str
) -> None:
    import ray
    import ray.tune

    every, total, slots = setup["interval"], setup["total"], setup["slots"]
    tracker = RunLogger(setup["extras"]["tracking_uri"], run_id)
    # [1] State from Tune's checkpoint: this trial's own after a pause, its donor's after an
    # exploit, none at the start. The workers load it; the weights come from the config.
    checkpoint = ray.tune.get_checkpoint()
    step, previous = _step_of(checkpoint), None
    # This process's lease on a train slot: if the process dies (SIGKILL, OOM), Ray ends the
    # lease with it and the slot goes back to the other trials.
    lease = hold_lease()
    holder = {"trial_id": trial_id, "pid": os.getpid()}
    holder["node"] = ray.get_runtime_context().get_node_id()
    try:
        while step < total:
            # [2] Train to the next boundary with this trial's weights. A new Train run name
            # each time: Train V2 would resume a run of the same name from its own checkpoint.
            stop = min(total, (step // every + 1) * every)
            cfg = _with_weights(base, weights_at(config, step))
            shown = ", ".join(f"{k}={w:.3f}" for k, w in cfg.tasks.weights.items())
            log.info("trial %s: steps %d-%d, weights %s", trial_id, step, stop, shown)
            # The workers' storage is this Train run's (where a guard's stop record goes).
            cfg = _stored_in(cfg, setup["storage"])
            loop_config = {**setup["extras"], "config": to_dict(cfg), "mlflow_run_id": run_id}
            loop_config.update(trial_id=trial_id, initial_checkpoint=checkpoint)
            loop_config["stop_at_step"] = stop
            name = f"{trial_id}-{uuid.uuid4().hex[:8]}"
            trainer = _trainer(cfg, loop_config, name, setup["storage"], env=setup["env"])
            if not ray.get(slots.acquire.remote(name, lease, holder)):
                raise RuntimeError(f"trial {trial_id}: its train slot lease died while it waited")
            try:
                result = trainer.fit()
            finally:
                ray.get(slots.release.remote(name))
            if previous is not None:  # the last segment's Train run; Tune holds its copy
                _delete_quietly(previous)
            previous = storage.join(setup["storage"], name)

            # [3] Report with the checkpoint (Tune copies it); PBT may pause or exploit here.
            # A guard-stopped segment raises instead: the trial fails before Tune sees it.
            metrics = segment_report(result, setup["fitness_key"])
            tracker.log_metrics(segment_metrics(metrics), int(metrics["step"]))
            saved = result.checkpoint
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint(saved.path, saved.filesystem))
            checkpoint, step = saved, int(metrics["step"])
    finally:
        ray.kill(lease)


def segment_report(result: Any, fitness_key: str) -> dict[str, Any]:
    """What a trial reports to Tune after a segment: the workers' last metrics and its fitness.

    Args:
        result: The segment's ``Result`` (its folder holds a guard's stop record, which is
            how Ray Train V2 tells of a stop) or, as under Ray Train V1, its metrics.

    Raises:
        TrainingStopped: A guard stopped the workers: the trial fails here, before Tune or
            PBT sees the diverged result, so it is never ranked again nor a donor.
    """
    check_result(result)
    metrics = dict((result if isinstance(result, Mapping) else result.metrics) or {})
    return {**metrics, "fitness": metrics.get(fitness_key)}


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _recovering(scheduler_cls: type) -> type:
    """``scheduler_cls`` (PBT or PB2) whose synchronous mode survives a failed trial.

    Synchronous PBT perturbs once every live trial has reached the perturbation point and
    keeps the others paused until then. Ray's controller keeps a trial that failed (a killed
    process, a guard's stop) among its live trials, so the others would wait for it forever:
    here a finished trial is never live (``_LiveTrials``). And when the failed trial was the
    last one the others waited for, they move on at once (that round is not perturbed).
    """

    class Recovering(scheduler_cls):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            return super().on_trial_result(_LiveTrials(tune_controller), trial, result)

        def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
            super().on_trial_error(_LiveTrials(tune_controller), trial)
            live = [t for t in _LiveTrials(tune_controller).get_live_trials() if t is not trial]
            times = [self._trial_state[t].last_train_time for t in live if t in self._trial_state]
            if self._synch and times and min(times) >= self._next_perturbation_sync:
                self._next_perturbation_sync = max(times) + self._perturbation_interval

    Recovering.__name__ = Recovering.__qualname__ = scheduler_cls.__name__
    return Recovering


class _LiveTrials:
    """A Tune controller whose live trials leave out the finished (ERROR, TERMINATED) ones;
    everything else is the controller's own."""

    def __init__(self, controller: Any) -> None:
        self._controller = controller

    def get_live_trials(self) -> list[Any]:
        return [t for t in self._controller.get_live_trials() if not t.is_finished()]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._controller, name)


def _scheduler(plan: SweepPlan) -> Any:
    tu = plan.cfg.tune
    common = dict(
        time_attr="step",
        metric="fitness",
        mode=plan.mode,
        perturbation_interval=plan.interval_steps,
        quantile_fraction=tu.quantile_fraction,
        log_config=True,  # the pbt_policy_*.txt files: schedules that can be replayed
        synch=tu.synch,
    )
    if tu.scheduler == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        # PB2 proposes the stick fractions (config["sticks"]); Projector maps them to weights.
        bounds = {"sticks": plan.space.pb2_bounds()}
        projector = Projector(plan.space)
        return _recovering(PB2)(hyperparam_bounds=bounds, custom_explore_fn=projector, **common)
    from ray.tune.schedulers import PopulationBasedTraining

    # No hyperparam_mutations: Ray's own explore scales each value independently and would
    # leave the simplex. Explorer perturbs in log space and projects back.
    explorer = Explorer(plan.space, plan.cfg.tune.seed)
    pbt = _recovering(PopulationBasedTraining)
    return pbt(
        hyperparam_mutations={},
        custom_explore_fn=explorer,
        burn_in_period=plan.burn_in_steps,  # PB2 has none (the config refuses one)
        **common,
    )


def _tuner(plan: SweepPlan, setup: dict[str, Any], at_once: int) -> Any:
    from ray import tune

    cfg = plan.cfg
    where, filesystem = storage.ray_storage(cfg.train.storage_path)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), TRIAL_RESOURCES)
    if plan.schedule:
        # One trial that switches weights between its segments itself (no Tune restarts).
        scheduler, space = None, {"weights": plan.schedule[0][1], "schedule": plan.schedule}
    else:
        scheduler = None if cfg.tune.scheduler == "grid" else _scheduler(plan)
        space = {"weights": tune.grid_search(plan.population)}
        if plan.cfg.tune.scheduler == "pb2":  # PB2 searches the weights' stick fractions
            to_sticks = plan.space.to_sticks
            space["sticks"] = tune.sample_from(lambda spec: to_sticks(spec.config["weights"]))
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            num_samples=1,  # the grid over the initial weights is the population
            # PBT needs its whole population live (TrainSlots queues them); fixed weights do
            # not, and each waiting trial process would hold ~0.8 GB for nothing.
            max_concurrent_trials=at_once if scheduler is None else None,
            reuse_actors=False,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            # s3://... as bucket/prefix on a filesystem that carries the endpoint and keys.
            storage_path=where,
            storage_filesystem=filesystem,
            # Every checkpoint stays until the sweep ends. Ray's PBT registers a top trial's
            # checkpoint a second time when it saves it for exploiting, so a count-based
            # num_to_keep deletes checkpoints about twice as early as it says, and a
            # receiver still waiting for a train slot could find its donor's one gone.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            # The last report ends the trial before PBT sees it: an exploit there would hand
            # the trial another trial's checkpoint that it never trains.
            stop={"step": plan.total_steps},
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune's trial status tables only with --verbose: the trials' own [mtl] lines say
            # where each one is, and errors are raised either way.
            verbose=None if mtl_log.verbosity() == mtl_log.VERBOSE else 0,
        ),
    )


def tune_weights(cfg: Config, *, replay: str | None = None) -> Any:
    """Run the sweep of ``cfg.tune`` (or replay a policy file); returns a ``SweepResult``.

    Raises:
        ValueError: Bad input, found before any trial starts (see ``plan_sweep``).
        RuntimeError: No trial finished.
    """
    from mtl.tune.report import summarize

    plan = plan_sweep(pin_paths(cfg), replay)
    cfg, uri = plan.cfg, plan.extras["tracking_uri"]
    init_ray()
    import ray

    use_gpu = _use_gpu(cfg)
    at_once = trials_at_once(cfg, use_gpu)
    for line in _describe(plan, at_once).splitlines():
        if line.startswith("warning: "):
            log.warning("%s", line.removeprefix("warning: "))
        else:
            log.info("%s", line)
    named = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or plan.name)
    parent = start_run(dataclasses.replace(cfg, tracking=named), uri)
    RunLogger(uri, parent).set_tags({"mtl.sweep": plan.name, "mtl.replay": str(replay or "")})
    setup = {
        "config": to_dict(cfg),
        "extras": {**plan.extras, "use_gpu": use_gpu},
        "parent_run_id": parent,
        "fitness_key": plan.fitness_key,
        "interval": plan.interval_steps,
        "total": plan.total_steps,
        "storage": storage.join(cfg.train.storage_path, plan.name, TRAIN_RUNS),
        "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
        "slots": ray.remote(num_cpus=0)(TrainSlots)
        .options(name=f"{SLOTS_ACTOR}:{plan.name}")
        .remote(at_once),
    }
    try:
        grid = _tuner(plan, setup, at_once).fit()
        result = summarize(plan, grid, parent)
    except BaseException:
        finish_run(uri, parent, ok=False)
        raise
    finally:
        ray.kill(setup["slots"])
    finish_run(uri, parent, ok=True)
    # Every reported checkpoint now has a copy in its Tune trial folder.
    _delete_quietly(setup["storage"])
    storage.prune_checkpoints(storage.join(cfg.train.storage_path, plan.name), plan.keep)
    return result


def _delete_quietly(folder: str) -> None:
    """Delete a finished Train run's folder (local or in S3); a failure is only reported."""
    try:
        storage.delete_dir(folder)
    except OSError as err:
        log.warning("could not delete %s (%s)", folder, err)


def _describe(plan: SweepPlan, at_once: int) -> str:
    tu = plan.cfg.tune
    what = (
        "domain sampling probabilities"
        if plan.cfg.tasks.weighting == "sampling"
        else "loss weights"
    )
    if plan.replay:
        return f"sweep {plan.name}: replaying {plan.replay} over the {what}"
    if tu.scheduler == "grid":
        return (
            f"sweep {plan.name}: a grid of {len(plan.population)} fixed {what} "
            f"{list(plan.space.keys)} ({at_once} at once), fitness {plan.fitness_key} "
            f"({plan.mode}), {plan.total_steps} steps each"
        )
    mode = "synchronous" if tu.synch else "asynchronous"
    line = (
        f"sweep {plan.name}: {mode} {tu.scheduler.upper()} over the {what} "
        f"{list(plan.space.keys)} in [{tu.weight_min}, {tu.weight_max}], population "
        f"{tu.population} ({tu.initial} start, {at_once} at once), fitness "
        f"{plan.fitness_key} ({plan.mode}), perturbation every {plan.interval_steps} steps"
        f"{f' from step {plan.burn_in_steps}' if plan.burn_in_steps else ''}, "
        f"every checkpoint kept until the end, then {plan.keep or 'all'} per trial"
    )
    if not tu.synch and tu.population > at_once:
        line += (
            f"\nwarning: asynchronous {tu.scheduler.upper()} with {tu.population} trials "
            f"but {at_once} training at once ranks trials at different steps: those that "
            "train first are never in the bottom quantile; set tune.synch=true"
        )
    return line
