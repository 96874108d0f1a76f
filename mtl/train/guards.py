"""Training guards: a run whose loss or gradients go non-finite, or diverge, stops there.

The worker that trips a guard does not raise (Ray Train would restart the group from the
last checkpoint and diverge again); every rank sees the same all-reduced losses, so all stop
at the same step without a checkpoint. Rank 0 writes ``STOP_FILE`` into the run's storage
folder and every rank reports ``STOPPED_KEY`` with the reason; the driver turns that into
``TrainingStopped`` (``check_result``). The file is what the driver reads under Ray Train V2:
there a report without a checkpoint never reaches ``Result.metrics`` (those are the latest
checkpoint's).

``Guard`` is pure Python over host floats: the loop hands it each optimizer step's losses
(one host sync per step), and it answers with the reason to stop, or "".
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

STOPPED_KEY = "guard/stopped"  # report key: why the workers stopped early ("" = they did not)
STOP_FILE = "guard_stopped.json"  # in the Ray run's folder (``Result.path``): the same reason
SHOWN_LOSSES = 8  # losses named in a reason; the non-finite ones come first
NONFINITE_ADVICE = "lower train.lr or set deepspeed.gradient_clipping"
FP16_ADVICE = " (or use bf16: fp16 overflows at 65504)"
DIVERGENCE_ADVICE = (
    "lower train.lr or set deepspeed.gradient_clipping; train.divergence_factor=0 turns this "
    "guard off"
)


class TrainingStopped(RuntimeError):
    """A guard stopped training (non-finite values or divergence); no model is shipped."""


class RunFailed(RuntimeError):
    """A training job failed after it started (workers, registration, export, tracking).

    Raised by the driver (``mtl.train.launch.fit``) once the MLflow run is marked FAILED with
    its reason; the message names the run, the cause and how to continue it (``--resume``).
    The CLI prints it in one line and exits 1 (bad input exits 2).
    """


@dataclass
class StepValues:
    """One optimizer step as the guard sees it, averaged over micro-batches and ranks."""

    step: int
    loss: float  # the scalarized total
    losses: dict[str, float]  # per loss key (``aux/<name>`` included)
    grad_norm: float | None = None  # None: the engine computed none this step
    skipped: bool = False  # fp16's dynamic loss scaling skipped this step (overflow)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _named(losses: Mapping[str, float]) -> str:
    """``key=value`` for the losses, the non-finite ones first, at most ``SHOWN_LOSSES``."""
    order = sorted(losses, key=lambda k: math.isfinite(losses[k]))  # stable: task order kept
    shown = ", ".join(f"{k}={_fmt(losses[k])}" for k in order[:SHOWN_LOSSES])
    more = len(order) - SHOWN_LOSSES
    return shown + (f", +{more} finite" if more > 0 else "")


class Guard:
    """Stops on a non-finite loss or gradient norm, and on a loss far above its early level.

    The early level (reference) is the mean total loss of the first ``window`` counted
    steps; while it fills, each step is compared with the steps before it, so a blow-up
    inside the first window is caught too. The running loss is the mean over the last
    ``window`` counted steps. Steps fp16 skipped (overflow) are neither a stop nor counted.

    Args:
        factor: Stop when the running loss exceeds ``factor`` x the reference; 0 = off.
        window: Steps in the reference and in the running mean.
        fp16: Dynamic loss scaling is on: a skipped step is the scaler at work, not a stop.
    """

    def __init__(self, factor: float, window: int, fp16: bool = False) -> None:
        if factor < 0 or not math.isfinite(factor):
            raise ValueError(f"train.divergence_factor={factor}: use a finite value >= 0")
        if window < 1:
            raise ValueError(f"train.divergence_window={window}: use at least 1")
        self.factor, self.window, self.fp16 = factor, window, fp16
        self.reference_sum = 0.0
        self.reference_steps = 0
        self.recent: deque[float] = deque(maxlen=window)
        self.skipped = 0  # fp16 steps skipped so far (reported, never a stop)

    @property
    def reference(self) -> float | None:
        return self.reference_sum / self.reference_steps if self.reference_steps else None

    def check(self, v: StepValues) -> str:
        """The reason to stop at ``v.step`` ("" to go on); updates the running state."""
        if self.fp16 and v.skipped:
            self.skipped += 1
            return ""
        values = [v.loss, *v.losses.values()]
        norm_bad = v.grad_norm is not None and not math.isfinite(v.grad_norm)
        losses_bad = not all(math.isfinite(x) for x in values)
        if not (losses_bad or norm_bad):
            return self._diverged(v)
        named = f"total={_fmt(v.loss)}, {_named(v.losses)}"
        norm = "" if v.grad_norm is None else f"gradient norm {_fmt(v.grad_norm)}"
        if losses_bad:
            what = f"non-finite loss ({named})" + (f", {norm}" if norm else "")
        else:
            what = f"non-finite {norm} (losses {named})"
        advice = NONFINITE_ADVICE + (FP16_ADVICE if self.fp16 else "")
        return f"step {v.step}: {what}; {advice}"

    def _diverged(self, v: StepValues) -> str:
        reference = self.reference  # of the steps before this one while it fills
        self.recent.append(v.loss)
        if self.reference_steps < self.window:
            self.reference_sum += v.loss
            self.reference_steps += 1
        if not self.factor or reference is None or reference <= 0:
            return ""  # a reference of 0 or below has no "far above" (no such loss here)
        running = sum(self.recent) / len(self.recent)
        if running <= self.factor * reference:
            return ""
        return (
            f"step {v.step}: the loss diverged: mean {_fmt(running)} over the last "
            f"{len(self.recent)} steps > train.divergence_factor={self.factor:g} x its early "
            f"level {_fmt(reference)} (this step total={_fmt(v.loss)}, {_named(v.losses)}); "
            f"{DIVERGENCE_ADVICE}"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resume does not reset the reference."""
        return {
            "reference_sum": self.reference_sum,
            "reference_steps": self.reference_steps,
            "recent": list(self.recent),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; a checkpoint written before the guard has none (fresh)."""
        self.reference_sum = float(state.get("reference_sum", 0.0))
        self.reference_steps = min(int(state.get("reference_steps", 0)), self.window)
        self.recent = deque((float(x) for x in state.get("recent", ())), maxlen=self.window)
        self.skipped = int(state.get("skipped", 0))


class StepMonitor:
    """Feeds a ``Guard`` once per optimizer step with one host sync.

    Micro-batch losses are summed on device; at the step's end they are averaged, joined by
    the gradient norm, all-reduced (so every rank decides on the same numbers and all stop
    together) and moved to the host in one ``tolist``.

    Args:
        guard: The decisions.
        world: Ranks in the default process group.
        own_norm: The engine computes no gradient norm (plain torch optimizer): the loop
            hands one in through ``record_norm`` before ``step()`` clears the gradients.
    """

    def __init__(self, guard: Guard, world: int = 1, own_norm: bool = False) -> None:
        self.guard, self.world, self.own_norm = guard, world, own_norm
        self.keys: tuple[str, ...] = ()  # loss keys, fixed by the first micro-batch
        self.sums: torch.Tensor | None = None
        self.micros = 0
        self.norm: torch.Tensor | None = None
        self.skipped_steps = 0  # the engine's counter at the last step

    def add(self, loss: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> None:
        """One micro-batch's total and per-key losses (still on device)."""
        self.keys = self.keys or tuple(losses)
        values = torch.stack(
            [loss.detach().float()] + [losses[k].detach().float() for k in self.keys]
        )
        self.sums = values if self.sums is None else self.sums + values
        self.micros += 1

    def record_norm(self, norm: torch.Tensor) -> None:
        self.norm = norm

    def end_step(self, step: int, engine_norm: Any = None, skipped_steps: int = 0) -> str:
        """The reason to stop after optimizer step ``step`` ("" to go on).

        Args:
            engine_norm: The engine's global gradient norm (float, tensor or None).
            skipped_steps: The engine's count of steps fp16's loss scaler skipped.
        """
        import torch.distributed as dist

        if self.sums is None:
            raise RuntimeError("end_step before any add(): no micro-batch in this step")
        values = self.sums / self.micros
        norm = self.norm if self.own_norm else engine_norm
        self.sums, self.micros, self.norm = None, 0, None
        has_norm = norm is not None
        norm = torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32)
        values = torch.cat([values, norm.to(values.device).reshape(1)])
        if self.world > 1:  # NaN on any rank makes the sum NaN on every rank
            dist.all_reduce(values)
            values = values / self.world
        host = values.tolist()  # the step's one host sync
        skipped = skipped_steps > self.skipped_steps
        self.skipped_steps = skipped_steps
        return self.guard.check(
            StepValues(
                step=step,
                loss=host[0],
                losses=dict(zip(self.keys, host[1:-1], strict=True)),
                grad_norm=host[-1] if has_norm else None,
                skipped=skipped,
            )
        )


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding a NaN or inf (empty: all finite).

    One host sync for the whole module. Run before a checkpoint is written and after one is
    loaded, so non-finite weights are never saved nor trained on.
    """
    named = [
        (n, t)
        for n, t in (*module.named_parameters(), *module.named_buffers())
        if t.is_floating_point() and t.numel()
    ]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).tolist()
    return [n for (n, _), ok in zip(named, flags, strict=True) if not ok]


def nonfinite_anywhere(module: nn.Module, world: int = 1) -> list[str]:
    """``nonfinite_parameters`` agreed over every rank: non-empty on all ranks when any
    rank has a non-finite weight (expert-parallel ranks hold different experts)."""
    import torch.distributed as dist

    bad = nonfinite_parameters(module)
    if world > 1:
        device = next(module.parameters()).device
        count = torch.tensor([float(len(bad))], device=device)
        dist.all_reduce(count)
        if count.item() and not bad:
            bad = ["(on another rank)"]
    return bad


def weights_reason(step: int, names: Iterable[str], when: str) -> str:
    """The reason to stop when weights are non-finite ``when`` (e.g. "before the checkpoint")."""
    names = list(names)
    shown = ", ".join(names[:4]) + (f" +{len(names) - 4} more" if len(names) > 4 else "")
    return f"step {step}: non-finite weights {when} ({shown}); {NONFINITE_ADVICE}"


# --- the stop record: written by rank 0, read by the driver ---


def _filesystem(path: str) -> tuple[Any, str]:
    from mtl.storage import resolve  # a local folder or an s3:// URI

    return resolve(path)


def write_stop(run_path: str, record: Mapping[str, Any]) -> None:
    """Write the stop record (``STOPPED_KEY`` = the reason) into the run's folder."""
    fs, base = _filesystem(run_path)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(f"{base}/{STOP_FILE}") as out:
        out.write(json.dumps(dict(record), indent=2, default=str).encode())


def clear_stop(run_path: str) -> None:
    """Remove a stop record left by an earlier attempt (a resumed run starts clean)."""
    import pyarrow.fs

    fs, base = _filesystem(run_path)
    if fs.get_file_info(f"{base}/{STOP_FILE}").type == pyarrow.fs.FileType.File:
        fs.delete_file(f"{base}/{STOP_FILE}")


def read_stop(run_path: str, filesystem: Any = None) -> dict[str, Any]:
    """The stop record in ``run_path`` ({} when training was not stopped)."""
    import pyarrow.fs

    fs, base = (filesystem, run_path) if filesystem is not None else _filesystem(run_path)
    if fs.get_file_info(f"{base}/{STOP_FILE}").type != pyarrow.fs.FileType.File:
        return {}
    with fs.open_input_stream(f"{base}/{STOP_FILE}") as f:
        return json.loads(f.read().decode())


def check_result(result: Any) -> None:
    """Raise ``TrainingStopped`` when a guard stopped the job.

    Args:
        result: The ``Result`` of ``trainer.fit()`` (its folder holds ``STOP_FILE``, which
            Ray Train V2 needs), or its ``metrics`` (the last report: enough under V1).
    """
    if isinstance(result, Mapping) or result is None:
        metrics, record = result or {}, {}
    else:
        metrics = getattr(result, "metrics", None) or {}
        path = getattr(result, "path", None)
        record = read_stop(str(path), getattr(result, "filesystem", None)) if path else {}
    reason = record.get(STOPPED_KEY) or metrics.get(STOPPED_KEY) or ""
    if reason:
        raise TrainingStopped(str(reason))
