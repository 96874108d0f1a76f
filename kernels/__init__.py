"""Triton kernels of mtl's hot paths, one per file; none imports ``mtl``.

Each file reads top to bottom: what the kernel computes and its memory traffic, the PyTorch
reference (``<name>_ref``, also the fallback off CUDA), the ``@triton.jit`` kernels, the
launcher as an ``autograd.Function``, and a ``__main__`` benchmark. On a machine without CUDA
the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` before ``triton`` is
imported; fp32 only there).
"""
