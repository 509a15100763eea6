"""Launch parameters and Python launchers of the Triton STDHA kernels (:mod:`zeroi2v.kernels.stdha_fwd`,
:mod:`zeroi2v.kernels.stdha_bwd`): argument checks, output layouts, grids and block sizes.

Any ``N`` (ragged ends cut at :data:`TAIL` = 16 tokens), any head_dim up to 128 (padded to a power
of two with masks; 32/64/128 are exact tiles, 80/96 pad to 128), fp16/bf16 (fp32 too: ``tf32``
dots unless ``torch.get_float32_matmul_precision() == "highest"``, the default, which uses IEEE
fp32 dots). Every tensor is read and written through its strides.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton

from ..offsets import HeadOffsets, resolve_offsets
from ..ops.stdha import qkv_views
from ._triton import interpreting, upcast_dots
from .stdha_bwd import stdha_bwd_dkdv_kernel, stdha_bwd_dq_kernel, stdha_bwd_pre_kernel
from .stdha_fwd import TAIL, stdha_fwd_kernel

LOG2E = 1.4426950408889634

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128

# ----------------------------------------------------------------------------- launch configs
# The one place for block sizes / warps / stages. UNTUNED: no GPU was available when these were
# written. They are flash-attention-style defaults for ViT shapes (N = 197 / 257, D = 64); B*T*H
# programs (thousands) already fill an H100. Block sizes do not decide the padding of a ragged N
# (that is TAIL's job, see tile_extent). Only checked offline: compiled for sm_80 and sm_90a with
# a real launch's alignment, no entry spills registers (tests/test_kernels_offline.py). Keyed by
# kernel, then by padded head dim (the first entry whose bound >= BLOCK_D applies); sequences
# shorter than a block shrink it (min 16, tl.dot's minimum). ``benchmarks/gpu_stdha_sweep.py``
# times alternatives on a GPU; update this table from its output.
CONFIGS: dict[str, tuple[tuple[int, dict], ...]] = {
    "fwd": (
        (64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
        (128, dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)),
    ),
    "bwd_pre": (
        (128, dict(BLOCK_M=64, num_warps=4, num_stages=1)),
    ),
    "bwd_dq": (
        (64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
        (128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)),
    ),
    "bwd_dkdv": (  # BLOCK_N: key rows owned by a program; BLOCK_M: query step of its loop
        (64, dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)),
        (128, dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)),
    ),
}

# fp32 operands (explicit backend="triton" only; "auto" leaves fp32 to the torch backend): IEEE
# dots run on FMA units and need far more registers, so blocks are capped (sm_90 ptxas reports
# heavy spills at 64x64). Applied after the table, before any block_config override.
FP32_LIMITS = dict(BLOCK_M=32, BLOCK_N=32, num_stages=2)

_OVERRIDE: dict[str, dict] = {}


@contextlib.contextmanager
def block_config(**per_kernel: dict):
    """Temporarily override launch parameters, e.g. ``block_config(fwd=dict(BLOCK_M=16))``.

    For tests (small blocks exercise multi-block loops and masked tails on small inputs) and for
    the GPU sweep script. Not thread-safe.
    """
    old = dict(_OVERRIDE)
    try:
        for kind, cfg in per_kernel.items():
            if kind not in CONFIGS:
                raise ValueError(f"unknown kernel {kind!r}; known: {sorted(CONFIGS)}")
            _OVERRIDE[kind] = dict(cfg)
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def tile_extent(n: int, block: int) -> int:
    """How many of ``n`` rows (or columns) a kernel computes with blocks of ``block``: the full
    blocks, then the rest rounded up to :data:`TAIL` (N = 197, 64-row blocks: 208, not 256)."""
    rest = n % block
    return n - rest + -(-rest // TAIL) * TAIL


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def launch_config(kind: str, block_d: int, n_rows: int, n_cols: int, fp32: bool = False) -> dict:
    """Block sizes, warps and stages of kernel ``kind`` (a key of :data:`CONFIGS`) for a padded
    head dim ``block_d`` and ``n_rows`` x ``n_cols`` scores."""
    table = CONFIGS[kind]
    cfg = dict(table[-1][1])
    for bound, c in table:
        if block_d <= bound:
            cfg = dict(c)
            break
    if fp32:
        for key, lim in FP32_LIMITS.items():
            if key in cfg:
                cfg[key] = min(cfg[key], lim)
    # Short sequences: do not pad a 17-token frame to 64 (tl.dot needs >= 16).
    if "BLOCK_M" in cfg:
        cfg["BLOCK_M"] = max(16, min(cfg["BLOCK_M"], _next_pow2(n_rows)))
    if "BLOCK_N" in cfg:
        cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], _next_pow2(n_cols)))
    cfg.update(_OVERRIDE.get(kind, {}))
    return cfg


# ----------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=256)
def _offsets_tensor(offsets: tuple, device: torch.device) -> torch.Tensor:
    # Tiny, reused by every layer and step: build once per (offsets, device).
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _precision(dtype: torch.dtype) -> str:
    # Only matters for fp32 operands; "tf32" is tl.dot's default, so fp16/bf16 dots are unchanged.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _device_ctx(t: torch.Tensor):
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _check_launch_args(q, k, v, num_frames: int, offsets) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (B*T, H, N, D)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton STDHA supports {SUPPORTED_DTYPES}, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if not q.is_cuda and not interpreting():
        raise ValueError("triton STDHA needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    bt, h, nq, d = q.shape
    if k.shape[:2] != (bt, h) or v.shape[:2] != (bt, h) or k.shape[2] != v.shape[2]:
        raise ValueError(f"shape mismatch: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if nq == 0 or k.shape[2] == 0:
        raise ValueError("triton STDHA needs at least one query and one key token")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError("triton STDHA needs one head_dim for q, k and v")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"triton STDHA supports head_dim <= {MAX_HEAD_DIM}, got {d}")
    if len(offsets) != h:
        raise ValueError(f"got {len(offsets)} head offsets for {h} heads")
    if num_frames < 1 or bt % num_frames:
        raise ValueError(f"batch*frames = {bt} is not divisible by num_frames = {num_frames}")
    if any(abs(int(o)) >= num_frames for o in offsets):
        raise ValueError(f"head offsets {list(offsets)} need |d| < num_frames = {num_frames}")


def output_buffer(bt: int, h: int, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B*T, H, N, D) view of a (B*T, N, H, D) buffer: the layout the output
    projection reads, so ``out.transpose(1, 2).reshape(B*T, N, H*D)`` costs nothing."""
    return torch.empty((bt, n, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


def stdha_triton_forward(q, k, v, num_frames: int, head_offsets: HeadOffsets, scale: float,
                         out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """Launch the forward kernel; returns ``(out, lse)`` (``lse``: natural log, fp32, (BT, H, N)).

    ``out`` (``(B*T, H, N, D)``, any strides with a unit last one; default: the
    :func:`output_buffer` view) and ``lse`` (contiguous) may be given to write into.
    """
    offsets = resolve_offsets(head_offsets, q.shape[1], num_frames)
    _check_launch_args(q, k, v, num_frames, offsets)
    bt, h, nq, d = q.shape
    nk = k.shape[2]
    if out is None:
        out = output_buffer(bt, h, nq, d, q)
    if lse is None:
        lse = torch.empty((bt, h, nq), dtype=torch.float32, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1 and lse.is_contiguous()
    if out.numel() == 0:
        return out, lse
    block_d = max(16, _next_pow2(d))
    cfg = launch_config("fwd", block_d, nq, nk, q.dtype == torch.float32)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    off_t = _offsets_tensor(offsets, q.device)
    grid = (triton.cdiv(nq, bm) * bt * h,)
    with _device_ctx(q):
        stdha_fwd_kernel[grid](
            q, k, v, off_t, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
            h, int(num_frames), nq, nk,
            float(scale) * LOG2E,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
            PREC=_precision(q.dtype), UPCAST=upcast_dots(q.dtype),
            **cfg,
        )
    return out, lse


def stdha_triton_backward(do, q, k, v, out, lse, num_frames: int, head_offsets: HeadOffsets,
                          scale: float, dq=None, dk=None, dv=None, delta=None):
    """Launch the backward kernels; returns ``(dq, dk, dv)`` in q's dtype.

    ``dq``/``dk``/``dv`` may be given (any strides with a unit last one, e.g. views of one packed
    ``(B*T, N, 3, H, D)`` gradient); by default they are contiguous. Deterministic: no atomics;
    every gradient element is written by exactly one program.
    """
    offsets = resolve_offsets(head_offsets, q.shape[1], num_frames)
    _check_launch_args(q, k, v, num_frames, offsets)
    bt, h, nq, d = q.shape
    nk = k.shape[2]
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    dq = torch.empty((bt, h, nq, d), dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty((bt, h, nk, d), dtype=k.dtype, device=q.device) if dk is None else dk
    dv = torch.empty((bt, h, nk, d), dtype=v.dtype, device=q.device) if dv is None else dv
    if delta is None:
        delta = torch.empty((bt, h, nq), dtype=torch.float32, device=q.device)
    assert out.stride(-1) == 1 and lse.is_contiguous() and delta.is_contiguous()
    assert dq.stride(-1) == 1 and dk.stride(-1) == 1 and dv.stride(-1) == 1
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = max(16, _next_pow2(d))
    prec = _precision(q.dtype)
    fp32 = q.dtype == torch.float32
    upcast = upcast_dots(q.dtype)
    off_t = _offsets_tensor(offsets, q.device)
    T = int(num_frames)
    with _device_ctx(q):
        cfg = launch_config("bwd_pre", block_d, nq, nk, fp32)
        bm = cfg.pop("BLOCK_M")
        cfg.pop("BLOCK_N", None)
        stdha_bwd_pre_kernel[(triton.cdiv(nq, bm) * bt * h,)](
            out, do, delta, *out.stride()[:3], *do.stride(), h, nq,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, **cfg,
        )
        cfg = launch_config("bwd_dq", block_d, nq, nk, fp32)
        bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
        stdha_bwd_dq_kernel[(triton.cdiv(nq, bm) * bt * h,)](
            q, k, v, do, lse, delta, off_t, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3],
            h, T, nq, nk, float(scale) * LOG2E, float(scale),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
            PREC=prec, UPCAST=upcast, **cfg,
        )
        cfg = launch_config("bwd_dkdv", block_d, nq, nk, fp32)
        bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
        stdha_bwd_dkdv_kernel[(triton.cdiv(nk, bn) * bt * h,)](
            q, k, v, do, lse, delta, off_t, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dk.stride()[:3], *dv.stride()[:3],
            h, T, nq, nk, float(scale) * LOG2E, float(scale),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
            PREC=prec, UPCAST=upcast, **cfg,
        )
    return dq, dk, dv


def stdha_triton_packed_forward(qkv: torch.Tensor, num_frames: int, head_offsets: HeadOffsets,
                                scale: float):
    """Forward on a packed ``(B*T, N, 3, H, D)`` qkv; returns ``(out, lse)`` with ``out`` a
    contiguous ``(B*T, N, H, D)`` tensor (what the output projection reads)."""
    q, k, v = qkv_views(qkv)
    bt, n, _, h, d = qkv.shape
    out = torch.empty((bt, n, h, d), dtype=qkv.dtype, device=qkv.device)
    _, lse = stdha_triton_forward(q, k, v, num_frames, head_offsets, scale,
                                  out=out.transpose(1, 2))
    return out, lse


def stdha_triton_packed_backward(dout, qkv, out, lse, num_frames: int,
                                 head_offsets: HeadOffsets, scale: float) -> torch.Tensor:
    """Backward of :func:`stdha_triton_packed_forward`: ``dout`` and ``out`` are
    ``(B*T, N, H, D)``; returns one contiguous ``(B*T, N, 3, H, D)`` gradient of ``qkv``, into
    which the kernels write dQ, dK and dV directly (no stack, no copy)."""
    q, k, v = qkv_views(qkv)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = qkv_views(dqkv)
    stdha_triton_backward(dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, num_frames,
                          head_offsets, scale, dq=dq, dk=dk, dv=dv)
    return dqkv

