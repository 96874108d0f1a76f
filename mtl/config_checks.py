"""Value checks on a loaded configuration that types alone cannot express.

``mtl.config.load_config`` calls ``validate`` on every tree it builds, so a bad value fails on
the driver, before Ray starts, with a ``ConfigError`` that names the key and the fix. This
module reads the dataclasses of ``mtl.config`` but does not import it (no import cycle).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtl.config import Config, ModelConfig, TuneConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and how to fix it."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


SMALL_TRUNKS = ("resnet", "vit")  # sized by model.width / model.depth
RESNETS = ("resnet18", "resnet34", "resnet50")


def _validate_backbone(model: ModelConfig) -> None:
    """Backbone options; the name itself, the weights file and the image tiling are checked
    when the driver builds the model (``mtl.train.launch.preflight``), before Ray starts."""
    _check(
        model.output_stride in (8, 16, 32),
        f"model.output_stride={model.output_stride}: use 32 (as published), 16 or 8 (dilated)",
    )
    _check(
        model.output_stride == 32 or model.backbone in RESNETS,
        f"model.output_stride={model.output_stride} dilates ResNet stages, but model.backbone="
        f"{model.backbone!r}: use one of {list(RESNETS)} or model.output_stride=32",
    )
    _check(model.patch_size >= 0, f"model.patch_size={model.patch_size}: must be >= 0")
    _check(model.head_channels >= 0, f"model.head_channels={model.head_channels}: must be >= 0")
    _check(
        model.dense_head in ("auto", "conv", "aspp"),
        f"model.dense_head={model.dense_head!r}: use auto, conv or aspp",
    )
    _check(
        model.kernels in ("auto", "torch", "triton"),
        f"model.kernels={model.kernels!r}: use auto (Triton on CUDA), torch or triton",
    )


def _validate_moe(model: ModelConfig) -> None:
    m = model.moe
    _check(m.num_experts >= 1, f"model.moe.num_experts={m.num_experts}: need at least 1")
    _check(
        1 <= m.top_k <= m.num_experts,
        f"model.moe.top_k={m.top_k}: must be in [1, model.moe.num_experts={m.num_experts}]",
    )
    _check(m.router_dim >= 1, f"model.moe.router_dim={m.router_dim}: must be >= 1")
    _check(
        len(set(m.moe_layers)) == len(m.moe_layers)
        # a standard backbone's block count is checked when the model is built
        and (model.backbone not in SMALL_TRUNKS or all(0 <= i < model.depth for i in m.moe_layers)),
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


def _non_finite(node: Any, key: str) -> tuple[str, float] | None:
    """The first float under ``node`` (dataclass, dict or list) that is inf or NaN."""
    if isinstance(node, float):
        return None if math.isfinite(node) else (key, node)
    if dataclasses.is_dataclass(node):
        items = ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    elif isinstance(node, dict):
        items = ((str(k), v) for k, v in node.items())
    elif isinstance(node, (list, tuple)):
        return next(
            (hit for i, v in enumerate(node) if (hit := _non_finite(v, f"{key}[{i}]"))), None
        )
    else:
        return None
    for name, value in items:
        found = _non_finite(value, f"{key}.{name}" if key else name)
        if found:
            return found
    return None


def _validate_single_gate(cfg: Config) -> None:
    """``model.single_gate`` bounds; ``branch_at`` against the trunk is checked when the model
    is built (preflight), where the number of blocks is known."""
    sg, where = cfg.model.single_gate, "model.single_gate"
    _check(sg.num_experts >= 2, f"{where}.num_experts={sg.num_experts}: a mixture needs K >= 2")
    _check(
        0 < sg.threshold <= 1,
        f"{where}.threshold={sg.threshold} must be in (0, 1] (1 = never exit early)",
    )
    _check(
        sg.branch_at >= 0,
        f"{where}.branch_at={sg.branch_at}: a block index >= 1, or 0 for half-way",
    )
    _check(
        0 < sg.base_fraction < 1,
        f"{where}.base_fraction={sg.base_fraction}: the base and the experts each need a share "
        "of the steps, so use a value in (0, 1)",
    )
    _check(
        sg.cluster_samples >= sg.num_experts,
        f"{where}.cluster_samples={sg.cluster_samples}: k-means needs at least "
        f"num_experts={sg.num_experts} samples",
    )
    _check(sg.gate_weight >= 0, f"{where}.gate_weight={sg.gate_weight}: must be >= 0")
    if cfg.model.name != "single_gate":
        return
    # Stage 3 builds a new engine over the trained base: ZeRO-3 partitions the module's own
    # parameters, which a second engine cannot take over.
    _check(
        cfg.deepspeed.zero_stage <= 2,
        f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: model.name=single_gate trains in "
        "stages, each its own engine; use ZeRO stage 0, 1 or 2",
    )
    from mtl.methods import LOSS_METHODS

    _check(
        cfg.tasks.method in LOSS_METHODS,
        f"tasks.method={cfg.tasks.method!r}: model.name=single_gate has no one shared trunk for "
        f"a gradient method to balance; use a loss-based method ({', '.join(LOSS_METHODS)})",
    )


def validate_finite(cfg: Any) -> None:
    """Every float of the tree is finite: ``train.lr=inf`` would train NaN to the end."""
    found = _non_finite(cfg, "")
    if found:
        key, value = found
        raise ConfigError(f"{key}={value}: must be a finite number (not inf or nan)")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express. Raises ``ConfigError``."""
    t, ds = cfg.train, cfg.deepspeed
    validate_finite(cfg)
    _validate_backbone(cfg.model)
    _validate_moe(cfg.model)
    _validate_expert_parallel(cfg)
    _validate_single_gate(cfg)
    _check(t.num_workers >= 1, f"train.num_workers={t.num_workers}: need at least 1 worker")
    _check(t.cpus_per_worker >= 1, "train.cpus_per_worker must be >= 1")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1")
    _check(t.lr > 0, f"train.lr={t.lr}: the learning rate must be > 0")
    _check(
        t.divergence_factor == 0 or t.divergence_factor > 1,
        f"train.divergence_factor={t.divergence_factor}: use a factor > 1, or 0 to turn the "
        "divergence guard off",
    )
    _check(
        t.divergence_window >= 1,
        f"train.divergence_window={t.divergence_window}: the early level needs >= 1 step",
    )
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
    _validate_method(cfg)
    _check(
        cfg.tune.scheduler in ("pbt", "pb2", "grid"),
        f"tune.scheduler={cfg.tune.scheduler!r}: use pbt, pb2 or grid",
    )
    _validate_data(cfg.data)
    _validate_tune(cfg.tune)
    _validate_storage(cfg)


def _validate_storage(cfg: Config) -> None:
    """A storage path is a local folder or ``s3://bucket/prefix``; that the bucket can be
    reached is checked by the driver's preflight (``mtl.storage.check_reachable``)."""
    from mtl.storage import check_scheme  # imports nothing of mtl

    _check(
        bool(cfg.train.storage_path),
        "train.storage_path is empty: give a folder or s3://bucket/prefix",
    )
    for key, path in (
        ("train.storage_path", cfg.train.storage_path),
        ("model.interrogate.init_from", cfg.model.interrogate.init_from),
    ):
        try:
            check_scheme(path, key)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _validate_method(cfg: Config) -> None:
    """``tasks.method`` and its options, against what the rest of the config trains."""
    from mtl.methods import GRADIENT_METHODS, METHODS

    ta, method = cfg.tasks, cfg.tasks.method
    _check(
        method in METHODS,
        f"tasks.method={method!r} is not a method; choose one of {sorted(METHODS)}",
    )
    _check(
        ta.gradients in ("params", "representation"),
        f"tasks.gradients={ta.gradients!r}: use 'params' or 'representation'",
    )
    _check(
        method == "ew" or ta.weighting == "loss",
        f"tasks.method={method} with tasks.weighting=sampling: the sampling weights already "
        "decide each domain's share of the batch, so only tasks.method=ew applies; set "
        "tasks.weighting=loss to weigh the domain losses with this method",
    )
    if method in GRADIENT_METHODS:
        _check(
            cfg.train.grad_accum_steps == 1,
            f"tasks.method={method} with train.grad_accum_steps={cfg.train.grad_accum_steps}: "
            "a gradient method combines one step's per-task gradients, which accumulation "
            "would split; set train.grad_accum_steps=1 (raise micro_batch_size or workers)",
        )
        _check(
            not (cfg.model.name == "moe" and cfg.model.moe.routing == "token"),
            f"tasks.method={method} with model.moe.routing=token: each worker holds other "
            "experts, so per-task gradients cannot be averaged across workers; use a "
            "loss-based method (ew, uw, dwa, rlw, famo) or moe.routing=task",
        )
        _check(
            ta.gradients == "representation" or cfg.deepspeed.zero_stage <= 2,
            f"tasks.method={method} on the shared parameters with deepspeed.zero_stage=3: "
            "ZeRO-3 partitions the parameters; use zero_stage <= 2",
        )
        _check(
            ta.gradients == "params" or cfg.model.name == "hard_sharing",
            f"tasks.gradients=representation with model.name={cfg.model.name}: only hard "
            "sharing has one representation every head reads; use tasks.gradients=params",
        )
    _check(ta.uw.lr_scale > 0, f"tasks.uw.lr_scale={ta.uw.lr_scale}: must be > 0")
    _check(ta.dwa.temperature > 0, f"tasks.dwa.temperature={ta.dwa.temperature}: must be > 0")
    _check(ta.famo.lr > 0, f"tasks.famo.lr={ta.famo.lr}: must be > 0")
    _check(ta.famo.gamma >= 0, f"tasks.famo.gamma={ta.famo.gamma}: must be >= 0")
    _check(
        ta.famo.update in ("same_batch", "next_batch"),
        f"tasks.famo.update={ta.famo.update!r}: use same_batch or next_batch",
    )
    _check(ta.cagrad.c >= 0, f"tasks.cagrad.c={ta.cagrad.c}: must be >= 0")
    n = ta.nash_mtl
    _check(n.max_norm >= 0, f"tasks.nash_mtl.max_norm={n.max_norm}: must be >= 0 (0 = off)")
    _check(n.update_every >= 1, f"tasks.nash_mtl.update_every={n.update_every}: must be >= 1")
    _check(n.optim_niter >= 1, f"tasks.nash_mtl.optim_niter={n.optim_niter}: must be >= 1")


def image_hw(size: Any) -> tuple[int, int]:
    """``data.image_size`` as ``(height, width)``: one number means a square."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    ok = (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    )
    _check(ok, f"data.image_size={size!r}: give one positive integer or [height, width]")
    return int(size[0]), int(size[1])


def _validate_data(d: Any) -> None:
    image_hw(d.image_size)
    _check(d.loader_workers >= 0, f"data.loader_workers={d.loader_workers}: must be >= 0")
    _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction}: must lie in (0, 1)")
    _check(
        d.eval_split in ("val", "test"),
        f"data.eval_split={d.eval_split!r}: use val or test",
    )
    scale = d.augment.scale
    _check(
        len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0,
        f"data.augment.scale={scale}: need [min, max] crop area fractions, 0 < min <= max <= 1",
    )
    _check(
        d.nyuv2_layout in ("auto", "libmtl", "nyud_mt"),
        f"data.nyuv2_layout={d.nyuv2_layout!r}: use auto, libmtl or nyud_mt",
    )


def _validate_tune(tu: TuneConfig) -> None:
    _check(
        tu.population >= 2,
        f"tune.population={tu.population}: PBT needs at least 2 trials",
    )
    _check(tu.perturbation_interval >= 1, "tune.perturbation_interval must be >= 1")
    _check(tu.burn_in >= 0, f"tune.burn_in={tu.burn_in}: must be >= 0 (0 = perturb from the start)")
    _check(
        tu.burn_in == 0 or tu.scheduler != "pb2",
        f"tune.burn_in={tu.burn_in} with tune.scheduler=pb2: Ray's PB2 has no burn-in period; "
        "use pbt or tune.burn_in=0",
    )
    _check(
        tu.initial in ("random", "spread"),
        f"tune.initial={tu.initial!r}: use random or spread",
    )
    _check(
        tu.spread_factor > 0 and tu.spread_factor != 1,
        f"tune.spread_factor={tu.spread_factor}: give a positive factor other than 1",
    )
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
