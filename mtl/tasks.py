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
BINARY = "binary"  # one binary attribute: target (B,) float in {0, 1}; output (B,) logits
DEPTH = "depth"  # target (B, 1, H, W) float, 0 = no measurement; output (B, 1, H, W)
NORMALS = "normals"  # target (B, 3, H, W) unit vectors, 0 = unlabelled; output (B, 3, H, W)
SALIENCY = "saliency"  # target (B, 1, H, W) float in {0, 1}; output (B, 1, H, W) logits
TASK_KINDS = (
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    BINARY,
    DEPTH,
    NORMALS,
    SALIENCY,
)
# Kinds whose target is a per-pixel map that must move with the image under augmentation.
DENSE_KINDS = (DENSE_CLASSIFICATION, DENSE_REGRESSION, DEPTH, NORMALS, SALIENCY)


@dataclass(frozen=True)
class TaskSpec:
    """One model head: what it predicts and how it is scored.

    Attributes:
        name: Head name; the key of its output and of its target in a batch.
        kind: One of ``TASK_KINDS``.
        num_outputs: Classes for (dense) classification, channels for dense regression.
        metric: Primary metric name, used for Δ_MTL: "accuracy" (classification, binary),
            "miou", "rmse", "abs_err" (depth), "mean_angle" (normals) or "max_f" (saliency).
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
        image_size: Input ``(height, width)``.
        domains: Domain names for a multi-domain set (the value of ``batch["domain"]``
            indexes this tuple); empty for a multi-task set.
    """

    name: str
    heads: tuple[TaskSpec, ...]
    in_channels: int
    image_size: tuple[int, int]
    domains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, int):  # a square size given as one number
            object.__setattr__(self, "image_size", (size, size))
        elif len(size) != 2 or min(size) < 1:
            raise ValueError(f"task set {self.name!r}: image_size {size} is not (height, width)")
        else:
            object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))

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
