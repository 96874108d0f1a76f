"""FLOPs and parameter counts, for InterroGate's compute budget and for registry tags.

FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts (matrix multiplies and
convolutions, 2 per multiply-accumulate; normalisations, activations and element-wise ops
are free). It has no formula for the CPU attention kernel, so one is added here: without it
a ViT block on CPU would be counted without its attention matmuls, and its FLOPs (and so its
weight in the budget) would depend on the device it was built on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(
    query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], *args: Any, **kwargs: Any
) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (arguments are shapes)."""
    del args, kwargs
    return sdpa_flop_count(query, key, value)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def _counted(model: nn.Module, *inputs: Any) -> FlopCounterMode:
    """Run ``model(*inputs)`` once under a FLOP counter, in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as m:
            model(*inputs)
    finally:
        model.train(was_training)
    return m


def count_flops(model: nn.Module, *inputs: Any) -> int:
    """FLOPs of one forward pass of ``model(*inputs)``, in eval mode and without gradients.

    Eval mode because a train-mode BatchNorm would update its running statistics as a side
    effect of being counted; the module's mode is restored afterwards.

    Args:
        model: Any module.
        *inputs: Its positional inputs, e.g. one image batch ``(B, C, H, W)``.

    Returns:
        Total FLOPs for the whole batch.
    """
    return _counted(model, *inputs).get_total_flops()


def count_flops_by_module(model: nn.Module, *inputs: Any) -> dict[str, int]:
    """FLOPs of one forward pass per submodule, keyed by its path inside ``model`` (``""`` is
    the whole model, ``"conv2"`` or ``"mlp.2"`` a child); same rules as ``count_flops``."""
    m = _counted(model, *inputs)
    root = type(model).__name__
    out = {}
    for name, counts in m.get_flop_counts().items():
        if name == root or name.startswith(root + "."):
            out[name.removeprefix(root).removeprefix(".")] = sum(counts.values())
    return out


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())
