"""``model.kernels``: when the models run their hot paths through the Triton kernels in kernels/.

``auto`` uses them on CUDA and the eager PyTorch code elsewhere; ``triton`` always (on the CPU
only under Triton's interpreter, ``TRITON_INTERPRET=1``, fp32); ``torch`` never. The kernels'
own references (``kernels/<name>.py``, ``<name>_ref``) compute what the eager code computes.
"""

from __future__ import annotations

import os

from torch import Tensor

KERNELS = ("auto", "torch", "triton")


def use_triton(kernels: str, x: Tensor) -> bool:
    """Whether a forward on ``x`` runs the Triton kernels under ``model.kernels=kernels``.

    Raises:
        ValueError: ``triton`` on a CPU tensor without Triton's interpreter.
    """
    if kernels == "torch" or (kernels == "auto" and not x.is_cuda):
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "model.kernels=triton on the CPU needs Triton's interpreter (TRITON_INTERPRET=1 "
            "before triton is imported; fp32 only): set model.kernels=auto or torch"
        )
    return True
