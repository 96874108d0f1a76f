"""Training guards: a run whose loss or gradients go non-finite, or diverge, stops there.

The worker that trips a guard does not raise (Ray Train would restart the group from the
last checkpoint and diverge again); it reports ``STOPPED_KEY`` with the reason and returns,
and the driver turns that report into ``TrainingStopped`` (``check_result``).
"""

from __future__ import annotations

from typing import Any

STOPPED_KEY = "guard/stopped"  # report key: why the workers stopped early ("" = they did not)


class TrainingStopped(RuntimeError):
    """A guard stopped training (non-finite values or divergence); no model is shipped."""


def check_result(metrics: dict[str, Any] | None) -> None:
    """Raise ``TrainingStopped`` when the job's last report says a guard stopped it."""
    reason = (metrics or {}).get(STOPPED_KEY) or ""
    if reason:
        raise TrainingStopped(str(reason))


class RunFailed(RuntimeError):
    """A training job failed after it started (workers, registration, export, tracking).

    Raised by the driver (``mtl.train.launch.fit``) once the MLflow run is marked FAILED with
    its reason; the message names the run, the cause and how to continue it (``--resume``).
    The CLI prints it in one line and exits 1 (bad input exits 2).
    """
