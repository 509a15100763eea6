"""Triton STDHA attention (docs/method.md §2): flash-style forward and backward, temporal gather in-kernel.

Head ``h`` of frame ``t`` attends to the keys/values of source frame ``s(t, h) = t - d_h`` (or
``t`` when that frame is outside the clip). The kernels compute ``s`` from a small int32 tensor of
per-head offsets and point their K/V tile loads at row ``b*T + s`` of the *original* K/V tensors:
no shifted copy of K or V is ever made, so STDHA costs exactly what plain attention costs.

Kernels (all one program per ``(row block, frame-row, head)``, 1-D grid):

* ``_fwd_kernel``     online softmax (exp2, ``log2 e`` folded into the scale), fp32 accumulators,
                      writes ``O`` and the natural-log log-sum-exp ``LSE`` (fp32, ``(B*T, H, N)``).
* ``_bwd_pre_kernel`` ``delta = rowsum(dO * O)``.
* ``_bwd_dq_kernel``  dQ for one query block, reading K/V of its source frame.
* ``_bwd_dkdv_kernel`` dK/dV for one key block of source frame ``s``. With the boundary rule a
                      frame is read, for head ``h``, by at most two query frames: ``t = s + d_h``
                      (when in the clip) and ``s`` itself (when ``s - d_h`` is outside the clip).
                      The program loops over those query frames, so every dK/dV element is written
                      by exactly one program: no atomics, bitwise deterministic.

Any ``N`` (ragged ends cut at :data:`TAIL` = 16 tokens, see the kernels section), any head_dim up
to 128 (padded to a power of two with masks; 32/64/128 are exact tiles, 80/96 pad to 128),
fp16/bf16 (fp32 too: ``tf32`` dots unless ``torch.get_float32_matmul_precision() == "highest"``,
the default, which uses IEEE fp32 dots). Every tensor is read and written through its strides.

Two entry points, both differentiable and ``torch.compile``-traceable:

* :func:`stdha_triton` — q, k, v ``(B*T, H, N, D)`` (e.g. views of a qkv projection). The output
  is ``(B*T, H, N, D)`` stored as ``(B*T, N, H, D)``, so the model's transpose + reshape back to
  ``(B*T, N, H*D)`` is a view. Gradients: separate dq, dk, dv.
* :func:`stdha_triton_packed` — the packed ``(B*T, N, 3, H, D)`` qkv itself; output
  ``(B*T, N, H, D)``; the backward writes dQ, dK and dV into one ``(B*T, N, 3, H, D)`` gradient.
  With it nothing is copied between the qkv and the output projections (what ``STDHAttention``
  uses through :func:`zeroi2v.ops.stdha.stdha_attention_packed`).

Eager calls go through :class:`STDHATritonFunction` / :class:`STDHATritonPackedFunction`; under
``torch.compile`` the ``torch.library`` custom ops ``zeroi2v::stdha_triton_fwd`` /
``zeroi2v::stdha_triton_packed_fwd`` (fake impls and autograd registered; their backwards are
``..._bwd`` ops) are traced as opaque nodes. Importing this module registers the ``"triton"``
backend of :func:`zeroi2v.ops.stdha.stdha_attention` (its rank: ``PRIORITIES`` in
:mod:`zeroi2v.ops.registry`; ``"auto"`` picks it for CUDA fp16/bf16 inputs only). Without Triton
the import raises ``ImportError``, which the registry reads as "backend absent". CPU tensors work
through the Triton interpreter (``TRITON_INTERPRET=1``), which is how CI tests the kernels.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"zeroi2v.kernels.stdha needs Triton: {exc}") from exc

from ..offsets import HeadOffsets, resolve_offsets
from ..ops.registry import Capabilities, register_backend
from ._triton import dot, interpreting, upcast_dots

__all__ = [
    "stdha_triton",
    "stdha_triton_packed",
    "STDHATritonFunction",
    "STDHATritonPackedFunction",
    "stdha_triton_forward",
    "stdha_triton_backward",
    "stdha_triton_packed_forward",
    "stdha_triton_packed_backward",
    "tile_extent",
    "TAIL",
    "SUPPORTED_DTYPES",
    "AUTO_HEAD_DIMS",
    "MAX_HEAD_DIM",
    "CONFIGS",
    "block_config",
]

LOG2E = 1.4426950408889634

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dtypes / head dims for which ``backend="auto"`` picks this backend on CUDA.
AUTO_DTYPES = (torch.float16, torch.bfloat16)
AUTO_HEAD_DIMS = (32, 64, 80, 96, 128)
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


#: Granularity of ragged ends: tokens past the last full block are computed TAIL at a time.
TAIL = 16


def tile_extent(n: int, block: int) -> int:
    """How many of ``n`` rows (or columns) a kernel computes with blocks of ``block``: the full
    blocks, then the rest rounded up to :data:`TAIL` (N = 197, 64-row blocks: 208, not 256)."""
    rest = n % block
    return n - rest + -(-rest // TAIL) * TAIL


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _config(kind: str, block_d: int, n_rows: int, n_cols: int, fp32: bool = False) -> dict:
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


# ----------------------------------------------------------------------------- kernels
#
# Ragged ends are cut at TAIL-token granularity (tl.dot's minimum) rather than at block size: a
# program whose query (or key) block would run past N instead walks the remaining rows in TAIL-row
# sub-blocks, and every key (or query) loop runs full blocks unmasked, then TAIL-wide masked
# steps. At N = 197 with 64-row blocks that computes 208 rows and columns instead of 256.
# ``benchmarks/useful_work.py`` tabulates the fraction of useful score work per kernel.

_TAIL = tl.constexpr(TAIL)
# Sizes are not specialised on (divisibility by 16, == 1): every (T, H, N) would otherwise compile
# its own binaries (T = 1 vs 8 vs 32, H = 12 vs 16, N = 1 ...) for no gain; strides still are.
_SIZES = ("H", "T", "NQ", "NK")


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile, masked only where it can leave the tensor (ragged rows, padded D)."""
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM),
                        other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tl.store(ptrs, x, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))
    else:
        if HEAD_DIM == BLOCK_D:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=offs_d[None, :] < HEAD_DIM)


@triton.jit
def _load_vec(ptrs, rows, n_rows, MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        x = tl.load(ptrs, mask=rows < n_rows, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _source_row(bt, h, OFF, T):
    """Row ``b*T + s(t, h)`` of K/V read by query row ``bt = b*T + t`` for head ``h``."""
    t = bt % T
    d = tl.load(OFF + h)
    s = t - d
    s = tl.where((s >= 0) & (s < T), s, t)
    return bt - t + s


@triton.jit
def _query_program(NQ, BLOCK_M: tl.constexpr, H, T, OFF):
    """(query block, frame-row * H + head, frame-row, head, K/V source row) of this program of a
    query-blocked kernel (fwd, dQ); all but the block index as int64 for pointer arithmetic."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid_bh = pid // num_m
    bt = pid_bh // H
    h = pid_bh % H
    src = _source_row(bt, h, OFF, T)
    return (pid % num_m, pid_bh.to(tl.int64), bt.to(tl.int64), h.to(tl.int64),
            src.to(tl.int64))


@triton.jit
def _fwd_kv_step(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd, start_n, NK, offs_d,
                 qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One online-softmax step over keys ``start_n .. start_n + BLOCK_N``."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base + cols[:, None] * skn + offs_d[None, :] * skd, cols, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, UPCAST)
    qk = qk * qk_scale  # log2 domain
    if MASK_N:
        qk = tl.where(cols[None, :] < NK, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every step has at least one key
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_base + cols[:, None] * svn + offs_d[None, :] * svd, cols, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _fwd_rows(q_base, k_base, v_base, o_base, lse_base, row0,
              sqn, sqd, skn, skd, svn, svd, son, NQ, NK, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """Output rows ``row0 .. row0 + BLOCK_M`` of one (frame, head): all keys, then O and LSE."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, offs_m, NQ, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    nk_full = NK - NK % BLOCK_N
    for start_n in range(0, nk_full, BLOCK_N):
        acc, m_i, l_i = _fwd_kv_step(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd,
                                     start_n, NK, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                     BLOCK_N, False, PREC, UPCAST)
    for start_n in range(nk_full, NK, _TAIL):
        acc, m_i, l_i = _fwd_kv_step(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd,
                                     start_n, NK, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                     _TAIL, True, PREC, UPCAST)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log
    _store_tile(o_base + offs_m[:, None] * son + offs_d[None, :], acc.to(o_base.dtype.element_ty),
                offs_m, NQ, offs_d, HEAD_DIM, BLOCK_D, MASK_M)
    if MASK_M:
        tl.store(lse_base + offs_m, lse, mask=offs_m < NQ)
    else:
        tl.store(lse_base + offs_m, lse)


@triton.jit(do_not_specialize=_SIZES)
def _fwd_kernel(
    Q, K, V, OFF, O, LSE,  # noqa: E741 - O is the attention output, as in the papers
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son,
    H, T, NQ, NK,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, pid_bh, bt64, h64, src64 = _query_program(NQ, BLOCK_M, H, T, OFF)
    q_base = Q + bt64 * sqb + h64 * sqh
    k_base = K + src64 * skb + h64 * skh
    v_base = V + src64 * svb + h64 * svh
    o_base = O + bt64 * sob + h64 * soh
    lse_base = LSE + pid_bh * NQ
    n_full = NQ // BLOCK_M
    if pid_m < n_full:
        _fwd_rows(q_base, k_base, v_base, o_base, lse_base, pid_m * BLOCK_M,
                  sqn, sqd, skn, skd, svn, svd, son, NQ, NK, qk_scale,
                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, PREC, UPCAST)
    else:  # the ragged last block, TAIL rows at a time
        for row0 in range(n_full * BLOCK_M, NQ, _TAIL):
            _fwd_rows(q_base, k_base, v_base, o_base, lse_base, row0,
                      sqn, sqd, skn, skd, svn, svd, son, NQ, NK, qk_scale,
                      HEAD_DIM, BLOCK_D, _TAIL, BLOCK_N, True, PREC, UPCAST)


@triton.jit(do_not_specialize=("H", "NQ"))
def _bwd_pre_kernel(
    O, DO, DELTA,  # noqa: E741 - O is the attention output, as in the papers
    sob, soh, son,
    sdb, sdh, sdn, sdd,
    H, NQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # memory-bound: a masked tail costs loads, not tensor-core work, so no TAIL sub-blocks here
    pid = tl.program_id(0)
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    bt = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + bt * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], offs_m, NQ,
                   offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = _load_tile(DO + bt * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                    offs_m, NQ, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * NQ + offs_m, tl.sum(o * do, 1), mask=offs_m < NQ)


@triton.jit
def _dq_kv_step(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, NK, offs_d,
                qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base + cols[:, None] * skn + offs_d[None, :] * skd, cols, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_tile(v_base + cols[:, None] * svn + offs_d[None, :] * svd, cols, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, UPCAST)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASK_N:
        p = tl.where(cols[None, :] < NK, p, 0.0)
    dp = dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    return dot(ds.to(k.dtype), k, dq, PREC, UPCAST)


@triton.jit
def _dq_rows(q_base, do_base, k_base, v_base, dq_base, lse_base, delta_base, row0,
             sqn, sqd, sdn, sdd, skn, skd, svn, svd, sdqn, NQ, NK, qk_scale, sm_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, PREC: tl.constexpr,
             UPCAST: tl.constexpr):
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, offs_m, NQ, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_M)
    do = _load_tile(do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd, offs_m, NQ, offs_d,
                    HEAD_DIM, BLOCK_D, MASK_M)
    # padded rows read q = dO = LSE = delta = 0: finite, and their dQ is never stored
    lse2 = _load_vec(lse_base + offs_m, offs_m, NQ, MASK_M) * 1.4426950408889634
    delta = _load_vec(delta_base + offs_m, offs_m, NQ, MASK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    nk_full = NK - NK % BLOCK_N
    for start_n in range(0, nk_full, BLOCK_N):
        dq = _dq_kv_step(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, NK,
                         offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, PREC,
                         UPCAST)
    for start_n in range(nk_full, NK, _TAIL):
        dq = _dq_kv_step(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, NK,
                         offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, _TAIL, True, PREC, UPCAST)
    _store_tile(dq_base + offs_m[:, None] * sdqn + offs_d[None, :],
                (dq * sm_scale).to(dq_base.dtype.element_ty), offs_m, NQ, offs_d, HEAD_DIM,
                BLOCK_D, MASK_M)


@triton.jit(do_not_specialize=_SIZES)
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, OFF, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    sdqb, sdqh, sdqn,
    H, T, NQ, NK,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, pid_bh, bt64, h64, src64 = _query_program(NQ, BLOCK_M, H, T, OFF)
    q_base = Q + bt64 * sqb + h64 * sqh
    do_base = DO + bt64 * sdb + h64 * sdh
    k_base = K + src64 * skb + h64 * skh
    v_base = V + src64 * svb + h64 * svh
    dq_base = DQ + bt64 * sdqb + h64 * sdqh
    row_base = pid_bh * NQ
    n_full = NQ // BLOCK_M
    if pid_m < n_full:
        _dq_rows(q_base, do_base, k_base, v_base, dq_base, LSE + row_base, DELTA + row_base,
                 pid_m * BLOCK_M, sqn, sqd, sdn, sdd, skn, skd, svn, svd, sdqn, NQ, NK,
                 qk_scale, sm_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, PREC, UPCAST)
    else:
        for row0 in range(n_full * BLOCK_M, NQ, _TAIL):
            _dq_rows(q_base, do_base, k_base, v_base, dq_base, LSE + row_base, DELTA + row_base,
                     row0, sqn, sqd, sdn, sdd, skn, skd, svn, svd, sdqn, NQ, NK,
                     qk_scale, sm_scale, HEAD_DIM, BLOCK_D, _TAIL, BLOCK_N, True, PREC, UPCAST)


@triton.jit
def _dkdv_q_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m,
                 sqn, sqd, sdn, sdd, NQ, qk_scale, offs_d,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Add to dK/dV of a key block (fp32) the contribution of queries ``start_m ..``."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_base + rows[:, None] * sqn + offs_d[None, :] * sqd, rows, NQ, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_M)
    do = _load_tile(do_base + rows[:, None] * sdn + offs_d[None, :] * sdd, rows, NQ, offs_d,
                    HEAD_DIM, BLOCK_D, MASK_M)
    lse2 = _load_vec(lse_base + rows, rows, NQ, MASK_M) * 1.4426950408889634
    delta = _load_vec(delta_base + rows, rows, NQ, MASK_M)
    # transposed scores: (BLOCK_N keys, BLOCK_M queries)
    qkT = dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PREC, UPCAST)
    pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    if MASK_M:
        pT = tl.where(rows[None, :] < NQ, pT, 0.0)
    dv = dot(pT.to(do.dtype), do, dv, PREC, UPCAST)
    dpT = dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PREC, UPCAST)
    dsT = pT * (dpT - delta[None, :])
    dk = dot(dsT.to(q.dtype), q, dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_cols(Q, DO, LSE, DELTA, k_base, v_base, dk_base, dv_base, col0,
               base, s, first, n_frames, h64,
               sqb, sqh, sqn, sqd, skn, skd, svn, svd, sdb, sdh, sdn, sdd, sdkn, sdvn,
               H, NQ, NK, qk_scale, sm_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    """dK/dV of keys ``col0 .. col0 + BLOCK_N`` of one (source frame, head): every query of the
    (at most two) frames that read them, full query blocks then TAIL-row steps."""
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, offs_n, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    v = _load_tile(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, offs_n, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    nq_full = NQ - NQ % BLOCK_M
    for j in range(0, n_frames):
        tq = tl.where(j == 0, first, s)
        btq = (base + tq).to(tl.int64)
        row0 = (btq * H + h64) * NQ
        q_base = Q + btq * sqb + h64 * sqh
        do_base = DO + btq * sdb + h64 * sdh
        for start_m in range(0, nq_full, BLOCK_M):
            dk, dv = _dkdv_q_step(dk, dv, k, v, q_base, do_base, LSE + row0, DELTA + row0,
                                  start_m, sqn, sqd, sdn, sdd, NQ, qk_scale, offs_d, HEAD_DIM,
                                  BLOCK_D, BLOCK_M, BLOCK_N, False, PREC, UPCAST)
        for start_m in range(nq_full, NQ, _TAIL):
            dk, dv = _dkdv_q_step(dk, dv, k, v, q_base, do_base, LSE + row0, DELTA + row0,
                                  start_m, sqn, sqd, sdn, sdd, NQ, qk_scale, offs_d, HEAD_DIM,
                                  BLOCK_D, _TAIL, BLOCK_N, True, PREC, UPCAST)
    _store_tile(dk_base + offs_n[:, None] * sdkn + offs_d[None, :],
                (dk * sm_scale).to(dk_base.dtype.element_ty), offs_n, NK, offs_d, HEAD_DIM,
                BLOCK_D, MASK_N)
    _store_tile(dv_base + offs_n[:, None] * sdvn + offs_d[None, :],
                dv.to(dv_base.dtype.element_ty), offs_n, NK, offs_d, HEAD_DIM, BLOCK_D, MASK_N)


@triton.jit(do_not_specialize=_SIZES)
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, OFF, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    sdkb, sdkh, sdkn,
    sdvb, sdvh, sdvn,
    H, T, NQ, NK,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(NK, BLOCK_N)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    bt = pid_bh // H  # the source frame row b*T + s whose dK/dV this program owns
    h = pid_bh % H
    s = bt % T
    base = bt - s
    d = tl.load(OFF + h)
    # Query frames that read frame s for head h (docs/method.md §2 boundary rule), at most two:
    t1 = s + d
    read_by_shifted = (t1 >= 0) & (t1 < T)  # frame t1 = s + d reads t1 - d = s
    back = s - d
    read_by_self = (d != 0) & ((back < 0) | (back >= T))  # frame s falls back to itself
    n_frames = read_by_shifted.to(tl.int32) + read_by_self.to(tl.int32)
    first = tl.where(read_by_shifted, t1, s)

    bt64 = bt.to(tl.int64)
    h64 = h.to(tl.int64)
    k_base = K + bt64 * skb + h64 * skh
    v_base = V + bt64 * svb + h64 * svh
    dk_base = DK + bt64 * sdkb + h64 * sdkh
    dv_base = DV + bt64 * sdvb + h64 * sdvh
    n_full = NK // BLOCK_N
    if pid_n < n_full:
        _dkdv_cols(Q, DO, LSE, DELTA, k_base, v_base, dk_base, dv_base, pid_n * BLOCK_N,
                   base, s, first, n_frames, h64,
                   sqb, sqh, sqn, sqd, skn, skd, svn, svd, sdb, sdh, sdn, sdd, sdkn, sdvn,
                   H, NQ, NK, qk_scale, sm_scale,
                   HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, PREC, UPCAST)
    else:  # the ragged last key block, TAIL keys at a time
        for col0 in range(n_full * BLOCK_N, NK, _TAIL):
            _dkdv_cols(Q, DO, LSE, DELTA, k_base, v_base, dk_base, dv_base, col0,
                       base, s, first, n_frames, h64,
                       sqb, sqh, sqn, sqd, skn, skd, svn, svd, sdb, sdh, sdn, sdd, sdkn, sdvn,
                       H, NQ, NK, qk_scale, sm_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_M, _TAIL, True, PREC, UPCAST)


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


def _check(q, k, v, num_frames: int, offsets) -> None:
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


def _out_layout(bt: int, h: int, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B*T, H, N, D) view of a (B*T, N, H, D) buffer: the layout the output
    projection reads, so ``out.transpose(1, 2).reshape(B*T, N, H*D)`` costs nothing."""
    return torch.empty((bt, n, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


def stdha_triton_forward(q, k, v, num_frames: int, head_offsets: HeadOffsets, scale: float,
                         out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """Launch the forward kernel; returns ``(out, lse)`` (``lse``: natural log, fp32, (BT, H, N)).

    ``out`` (``(B*T, H, N, D)``, any strides with a unit last one; default: the
    :func:`_out_layout` view) and ``lse`` (contiguous) may be given to write into.
    """
    offsets = resolve_offsets(head_offsets, q.shape[1], num_frames)
    _check(q, k, v, num_frames, offsets)
    bt, h, nq, d = q.shape
    nk = k.shape[2]
    if out is None:
        out = _out_layout(bt, h, nq, d, q)
    if lse is None:
        lse = torch.empty((bt, h, nq), dtype=torch.float32, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1 and lse.is_contiguous()
    if out.numel() == 0:
        return out, lse
    block_d = max(16, _next_pow2(d))
    cfg = _config("fwd", block_d, nq, nk, q.dtype == torch.float32)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    off_t = _offsets_tensor(offsets, q.device)
    grid = (triton.cdiv(nq, bm) * bt * h,)
    with _device_ctx(q):
        _fwd_kernel[grid](
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
    _check(q, k, v, num_frames, offsets)
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
        cfg = _config("bwd_pre", block_d, nq, nk, fp32)
        bm = cfg.pop("BLOCK_M")
        cfg.pop("BLOCK_N", None)
        _bwd_pre_kernel[(triton.cdiv(nq, bm) * bt * h,)](
            out, do, delta, *out.stride()[:3], *do.stride(), h, nq,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, **cfg,
        )
        cfg = _config("bwd_dq", block_d, nq, nk, fp32)
        bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
        _bwd_dq_kernel[(triton.cdiv(nq, bm) * bt * h,)](
            q, k, v, do, lse, delta, off_t, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3],
            h, T, nq, nk, float(scale) * LOG2E, float(scale),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
            PREC=prec, UPCAST=upcast, **cfg,
        )
        cfg = _config("bwd_dkdv", block_d, nq, nk, fp32)
        bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
        _bwd_dkdv_kernel[(triton.cdiv(nk, bn) * bt * h,)](
            q, k, v, do, lse, delta, off_t, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dk.stride()[:3], *dv.stride()[:3],
            h, T, nq, nk, float(scale) * LOG2E, float(scale),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
            PREC=prec, UPCAST=upcast, **cfg,
        )
    return dq, dk, dv


def _unpack(qkv: torch.Tensor):
    """q, k, v as (B*T, H, N, D) views of a packed (B*T, N, 3, H, D) tensor."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def stdha_triton_packed_forward(qkv: torch.Tensor, num_frames: int, head_offsets: HeadOffsets,
                                scale: float):
    """Forward on a packed ``(B*T, N, 3, H, D)`` qkv; returns ``(out, lse)`` with ``out`` a
    contiguous ``(B*T, N, H, D)`` tensor (what the output projection reads)."""
    q, k, v = _unpack(qkv)
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
    q, k, v = _unpack(qkv)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = _unpack(dqkv)
    stdha_triton_backward(dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, num_frames,
                          head_offsets, scale, dq=dq, dk=dk, dv=dv)
    return dqkv


# ----------------------------------------------------------------------------- torch.library ops
# Fake impls return the real strides: the unpacked forward's output is the _out_layout view.


@torch.library.custom_op("zeroi2v::stdha_triton_fwd", mutates_args=())
def _stdha_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: list[int],
                  num_frames: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return stdha_triton_forward(q, k, v, num_frames, offsets, scale)


@_stdha_fwd_op.register_fake
def _(q, k, v, offsets, num_frames, scale):
    bt, h, n, d = q.shape
    return _out_layout(bt, h, n, d, q), q.new_empty((bt, h, n), dtype=torch.float32)


@torch.library.custom_op("zeroi2v::stdha_triton_bwd", mutates_args=())
def _stdha_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, offsets: list[int], num_frames: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return stdha_triton_backward(do, q, k, v, out, lse, num_frames, offsets, scale)


@_stdha_bwd_op.register_fake
def _(do, q, k, v, out, lse, offsets, num_frames, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, offsets, num_frames, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.offsets = list(offsets)
    ctx.num_frames = num_frames
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.zeroi2v.stdha_triton_bwd(
        dout, q, k, v, out, lse, ctx.offsets, ctx.num_frames, ctx.scale
    )
    return dq, dk, dv, None, None, None


_stdha_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("zeroi2v::stdha_triton_packed_fwd", mutates_args=())
def _stdha_packed_fwd_op(qkv: torch.Tensor, offsets: list[int], num_frames: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return stdha_triton_packed_forward(qkv, num_frames, offsets, scale)


@_stdha_packed_fwd_op.register_fake
def _(qkv, offsets, num_frames, scale):
    bt, n, _, h, d = qkv.shape
    return qkv.new_empty((bt, n, h, d)), qkv.new_empty((bt, h, n), dtype=torch.float32)


@torch.library.custom_op("zeroi2v::stdha_triton_packed_bwd", mutates_args=())
def _stdha_packed_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, offsets: list[int], num_frames: int,
                         scale: float) -> torch.Tensor:
    return stdha_triton_packed_backward(dout, qkv, out, lse, num_frames, offsets, scale)


@_stdha_packed_bwd_op.register_fake
def _(dout, qkv, out, lse, offsets, num_frames, scale):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, offsets, num_frames, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.offsets, ctx.num_frames, ctx.scale = list(offsets), num_frames, scale
    ctx.mark_non_differentiable(lse)


def _packed_backward(ctx, dout, dlse):
    qkv, out, lse = ctx.saved_tensors
    dqkv = torch.ops.zeroi2v.stdha_triton_packed_bwd(dout, qkv, out, lse, ctx.offsets,
                                                     ctx.num_frames, ctx.scale)
    return dqkv, None, None, None


_stdha_packed_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


# ----------------------------------------------------------------------------- eager autograd
# The torch.library custom ops cost tens of microseconds of Python per call in eager mode; these
# Functions run the same launchers without that overhead (torch.compile traces the ops instead).


class STDHATritonFunction(torch.autograd.Function):
    """q, k, v ``(B*T, H, N, D)`` -> out ``(B*T, H, N, D)`` (the :func:`_out_layout` view);
    separate dq, dk, dv."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, num_frames, scale):
        out, lse = stdha_triton_forward(q, k, v, num_frames, offsets, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.offsets, ctx.num_frames, ctx.scale = offsets, num_frames, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = stdha_triton_backward(dout, q, k, v, out, lse, ctx.num_frames, ctx.offsets,
                                           ctx.scale)
        return dq, dk, dv, None, None, None


class STDHATritonPackedFunction(torch.autograd.Function):
    """qkv ``(B*T, N, 3, H, D)`` -> out ``(B*T, N, H, D)``; one packed gradient of qkv."""

    @staticmethod
    def forward(ctx, qkv, offsets, num_frames, scale):
        out, lse = stdha_triton_packed_forward(qkv, num_frames, offsets, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.offsets, ctx.num_frames, ctx.scale = offsets, num_frames, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse = ctx.saved_tensors
        return (stdha_triton_packed_backward(dout, qkv, out, lse, ctx.num_frames, ctx.offsets,
                                             ctx.scale), None, None, None)


def stdha_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int,
                 head_offsets: HeadOffsets, scale: Optional[float] = None) -> torch.Tensor:
    """STDHA attention with the Triton kernels (differentiable, ``torch.compile``-traceable).

    ``q, k, v``: ``(B*T, H, N, D)``, possibly strided views; ``head_offsets``: ``H`` ints with
    ``|d| < num_frames``, or a layout name (:func:`zeroi2v.offsets.resolve_offsets`). Returns
    ``(B*T, H, N, D)`` in q's dtype, stored as ``(B*T, N, H, D)`` (``out.transpose(1, 2)`` is
    contiguous). Eager calls go through :class:`STDHATritonFunction`; under ``torch.compile`` the
    custom op ``zeroi2v::stdha_triton_fwd`` is traced instead.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    offsets = list(resolve_offsets(head_offsets, q.shape[1], num_frames))
    if torch.compiler.is_compiling():
        out, _ = torch.ops.zeroi2v.stdha_triton_fwd(q, k, v, offsets, int(num_frames),
                                                    float(scale))
        return out
    return STDHATritonFunction.apply(q, k, v, tuple(offsets), int(num_frames), float(scale))


def stdha_triton_packed(qkv: torch.Tensor, num_frames: int, head_offsets: HeadOffsets,
                        scale: Optional[float] = None) -> torch.Tensor:
    """:func:`stdha_triton` on a packed ``(B*T, N, 3, H, D)`` qkv (the qkv projection's output,
    reshaped). Returns a contiguous ``(B*T, N, H, D)`` output; its backward writes one packed
    ``(B*T, N, 3, H, D)`` gradient. Nothing is copied between the qkv projection and the output
    projection, forward or backward, eager or compiled (custom op
    ``zeroi2v::stdha_triton_packed_fwd``)."""
    if scale is None:
        scale = 1.0 / math.sqrt(qkv.shape[-1])
    offsets = list(resolve_offsets(head_offsets, qkv.shape[3], num_frames))
    if torch.compiler.is_compiling():
        out, _ = torch.ops.zeroi2v.stdha_triton_packed_fwd(qkv, offsets, int(num_frames),
                                                           float(scale))
        return out
    return STDHATritonPackedFunction.apply(qkv, tuple(offsets), int(num_frames), float(scale))


#: CUDA tensors (CPU ones only through the interpreter, by name), fp16/bf16/fp32 up to head_dim
#: 128, forward and backward; "auto" picks it for CUDA fp16/bf16 and the common head dims.
CAPABILITIES = Capabilities(devices=("cuda", "cpu"), dtypes=SUPPORTED_DTYPES,
                            max_head_dim=MAX_HEAD_DIM, auto_devices=("cuda",),
                            auto_dtypes=AUTO_DTYPES, auto_head_dims=AUTO_HEAD_DIMS)


def _device_check(q, k, v) -> list:
    if q.is_cuda or interpreting():
        return []
    return ["CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)"]


def _backend(q, k, v, num_frames, offsets, scale):
    return stdha_triton(q, k, v, num_frames, offsets, scale)


def _packed_backend(qkv, num_frames, offsets, scale):
    return stdha_triton_packed(qkv, num_frames, offsets, scale)


register_backend("triton", _backend, caps=CAPABILITIES, packed=_packed_backend,
                 check=_device_check)
