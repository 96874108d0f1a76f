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

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl.config_checks import ConfigError, validate


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
class SingleGateConfig:
    """Single-gated mixture of experts (Royer et al. 2023): a base network, K expert branches
    copied from its blocks from ``branch_at`` on, one gate on the features there, an early exit
    where the base is confident. One ``mtl train`` runs the three stages: base, clustering,
    experts (``mtl.train.single_gate``). The paper states none of these values for our
    benchmarks: every default is ours."""

    num_experts: int = 4  # K expert branches, K >= 2
    branch_at: int = 0  # first branched block, 1 .. blocks - 1; 0 = half-way down the trunk
    threshold: float = 0.9  # exit where the base's confidence >= this, in (0, 1]; 1 = never
    base_fraction: float = 0.5  # share of the run's optimizer steps that trains the base
    cluster_samples: int = 4096  # training samples whose features k-means clusters (stage 2)
    freeze_base: bool = True  # stage 3 trains the experts and the gate only
    gate_weight: float = 1.0  # weight of the gate's cross entropy to the clusters (stage 3)


@dataclass
class ModelConfig:
    """Architecture. ``name`` keys ``mtl.models.MODELS``, ``backbone`` keys ``BACKBONES``."""

    name: str = "hard_sharing"  # hard_sharing | interrogate | moe | single_gate (mtl.models.MODELS)
    # Small trunks for 28-36 px: "resnet", "vit" (sized by width/depth/num_heads/mlp_ratio).
    # Standard backbones (DESIGN.md §4.7): "resnet18" | "resnet34" | "resnet50" (torchvision)
    # and "vit_s16" (timm's ViT-S/16); they ignore width, depth, num_heads and mlp_ratio.
    backbone: str = "resnet"
    width: int = 32  # resnet: first-stage channels; vit: embedding dim
    depth: int = 4  # resnet: residual blocks; vit: transformer blocks
    patch_size: int = 0  # vit, vit_s16: patch side; 0 = the backbone's own (vit 4, vit_s16 16)
    num_heads: int = 4  # vit only
    mlp_ratio: float = 2.0  # vit only
    # resnet18/34/50: 32 as published; 16 or 8 dilate the last one or two stages (dense tasks)
    output_stride: int = 32
    # Weights for the backbone from a local file: a torchvision .pth or a timm .safetensors
    # (or .pth) of the same architecture. Nothing is downloaded; "" = random initialisation.
    pretrained: str = ""
    dense_head: str = "auto"  # decoder of dense heads: "conv" | "aspp"; auto = aspp on standard
    head_channels: int = 0  # dense heads' decoder width; 0 = 256 for aspp, 32 for conv
    # InterroGate's gate mix: "triton" (kernels/, CUDA or TRITON_INTERPRET=1), "torch" (the
    # eager reference) or "auto" (Triton on CUDA, the reference elsewhere)
    kernels: str = "auto"
    interrogate: InterroGateConfig = field(default_factory=InterroGateConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    single_gate: SingleGateConfig = field(default_factory=SingleGateConfig)


@dataclass
class UWOptions:
    """Uncertainty weighting (Kendall et al. 2018): the log-variances' Adam step size."""

    lr_scale: float = 1.0  # (ours) times the model's current learning rate


@dataclass
class DWAOptions:
    """Dynamic weight average (Liu et al. 2019)."""

    temperature: float = 2.0  # τ, the paper's


@dataclass
class FAMOOptions:
    """FAMO (Liu et al. 2023): the task logits' Adam, and which losses measure progress."""

    lr: float = 0.025  # the paper's (and LibMTL's)
    gamma: float = 0.001  # the logits' weight decay, LibMTL's default
    # "same_batch": re-evaluate the step's last batch after the step (the paper's, one extra
    # forward); "next_batch": the next step's first batch (ours: no extra forward)
    update: str = "same_batch"


@dataclass
class CAGradOptions:
    """CAGrad (Liu et al. 2021)."""

    c: float = 0.4  # radius of the ball around the mean gradient, the paper's NYUv2 value
    rescale: bool = True  # divide by 1 + c², as the official code's default


@dataclass
class NashMTLOptions:
    """Nash-MTL (Navon et al. 2022)."""

    max_norm: float = 1.0  # clip the update's norm (0 = off), the paper's
    update_every: int = 1  # recompute the weights every N steps (the paper's speed-up: 25)
    optim_niter: int = 20  # solver iterations per solve (damped Newton; 20 is ample)


@dataclass
class TasksConfig:
    """Which tasks (or domains) train, and how their losses combine (DESIGN.md §4.1).

    ``weights`` maps each loss key (task, or domain for multi-domain) to a non-negative
    weight; they are normalised to sum to 1, and empty means uniform. With
    ``weighting: sampling`` (multi-domain only) the weights are the domain sampling
    probabilities and the domain losses are averaged per sample instead.
    """

    names: list[str] = field(default_factory=list)  # empty = every task of the benchmark
    # loss weight per task (or domain sampling weight); {} = uniform
    weights: dict[str, float] = field(default_factory=dict)
    weighting: str = "loss"  # "loss" | "sampling"
    baseline: str = ""  # single-task baseline table (JSON) for Δ_MTL; "" = none
    # The weighting method (mtl.methods.METHODS): "ew" (fixed weights above), loss-based
    # "uw" | "dwa" | "rlw" | "famo", gradient-based "pcgrad" | "cagrad" | "mgda_ub" |
    # "imtl_g" | "nash_mtl". Every method applies ``weights`` as priors (uniform = none).
    method: str = "ew"
    # Gradient methods: per-task gradients of the "params" (shared parameters, one backward
    # per task) or of the "representation" (the trunk's output, hard sharing only: one
    # backward through the heads per task, one through the trunk)
    gradients: str = "params"
    uw: UWOptions = field(default_factory=UWOptions)
    dwa: DWAOptions = field(default_factory=DWAOptions)
    famo: FAMOOptions = field(default_factory=FAMOOptions)
    cagrad: CAGradOptions = field(default_factory=CAGradOptions)
    nash_mtl: NashMTLOptions = field(default_factory=NashMTLOptions)


@dataclass
class LocalSourceConfig:
    """A user's own data, loadable by Hugging Face ``datasets`` from a local path."""

    path: str = ""  # image folder (one subfolder per class) or parquet file
    format: str = "imagefolder"  # "imagefolder" | "parquet"
    image_column: str = "image"  # parquet: column holding encoded images
    label_columns: dict[str, str] = field(default_factory=dict)  # task name -> column
    num_classes: dict[str, int] = field(default_factory=dict)  # task name -> classes
    image_size: int = 32  # images are resized to this square side
    in_channels: int = 3  # 1 (grey) or 3 (RGB)
    val_fraction: float = 0.1  # held out as the validation split


@dataclass
class FileTaskConfig:
    """One task of the generic ``files`` layout (a column of its sample table)."""

    kind: str = "classification"  # a kind of mtl.tasks.TASK_KINDS
    num_outputs: int = 0  # classes (classification kinds); 0 = the kind's channels (dense)
    column: str = ""  # column of the sample table; "" = the task's name


@dataclass
class FilesConfig:
    """A user's own multi-task or multi-domain data: images plus a sample table (CSV).

    ``<data.root>/<table>`` has a header row with ``image`` (path relative to data.root),
    ``split`` (train | val), optionally ``domain``, and one column per task: an integer
    class, a 0/1 attribute, or the relative path of a dense target file (.png or .npy).
    """

    table: str = "samples.csv"  # CSV or parquet of samples, relative to data.root
    # task name -> its kind, outputs and column
    tasks: dict[str, FileTaskConfig] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)  # domain names; [] = multi-task
    in_channels: int = 3  # images read as 1 (grey) or 3 (RGB) channels


@dataclass
class AugmentConfig:
    """Train-time augmentation of streamed datasets; every target moves with the image."""

    enabled: bool = False  # random resized crop + flip of training images (and dense maps)
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # crop area fraction
    hflip: bool = True  # horizontal flip with probability 0.5


@dataclass
class DataConfig:
    """Benchmark data. ``benchmark`` keys ``mtl.data.BENCHMARKS``."""

    # "multimnist" | "digits" | "local" | "celeba" | "nyuv2" | "pascal_context"
    # | "office_home" | "domainnet" | "files"
    benchmark: str = "multimnist"
    # MNIST-family raw files, or the folder of a dataset in its published layout;
    # "" = $MTL_DATA_DIR, else ./data
    root: str = ""
    cache_dir: str = ""  # Arrow cache; "" = $MTL_CACHE_DIR, else ~/.cache/mtl
    source: str = "mnist"  # "mnist" | "fashion_mnist" | "kmnist" | "emnist"
    download: bool = True  # fetch missing MNIST-family files (torchvision, internet); false: never
    image_size: Any = 36  # one number (square) or [height, width]
    train_size: int = 20000  # generated benchmarks: training samples
    val_size: int = 2000  # generated benchmarks: validation samples
    seed: int = 0  # generation, split and shuffling seed of the data
    local: LocalSourceConfig = field(default_factory=LocalSourceConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # data.benchmark=nyuv2: the published layout under data.root (mtl.data.nyud): "libmtl"
    # (13 semseg classes), "nyud_mt" (40), or "auto" (the one whose folders exist)
    nyuv2_layout: str = "auto"
    # Streamed datasets: processes per training worker that read and decode batches ahead
    # (0 = in the training process). In-memory benchmarks never use them.
    loader_workers: int = 1
    val_fraction: float = 0.1  # held out from train when a dataset ships no val split
    # Datasets that publish both a val and a test split (CelebA): which one is served as
    # the val split, "val" (model selection) or "test" (the numbers papers report)
    eval_split: str = "val"


@dataclass
class TrainConfig:
    """The Ray Train job: workers, schedule, checkpoints, validation."""

    num_workers: int = 2  # Ray Train workers, one DeepSpeed engine each
    cpus_per_worker: int = 1  # CPUs Ray reserves per worker
    device: str = "auto"  # "auto" (GPUs when the cluster has them) | "cpu" | "gpu"
    epochs: int = 2  # passes over the training split (unless max_steps)
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    micro_batch_size: int = 64  # samples per worker per forward pass
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # peak learning rate (AdamW)
    lr_schedule: str = "cosine"  # "cosine" (linear warm-up, cosine decay to 0) | "constant"
    warmup_steps: int = 20  # linear warm-up steps of the cosine schedule
    weight_decay: float = 0.0  # AdamW weight decay
    seed: int = 0  # initial weights and sampling order
    log_every_steps: int = 20  # progress line and train metrics every N steps
    val_every_steps: int = 200  # plus once at the end
    val_batches: int = 0  # 0 = the whole validation split
    checkpoint_every_steps: int = 200  # plus once at the end
    keep_checkpoints: int = 2  # newest checkpoints kept in storage
    max_failures: int = 1  # Ray restarts the workers from the latest checkpoint
    storage_path: str = "./mtl_runs"  # runs and checkpoints: a folder or s3://bucket/prefix
    threads_per_worker: int = 1  # torch CPU threads per worker
    # Divergence guard (ours), checked every step: stop when the mean training loss of the
    # last ``divergence_window`` steps exceeds this factor times its early level (the mean of
    # the first ``divergence_window`` steps; within those, each step against the ones before
    # it); 0 = off. A non-finite loss or gradient norm always stops the run at that step.
    divergence_factor: float = 1000.0
    divergence_window: int = 8  # steps of loss history the divergence guard compares


@dataclass
class DeepSpeedConfig:
    """What goes into each worker's DeepSpeed engine config."""

    zero_stage: int = 0  # ZeRO stage 0-3
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    gradient_clipping: float = 0.0  # clip the gradient norm; 0 = off


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
    # Starting weights. "random": trial 0 the configured tasks.weights, the others random
    # points of the simplex. "spread": tasks.weights with one key's weight times
    # spread_factor, for each key in turn, then tasks.weights, then random points.
    initial: str = "random"
    spread_factor: float = 4.0  # initial=spread: one key's weight times this
    # grid: tasks.weights, then each key's weight times each factor (renormalised): 1 + K*F
    # trials, each trained with its weights for the whole run. ``population`` is not used.
    grid_factors: list[float] = field(default_factory=lambda: [0.25, 4.0])
    perturbation_interval: int = 1  # ranking and perturbation every N interval_unit
    interval_unit: str = "epochs"  # "epochs" | "steps" (optimizer steps)
    # No perturbation before this many interval_units: early rankings can favour weights
    # that only help early (PBT's short-horizon bias). Rounded up to a whole interval.
    burn_in: int = 0
    max_concurrent_trials: int = 0  # trials training at once; 0 = as many as the CPUs hold
    # Fitness: "mean_accuracy", "delta_mtl" (needs tasks.baseline) or one metric such as
    # "left/accuracy" or "depth/rmse" (its direction is known).
    metric: str = "mean_accuracy"
    quantile_fraction: float = 0.25  # bottom fraction exploits the top fraction
    resample_probability: float = 0.25  # explore: fresh weights instead of a perturbation
    perturb_sigma: float = 0.3  # explore: std of the Gaussian step on log-weights
    weight_min: float = 0.02  # bounds of every normalised weight
    weight_max: float = 1.0  # upper bound of every normalised weight
    # Synchronous PBT: rank and perturb only once every trial has reached the interval, so
    # trials are compared at equal steps. Asynchronous PBT ranks each report against the
    # others' latest; with a time-multiplexed population the trials that train first are
    # ranked against older, less trained results and so never land in the bottom quantile.
    synch: bool = True
    # Checkpoints per trial left after the sweep (the newest); 0 = all. During the sweep every
    # checkpoint is kept: any of them may still be exploited (see mtl/tune/resources.py).
    keep_checkpoints: int = 1
    seed: int = 0  # initial population and explore steps
    name: str = ""  # sweep name (storage folder, MLflow parent run); "" = benchmark-scheduler-time


@dataclass
class TrackingConfig:
    """MLflow. ``tracking_uri`` "" means $MLFLOW_TRACKING_URI, else ./mlflow.db (SQLite)."""

    tracking_uri: str = ""  # MLflow store or server; "" = $MLFLOW_TRACKING_URI, else ./mlflow.db
    experiment: str = "mtl"  # MLflow experiment of the runs
    run_name: str = ""  # MLflow run name; "" = the job name mtl prints
    register: bool = True  # register the fixed model after training (alias candidate)
    # Registered model name; "" = <benchmark>[-<data source>][-<task>+<task>]-<model.name>,
    # the source only when not the default, the tasks only for a subset (tasks.names)
    model_name: str = ""
    # Registration floors: validation metric (as logged, without "val/") -> the value it must
    # beat in the metric's direction, e.g. {mean_accuracy: 0.5}. Non-finite metrics always
    # refuse registration.
    register_if: dict[str, float] = field(default_factory=dict)
    register_above_chance: bool = True  # every classification accuracy must beat 1 / classes
    # After registering, move alias champion to the best version on this validation metric
    # (as `mtl promote NAME --best METRIC`, among versions with the same task set and
    # evaluation data), e.g. "mean_accuracy"; "" = champion moves only by hand
    auto_promote: str = ""
    serve_max_rows: int = 1024  # the served model refuses requests with more images (HTTP 400)


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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``line N: what`` from a YAML error (its problem mark is where the parser gave up)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}: {what}" if mark is not None else what


def _read_yaml(path: Path) -> Any:
    """The file's mapping as an OmegaConf node; syntax and shape errors name file and line."""
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # shape first: mapping or not
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{path}: not valid YAML ({_yaml_problem(err)}); fix the syntax there"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    if root is None:
        raise ConfigError(
            f"{path} is empty: give sections such as `train: {{epochs: 1}}`, or leave out the "
            "file to use the defaults"
        )
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        raise ConfigError(
            f"{path}, line {root.start_mark.line + 1}: the top level is {kind}, not a mapping; "
            "write sections such as `train:` and `model:` at the top level (see configs/tiny.yaml)"
        )
    return layer


def _override(cfg: Any, item: str) -> Any:
    key, _, value = item.partition("=")
    if not key.strip() or "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value, e.g. train.epochs=3")
    # ``key=`` means the empty string (YAML would read it as null).
    dotted = f"{item}''" if not value else item
    try:
        layer = OmegaConf.from_dotlist([dotted])
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); quote it "
            "or fix the brackets, e.g. tasks.names=[left,right]"
        ) from None
    return _merge(cfg, layer, f"override {item!r}")


def _build(cfg: Any, source: str) -> Config:
    """Dataclasses from the merged tree (interpolations resolved here), then value checks."""
    try:
        result = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"{source}: config key {key!r} cannot be resolved: {str(err).splitlines()[0]}"
        ) from None
    validate(result)
    return result


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: A YAML file in the layout of ``Config``.
        overrides: ``key=value`` strings, e.g. ``train.epochs=3`` or ``tasks.names=[left]``.

    Raises:
        ConfigError: Unknown key, wrong type, non-finite number, malformed override, a missing
            or empty file, YAML that does not parse or whose top level is not a mapping.
    """
    cfg = OmegaConf.structured(Config)
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist: give a YAML file such as "
                "configs/tiny.yaml, or none for the defaults"
            )
        cfg = _merge(cfg, _read_yaml(path), str(path))
        source = str(path)
    for item in overrides:
        cfg = _override(cfg, item)
    return _build(cfg, source)


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain, JSON-able dict of the whole tree (what travels to workers and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild (and re-check) a ``Config`` from ``to_dict`` output."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(data), "config dict")
    return _build(cfg, "config dict")


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
