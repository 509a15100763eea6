"""Triton STDHA backward kernels (docs/method.md §2), launched by
:mod:`zeroi2v.kernels.stdha_launch`:

* :func:`stdha_bwd_pre_kernel`  ``delta = rowsum(dO * O)``.
* :func:`stdha_bwd_dq_kernel`   dQ for one query block, reading K/V of its source frame.
* :func:`stdha_bwd_dkdv_kernel` dK/dV for one key block of source frame ``s``. With the boundary
  rule a frame is read, for head ``h``, by at most two query frames: ``t = s + d_h`` (when in the
  clip) and ``s`` itself (when ``s - d_h`` is outside the clip). The program loops over those
  query frames, so every dK/dV element is written by exactly one program: no atomics, bitwise
  deterministic.

Ragged ends and tiles as in :mod:`zeroi2v.kernels.stdha_fwd`, whose helpers these share.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton import dot
from .stdha_fwd import TAIL_C, UNSPECIALISED_SIZES, load_tile, load_vec, query_program, store_tile


@triton.jit(do_not_specialize=("H", "NQ"))
def stdha_bwd_pre_kernel(
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
    o = load_tile(O + bt * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], offs_m, NQ,
                   offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = load_tile(DO + bt * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                    offs_m, NQ, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * NQ + offs_m, tl.sum(o * do, 1), mask=offs_m < NQ)


@triton.jit
def _dq_kv_step(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, NK, offs_d,
                qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(k_base + cols[:, None] * skn + offs_d[None, :] * skd, cols, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    v = load_tile(v_base + cols[:, None] * svn + offs_d[None, :] * svd, cols, NK, offs_d,
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
    q = load_tile(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, offs_m, NQ, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_M)
    do = load_tile(do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd, offs_m, NQ, offs_d,
                    HEAD_DIM, BLOCK_D, MASK_M)
    # padded rows read q = dO = LSE = delta = 0: finite, and their dQ is never stored
    lse2 = load_vec(lse_base + offs_m, offs_m, NQ, MASK_M) * 1.4426950408889634
    delta = load_vec(delta_base + offs_m, offs_m, NQ, MASK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    nk_full = NK - NK % BLOCK_N
    for start_n in range(0, nk_full, BLOCK_N):
        dq = _dq_kv_step(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, NK,
                         offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, PREC,
                         UPCAST)
    for start_n in range(nk_full, NK, TAIL_C):
        dq = _dq_kv_step(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start_n, NK,
                         offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, TAIL_C, True, PREC, UPCAST)
    store_tile(dq_base + offs_m[:, None] * sdqn + offs_d[None, :],
                (dq * sm_scale).to(dq_base.dtype.element_ty), offs_m, NQ, offs_d, HEAD_DIM,
                BLOCK_D, MASK_M)


@triton.jit(do_not_specialize=UNSPECIALISED_SIZES)
def stdha_bwd_dq_kernel(
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
    pid_m, pid_bh, bt64, h64, src64 = query_program(NQ, BLOCK_M, H, T, OFF)
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
        for row0 in range(n_full * BLOCK_M, NQ, TAIL_C):
            _dq_rows(q_base, do_base, k_base, v_base, dq_base, LSE + row_base, DELTA + row_base,
                     row0, sqn, sqd, sdn, sdd, skn, skd, svn, svd, sdqn, NQ, NK,
                     qk_scale, sm_scale, HEAD_DIM, BLOCK_D, TAIL_C, BLOCK_N, True, PREC, UPCAST)


@triton.jit
def _dkdv_q_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m,
                 sqn, sqd, sdn, sdd, NQ, qk_scale, offs_d,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASK_M: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Add to dK/dV of a key block (fp32) the contribution of queries ``start_m ..``."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(q_base + rows[:, None] * sqn + offs_d[None, :] * sqd, rows, NQ, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_M)
    do = load_tile(do_base + rows[:, None] * sdn + offs_d[None, :] * sdd, rows, NQ, offs_d,
                    HEAD_DIM, BLOCK_D, MASK_M)
    lse2 = load_vec(lse_base + rows, rows, NQ, MASK_M) * 1.4426950408889634
    delta = load_vec(delta_base + rows, rows, NQ, MASK_M)
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
    k = load_tile(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, offs_n, NK, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_N)
    v = load_tile(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, offs_n, NK, offs_d,
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
        for start_m in range(nq_full, NQ, TAIL_C):
            dk, dv = _dkdv_q_step(dk, dv, k, v, q_base, do_base, LSE + row0, DELTA + row0,
                                  start_m, sqn, sqd, sdn, sdd, NQ, qk_scale, offs_d, HEAD_DIM,
                                  BLOCK_D, TAIL_C, BLOCK_N, True, PREC, UPCAST)
    store_tile(dk_base + offs_n[:, None] * sdkn + offs_d[None, :],
                (dk * sm_scale).to(dk_base.dtype.element_ty), offs_n, NK, offs_d, HEAD_DIM,
                BLOCK_D, MASK_N)
    store_tile(dv_base + offs_n[:, None] * sdvn + offs_d[None, :],
                dv.to(dv_base.dtype.element_ty), offs_n, NK, offs_d, HEAD_DIM, BLOCK_D, MASK_N)


@triton.jit(do_not_specialize=UNSPECIALISED_SIZES)
def stdha_bwd_dkdv_kernel(
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
        for col0 in range(n_full * BLOCK_N, NK, TAIL_C):
            _dkdv_cols(Q, DO, LSE, DELTA, k_base, v_base, dk_base, dv_base, col0,
                       base, s, first, n_frames, h64,
                       sqb, sqh, sqn, sqd, skn, skd, svn, svd, sdb, sdh, sdn, sdd, sdkn, sdvn,
                       H, NQ, NK, qk_scale, sm_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_M, TAIL_C, True, PREC, UPCAST)

