"""Registers the fused CPU STDHA kernel of the native extension ``zeroi2v._C`` (C++ sources in
``csrc/``) as the STDHA backend ``"cpu"``; no kernel code lives here.

``torch.ops.zeroi2v.stdha_fwd_cpu(q, k, v, offsets, num_frames, scale)`` (csrc/stdha_cpu.cpp) runs
STDHA as one attention pass: each (frame, head, query block) task reads K/V of its source frame in
place, so no shifted copy of K/V is made, and the output comes out in the layout timm's attention
reshapes for free. float32, inference only (no backward); ``backend="auto"`` picks it for CPU
tensors without autograd, and STDHA then costs what ``F.scaled_dot_product_attention`` costs
(paired benchmarks: ``benchmarks/test_bench_core.py``).

Importing this module raises ImportError when the extension is not built, or when libtorch
exports no BLAS ``sgemm_`` for the kernel; the plugin loader then skips it and the ``"torch"``
backend runs.
"""
from __future__ import annotations

import torch

from .._native import require
from ..ops.registry import Capabilities, register_backend

_C = require("the 'cpu' STDHA backend")  # importing it registers torch.ops.zeroi2v.*
if not hasattr(_C, "stdha_cpu_available") or not _C.stdha_cpu_available():
    raise ImportError("zeroi2v._C has no usable fused CPU kernel (no BLAS sgemm_ in libtorch)")

def stdha_cpu(q, k, v, num_frames: int, offsets: tuple, scale: float) -> torch.Tensor:
    """The registered backend function (inputs validated and checked against
    :data:`CAPABILITIES` by ``zeroi2v.ops``)."""
    return torch.ops.zeroi2v.stdha_fwd_cpu(q, k, v, [int(o) for o in offsets], int(num_frames),
                                            float(scale))


#: CPU float32 inference with a contiguous last dimension.
CAPABILITIES = Capabilities(devices=("cpu",), dtypes=(torch.float32,), backward=False,
                            needs_contiguous_last_dim=True)

register_backend("cpu", stdha_cpu, caps=CAPABILITIES)
