"""The Ray Train worker loop: the only module that calls ``ray.train`` inside workers.

Each worker rebuilds the typed config from a plain dict, reads its data shard, builds one
DeepSpeed engine, restores the latest checkpoint if Ray hands one over, and trains. Every
``checkpoint_every_steps`` every rank saves its DeepSpeed shard into a local directory and
reports it; Ray merges the ranks' directories into one checkpoint in the run's storage.
After every optimizer step the guards (``mtl.train.guards``) check the losses and gradient
norm; a non-finite value or a divergence stops every rank at that step without a checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtl import log as mtl_log
from mtl.config import Config, from_dict, to_dict
from mtl.data import benchmark_taskset, load_splits, make_loader
from mtl.losses import normalize_weights, task_losses
from mtl.methods import build_combiner
from mtl.metrics import MetricAccumulator, delta_mtl
from mtl.models import build_model
from mtl.tasks import TaskSet
from mtl.train.guards import (
    STOPPED_KEY,
    Guard,
    StepMonitor,
    clear_stop,
    nonfinite_anywhere,
    weights_reason,
    write_stop,
)
from mtl.train.single_gate import (
    BASE,
    EXPERTS,
    StagePlan,
    expert_model,
    local_features,
    plan_for,
    shared_centroids,
)
from mtl.train.step import (
    auxiliary_total,
    cast_outputs,
    evaluate,
    forward_losses,
    gradient_norm,
    sampling_total,
    to_device,
)
from mtl.train.window import StatsWindow, peak_rss_mb

SHOWN_LOSSES = 6  # per-task losses (and metrics) on a log line; MLflow has every one

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    stage: str = ""  # model.name=single_gate: "base" or "experts" (mtl.train.single_gate)
    stage_start: int = 0  # the step the current stage began at (its engine counts from there)


def total_steps(cfg: Config, micro_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, else whole epochs."""
    t = cfg.train
    return t.max_steps if t.max_steps > 0 else t.epochs * (micro_per_epoch // t.grad_accum_steps)


def active_taskset(cfg: Config) -> TaskSet:
    """The benchmark's task set, restricted to ``tasks.names`` when given."""
    full = benchmark_taskset(cfg.data)
    return full.subset(cfg.tasks.names) if cfg.tasks.names else full


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (see ``mtl.train.launch.fit``)."""
    import ray.train

    # [0] The typed config back from its plain-dict form, and this worker's place.
    started = time.perf_counter()
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mtl_log.configure_from_env(rank=rank)  # the driver's --quiet / --verbose (MTL_VERBOSITY)
    torch.set_num_threads(cfg.train.threads_per_worker)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    use_gpu = bool(loop_config.get("use_gpu")) and torch.cuda.is_available()
    if use_gpu:  # DeepSpeed places the engine on the current device; Ray picked ours
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())

    # [1] Data: this rank's shard of the training split, and of the validation split.
    taskset = active_taskset(cfg)
    weights = normalize_weights(cfg.tasks.weights, taskset.loss_keys)
    train_loader, val_loader = _loaders(cfg, taskset, weights, rank, world)

    # [2] Model and DeepSpeed engine (imported here: DS_ACCELERATOR must be set first).
    from mtl.train.engine import build_engine

    total = total_steps(cfg, len(train_loader))
    plan = plan_for(cfg, total)  # the single-gated MoE trains in stages, else None
    model = _build_model(cfg, taskset, use_gpu)
    if cfg.model.name == "interrogate" and cfg.model.interrogate.init_from:
        from mtl.train.warm_start import load_single_task, single_task_checkpoints

        load_single_task(model, single_task_checkpoints(cfg, taskset))
    # DeepSpeed prints "DeepSpeed ... deepspeed_shm_comm_op built successfully" on every
    # worker while the engine is built: routine, so DEBUG unless --verbose.
    with mtl_log.prints_to_debug(log, "DeepSpeed"):
        engine = build_engine(model, cfg, use_gpu, plan.base_steps if plan else total)
    # The weighting method (tasks.method) reads the engine's module: its heads and shared
    # parameters for the gradient methods. Its state is part of every checkpoint.
    combiner = build_combiner(cfg.tasks, taskset, weights, engine.module, cfg.train.seed)
    job = _Job(cfg, loop_config, taskset, weights, engine, rank, world, total, combiner)
    job.started = started
    job.plan = plan
    if plan:
        job.progress.stage = BASE

    # [3] Restore: Ray hands over the run's latest checkpoint after a failure or on --resume;
    # else the driver's ``initial_checkpoint`` (a Tune trial's own after a pause, or its
    # donor's after a PBT exploit). Only model and optimizer state come from a checkpoint:
    # the weights above came from this run's config.
    checkpoint = ray.train.get_checkpoint() or loop_config.get("initial_checkpoint")
    if not loop_config.get("trial_id"):  # a Tune trial's checkpoints are the driver's choice
        checkpoint = _newest_complete(job, checkpoint)
    if checkpoint is not None:
        from mtl.train.engine import load_shard, read_state

        with checkpoint.as_directory() as directory:
            saved = read_state(Path(directory))["progress"]
            if plan and saved.get("stage") == EXPERTS:  # stage 3's experts and optimizer
                job.to_expert_engine(saved["stage_start"])
            state = load_shard(job.engine, Path(directory), world)
        job.progress = Progress(**state["progress"])
        job.resumed_from = job.progress.step
        job.resumed_from_trial = state.get("trial_id", "")
        job.guard.load_state_dict(state.get("guard") or {})  # the early level carries over
        # The method's state (UW's log-variances, FAMO's logits, DWA's history) too, also
        # after a PBT exploit (the donor's); another method's state is not loaded.
        method_state = state.get("method")
        if method_state and not combiner.load_state_dict(method_state) and rank == 0:
            log.warning(
                "the checkpoint's %s state does not apply to tasks.method=%s: the method "
                "starts afresh",
                method_state.get("name"),
                cfg.tasks.method,
            )
        if rank == 0:
            log.info("resumed from step %d (epoch %d)", job.progress.step, job.progress.epoch)
        # A checkpoint written before the guards existed may hold NaN weights: never train on.
        if not job.weights_finite("in the checkpoint it resumed from"):
            return

    # [4] Train; validate, checkpoint and report on schedule.
    job.run(train_loader, val_loader)


def _newest_complete(job: _Job, given: Any) -> Any:
    """The run folder's newest checkpoint that verifies complete, if it is newer than
    ``given`` (the one Ray hands over after a failure, or the driver's on ``--resume``, or
    None); else ``given``.

    Ray Train's controller registers a checkpoint when it next polls the workers (every 2 s),
    so one that every rank had finished uploading just before a node was lost can be in the
    storage unregistered: resuming from Ray's (or from nothing, when it was the first) would
    lose a whole checkpoint interval more.
    Rank 0 chooses (downloading and verifying every byte, as a resume does) and every rank
    loads the same one; a half-written newer folder is passed over, never loaded.
    """
    from ray.train import Checkpoint

    from mtl import storage

    chosen = [None]
    if job.rank == 0:
        from mtl.train.engine import CheckpointError
        from mtl.train.launch import verified_state

        step = _step_of_dir(storage.name(given.path)) if given is not None else -1
        for path in reversed(storage.checkpoints(job.run_path())):
            if _step_of_dir(storage.name(path)) <= step:
                break
            try:
                verified_state(path)
            except (CheckpointError, OSError) as err:
                log.warning("passing over %s: %s", path, err)
                continue
            log.info(
                "%s is complete in storage but was not yet registered with Ray (it hands over "
                "%s): resuming from it",
                path,
                storage.name(given.path) if given else "none",
            )
            chosen = [path]
            break
    if job.world > 1 and dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return given
    return Checkpoint(*storage.ray_storage(chosen[0]))


def _step_of_dir(name: str) -> int:
    digits = name.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def _build_model(cfg: Config, taskset: TaskSet, use_gpu: bool) -> torch.nn.Module:
    """``mtl.models.MODELS``' model, or the token-routed expert-parallel ViT (DeepSpeed MoE
    layers: DeepSpeed's communication must be up first, the experts depend on the rank)."""
    from mtl.train.expert_parallel import is_token_moe, token_moe_vit

    if not is_token_moe(cfg.model):
        return build_model(cfg.model, taskset)
    from mtl.train.engine import init_distributed

    init_distributed(use_gpu)
    return token_moe_vit(cfg.model, taskset, seed=cfg.train.seed)


def _loaders(
    cfg: Config, taskset: TaskSet, weights: dict[str, float], rank: int, world: int
) -> tuple[Any, Any]:
    """This rank's training and validation loaders."""
    train_set, val_set = load_splits(cfg.data, taskset)
    # With ``weighting: sampling`` the weights act as domain sampling probabilities.
    sampling = weights if cfg.tasks.weighting == "sampling" else None
    mb, seed = cfg.train.micro_batch_size, cfg.train.seed
    workers = cfg.data.loader_workers
    train = make_loader(
        train_set,
        mb,
        train=True,
        rank=rank,
        world_size=world,
        seed=seed,
        domain_weights=sampling,
        num_workers=workers,
    )
    val = make_loader(val_set, mb, train=False, rank=rank, world_size=world, num_workers=workers)
    return train, val


class _Job:
    """The state of one worker's training run (engine, progress, logging)."""

    def __init__(
        self,
        cfg: Config,
        loop_config: dict[str, Any],
        taskset: TaskSet,
        weights: dict[str, float],
        engine: Any,
        rank: int,
        world: int,
        total: int,
        combiner: Any,
    ) -> None:
        from mtl.train.engine import PRECISION_DTYPES

        self.cfg, self.taskset, self.weights, self.engine = cfg, taskset, weights, engine
        self.combiner = combiner
        self.rank, self.world, self.total = rank, world, total
        self.loop_config = loop_config
        self.device = engine.device
        self.dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        self.progress = Progress()
        self.resumed_from = -1
        self.resumed_from_trial = ""  # Tune trial that wrote the restored checkpoint
        # A Tune trial trains in segments: stop (validate, checkpoint, report) at this step.
        self.stop = min(total, int(loop_config.get("stop_at_step") or total))
        self.val_metrics: dict[str, float] = {}
        self.started = time.perf_counter()  # when the worker began (set by train_worker)
        self.first_step_s = -1.0  # seconds from the worker's start to its first step
        self.logger = None
        if rank == 0 and loop_config.get("mlflow_run_id"):
            from mtl.tracking import RunLogger

            self.logger = RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
        # Guards: each step's losses (summed over its micro-batches, on device) and gradient
        # norm reach the host once per step; a tripped guard stops every rank at that step.
        t, ds = cfg.train, cfg.deepspeed
        self.guard = Guard(t.divergence_factor, t.divergence_window, ds.precision == "fp16")
        # Plain fp32 without ZeRO steps torch's optimizer, which computes no gradient norm.
        own_norm = ds.zero_stage == 0 and ds.precision == "fp32"
        self.monitor = StepMonitor(self.guard, world, own_norm)
        self.stopped = ""  # the reason a guard stopped training ("" = it did not)
        self.eta = mtl_log.Eta(self.stop)  # time left to this run's (or segment's) last step
        self.plan: StagePlan | None = None  # model.name=single_gate: its stages
        self.offset = 0  # optimizer steps taken before this engine (stage 3: the base's)

    def run(self, train_loader, val_loader) -> None:
        total = self.total
        if total < 1:
            raise ValueError("the training split is smaller than one optimizer step per worker")
        if self.rank == 0:
            self._print_plan(len(train_loader), total)
            clear_stop(self.run_path())  # an earlier attempt's stop does not count for this one
        window = StatsWindow(self.device)
        self.eta.begin(self.progress.step, time.perf_counter())
        self.monitor.skipped_steps = self.engine.skipped_steps
        while self.progress.step < self.stop and not self.stopped:
            # A resume mid-epoch skips the batches already consumed without loading them.
            _set_epoch(train_loader, self.progress.epoch, self.progress.micro_in_epoch)
            for batch in window.timed(train_loader):
                if self._base_done():
                    self._enter_experts(train_loader)
                self._train_micro(batch, window)
                if self._at_step_boundary() and self._guards_pass():
                    self._on_step(window, val_loader, total)
                if self.progress.step >= self.stop or self.stopped:
                    break
            else:
                self.progress.epoch += 1
                self.progress.micro_in_epoch = 0
        if self.logger:
            self.logger.flush()

    def _train_micro(self, batch, window: StatsWindow) -> None:
        set_progress = getattr(self.engine.module, "set_progress", None)
        if set_progress is not None:  # e.g. InterroGate anneals its gate temperature
            set_progress(self.progress.step / self.total)
        batch = to_device(batch, self.device, self.dtype)
        losses = forward_losses(self.engine, batch, self.taskset)
        task = {k: losses[k] for k in self.taskset.loss_keys}
        if self.cfg.tasks.weighting == "sampling":  # ew only (config_checks)
            loss = objective = sampling_total(task, batch, self.taskset)
        else:  # `loss` is what the method back-propagates; `objective` is Σ_k p_k L_k
            p = self.progress
            loss, objective = self.combiner.combine(task, p.step, p.epoch, self._loss_fn(batch))
        aux = auxiliary_total(losses)
        loss, objective = loss + aux, objective + aux
        self.engine.backward(loss)
        if self.monitor.own_norm and self.engine.is_gradient_accumulation_boundary():
            self.monitor.record_norm(gradient_norm(self.engine.module))  # step() clears grads
        self.engine.step()
        if self.engine.global_steps != self.progress.step:  # an optimizer step was taken
            self.combiner.end_step(self.engine.get_lr()[0], lambda: self._losses_of(batch))
        self.progress.micro_in_epoch += 1
        # Logs and guards read the objective, comparable across methods and steps.
        window.add(
            objective.detach(),
            {k: v.detach() for k, v in losses.items()},
            batch["image"].shape[0],
        )
        self.monitor.add(objective, losses)

    def _loss_fn(self, batch):
        """Head outputs -> this batch's per-key losses (gradient methods recompute with it)."""
        return lambda outputs: task_losses(cast_outputs(outputs), batch, self.taskset)

    def _losses_of(self, batch) -> dict[str, torch.Tensor]:
        """The batch's per-key losses under the current weights (FAMO's same-batch update)."""
        outputs = cast_outputs(self.engine(batch["image"], batch.get("domain")))
        return task_losses(outputs, batch, self.taskset)

    def _at_step_boundary(self) -> bool:
        if self.engine.global_steps + self.offset == self.progress.step:
            return False
        self.progress.step = self.engine.global_steps + self.offset
        return True

    def _base_done(self) -> bool:
        """A single-gate run has trained its base's share of the steps, still in stage 1."""
        plan = self.plan
        return bool(plan) and self.progress.stage == BASE and self.progress.step >= plan.base_steps

    def _enter_experts(self, train_loader) -> None:
        """Stages 2 and 3 of a single-gate run: cluster, copy the base, new engine."""
        from mtl.models.single_gate import SingleGateMoE

        module: SingleGateMoE = self.engine.module
        sg = self.cfg.model.single_gate
        samples = -(-sg.cluster_samples // self.world)  # this rank's share, rounded up

        def to_dev(batch):
            return to_device(batch, self.device, self.dtype)

        features = local_features(module, train_loader, samples, to_dev)
        centroids = shared_centroids(features, sg.num_experts, self.cfg.train.seed, self.rank,
                                     self.world)  # fmt: skip
        module.init_from_base(centroids.to(self.device, module.centroids.dtype))
        self.to_expert_engine(self.progress.step)
        if self.rank == 0:
            log.info(
                "stage 3 from step %d: %d experts and the gate train for %d steps (base %s)",
                self.progress.step, sg.num_experts, self.total - self.progress.step,
                "frozen" if sg.freeze_base else "training",
            )  # fmt: skip

    def to_expert_engine(self, start: int) -> None:
        """Stage 3's engine over a copy of the current module, its own optimizer and a
        schedule over the steps from ``start`` (where stage 3 began) to the end."""
        from mtl.train.engine import build_engine

        model = expert_model(self.cfg, self.taskset, self.engine.module)
        use_gpu = self.device.type == "cuda"
        self.engine = None  # the old engine (and its optimizer state) can go
        with mtl_log.prints_to_debug(log, "DeepSpeed"):
            self.engine = build_engine(model, self.cfg, use_gpu, self.total - start)
        self.offset = self.progress.stage_start = start
        self.progress.stage = EXPERTS
        self.monitor.skipped_steps = self.engine.skipped_steps

    def _guards_pass(self) -> bool:
        """Check the step just taken; on a non-finite value or divergence, stop (all ranks)."""
        e = self.engine
        reason = self.monitor.end_step(
            self.progress.step, e.get_global_grad_norm(), e.skipped_steps
        )
        if reason:
            self._stop(reason)
        return not reason

    def weights_finite(self, when: str) -> bool:
        """True when every rank's weights are finite; else stop (all ranks) and say where."""
        bad = nonfinite_anywhere(self.engine.module, self.world)
        if bad:
            self._stop(weights_reason(self.progress.step, bad, when))
        return not bad

    def _stop(self, reason: str) -> None:
        """End training here without a checkpoint: rank 0 records why, every rank reports it
        (a report is a barrier in Ray Train) and returns; the driver fails the run."""
        import ray.train

        self.stopped = reason
        step = self.progress.step
        record = {
            STOPPED_KEY: reason,
            "step": step,
            "epoch": self.progress.epoch,
            "trial_id": self.loop_config.get("trial_id", ""),
        }
        if self.rank == 0:
            log.error("training stopped, no checkpoint written: %s", reason)
            if self.logger:
                self.logger.log_metrics({"guard/stopped_at_step": float(step)}, step)
                self.logger.set_tags({"mtl.guard": reason[:5000]})
            run_id = self.loop_config.get("mlflow_run_id")
            write_stop(self.run_path(), {**record, "mlflow_run_id": run_id})
        ray.train.report(record)  # no checkpoint: nothing of this state is ever saved

    def run_path(self) -> str:
        """The Ray run's folder (``Result.path`` on the driver)."""
        import ray.train

        name = ray.train.get_context().get_experiment_name()
        return f"{self.cfg.train.storage_path.rstrip('/')}/{name}"

    def _on_step(self, window: StatsWindow, val_loader, total: int) -> None:
        t, step = self.cfg.train, self.progress.step
        if self.first_step_s < 0:
            self.first_step_s = time.perf_counter() - self.started
        last = step >= self.stop
        # The base's last step always validates and checkpoints: stage 3 starts from it.
        last = last or bool(
            self.plan and self.progress.stage == BASE and step == self.plan.base_steps
        )
        if step % t.log_every_steps == 0 or last:
            self._log_train(window, step, total)
        if step % t.val_every_steps == 0 or last:
            self.val_metrics = self._validate(val_loader)
        if step % t.checkpoint_every_steps == 0 or last:
            if not self.weights_finite("before the checkpoint"):
                return  # stopped: non-finite weights are never saved
            self._checkpoint_and_report()
        _maybe_inject_failure(step, self.loop_config.get("trial_id", ""))

    def _log_train(self, window: StatsWindow, step: int, total: int) -> None:
        stats = window.flush(self.world)  # host sync happens here, only when logging
        if self.rank != 0:
            return
        keys = self.taskset.loss_keys
        losses = " ".join(f"{k}={stats[f'train/loss/{k}']:.4f}" for k in keys[:SHOWN_LOSSES])
        if len(keys) > SHOWN_LOSSES:  # e.g. CelebA's 40 attributes: the rest are in MLflow
            losses += f" +{len(keys) - SHOWN_LOSSES} more"
        left = self.eta.tick(step, time.perf_counter())
        log.info(progress_line(step, total, self.progress.epoch, stats, losses, left))
        stats.update({f"weight/{k}": w for k, w in self.weights.items()})
        # The method's effective weight per key, averaged over the steps since the last log.
        means = self.combiner.mean_weights()
        stats.update({f"method/weight/{k}": w for k, w in means.items()})
        stats.update(self._system_stats())
        module = self.engine.module
        if hasattr(module, "task_rates"):  # InterroGate: task-specific compute per task ...
            stats.update({f"rate/{k}": float(v) for k, v in module.task_rates().items()})
        if hasattr(module, "gate_pattern"):  # ... and per layer (fraction of closed gates)
            for task, layers in module.gate_pattern().items():
                stats.update({f"gates/{task}/layer{i}": v for i, v in enumerate(layers)})
        if hasattr(module, "expert_usage"):  # task-expert MoE: routing mass per expert
            for key, layers in module.expert_usage().items():
                for i, usage in enumerate(layers):
                    stats.update({f"experts/{key}/layer{i}/e{e}": p for e, p in enumerate(usage)})
        if self.logger:
            self.logger.log_metrics(stats, step)

    def _validate(self, val_loader) -> dict[str, float]:
        acc = evaluate(
            self.engine.module,
            val_loader,
            self.taskset,
            self.device,
            self.dtype,
            self.cfg.train.val_batches,
        )
        totals = acc.totals().to(self.device)
        if self.world > 1:
            dist.all_reduce(totals)
        metrics = {
            f"val/{k}": v for k, v in MetricAccumulator(self.taskset).compute(totals.cpu()).items()
        }
        baseline = self.loop_config.get("baseline")
        if baseline:
            plain = {k.removeprefix("val/"): v for k, v in metrics.items()}
            metrics["val/delta_mtl"] = delta_mtl(plain, baseline, self.taskset)
        if self.rank == 0:
            log.info("validation @ step %d: %s", self.progress.step, self._shown(metrics))
            log.debug("validation @ step %d, every metric: %s", self.progress.step, metrics)
            if self.logger:
                self.logger.log_metrics(metrics, self.progress.step)
        return metrics

    def _shown(self, metrics: dict[str, float]) -> str:
        """Δ_MTL (with a baseline) and each task's primary metric: one short line."""
        keys = self.taskset.loss_keys
        names = ["delta_mtl"] if "val/delta_mtl" in metrics else []
        names += [self.taskset.primary(k)[0] for k in keys[:SHOWN_LOSSES]]
        shown = " ".join(f"{n}={metrics[f'val/{n}']:.4f}" for n in names if f"val/{n}" in metrics)
        if len(keys) > SHOWN_LOSSES:
            shown += f" +{len(keys) - SHOWN_LOSSES} more"
        return shown

    def _checkpoint_and_report(self) -> None:
        import ray.train

        from mtl.train.engine import save_shard

        state = {
            "progress": vars(self.progress).copy(),
            "world_size": self.world,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "config": to_dict(self.cfg),
            "mlflow_run_id": self.loop_config.get("mlflow_run_id"),
            "trial_id": self.loop_config.get("trial_id", ""),
            "guard": self.guard.state_dict(),
            "method": self.combiner.state_dict(),
        }
        metrics = {**self.val_metrics, "step": self.progress.step, "epoch": self.progress.epoch}
        metrics["resumed_from_step"] = self.resumed_from
        metrics["resumed_from_trial"] = self.resumed_from_trial
        metrics.update(self._system_stats())
        metrics.update({f"weight/{k}": w for k, w in self.weights.items()})  # PBT changes them
        with tempfile.TemporaryDirectory(prefix=f"mtl-ckpt-r{self.rank}-") as tmp:
            save_shard(self.engine, Path(tmp), f"step{self.progress.step}", state)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{self.progress.step:08d}",
            )
        if self.rank == 0:
            step = self.progress.step
            log.info("checkpoint @ step %d saved: checkpoint_%08d", step, step)

    def _system_stats(self) -> dict[str, float]:
        """Peak memory of this worker process and how long it took to the first step."""
        return {"sys/peak_rss_mb": peak_rss_mb(), "sys/first_step_s": self.first_step_s}

    def _print_plan(self, micro_per_epoch: int, total: int) -> None:
        t = self.cfg.train
        global_batch = t.micro_batch_size * t.grad_accum_steps * self.world
        log.info(
            "%d workers x micro-batch %d x accumulation %d = %d samples per step; %d "
            "micro-batches per epoch per worker; %d steps; ZeRO stage %d, %s, device %s",
            self.world,
            t.micro_batch_size,
            t.grad_accum_steps,
            global_batch,
            micro_per_epoch,
            total,
            self.cfg.deepspeed.zero_stage,
            self.cfg.deepspeed.precision,
            self.device,
        )
        m = self.cfg.model.moe
        if self.cfg.model.name == "moe" and m.routing == "token":
            log.info(
                "token-routed MoE: %d experts per layer, top-%d, expert-parallel groups of %d "
                "workers -> %d experts per worker, %d copies of each expert",
                m.num_experts,
                m.top_k,
                m.ep_size,
                m.num_experts // m.ep_size,
                self.world // m.ep_size,
            )


def progress_line(
    step: int, total: int, epoch: int, stats: dict[str, float], losses: str, left_s: float
) -> str:
    """One training progress line: where, the loss, throughput, data-wait share, time left."""
    return (
        f"step {step}/{total} ({100 * step / max(total, 1):.0f}%) epoch {epoch} "
        f"loss={stats['train/loss']:.4f} ({losses}) | "
        f"{stats['train/samples_per_s']:.0f} samples/s | "
        f"data wait {100 * stats['train/data_wait_fraction']:.1f}% | "
        f"ETA {mtl_log.duration(left_s)}"
    )


def _set_epoch(loader, epoch: int, skip: int = 0) -> None:
    """Reshuffle for ``epoch`` (sampler and augmentation); start after ``skip`` batches."""
    loader.batch_sampler.set_epoch(epoch, skip)
    loader.dataset.set_epoch(epoch)  # a streamed split reseeds its augmentation


def _maybe_inject_failure(step: int, trial_id: str = "") -> None:
    """Test hook: crash this worker once at a step, as a lost machine would.

    ``MTL_FAIL_AT_STEP=N`` with ``MTL_FAIL_MARKER=path``: the first worker to finish step N
    creates the marker and dies; Ray then restarts the group from the
    latest checkpoint. With ``MTL_FAIL_TRIAL=suffix`` only a worker of the Tune trial whose
    id ends with it may die (e.g. ``_00001``). The hooks are read only when the test-only
    switch ``MTL_TEST_FAULTS=1`` is set too, so a stray variable cannot kill a real run.
    """
    if os.environ.get("MTL_TEST_FAULTS") != "1":
        return
    at, marker = os.environ.get("MTL_FAIL_AT_STEP"), os.environ.get("MTL_FAIL_MARKER")
    only = os.environ.get("MTL_FAIL_TRIAL", "")
    if only and not trial_id.endswith(only):
        return
    if at and marker and step == int(at):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)
