"""Helpers shared by the Triton kernels (STDHA in ``stdha.py``, the fused adapter GEMM in
``adapter.py``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import settings


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return settings.triton_interpret()


def upcast_dots(dtype: torch.dtype) -> bool:
    """The ``UPCAST`` flag of :func:`dot` for operands of ``dtype``.

    The interpreter stores bf16 as uint16 and multiplies those integers with numpy, so its bf16
    dots are garbage; fp16 is fine (numpy upcasts it to the fp32 accumulator).
    """
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``; with ``UPCAST`` (interpreter, bf16 only) on fp32 copies of the operands.
    They are already bf16-rounded, so the result matches the GPU's up to accumulation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)
