"""Hard parameter sharing: one backbone for every task, one head per task.

The single-task setting is the same model over ``taskset.subset([task])``: one head on the
same backbone, which is how the single-task baselines of Δ_MTL are trained.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtl.tasks import TaskSet


class HardSharing(nn.Module):
    """A shared backbone feeding every head (Caruana, 1997).

    Args:
        backbone: Has ``forward_features(x) -> (B, C, h, w)`` and ``out_channels``.
        heads: One head per ``taskset.heads`` entry, keyed by head name; each is called as
            ``head(features, size)``.
        taskset: The tasks the heads predict; the heads' names must match it exactly.
    """

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict, taskset: TaskSet) -> None:
        super().__init__()
        expected = [h.name for h in taskset.heads]
        if sorted(heads.keys()) != sorted(expected):
            raise ValueError(f"heads {list(heads.keys())} do not match the task set's {expected}")
        self.backbone = backbone
        self.heads = heads
        self.taskset = taskset
        self._order = expected  # outputs follow the task set's head order

    def forward_features(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        """Shared features ``(B, C, h, w)``; ``domain`` is ignored by hard sharing."""
        del domain
        return self.backbone.forward_features(x)

    def forward_head(self, features: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """Every head on the shared features; ``size`` is the input's ``(H, W)``."""
        return {name: self.heads[name](features, size) for name in self._order}

    def forward(self, x: Tensor, domain: Tensor | None = None) -> dict[str, Tensor]:
        """Predict every head.

        Args:
            x: Images ``(B, C, H, W)``.
            domain: Domain index per sample ``(B,)``; unused here, accepted so that every
                model in ``MODELS`` has the same signature.

        Returns:
            Head name -> output (see ``mtl.tasks`` for shapes per kind).
        """
        size = (x.shape[-2], x.shape[-1])
        return self.forward_head(self.forward_features(x, domain), size)
