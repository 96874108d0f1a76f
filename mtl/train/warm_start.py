"""InterroGate's task blocks and heads started from single-task runs (DESIGN.md §4.3).

``model.interrogate.init_from`` names a storage directory holding the runs that
``mtl baseline`` trains, ``baseline-<benchmark>-<task>/checkpoint_*`` (a local folder or an
``s3://`` URI: a checkpoint in S3 is downloaded to a temporary folder and verified there).
Task t's blocks (and its neck and head) start from the newest verified checkpoint of task
t's run; the shared stem and blocks keep the shared initialisation. The driver checks every
checkpoint before Ray starts (``single_task_checkpoints``); each worker then loads them
(``load_single_task``).
"""

from __future__ import annotations

import torch

from mtl import storage
from mtl.config import Config
from mtl.tasks import TaskSet
from mtl.train.engine import CheckpointError, consolidated_weights, read_state

# What must match for a single-task backbone's weights to fit a task block.
_SHAPE_KEYS = (
    *("backbone", "width", "depth", "num_heads", "patch_size", "mlp_ratio", "output_stride"),
    *("dense_head", "head_channels"),
)


def _read_state(checkpoint: str) -> dict:
    with storage.local_copy(checkpoint) as local:
        return read_state(local)  # raises on a corrupt or incomplete checkpoint


def single_task_checkpoints(cfg: Config, taskset: TaskSet) -> dict[str, str]:
    """Head name -> newest checkpoint of its single-task run under ``init_from``, verified.

    Raises:
        ValueError: A multi-domain task set (one head: nothing per task to start from), or a
            single-task run whose backbone differs from ``model``'s.
        CheckpointError: A run without a checkpoint, or a corrupt one.
    """
    root = cfg.model.interrogate.init_from
    if taskset.multi_domain:
        raise ValueError(
            "model.interrogate.init_from needs a multi-task benchmark: a multi-domain task set "
            "has one head, so there are no per-task blocks to start from single-task runs"
        )
    found = {}
    for head in (h.name for h in taskset.heads):
        run = storage.join(root, f"baseline-{taskset.name}-{head}")
        candidates = storage.checkpoints(run)
        if not candidates:
            raise CheckpointError(
                f"model.interrogate.init_from={root}: no checkpoint of the single-task run "
                f"{run}. Train it first: `mtl baseline CONFIG --out TABLE "
                f"train.storage_path={root}` (or set init_from to where those runs are)"
            )
        state = _read_state(candidates[-1])
        theirs, ours = state["config"]["model"], vars(cfg.model)
        differs = [k for k in _SHAPE_KEYS if k in theirs and theirs[k] != ours[k]]
        if differs:
            raise ValueError(
                f"model.interrogate.init_from: {candidates[-1]} was trained with "
                f"{ {k: theirs[k] for k in differs} } but this model has "
                f"{ {k: ours[k] for k in differs} }; use single-task runs of the same backbone"
            )
        found[head] = candidates[-1]
    return found


def load_single_task(model, checkpoints: dict[str, str]) -> None:
    """Task blocks, neck and head of every task from its single-task checkpoint."""
    weights = {}
    for head, checkpoint in checkpoints.items():
        with storage.local_copy(str(checkpoint)) as local:
            weights[head] = consolidated_weights(local)
    load_single_task_weights(model, weights, {head: str(d) for head, d in checkpoints.items()})


def load_single_task_weights(
    model, weights: dict[str, dict[str, torch.Tensor]], sources: dict[str, str] | None = None
) -> None:
    """Task blocks, neck and head of every task from a single-task model's state dict
    (``HardSharing`` over that task alone): head name -> its full state dict; ``sources``
    names where each came from, for errors."""
    for head, state in weights.items():
        backbone = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
        model.load_task_blocks({head: backbone})
        prefix = f"heads.{head}."
        head_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not head_state:
            where = (sources or {}).get(head, f"the single-task weights of {head!r}")
            raise CheckpointError(f"{where} holds no weights for head {head!r}")
        model.heads[head].load_state_dict(head_state)
