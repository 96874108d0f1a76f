"""Task and task-set descriptions shared by data, models, losses and metrics.

A *task* is one prediction target (a model head with its loss and metrics). A *task set* is
what a model trains on. In a multi-task set every sample carries every label; in a
multi-domain set samples come from several domains that share one head, and losses and
metrics are split by domain (DESIGN.md §1). Both cases expose ``loss_keys``: the names that
scalarization weights, losses and the primary metrics are keyed by.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CLASSIFICATION = "classification"  # target (B,) long; output (B, K)
DENSE_CLASSIFICATION = "dense_classification"  # target (B, H, W) long; output (B, K, H, W)
DENSE_REGRESSION = "dense_regression"  # target (B, C, H, W) float; output (B, C, H, W)
TASK_KINDS = (CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION)


@dataclass(frozen=True)
class TaskSpec:
    """One model head: what it predicts and how it is scored.

    Attributes:
        name: Head name; the key of its output and of its target in a batch.
        kind: One of ``TASK_KINDS``.
        num_outputs: Classes for (dense) classification, channels for dense regression.
        metric: Primary metric name ("accuracy", "miou" or "rmse"), used for Δ_MTL.
        higher_is_better: Direction of the primary metric.
    """

    name: str
    kind: str
    num_outputs: int
    metric: str
    higher_is_better: bool

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {TASK_KINDS}")


@dataclass(frozen=True)
class TaskSet:
    """What a model is trained on.

    Attributes:
        name: Benchmark name, e.g. "multimnist" or "digits".
        heads: The model's heads, in a fixed order.
        in_channels: Input image channels.
        image_size: Input height and width (square images).
        domains: Domain names for a multi-domain set (the value of ``batch["domain"]``
            indexes this tuple); empty for a multi-task set.
    """

    name: str
    heads: tuple[TaskSpec, ...]
    in_channels: int
    image_size: int
    domains: tuple[str, ...] = ()

    @property
    def multi_domain(self) -> bool:
        return bool(self.domains)

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """Names that losses, scalarization weights and primary metrics are keyed by."""
        return self.domains if self.multi_domain else tuple(h.name for h in self.heads)

    def head(self, name: str) -> TaskSpec:
        for spec in self.heads:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.name} has no head {name!r}; heads: {[h.name for h in self.heads]}")

    def primary(self, key: str) -> tuple[str, bool]:
        """(metric key such as ``"left/accuracy"``, higher_is_better) for one loss key."""
        spec = self.heads[0] if self.multi_domain else self.head(key)
        return f"{key}/{spec.metric}", spec.higher_is_better

    def subset(self, names: list[str] | tuple[str, ...]) -> TaskSet:
        """The same benchmark restricted to some tasks (multi-task) or domains (multi-domain)."""
        available = self.loss_keys
        unknown = [n for n in names if n not in available]
        if unknown or not names:
            raise ValueError(
                f"tasks.names={list(names)} does not fit benchmark {self.name!r}: "
                f"choose a non-empty subset of {list(available)}"
            )
        if self.multi_domain:
            return replace(self, domains=tuple(n for n in available if n in names))
        return replace(self, heads=tuple(h for h in self.heads if h.name in names))
