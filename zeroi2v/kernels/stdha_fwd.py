"""Triton STDHA forward kernel (docs/method.md §2), and the tile helpers the backward shares.

Head ``h`` of frame ``t`` attends to the keys/values of source frame ``s(t, h) = t - d_h`` (or
``t`` when that frame is outside the clip). The kernels compute ``s`` from a small int32 tensor of
per-head offsets and point their K/V tile loads at row ``b*T + s`` of the *original* K/V tensors:
no shifted copy of K or V is ever made, so STDHA costs exactly what plain attention costs.

:func:`stdha_fwd_kernel`: one program per ``(query block, frame-row, head)`` (1-D grid); online
softmax (exp2, ``log2 e`` folded into the scale), fp32 accumulators; writes ``O`` and the
natural-log log-sum-exp ``LSE`` (fp32, ``(B*T, H, N)``). Launched by
:mod:`zeroi2v.kernels.stdha_launch`.

Ragged ends are cut at :data:`TAIL`-token granularity (tl.dot's minimum) rather than at block
size: a program whose query (or key) block would run past N instead walks the remaining rows in
TAIL-row sub-blocks, and every key (or query) loop runs full blocks unmasked, then TAIL-wide
masked steps. At N = 197 with 64-row blocks that computes 208 rows and columns instead of 256
(``benchmarks/useful_work.py`` tabulates the useful fraction per kernel).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton import dot

#: Granularity of ragged ends: tokens past the last full block are computed TAIL at a time.
TAIL = 16
TAIL_C = tl.constexpr(TAIL)
# Sizes are not specialised on (divisibility by 16, == 1): every (T, H, N) would otherwise compile
# its own binaries (T = 1 vs 8 vs 32, H = 12 vs 16, N = 1 ...) for no gain; strides still are.
UNSPECIALISED_SIZES = ("H", "T", "NQ", "NK")


@triton.jit
def load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
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
def store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
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
def load_vec(ptrs, rows, n_rows, MASK_ROWS: tl.constexpr):
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
def query_program(NQ, BLOCK_M: tl.constexpr, H, T, OFF):
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
    k = load_tile(k_base + cols[:, None] * skn + offs_d[None, :] * skd, cols, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC, UPCAST)
    qk = qk * qk_scale  # log2 domain
    if MASK_N:
        qk = tl.where(cols[None, :] < NK, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every step has at least one key
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_tile(v_base + cols[:, None] * svn + offs_d[None, :] * svd, cols, NK, offs_d,
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
    q = load_tile(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, offs_m, NQ, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    nk_full = NK - NK % BLOCK_N
    for start_n in range(0, nk_full, BLOCK_N):
        acc, m_i, l_i = _fwd_kv_step(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd,
                                     start_n, NK, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                     BLOCK_N, False, PREC, UPCAST)
    for start_n in range(nk_full, NK, TAIL_C):
        acc, m_i, l_i = _fwd_kv_step(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd,
                                     start_n, NK, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                     TAIL_C, True, PREC, UPCAST)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log
    store_tile(o_base + offs_m[:, None] * son + offs_d[None, :], acc.to(o_base.dtype.element_ty),
                offs_m, NQ, offs_d, HEAD_DIM, BLOCK_D, MASK_M)
    if MASK_M:
        tl.store(lse_base + offs_m, lse, mask=offs_m < NQ)
    else:
        tl.store(lse_base + offs_m, lse)


@triton.jit(do_not_specialize=UNSPECIALISED_SIZES)
def stdha_fwd_kernel(
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
    pid_m, pid_bh, bt64, h64, src64 = query_program(NQ, BLOCK_M, H, T, OFF)
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
        for row0 in range(n_full * BLOCK_M, NQ, TAIL_C):
            _fwd_rows(q_base, k_base, v_base, o_base, lse_base, row0,
                      sqn, sqd, skn, skd, svn, svd, son, NQ, NK, qk_scale,
                      HEAD_DIM, BLOCK_D, TAIL_C, BLOCK_N, True, PREC, UPCAST)

