"""LibMTL's weighting methods as the reference, run on a given Jacobian or given losses.

LibMTL 1.1.5's package ``__init__`` imports its trainer and models, which fail on
torchvision 0.29; its ``weighting`` subpackage needs only torch, numpy and scipy. So a bare
``LibMTL`` module whose ``__path__`` is the installed package stands in for the package,
and ``LibMTL.weighting.<Name>`` imports as usual. LibMTL is in the dev extra: without it
the reference tests skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch


class LibMTL:
    """Builds LibMTL weighting objects outside LibMTL's trainer.

    A LibMTL weighting is a mixin of the model: it reads ``task_num``, ``device``,
    ``rep_grad`` and the model's ``get_share_params`` / ``zero_grad_share_params``. Here the
    shared parameter is one vector θ and task k's loss is ``J[k] · θ``, so the per-task
    gradients LibMTL computes by its own backward passes are exactly the rows of ``J``, and
    what it writes into ``θ.grad`` is its combined gradient.
    """

    def module(self, name: str) -> types.ModuleType:
        return importlib.import_module(f"LibMTL.weighting.{name}")

    def weighting(self, name: str, task_num: int, shared: list[torch.Tensor] | None = None):
        base = getattr(self.module(name), name)
        params = shared if shared is not None else []

        class Harness(base):
            def get_share_params(self):
                return params

            def zero_grad_share_params(self):
                for p in params:
                    if p.grad is not None:
                        p.grad.zero_()

        method = Harness()
        method.task_num, method.device, method.rep_grad = task_num, torch.device("cpu"), False
        return method

    def on_jacobian(self, name: str, jacobian: torch.Tensor, **kwargs: Any):
        """(what LibMTL's backward returns, its combined gradient) for per-task gradients
        ``jacobian`` (T, d). LibMTL computes in float32."""
        theta = torch.nn.Parameter(torch.zeros(jacobian.shape[1]))
        method = self.weighting(name, jacobian.shape[0], [theta])
        if hasattr(method, "init_param"):
            method.init_param()
        losses = torch.stack([(row.float() * theta).sum() for row in jacobian])
        returned = method.backward(losses, **kwargs)
        return returned, theta.grad.detach().double()


@pytest.fixture(scope="session")
def libmtl() -> Iterator[LibMTL]:
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("LibMTL (the dev extra) is not installed")
    added = "LibMTL" not in sys.modules
    if added:
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    yield LibMTL()
    if added:  # leave no half-imported LibMTL behind for other tests
        for name in [m for m in sys.modules if m == "LibMTL" or m.startswith("LibMTL.")]:
            del sys.modules[name]
