"""Triton STDHA as an op (docs/method.md §2): ``torch.library`` custom ops over the launchers, one
``autograd.Function`` per entry point, and the ``"triton"`` backend of
:func:`zeroi2v.ops.stdha.stdha_attention`.

Where the rest lives: the forward kernel in :mod:`zeroi2v.kernels.stdha_fwd`, the backward kernels
in :mod:`zeroi2v.kernels.stdha_bwd`, block sizes and launchers in
:mod:`zeroi2v.kernels.stdha_launch`.

Two entry points, both differentiable, eager and under ``torch.compile``:

* :func:`stdha_triton` — q, k, v ``(B*T, H, N, D)`` (e.g. views of a qkv projection). The output
  is ``(B*T, H, N, D)`` stored as ``(B*T, N, H, D)``, so the model's transpose + reshape back to
  ``(B*T, N, H*D)`` is a view. Gradients: separate dq, dk, dv.
* :func:`stdha_triton_packed` — the packed ``(B*T, N, 3, H, D)`` qkv itself; output
  ``(B*T, N, H, D)``; the backward writes dQ, dK and dV into one ``(B*T, N, 3, H, D)`` gradient.
  With it nothing is copied between the qkv and the output projections (what ``STDHAttention``
  uses through :func:`zeroi2v.ops.stdha.stdha_attention_packed`).

One autograd path each (as flash-attention does it): an ``autograd.Function`` whose forward and
backward call the custom ops ``zeroi2v::stdha_triton[_packed]_fwd`` / ``..._bwd``. The ops carry
fake implementations with the real output strides, so ``torch.compile`` traces them as opaque
nodes of the forward and backward graphs; eagerly they run the launchers. The ops themselves have
no autograd formula: differentiate through the Functions.

Importing this module registers the ``"triton"`` backend (its rank: ``PRIORITIES`` in
:mod:`zeroi2v.ops.registry`; ``"auto"`` picks it for CUDA fp16/bf16 inputs only). Without Triton
the import raises ``ImportError``, which the registry reads as "backend absent". CPU tensors work
through the Triton interpreter (``TRITON_INTERPRET=1``), which is how CI tests the kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

try:
    import triton  # noqa: F401 - an unusable Triton must surface as ImportError here
except Exception as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"zeroi2v.kernels.stdha needs Triton: {exc}") from exc

from ..offsets import HeadOffsets, resolve_offsets
from ..ops.registry import Capabilities, register_backend
from ._triton import interpreting
from .stdha_launch import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    output_buffer,
    stdha_triton_backward,
    stdha_triton_forward,
    stdha_triton_packed_backward,
    stdha_triton_packed_forward,
)

__all__ = ["stdha_triton", "stdha_triton_packed", "STDHATritonFunction",
           "STDHATritonPackedFunction", "CAPABILITIES"]

# dtypes / head dims for which ``backend="auto"`` picks this backend on CUDA.
AUTO_DTYPES = (torch.float16, torch.bfloat16)
AUTO_HEAD_DIMS = (32, 64, 80, 96, 128)


# ----------------------------------------------------------------------------- torch.library ops
# Fake impls return the real strides: the unpacked forward's output is the output_buffer view.


@torch.library.custom_op("zeroi2v::stdha_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: list[int],
            num_frames: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return stdha_triton_forward(q, k, v, num_frames, offsets, scale)


@_fwd_op.register_fake
def _(q, k, v, offsets, num_frames, scale):
    bt, h, n, d = q.shape
    return output_buffer(bt, h, n, d, q), q.new_empty((bt, h, n), dtype=torch.float32)


@torch.library.custom_op("zeroi2v::stdha_triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, offsets: list[int], num_frames: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return stdha_triton_backward(do, q, k, v, out, lse, num_frames, offsets, scale)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, offsets, num_frames, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("zeroi2v::stdha_triton_packed_fwd", mutates_args=())
def _packed_fwd_op(qkv: torch.Tensor, offsets: list[int], num_frames: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return stdha_triton_packed_forward(qkv, num_frames, offsets, scale)


@_packed_fwd_op.register_fake
def _(qkv, offsets, num_frames, scale):
    bt, n, _, h, d = qkv.shape
    return qkv.new_empty((bt, n, h, d)), qkv.new_empty((bt, h, n), dtype=torch.float32)


@torch.library.custom_op("zeroi2v::stdha_triton_packed_bwd", mutates_args=())
def _packed_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, offsets: list[int], num_frames: int,
                   scale: float) -> torch.Tensor:
    return stdha_triton_packed_backward(dout, qkv, out, lse, num_frames, offsets, scale)


@_packed_bwd_op.register_fake
def _(dout, qkv, out, lse, offsets, num_frames, scale):
    return qkv.new_empty(qkv.shape)


# ----------------------------------------------------------------------------- autograd
# The ops are called through torch.ops (not the CustomOpDef objects) because that is the call
# every supported torch version's Dynamo traces as one graph node.


class STDHATritonFunction(torch.autograd.Function):
    """q, k, v ``(B*T, H, N, D)`` -> out ``(B*T, H, N, D)`` (the ``output_buffer`` view);
    separate dq, dk, dv. ``offsets`` is a list of ints."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, num_frames, scale):
        out, lse = torch.ops.zeroi2v.stdha_triton_fwd(q, k, v, offsets, num_frames, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.offsets, ctx.num_frames, ctx.scale = offsets, num_frames, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.zeroi2v.stdha_triton_bwd(dout, q, k, v, out, lse, ctx.offsets,
                                                        ctx.num_frames, ctx.scale)
        return dq, dk, dv, None, None, None


class STDHATritonPackedFunction(torch.autograd.Function):
    """qkv ``(B*T, N, 3, H, D)`` -> out ``(B*T, N, H, D)``; one packed gradient of qkv."""

    @staticmethod
    def forward(ctx, qkv, offsets, num_frames, scale):
        out, lse = torch.ops.zeroi2v.stdha_triton_packed_fwd(qkv, offsets, num_frames, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.offsets, ctx.num_frames, ctx.scale = offsets, num_frames, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse = ctx.saved_tensors
        dqkv = torch.ops.zeroi2v.stdha_triton_packed_bwd(dout, qkv, out, lse, ctx.offsets,
                                                         ctx.num_frames, ctx.scale)
        return dqkv, None, None, None


def stdha_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int,
                 head_offsets: HeadOffsets, scale: Optional[float] = None) -> torch.Tensor:
    """STDHA attention with the Triton kernels (differentiable, ``torch.compile``-traceable).

    ``q, k, v``: ``(B*T, H, N, D)``, possibly strided views; ``head_offsets``: ``H`` ints with
    ``|d| < num_frames``, or a layout name (:func:`zeroi2v.offsets.resolve_offsets`). Returns
    ``(B*T, H, N, D)`` in q's dtype, stored as ``(B*T, N, H, D)`` (``out.transpose(1, 2)`` is
    contiguous).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    offsets = list(resolve_offsets(head_offsets, q.shape[1], num_frames))
    return STDHATritonFunction.apply(q, k, v, offsets, int(num_frames), float(scale))


def stdha_triton_packed(qkv: torch.Tensor, num_frames: int, head_offsets: HeadOffsets,
                        scale: Optional[float] = None) -> torch.Tensor:
    """:func:`stdha_triton` on a packed ``(B*T, N, 3, H, D)`` qkv (the qkv projection's output,
    reshaped). Returns a contiguous ``(B*T, N, H, D)`` output; its backward writes one packed
    ``(B*T, N, 3, H, D)`` gradient. Nothing is copied between the qkv projection and the output
    projection, forward or backward, eager or compiled."""
    if scale is None:
        scale = 1.0 / math.sqrt(qkv.shape[-1])
    offsets = list(resolve_offsets(head_offsets, qkv.shape[3], num_frames))
    return STDHATritonPackedFunction.apply(qkv, offsets, int(num_frames), float(scale))


# ----------------------------------------------------------------------------- the backend
#: CUDA tensors (CPU ones only through the interpreter, by name), fp16/bf16/fp32 up to head_dim
#: 128, forward and backward; "auto" picks it for CUDA fp16/bf16 and the common head dims.
CAPABILITIES = Capabilities(devices=("cuda", "cpu"), dtypes=SUPPORTED_DTYPES,
                            max_head_dim=MAX_HEAD_DIM, auto_devices=("cuda",),
                            auto_dtypes=AUTO_DTYPES, auto_head_dims=AUTO_HEAD_DIMS)


def _interpreter_reasons(q, k, v) -> list:
    if q.is_cuda or interpreting():
        return []
    return ["CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)"]


def _backend(q, k, v, num_frames, offsets, scale):
    return stdha_triton(q, k, v, num_frames, offsets, scale)


def _packed_backend(qkv, num_frames, offsets, scale):
    return stdha_triton_packed(qkv, num_frames, offsets, scale)


register_backend("triton", _backend, caps=CAPABILITIES, packed=_packed_backend,
                 check=_interpreter_reasons)
