"""Registers the CUDA STDHA kernel of the native extension ``zeroi2v._C`` as the STDHA backend
``"cuda"``; no kernel code lives here.

The extension (sources in ``csrc/``) holds a flash-attention style CUDA C++ forward kernel
(tensor cores through ``mma.sync``, fp16/bf16, head_dim 64 and 128, fp32 online softmax). The
temporal shift of docs/method.md §2 is done by pointer arithmetic when K/V tiles are loaded; strided views
of a fused qkv projection are read in place. It is exposed as the dispatcher op

    torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, offsets: list[int], num_frames: int, scale: float)

(CUDA and Meta kernels: usable from torch.compile, TorchScript and libtorch). Inference only.

Importing this module raises ImportError when the extension was not built with CUDA (no CUDA
toolkit at install time, or ``ZEROI2V_NO_CUDA_EXT=1``: then ``zeroi2v._C`` holds only the CPU ops,
or is absent); ``stdha_attention``'s plugin loader then skips it.
"""
from __future__ import annotations

from functools import cache

import torch

from .. import settings
from .._native import require
from ..ops.registry import Capabilities, register_backend

_C = require("the 'cuda' STDHA backend")  # importing it registers torch.ops.zeroi2v.*
if not getattr(_C, "WITH_CUDA", False):
    raise ImportError(
        "zeroi2v._C was built without CUDA (CPU ops only): reinstall with a CUDA toolkit and a CUDA "
        "build of torch (pip install -e .) to get the 'cuda' STDHA backend"
    )

HEAD_DIMS: tuple[int, ...] = tuple(_C.HEAD_DIMS)
MAX_HEADS: int = int(_C.MAX_HEADS)
DTYPES = (torch.float16, torch.bfloat16)


@cache
def _capability_ok(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # mma.sync bf16, cp.async


def _gpu_generation_reasons(q, k, v) -> list:
    dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return [] if _capability_ok(dev) else ["needs a GPU of compute capability 8.0 or newer"]


def stdha_cuda(q, k, v, num_frames: int, offsets: tuple, scale: float) -> torch.Tensor:
    """The registered backend function (inputs validated and checked against
    :data:`CAPABILITIES` by ``zeroi2v.ops``)."""
    return torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, [int(o) for o in offsets], int(num_frames),
                                             float(scale))


#: CUDA (sm_80+), fp16/bf16, the compiled head dims, inference only.
CAPABILITIES = Capabilities(devices=("cuda",), dtypes=DTYPES, head_dims=HEAD_DIMS,
                            max_heads=MAX_HEADS, backward=False)

# its rank against "triton" is zeroi2v.ops.registry.PRIORITIES["cuda"]
register_backend("cuda", stdha_cuda, caps=CAPABILITIES, check=_gpu_generation_reasons)

if settings.stdha_block_m() is not None:  # ZEROI2V_STDHA_BLOCK_M, validated by zeroi2v.settings
    _C.set_block_m(settings.stdha_block_m())
