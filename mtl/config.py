"""The typed configuration tree: dataclasses, YAML loading, ``key=value`` overrides.

One ``Config`` flows from the command line to every Ray worker as a plain dict
(``to_dict``) and back into the same dataclasses on the worker's first line (``from_dict``).
Loading is strict: an unknown key or a value of the wrong type raises ``ConfigError`` naming
the key and the file, before any Ray process starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and how to fix it."""


@dataclass
class InterroGateConfig:
    """Learned sharing gates and their compute budget (DESIGN.md §4.3; choices marked ours)."""

    gate: str = "straight_through"  # "straight_through" | "annealed_sigmoid"
    gate_init: float = 1.0  # initial gate logit α; > 0 starts closer to the shared feature
    temperature_start: float = 1.0  # annealed_sigmoid: temperature at step 0 ...
    temperature_end: float = 0.01  # ... annealed geometrically to this at the last step
    tau: float = 0.25  # target rate of task-specific compute, every task
    tau_per_task: dict[str, float] = field(default_factory=dict)  # overrides tau per task
    lambda_s: float = 1.0  # weight of the hinge budget penalty
    gate_lr_scale: float = 10.0  # α and β learn at lr x this, without weight decay
    # Start task blocks from single-task runs: a storage directory holding the runs of
    # `mtl baseline` (baseline-<benchmark>-<task>/checkpoint_*); "" = the shared initialisation.
    init_from: str = ""
    prune_atol: float = 1e-4  # fixed vs binarised gated model: allowed output difference


@dataclass
class MoEConfig:
    """Task-expert mixture of experts (DESIGN.md §4.4): blocks become MoE layers routed by
    the task (multi-task) or the domain (multi-domain) embedding."""

    num_experts: int = 4  # E experts per MoE layer (resnet: basic blocks; vit: block MLPs)
    top_k: int = 2  # experts each task/domain uses per MoE layer
    moe_layers: list[int] = field(default_factory=list)  # block indices; empty = every block
    router_dim: int = 32  # width of the task/domain embedding the router reads
    # Also route on a cheap embedding of the image. Off by default: a fixed (pruned) model
    # needs routes that depend on the task/domain alone, so fix_moe refuses such a model.
    input_routing: bool = False
    renormalize: bool = True  # top-k weights renormalised to sum to 1 (k=1: weight 1 exactly)
    load_balance_weight: float = 0.01  # Switch-style balance loss, 1 at perfect balance
    mutual_info_weight: float = 0.01  # -I(task; expert), Mod-Squad style specialisation
    prune_atol: float = 1e-4  # fixed vs routed model: allowed output difference
    # "task": the task/domain-routed TaskMoE above (mtl.models.moe); "token": DeepSpeed's MoE
    # in the ViT's MLPs, routed per token and sharded across workers (mtl.train.expert_parallel).
    # Token routing has no fixed per-task route, so its model is not registered.
    routing: str = "task"
    ep_size: int = 1  # token routing: workers that share one layer's experts (expert parallel)


@dataclass
class ModelConfig:
    """Architecture. ``name`` keys ``mtl.models.MODELS``, ``backbone`` keys ``BACKBONES``."""

    name: str = "hard_sharing"
    backbone: str = "resnet"
    width: int = 32  # resnet: first-stage channels; vit: embedding dim
    depth: int = 4  # resnet: residual blocks; vit: transformer blocks
    patch_size: int = 4  # vit only
    num_heads: int = 4  # vit only
    mlp_ratio: float = 2.0  # vit only
    interrogate: InterroGateConfig = field(default_factory=InterroGateConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class TasksConfig:
    """Which tasks (or domains) train, and how their losses combine (DESIGN.md §4.1).

    ``weights`` maps each loss key (task, or domain for multi-domain) to a non-negative
    weight; they are normalised to sum to 1, and empty means uniform. With
    ``weighting: sampling`` (multi-domain only) the weights are the domain sampling
    probabilities and the domain losses are averaged per sample instead.
    """

    names: list[str] = field(default_factory=list)  # empty = every task of the benchmark
    weights: dict[str, float] = field(default_factory=dict)
    weighting: str = "loss"  # "loss" | "sampling"
    baseline: str = ""  # single-task baseline table (JSON) for Δ_MTL; "" = none


@dataclass
class LocalSourceConfig:
    """A user's own data, loadable by Hugging Face ``datasets`` from a local path."""

    path: str = ""
    format: str = "imagefolder"  # "imagefolder" | "parquet"
    image_column: str = "image"
    label_columns: dict[str, str] = field(default_factory=dict)  # task name -> column
    num_classes: dict[str, int] = field(default_factory=dict)  # task name -> classes
    image_size: int = 32
    in_channels: int = 3
    val_fraction: float = 0.1


@dataclass
class DataConfig:
    """Benchmark data. ``benchmark`` keys ``mtl.data.BENCHMARKS``."""

    benchmark: str = "multimnist"  # "multimnist" | "digits" | "local"
    root: str = ""  # MNIST-family raw files; "" = $MTL_DATA_DIR, else ./data
    cache_dir: str = ""  # Arrow cache; "" = $MTL_CACHE_DIR, else ~/.cache/mtl
    source: str = "mnist"  # "mnist" | "fashion_mnist" | "kmnist" | "emnist"
    download: bool = False  # let torchvision download a missing source (needs internet)
    image_size: int = 36
    train_size: int = 20000
    val_size: int = 2000
    seed: int = 0
    local: LocalSourceConfig = field(default_factory=LocalSourceConfig)


@dataclass
class TrainConfig:
    """The Ray Train job: workers, schedule, checkpoints, validation."""

    num_workers: int = 2
    cpus_per_worker: int = 1
    device: str = "auto"  # "auto" (GPUs when the cluster has them) | "cpu" | "gpu"
    epochs: int = 2
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    micro_batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # "cosine" (linear warm-up, cosine decay to 0) | "constant"
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    log_every_steps: int = 20
    val_every_steps: int = 200  # plus once at the end
    val_batches: int = 0  # 0 = the whole validation split
    checkpoint_every_steps: int = 200  # plus once at the end
    keep_checkpoints: int = 2  # newest checkpoints kept in storage
    max_failures: int = 1  # Ray restarts the workers from the latest checkpoint
    storage_path: str = "./mtl_runs"
    threads_per_worker: int = 1


@dataclass
class DeepSpeedConfig:
    """What goes into each worker's DeepSpeed engine config."""

    zero_stage: int = 0
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    gradient_clipping: float = 0.0


@dataclass
class TuneConfig:
    """Population-based search over the loss weights (DESIGN.md §4.2).

    The searched weights are ``tasks.weights``: loss weights, or with ``tasks.weighting:
    sampling`` (multi-domain) the domain sampling probabilities. They live on the simplex,
    each between ``weight_min`` and ``weight_max``. Trials are ranked by ``metric`` on the
    validation split every ``perturbation_interval`` (in ``interval_unit``).
    """

    scheduler: str = "pbt"  # "pbt" | "pb2" | "grid" (fixed weights, the reference PBT must beat)
    population: int = 4  # trials; more than train at once are time-multiplexed
    # grid: tasks.weights, then each key's weight times each factor (renormalised): 1 + K*F
    # trials, each trained with its weights for the whole run. ``population`` is not used.
    grid_factors: list[float] = field(default_factory=lambda: [0.25, 4.0])
    perturbation_interval: int = 1
    interval_unit: str = "epochs"  # "epochs" | "steps" (optimizer steps)
    max_concurrent_trials: int = 0  # trials training at once; 0 = as many as the CPUs hold
    # Fitness: "mean_accuracy", "delta_mtl" (needs tasks.baseline) or one metric such as
    # "left/accuracy" or "depth/rmse" (its direction is known).
    metric: str = "mean_accuracy"
    quantile_fraction: float = 0.25  # bottom fraction exploits the top fraction
    resample_probability: float = 0.25  # explore: fresh weights instead of a perturbation
    perturb_sigma: float = 0.3  # explore: std of the Gaussian step on log-weights
    weight_min: float = 0.02  # bounds of every normalised weight
    weight_max: float = 1.0
    # Synchronous PBT: rank and perturb only once every trial has reached the interval, so
    # trials are compared at equal steps. Asynchronous PBT ranks each report against the
    # others' latest, and when the population is time-multiplexed the trials that train first
    # are always ahead: they win every ranking for their progress, not for their weights.
    synch: bool = True
    # Checkpoints per trial left after the sweep (the newest); 0 = all. During the sweep every
    # checkpoint is kept: any of them may still be exploited (see mtl/tune/resources.py).
    keep_checkpoints: int = 1
    seed: int = 0  # initial population and explore steps
    name: str = ""  # sweep name (storage folder, MLflow parent run); "" = benchmark-scheduler-time


@dataclass
class TrackingConfig:
    """MLflow. ``tracking_uri`` "" means $MLFLOW_TRACKING_URI, else ./mlflow.db (SQLite)."""

    tracking_uri: str = ""
    experiment: str = "mtl"
    run_name: str = ""
    register: bool = True  # register the fixed model after training (alias candidate)
    model_name: str = ""  # registered model name; "" = <benchmark>-<model.name>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _merge(base: Any, layer: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(
            f"{source}: bad config key {key!r}: {reason}. Keys and types are defined in "
            f"mtl/config.py; fix or remove this key."
        ) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: A YAML file in the layout of ``Config``.
        overrides: ``key=value`` strings, e.g. ``train.epochs=3`` or ``tasks.names=[left]``.

    Raises:
        ConfigError: Unknown key, wrong type, malformed override or a missing file.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        # ``key=`` means the empty string (YAML would read it as null).
        dotted = f"{item}''" if item.endswith("=") else item
        cfg = _merge(cfg, OmegaConf.from_dotlist([dotted]), f"override {item!r}")
    result = OmegaConf.to_object(cfg)
    validate(result)
    return result


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain, JSON-able dict of the whole tree (what travels to workers and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild (and re-check) a ``Config`` from ``to_dict`` output."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(data), "config dict")
    result = OmegaConf.to_object(cfg)
    validate(result)
    return result


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values, e.g. for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_moe(model: ModelConfig) -> None:
    m = model.moe
    _check(m.num_experts >= 1, f"model.moe.num_experts={m.num_experts}: need at least 1")
    _check(
        1 <= m.top_k <= m.num_experts,
        f"model.moe.top_k={m.top_k}: must be in [1, model.moe.num_experts={m.num_experts}]",
    )
    _check(m.router_dim >= 1, f"model.moe.router_dim={m.router_dim}: must be >= 1")
    _check(
        all(0 <= i < model.depth for i in m.moe_layers)
        and len(set(m.moe_layers)) == len(m.moe_layers),
        f"model.moe.moe_layers={m.moe_layers}: use distinct block indices in "
        f"[0, model.depth={model.depth})",
    )
    for name in ("load_balance_weight", "mutual_info_weight", "prune_atol"):
        _check(getattr(m, name) >= 0, f"model.moe.{name}={getattr(m, name)}: must be >= 0")
    _check(
        m.routing in ("task", "token"),
        f"model.moe.routing={m.routing!r}: use task (TaskMoE) or token (DeepSpeed MoE, vit)",
    )
    _check(m.ep_size >= 1, f"model.moe.ep_size={m.ep_size}: must be >= 1")
    _check(
        m.num_experts % m.ep_size == 0,
        f"model.moe.num_experts={m.num_experts} is not divisible by model.moe.ep_size="
        f"{m.ep_size}: every worker of an expert-parallel group holds the same number of experts",
    )


def _validate_expert_parallel(cfg: Config) -> None:
    """Token routing (DeepSpeed MoE): only where DeepSpeed supports it, refused up front."""
    m = cfg.model.moe
    token = cfg.model.name == "moe" and m.routing == "token"
    _check(
        token or m.ep_size == 1,
        f"model.moe.ep_size={m.ep_size} needs model.name=moe and model.moe.routing=token "
        "(experts shard only under token routing); set model.moe.ep_size=1",
    )
    if not token:
        return
    _check(
        cfg.model.backbone == "vit",
        f"model.moe.routing=token routes ViT tokens, but model.backbone="
        f"{cfg.model.backbone!r}: set model.backbone=vit or model.moe.routing=task",
    )
    _check(
        cfg.train.num_workers % m.ep_size == 0,
        f"train.num_workers={cfg.train.num_workers} is not divisible by model.moe.ep_size="
        f"{m.ep_size}: expert-parallel groups partition the workers",
    )
    _check(
        cfg.deepspeed.zero_stage != 3,
        "deepspeed.zero_stage=3 with model.moe.routing=token: DeepSpeed's MoE does not support "
        "ZeRO-3; use deepspeed.zero_stage 0, 1 or 2",
    )


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express. Raises ``ConfigError``."""
    t, ds = cfg.train, cfg.deepspeed
    _validate_moe(cfg.model)
    _validate_expert_parallel(cfg)
    _check(t.num_workers >= 1, f"train.num_workers={t.num_workers}: need at least 1 worker")
    _check(t.cpus_per_worker >= 1, "train.cpus_per_worker must be >= 1")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1")
    _check(t.lr > 0, f"train.lr={t.lr}: the learning rate must be > 0")
    _check(t.epochs >= 1 or t.max_steps >= 1, "set train.epochs >= 1 or train.max_steps >= 1")
    for name in (
        "log_every_steps",
        "val_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        _check(getattr(t, name) >= 1, f"train.{name} must be >= 1")
    _check(
        t.lr_schedule in ("cosine", "constant"),
        f"train.lr_schedule={t.lr_schedule!r}: use cosine or constant",
    )
    _check(t.warmup_steps >= 1, "train.warmup_steps must be >= 1")
    _check(t.device in ("auto", "cpu", "gpu"), f"train.device={t.device!r}: use auto, cpu or gpu")
    _check(ds.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={ds.zero_stage}: use 0-3")
    _check(
        cfg.model.interrogate.gate_lr_scale > 0,
        f"model.interrogate.gate_lr_scale={cfg.model.interrogate.gate_lr_scale}: must be > 0",
    )
    _check(
        ds.precision in ("fp32", "bf16", "fp16"),
        f"deepspeed.precision={ds.precision!r}: use fp32, bf16 or fp16",
    )
    _check(
        cfg.tasks.weighting in ("loss", "sampling"),
        f"tasks.weighting={cfg.tasks.weighting!r}: use 'loss' or 'sampling'",
    )
    for key, weight in cfg.tasks.weights.items():
        _check(weight >= 0, f"tasks.weights.{key}={weight}: weights must be >= 0")
    if cfg.tasks.weights:
        _check(
            sum(cfg.tasks.weights.values()) > 0,
            "tasks.weights are all zero: give some task a positive weight",
        )
    _check(
        cfg.tune.scheduler in ("pbt", "pb2", "grid"),
        f"tune.scheduler={cfg.tune.scheduler!r}: use pbt, pb2 or grid",
    )
    _validate_tune(cfg.tune)


def _validate_tune(tu: TuneConfig) -> None:
    _check(
        tu.population >= 2,
        f"tune.population={tu.population}: PBT needs at least 2 trials",
    )
    _check(tu.perturbation_interval >= 1, "tune.perturbation_interval must be >= 1")
    _check(
        len(tu.grid_factors) > 0 and all(f > 0 and f != 1 for f in tu.grid_factors),
        f"tune.grid_factors={list(tu.grid_factors)}: give positive factors other than 1",
    )
    _check(
        tu.interval_unit in ("epochs", "steps"),
        f"tune.interval_unit={tu.interval_unit!r}: use epochs or steps",
    )
    _check(tu.max_concurrent_trials >= 0, "tune.max_concurrent_trials must be >= 0")
    _check(
        0 < tu.quantile_fraction <= 0.5,
        f"tune.quantile_fraction={tu.quantile_fraction}: use a value in (0, 0.5]",
    )
    _check(
        0 <= tu.resample_probability <= 1,
        f"tune.resample_probability={tu.resample_probability}: use a value in [0, 1]",
    )
    _check(tu.perturb_sigma > 0, f"tune.perturb_sigma={tu.perturb_sigma}: must be > 0")
    _check(
        0 < tu.weight_min < tu.weight_max <= 1,
        f"tune.weight_min={tu.weight_min}, tune.weight_max={tu.weight_max}: "
        "need 0 < weight_min < weight_max <= 1",
    )
    _check(tu.keep_checkpoints >= 0, "tune.keep_checkpoints must be >= 0 (0 = keep all)")
