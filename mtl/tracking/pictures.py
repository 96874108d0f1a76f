"""Pictures of a learned structure, attached to registry entries (DESIGN.md §5).

Both functions build a bare ``matplotlib.figure.Figure`` on an Agg canvas: no pyplot, so no
global figure registry to leak from a long-running driver and no display needed.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def gate_pattern_figure(pattern: dict[str, list[float]], title: str) -> Figure:
    """Heatmap of an InterroGate gate pattern: rows tasks, columns layers.

    Args:
        pattern: Task name -> per layer, the fraction of task-specific channels in [0, 1]
            (``InterroGate.gate_pattern()``); every task must have the same number of layers.
        title: Figure title, e.g. the registered model name and version.

    Raises:
        ValueError: Empty or ragged pattern, or a value outside [0, 1].
    """
    tasks = list(pattern)
    depths = {len(v) for v in pattern.values()}
    if not tasks or len(depths) != 1 or 0 in depths:
        raise ValueError(f"pattern needs the same non-zero number of layers per task: {pattern}")
    values = np.array([pattern[t] for t in tasks], dtype=float)  # (T, L)
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"pattern values must be fractions in [0, 1]: {pattern}")
    T, L = values.shape
    fig = Figure(figsize=(1.2 + 0.7 * L, 1.0 + 0.5 * T), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (row, col), value in np.ndenumerate(values):
        # Dark text on the bright end of viridis, light text elsewhere, so every label reads.
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="black" if value > 0.6 else "white")  # fmt: skip
    ax.set_xticks(range(L), [str(layer) for layer in range(L)])
    ax.set_yticks(range(T), tasks)
    ax.set_xlabel("layer")
    fig.suptitle(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="task-specific fraction")
    return fig


def routes_figure(routes: dict[str, list[list[int]]], num_experts: int, title: str) -> Figure:
    """Expert routes of a mixture-of-experts model: one panel per task, layers x experts.

    Args:
        routes: Task name -> per layer, the indices of the experts that task uses.
        num_experts: Experts per layer.
        title: Figure title.

    Raises:
        ValueError: Empty routes, a task with no layers, or an expert index out of range.
    """
    if not routes or num_experts < 1 or any(not layers for layers in routes.values()):
        raise ValueError(f"routes need >= 1 task with >= 1 layer and num_experts >= 1: {routes}")
    depth = max(len(layers) for layers in routes.values())
    size = (1.0 + 0.35 * num_experts * len(routes), 1.2 + 0.35 * depth)
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(routes), squeeze=False, sharey=True)[0]
    for ax, (task, layers) in zip(axes, routes.items(), strict=True):
        used = np.zeros((depth, num_experts))  # (L, E); 1 = the task routes through it
        for layer, experts in enumerate(layers):
            bad = [e for e in experts if not 0 <= e < num_experts]
            if bad:
                raise ValueError(
                    f"task {task!r} layer {layer}: experts {bad} not in [0, {num_experts})"
                )
            used[layer, list(experts)] = 1.0
        ax.imshow(used, cmap="Greys", vmin=0.0, vmax=1.0, aspect="equal")
        ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
        ax.set_yticks(range(depth), [str(layer) for layer in range(depth)])
        ax.set_xlabel("expert")
        ax.set_title(task)
    axes[0].set_ylabel("layer")
    fig.suptitle(title)
    return fig
