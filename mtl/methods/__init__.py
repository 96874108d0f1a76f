"""Loss-weighting and gradient-balancing methods: the second, orthogonal axis (DESIGN.md §4.6).

``tasks.method`` picks one from ``METHODS``, a plain dict of builders; each method is one
small module citing its paper. Loss-based methods (``LOSS_METHODS``) weigh the losses and
cost one backward; gradient methods (``GRADIENT_METHODS``) weigh them from the Gramian of
the per-task gradients (``mtl.methods.gradients``), on the shared parameters or the shared
representation (``tasks.gradients``). ``Combiner`` applies a method to a model: the engine
back-propagates what it returns. Nothing here knows about Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mtl.methods.base import Method, StepInputs
from mtl.methods.combine import Combiner

# Each builder takes (tasks config, number of loss keys, seed); imports are local so a
# missing optional solver (cvxpy) only matters to the method that needs it.


def _ew(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.ew import EqualWeighting

    return EqualWeighting(n)


def _uw(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.uw import UncertaintyWeighting

    return UncertaintyWeighting(n, lr_scale=tasks.uw.lr_scale)


def _dwa(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.dwa import DynamicWeightAverage

    return DynamicWeightAverage(n, temperature=tasks.dwa.temperature)


def _rlw(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.rlw import RandomWeighting

    return RandomWeighting(n, seed)


def _famo(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.famo import FAMO

    f = tasks.famo
    return FAMO(n, lr=f.lr, gamma=f.gamma, update=f.update)


def _pcgrad(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.pcgrad import PCGrad

    return PCGrad(seed)


def _cagrad(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.cagrad import CAGrad

    return CAGrad(c=tasks.cagrad.c, rescale=tasks.cagrad.rescale)


def _mgda_ub(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.mgda_ub import MGDAUB

    return MGDAUB()


def _imtl_g(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.imtl_g import IMTLG

    return IMTLG()


def _nash_mtl(tasks: Any, n: int, seed: int) -> Method:
    from mtl.methods.nash_mtl import NashMTL

    o = tasks.nash_mtl
    return NashMTL(n, max_norm=o.max_norm, update_every=o.update_every, optim_niter=o.optim_niter)


LOSS_METHODS: dict[str, Callable[[Any, int, int], Method]] = {
    "ew": _ew,
    "uw": _uw,
    "dwa": _dwa,
    "rlw": _rlw,
    "famo": _famo,
}
GRADIENT_METHODS: dict[str, Callable[[Any, int, int], Method]] = {
    "pcgrad": _pcgrad,
    "cagrad": _cagrad,
    "mgda_ub": _mgda_ub,
    "imtl_g": _imtl_g,
    "nash_mtl": _nash_mtl,
}
METHODS = {**LOSS_METHODS, **GRADIENT_METHODS}


def build_method(tasks: Any, num_keys: int, seed: int) -> Method:
    """The method ``tasks.method`` names, with its options from ``tasks.<method>``."""
    try:
        builder = METHODS[tasks.method]
    except KeyError:
        raise ValueError(
            f"tasks.method={tasks.method!r} is not a method; choose one of {sorted(METHODS)}"
        ) from None
    return builder(tasks, num_keys, seed)


def build_combiner(tasks: Any, taskset: Any, priors: dict[str, float], model, seed: int):
    """The combiner of ``tasks.method`` for ``model`` trained on ``taskset``."""
    method = build_method(tasks, len(taskset.loss_keys), seed)
    return Combiner(
        method,
        tasks.method,
        taskset.loss_keys,
        priors,
        model,
        gradients=tasks.gradients,
        multi_domain=taskset.multi_domain,
    )


__all__ = [
    "GRADIENT_METHODS",
    "LOSS_METHODS",
    "METHODS",
    "Combiner",
    "Method",
    "StepInputs",
    "build_combiner",
    "build_method",
]
