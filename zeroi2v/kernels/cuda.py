"""Python side of the CUDA extension ``zeroi2v._C``: registers the STDHA backend ``"cuda"``.

The extension (sources in ``csrc/``) holds a flash-attention style CUDA C++ forward kernel
(tensor cores through ``mma.sync``, fp16/bf16, head_dim 64 and 128, fp32 online softmax). The
temporal shift of SPEC §2 is done by pointer arithmetic when K/V tiles are loaded; strided views
of a fused qkv projection are read in place. It is exposed as the dispatcher op

    torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, offsets: list[int], num_frames: int, scale: float)

(CUDA and Meta kernels: usable from torch.compile, TorchScript and libtorch). Inference only.

Importing this module raises ImportError when the extension was not built with CUDA (no CUDA
toolkit at install time, or ``ZEROI2V_NO_CUDA_EXT=1``: then ``zeroi2v._C`` holds only the CPU ops,
or is absent); ``stdha_attention``'s plugin loader then skips it.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .._native import require
from ..ops.stdha import register_backend

_C = require("the 'cuda' STDHA backend")  # importing it registers torch.ops.zeroi2v.*
if not getattr(_C, "WITH_CUDA", False):
    raise ImportError(
        "zeroi2v._C was built without CUDA (CPU ops only): reinstall with a CUDA toolkit and a CUDA "
        "build of torch (pip install --no-build-isolation -e .) to get the 'cuda' STDHA backend"
    )

# Priority of "cuda" for stdha_attention(backend="auto"); the Triton backend registers 10, so
# "auto" prefers Triton. Raise this above 10 only once benchmarks/test_bench_stdha_cuda.py has
# measured the CUDA kernel faster on the target GPU (no GPU measurement exists yet).
CUDA_BACKEND_PRIORITY = 5

HEAD_DIMS: tuple[int, ...] = tuple(_C.HEAD_DIMS)
MAX_HEADS: int = int(_C.MAX_HEADS)
DTYPES = (torch.float16, torch.bfloat16)


@lru_cache(maxsize=None)
def _capability_ok(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # mma.sync bf16, cp.async


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, needs_grad: bool) -> bool:
    """CUDA tensors of sm_80+, fp16/bf16, a compiled head_dim, no autograd (inference only)."""
    if needs_grad:
        return False
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return False
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    d = q.shape[-1]
    if d not in HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d:
        return False
    if q.shape[1] > MAX_HEADS:
        return False
    return _capability_ok(q.device.index if q.device.index is not None else torch.cuda.current_device())


def stdha_cuda(q, k, v, num_frames: int, offsets: tuple, scale: float) -> torch.Tensor:
    """The registered backend function (validated inputs, see ``zeroi2v.ops.stdha``; registered
    inference-only, so the dispatch refuses inputs that need a gradient)."""
    return torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, [int(o) for o in offsets], int(num_frames),
                                             float(scale))


register_backend("cuda", stdha_cuda, supports=supports, priority=CUDA_BACKEND_PRIORITY,
                 inference_only=True)
