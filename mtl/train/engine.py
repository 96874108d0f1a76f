"""The DeepSpeed engine: its config, construction, and checkpoint shards.

This is the only module that imports DeepSpeed. Each Ray worker builds one engine; without a
GPU DeepSpeed runs on its CPU accelerator over gloo, which must be chosen (``DS_ACCELERATOR``)
before ``deepspeed`` is first imported in the process.

Checkpoints are read as tensors only. A checkpoint file is a pickle, and the sha256 manifest
only proves that the files are the ones the manifest lists: whoever can write the run folder
can re-hash it. So every read here (ours with ``torch.load(weights_only=True)``, DeepSpeed's
own inside ``load_checkpoint`` and ``zero_to_fp32``) goes through ``tensors_only_loads``,
which refuses any object that is not a tensor, a container of them, or one of the few
DeepSpeed types listed there.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl.config import Config

DS_SUBDIR = "deepspeed"  # inside a checkpoint directory
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or incompatible; nothing was loaded."""


# torch.load reads these two on every call (torch/serialization.py, torch 2.14).
_FORCE_SAFE, _FORCE_UNSAFE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_FORCE_LOCK = threading.Lock()  # the environment and the allowlist are process-wide
_FORCED = threading.local()  # set while this thread is inside ``tensors_only_loads``

# The only non-tensor types a checkpoint may hold: DeepSpeed 0.19's (``_deepspeed_safe_globals``).
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _deepspeed_safe_globals() -> list[Any]:
    """The classes named by ``DEEPSPEED_SAFE_GLOBALS``, allowed while DeepSpeed loads.

    Measured by saving real engines (ZeRO 0, 1 and 2; fp32 and bf16; hard sharing,
    InterroGate and task MoE) and listing ``torch.serialization.
    get_unsafe_globals_in_checkpoint`` of every file: model-state files hold none, the ZeRO
    1-2 optimizer files hold ``LossScaler``, ``ZeroStageEnum`` and ``fragment_address``.
    The weights-only unpickler builds an allowed class with ``cls.__new__`` and fills its
    ``__dict__`` (no ``__init__``, no ``__setstate__``, no ``__reduce__`` of the file's
    choosing; the values are again only what that unpickler allows), so each is only data:

    * ``LossScaler``: the static loss scale (``cur_scale``, ``dynamic``) saved as the ZeRO
      optimizer's ``loss_scaler``.
    * ``DynamicLossScaler``: the same under fp16's dynamic scaling (numbers and a dtype);
      read from DeepSpeed's code, since fp16 needs a GPU and was not measured here.
    * ``ZeroStageEnum``: the ZeRO stage, an ``int`` enum; unpickling it looks a member up.
    * ``fragment_address``: a dataclass of two ints (``numel``, ``start``) locating each
      parameter's slice in the flat partition (``param_slice_mappings``).

    Raises:
        RuntimeError: A DeepSpeed upgrade moved or renamed one of them (update the list).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    classes = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    names = tuple(f"{c.__module__}.{c.__qualname__}" for c in classes)
    if names != DEEPSPEED_SAFE_GLOBALS:
        raise RuntimeError(
            f"DeepSpeed's checkpoint types are now {names}, not {DEEPSPEED_SAFE_GLOBALS}: "
            "check the new ones hold only data, then update mtl/train/engine.py"
        )
    return classes


@contextmanager
def tensors_only_loads(checkpoint: Path) -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's included, reads tensors only.

    Sets PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (it wins over a call that asks for
    a full unpickle, as DeepSpeed's do) and allows ``_deepspeed_safe_globals`` for the
    duration, then restores the environment and the allowlist. A file holding any other
    object is refused before that object is built: ``CheckpointError`` names the file.
    """
    if getattr(_FORCED, "active", False):  # nested: the outer one restores everything
        yield
        return
    if "deepspeed" not in sys.modules:  # a worker's engine chose its accelerator already
        import_deepspeed(use_gpu=False)
    allowed = _deepspeed_safe_globals()
    with _FORCE_LOCK:
        saved = {name: os.environ.pop(name, None) for name in (_FORCE_SAFE, _FORCE_UNSAFE)}
        os.environ[_FORCE_SAFE] = "1"
        _FORCED.active = True
        try:
            with torch.serialization.safe_globals(allowed):
                yield
        except pickle.UnpicklingError as err:
            raise CheckpointError(_unsafe_file_message(checkpoint, err)) from None
        finally:
            _FORCED.active = False
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def non_tensor_objects(path: Path) -> list[str]:
    """The globals of a ``torch.save`` file other than tensors and ``DEEPSPEED_SAFE_GLOBALS``,
    read from its pickle's opcodes: nothing is built, no DeepSpeed import is needed."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError) as err:
        return [f"not a tensors-only torch.save file: {err}"]
    return sorted(set(found) - set(DEEPSPEED_SAFE_GLOBALS))


def _refusal(where: str, detail: str) -> str:
    return (
        f"{where} contains non-tensor objects ({detail}), which mtl never writes into a "
        "checkpoint and refuses to unpickle. The checkpoint must come from a trusted run: "
        "restore its files from a copy only you could write, or use an earlier checkpoint"
    )


def _unsafe_file_message(checkpoint: Path, err: Exception) -> str:
    """Which file of ``checkpoint`` a tensors-only load refused, and what to do."""
    found = {p: non_tensor_objects(p) for p in sorted(checkpoint.rglob("*.pt"))}
    refused = {p: names for p, names in found.items() if names}
    if not refused:
        return _refusal(f"a file under {checkpoint}", _reason(err))
    path, names = next(iter(refused.items()))  # the first is enough to refuse the whole
    return _refusal(str(path), ", ".join(names))


def _reason(err: Exception) -> str:
    """torch's own reason in one line, without its advice to unpickle the file anyway."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reasons = [
        line.split("WeightsUnpickler error: ")[-1]
        for line in lines
        if not line.startswith(("Weights only load failed", "Check the documentation", "("))
    ]
    return (reasons or lines or [type(err).__name__])[0]


def import_deepspeed(use_gpu: bool) -> Any:
    """Import DeepSpeed with the right accelerator for this process."""
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    return deepspeed


def deepspeed_config(cfg: Config, total_steps: int = 0) -> dict[str, Any]:
    """The engine config derived from ``cfg`` (micro-batch, accumulation, ZeRO, precision).

    Args:
        cfg: The resolved config.
        total_steps: Optimizer steps of the whole run; the cosine schedule decays over them.
    """
    ds, t = cfg.deepspeed, cfg.train
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "optimizer": {
            # torch's AdamW: DeepSpeed's fused CPU Adam would need a C++ build on every machine.
            "type": "AdamW",
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 10**9,  # progress lines are ours
        "wall_clock_breakdown": False,
    }
    if t.lr_schedule == "cosine" and total_steps > 0:
        config["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": min(t.warmup_steps, total_steps),
                "warmup_type": "linear",
                "cos_min_ratio": 0.0,
            },
        }
    return config


def init_distributed(use_gpu: bool) -> Any:
    """DeepSpeed's communication over the process group torch.distributed already has
    (Ray Train made it); returns the ``deepspeed`` module."""
    deepspeed = import_deepspeed(use_gpu)
    backend = "nccl" if use_gpu else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return deepspeed


def build_engine(model: nn.Module, cfg: Config, use_gpu: bool, total_steps: int = 0) -> Any:
    """Wrap ``model`` in a DeepSpeed engine; torch.distributed must already be initialised.

    For a model with DeepSpeed MoE layers the engine creates the expert-parallel and
    expert-data-parallel process groups (``ep_size_<P>``) and hands each layer its group
    before the optimizer is built; ``parameter_groups`` puts the experts in their own groups.
    """
    deepspeed = init_distributed(use_gpu)
    norm_statistics_in(model, PRECISION_DTYPES[cfg.deepspeed.precision])
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg),
        config=deepspeed_config(cfg, total_steps),
    )
    return engine


def norm_statistics_in(model: nn.Module, dtype: torch.dtype) -> None:
    """BatchNorm's running statistics in ``dtype``, the dtype DeepSpeed gives the parameters.

    Under bf16/fp16 DeepSpeed 0.19 casts parameters only and leaves buffers as loaded
    (``data_types.buffer_dtype`` unset), so a BatchNorm would hold a bf16 weight beside fp32
    running statistics, which ``torch.batch_norm`` refuses ("expected scalar type BFloat16
    but found Float"). Casting every buffer (``buffer_dtype``) would also round buffers that
    are not statistics (InterroGate's budget weights); only the norms' statistics follow the
    parameters, as they did when DeepSpeed cast the whole module. fp32: nothing changes.
    """
    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, BATCH_NORMS):
            for name in ("running_mean", "running_var"):
                stat = getattr(module, name)
                if stat is not None:
                    stat.data = stat.data.to(dtype)


def parameter_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: InterroGate's gate and mixing logits
    (``model.gate_parameters()``) learn ``gate_lr_scale`` times faster and without weight
    decay (decay would pull every gate towards the undecided α = 0); everything else uses
    the config's learning rate. The LR schedule scales every group alike.

    DeepSpeed MoE experts (``mtl.train.expert_parallel``) are reduced over their
    expert-data-parallel group, not over every rank, so each group's expert parameters move
    to a group of their own marked ``moe`` (same hyperparameters, named after the
    expert-parallel group); ZeRO 1-2 refuse a MoE model without one."""
    gates = list(getattr(model, "gate_parameters", list)())
    gate_ids = {id(p) for p in gates}
    rest = [p for p in model.parameters() if id(p) not in gate_ids]
    groups: list[dict[str, Any]] = [{"name": "params", "params": rest}]
    if gates:
        scale = cfg.model.interrogate.gate_lr_scale
        groups.append(
            {"name": "gates", "params": gates, "lr": cfg.train.lr * scale, "weight_decay": 0.0}
        )
    if any(getattr(p, "allreduce", True) is False for p in rest):  # DeepSpeed's expert mark
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def save_shard(engine: Any, directory: Path, tag: str, state: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shard into its own ``directory`` plus a manifest.

    The manifest lists the sha256 of every file this rank wrote, so a checkpoint assembled
    from all ranks can be verified before anything is loaded. ``state`` (step counters and
    the resolved config) travels inside DeepSpeed's client state and, on rank 0, as JSON.
    """
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / DS_SUBDIR), tag=tag, client_state={"mtl": state})
    rank = engine.global_rank
    if rank == 0:  # the JSON copy for the driver; entries with tensors (the weighting
        # method's state) live only in the client state, which the workers restore
        plain = {k: v for k, v in state.items() if _json_plain(v)}
        (directory / "mtl_state.json").write_text(json.dumps({**plain, "tag": tag}, indent=2))
    files = sorted(
        p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("manifest.")
    )
    manifest = {str(p.relative_to(directory)): _sha256(p) for p in files}
    (directory / manifest_name(rank)).write_text(json.dumps(manifest, indent=2))


def _json_plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def read_state(directory: Path) -> dict[str, Any]:
    """The rank-0 state of a checkpoint, after verifying every rank's manifest."""
    verify_checkpoint(directory)
    return json.loads((directory / "mtl_state.json").read_text())


def verify_checkpoint(directory: Path) -> None:
    """Refuse a checkpoint with a missing shard, a missing file, a changed byte, or a file
    holding anything but tensors (a re-hashed manifest proves nothing about who wrote it;
    the loads themselves are tensors-only too, ``tensors_only_loads``)."""
    state_file = directory / "mtl_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{directory} has no mtl_state.json: not an mtl checkpoint")
    try:
        state = json.loads(state_file.read_text())
        world_size = int(state["world_size"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"{state_file} is unreadable ({err}); the checkpoint is corrupt"
        ) from None
    manifests = {}
    for rank in range(world_size):  # every shard present before any byte is hashed
        manifest_file = directory / manifest_name(rank)
        if not manifest_file.is_file():
            raise CheckpointError(
                f"{directory}: the shard of rank {rank} is missing ({manifest_file.name})"
            )
        try:
            manifests[rank] = json.loads(manifest_file.read_text())
        except ValueError:
            raise CheckpointError(f"{manifest_file} is corrupt") from None
    for rank, manifest in manifests.items():
        for rel, digest in manifest.items():
            path = directory / rel
            if not path.is_file():
                raise CheckpointError(f"{directory}: {rel} (rank {rank}) is missing")
            if _sha256(path) != digest:
                raise CheckpointError(
                    f"{directory}: {rel} (rank {rank}) does not match its checksum"
                )
            if path.suffix == ".pt" and (names := non_tensor_objects(path)):
                raise CheckpointError(_refusal(str(path), ", ".join(names)))


def load_shard(engine: Any, directory: Path, world_size: int) -> dict[str, Any]:
    """Verify the whole checkpoint, then load this rank's shard; returns the saved state."""
    state = read_state(directory)
    if state["world_size"] != world_size and state["zero_stage"] > 0:
        raise CheckpointError(
            f"{directory} was written by {state['world_size']} workers with ZeRO stage "
            f"{state['zero_stage']}; resume it with train.num_workers={state['world_size']}"
        )
    _check_tag(directory, state)
    with tensors_only_loads(directory):
        path, client = engine.load_checkpoint(str(directory / DS_SUBDIR), tag=state["tag"])
    if path is None:
        raise CheckpointError(
            f"DeepSpeed could not load {directory / DS_SUBDIR} (tag {state['tag']})"
        )
    # The entries the JSON copy leaves out (tensors: the weighting method's state) come from
    # the client state, read under the same tensors-only guard.
    saved = (client or {}).get("mtl") or {}
    return {**state, **{k: v for k, v in saved.items() if k not in state}}


def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a verified checkpoint, whatever its ZeRO stage.

    ZeRO 1-3 keep the fp32 master weights partitioned across the ranks' optimizer shards;
    DeepSpeed's own zero-to-fp32 reader reassembles them (buffers included). Without ZeRO,
    rank 0's model file holds the whole module.
    """
    state = read_state(directory)
    _check_tag(directory, state)
    ds_dir = directory / DS_SUBDIR
    with tensors_only_loads(directory):
        module: dict[str, torch.Tensor] = {}
        if state["zero_stage"] < 3:  # ZeRO-3 partitions the module file's weights too
            saved = torch.load(
                ds_dir / state["tag"] / "mp_rank_00_model_states.pt",
                map_location="cpu",
                weights_only=True,
            )
            module = {k: v.float() if v.is_floating_point() else v
                      for k, v in (saved["module"] or {}).items()}  # fmt: skip
        if state["zero_stage"] == 0:
            return module
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        merged = dict(get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=state["tag"]))
    # Parameters no optimizer holds (frozen: the single-gated MoE's base in stage 3) are in
    # ZeRO-2's frozen fragments but not in ZeRO-1's shards; under ZeRO 1-2 the module file has
    # them whole (ZeRO-3 is refused for such models).
    return {**{k: v for k, v in module.items() if k not in merged}, **merged}


def _check_tag(directory: Path, state: dict[str, Any]) -> None:
    """The state's DeepSpeed tag names a folder of this checkpoint, nothing outside it."""
    tag = str(state.get("tag", ""))
    if (
        not tag
        or Path(tag).name != tag
        or tag in (".", "..")
        or not (directory / DS_SUBDIR / tag).is_dir()
    ):
        raise CheckpointError(
            f"{directory / 'mtl_state.json'}: tag {tag!r} is not a folder of "
            f"{directory / DS_SUBDIR}; the checkpoint is corrupt"
        )
