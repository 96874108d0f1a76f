"""The driver side of a training job: checks, Ray start-up, the ``TorchTrainer``, MLflow.

Everything that can be wrong with the input (config values, task names, weights, the dataset,
the tracking store, a checkpoint to resume) is checked here before any Ray process starts.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl.baselines import baseline_values, load_baseline
from mtl.config import Config, to_dict
from mtl.data import prepare, train_size
from mtl.losses import normalize_weights
from mtl.models import build_model
from mtl.tracking import (
    RunLogger,
    check_reachable,
    finish_run,
    resolve_tracking_uri,
    start_run,
    ui_command,
)
from mtl.train.engine import CheckpointError, read_state
from mtl.train.loop import active_taskset, train_worker


@dataclass
class FitResult:
    """What a finished training job leaves behind."""

    run_name: str
    metrics: dict[str, Any]  # the last report of rank 0
    checkpoint: str | None  # path of the latest checkpoint
    mlflow_run_id: str
    tracking_uri: str
    model_version: str | None = None  # registered version of the fixed model, if any


def _absolute(path: str) -> str:
    return path if not path or "://" in path else str(Path(path).expanduser().resolve())


def pin_paths(cfg: Config) -> Config:
    """Relative paths made absolute on the driver: workers run in other directories."""
    data = dataclasses.replace(
        cfg.data,
        root=_absolute(cfg.data.root or os.environ.get("MTL_DATA_DIR", "") or "data"),
        cache_dir=_absolute(cfg.data.cache_dir),
        local=dataclasses.replace(cfg.data.local, path=_absolute(cfg.data.local.path)),
    )
    train = dataclasses.replace(cfg.train, storage_path=_absolute(cfg.train.storage_path))
    interrogate = dataclasses.replace(
        cfg.model.interrogate, init_from=_absolute(cfg.model.interrogate.init_from)
    )
    model = dataclasses.replace(
        cfg.model, interrogate=interrogate, pretrained=_absolute(cfg.model.pretrained)
    )
    return dataclasses.replace(cfg, model=model, data=data, train=train)


def latest_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The saved state of a run's newest checkpoint, after verifying every byte of it.

    Raises:
        CheckpointError: No checkpoint, or the newest one is incomplete or corrupt.
    """
    candidates = (
        sorted(p for p in run_dir.glob("checkpoint_[0-9]*") if p.is_dir())
        if run_dir.is_dir()
        else []
    )
    if not candidates:
        raise CheckpointError(
            f"no checkpoint to resume under {run_dir}; check the run name and train.storage_path"
        )
    latest = candidates[-1]
    try:
        return read_state(latest)
    except CheckpointError as err:
        raise CheckpointError(
            f"refusing to resume: {err}. Nothing was loaded. Delete {latest} to resume from the "
            f"previous checkpoint, or start a new run."
        ) from None


def preflight(cfg: Config) -> dict[str, Any]:
    """All input checks; returns what the workers need besides the config."""
    taskset = active_taskset(cfg)
    normalize_weights(cfg.tasks.weights, taskset.loss_keys)
    if cfg.tasks.weighting == "sampling" and not taskset.multi_domain:
        raise ValueError(
            "tasks.weighting=sampling needs a multi-domain benchmark (data.benchmark=digits)"
        )
    build_model(cfg.model, taskset)  # unknown backbone or model name fails here, not in a worker
    if cfg.model.interrogate.init_from:
        if cfg.model.name != "interrogate":
            raise ValueError(
                f"model.interrogate.init_from is set but model.name={cfg.model.name!r}: "
                "single-task initialisation is for model.name=interrogate"
            )
        from mtl.train.warm_start import single_task_checkpoints

        single_task_checkpoints(cfg, taskset)  # every checkpoint exists, verifies and fits
    extras: dict[str, Any] = {"baseline": None}
    if cfg.tasks.baseline:
        values = baseline_values(load_baseline(cfg.tasks.baseline))
        missing = [k for k in taskset.loss_keys if k not in values]
        if missing:
            raise ValueError(
                f"baseline table {cfg.tasks.baseline} has no entry for {missing}; "
                "run `mtl baseline`"
            )
        extras["baseline"] = {k: values[k] for k in taskset.loss_keys}
    extras["tracking_uri"] = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_reachable(extras["tracking_uri"])
    prepare(cfg.data)  # builds the dataset cache once, here, instead of racing in workers
    samples, t = train_size(cfg.data, taskset), cfg.train
    if samples // t.num_workers < t.micro_batch_size:
        raise ValueError(
            f"{samples} training samples over train.num_workers={t.num_workers} is less than "
            f"one micro-batch of train.micro_batch_size={t.micro_batch_size} per worker; use "
            "a smaller batch, fewer workers or more data"
        )
    return extras


def init_ray() -> None:
    """Join the cluster in ``$RAY_ADDRESS`` (or a running local one), else start one on loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True, configure_logging=False)


def fit(cfg: Config, *, resume: str | None = None, run_name: str | None = None) -> FitResult:
    """Train ``cfg`` on Ray Train x DeepSpeed; ``resume`` names an earlier run to continue."""
    cfg = pin_paths(cfg)
    extras = preflight(cfg)
    storage = cfg.train.storage_path
    name = (
        resume
        or run_name
        or f"{cfg.data.benchmark}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    previous_run_id = None
    if resume:
        previous_run_id = latest_checkpoint(Path(storage) / name).get("mlflow_run_id")
    elif (Path(storage) / name).is_dir() and any((Path(storage) / name).iterdir()):
        # Ray Train would silently continue that run from its checkpoint instead.
        raise ValueError(
            f"a run named {name!r} already exists in {Path(storage) / name}: continue it with "
            f"`--resume {name}`, choose another `--name`, or delete that folder"
        )
    uri = extras["tracking_uri"]
    init_ray()
    extras["use_gpu"] = _use_gpu(cfg)
    run_id = start_run(cfg, uri, previous_run_id)
    print(f"[mtl] run {name}: storage {storage}/{name}, MLflow run {run_id}", flush=True)
    trainer = _trainer(
        cfg, {**extras, "config": to_dict(cfg), "mlflow_run_id": run_id}, name, storage
    )
    try:
        result = trainer.fit()
    except BaseException:
        finish_run(uri, run_id, ok=False)
        raise
    checkpoint = result.checkpoint.path if result.checkpoint else None
    out = FitResult(name, dict(result.metrics or {}), checkpoint, run_id, uri)
    RunLogger(uri, run_id).set_tags({"mtl.checkpoint": str(checkpoint), "mtl.run_name": name})
    from mtl.train.register import registration_refusal

    refusal = registration_refusal(cfg)  # token-routed MoE: no fixed model to register
    if cfg.tracking.register and checkpoint and refusal:
        print(f"[mtl] NOT registered: {refusal}", flush=True)
        RunLogger(uri, run_id).set_tags({"mtl.registration": f"skipped: {refusal}"})
    elif cfg.tracking.register and checkpoint:
        out.model_version = register(out, cfg.tracking.model_name)
    finish_run(uri, run_id, ok=True)
    print(f"[mtl] done: checkpoint {checkpoint}\n[mtl] browse it: {ui_command(uri)}", flush=True)
    return out


def register(result: FitResult, name: str = "") -> str | None:
    """Register the fixed model of a finished run; a failed verification refuses, loudly."""
    from mtl.prune import PruneVerificationError
    from mtl.train.register import register_checkpoint

    try:
        version = register_checkpoint(
            Path(result.checkpoint), result.tracking_uri, result.mlflow_run_id, result.metrics, name
        )
    except PruneVerificationError as err:
        print(f"[mtl] NOT registered: {err}", flush=True)
        RunLogger(result.tracking_uri, result.mlflow_run_id).set_tags(
            {"mtl.registration": f"refused: {err}"}
        )
        return None
    print(
        f"[mtl] registered models:/{version.name}/{version.version} (alias candidate)", flush=True
    )
    return str(version.version)


def _use_gpu(cfg: Config) -> bool:
    """``train.device=auto`` trains on GPUs when the cluster has one per worker."""
    if cfg.train.device != "auto":
        return cfg.train.device == "gpu"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= cfg.train.num_workers


# Environment the workers inherit from the process that builds the trainer (test hooks too).
FORWARDED_ENV = (
    "MTL_DATA_DIR",
    "MTL_CACHE_DIR",
    "MTL_FAIL_AT_STEP",
    "MTL_FAIL_MARKER",
    "MTL_FAIL_TRIAL",
)


def _trainer(
    cfg: Config,
    loop_config: dict[str, Any],
    name: str,
    storage: str,
    *,
    env: dict[str, str] | None = None,
) -> Any:
    """The job's ``TorchTrainer``; ``env`` adds to the workers' environment (a Tune trial
    passes on the driver's, which its own process does not have)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t, use_gpu = cfg.train, loop_config["use_gpu"]
    env = {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **(env or {})}
    # Ray Train re-routes print() through logging, which prints our progress lines twice.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
