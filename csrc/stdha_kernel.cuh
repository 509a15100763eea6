// zeroi2v STDHA forward kernel (flash-attention style, tensor cores through mma.sync PTX).
//
// One thread block = 4 warps = one (row b*T+t, head h, block of BM query rows). Each warp owns
// 16*MT query rows (MT m16 tiles). K/V are streamed in tiles of BN = 64 tokens through shared
// memory with cp.async double buffering; the K/V base pointer of the block is the one of the
// *source* frame (SPEC §2 boundary rule), so the temporal shift costs nothing.
//
// Fragment layouts are those of PTX mma.m16n8k16 (row.col, fp32 accumulate):
//   A (16x16): a0 (row g, cols 2c..2c+1), a1 (row g+8), a2 (row g, cols 8+2c..), a3 (row g+8, 8+..)
//   B (16x8):  b0 (k rows 2c..2c+1, col g), b1 (k rows 8+2c.., col g)
//   C (16x8):  c0,c1 (row g, cols 2c, 2c+1), c2,c3 (row g+8)
// with g = lane / 4, c = lane % 4.
// S = Q K^T: A = Q (ldmatrix), B = K rows as stored (ldmatrix, non-transposed).
// O = P V:   A = P (re-packed from the S accumulators), B = V (ldmatrix.trans).
// Shared-memory rows are D elements = D/8 chunks of 16 bytes; chunk c of row r is stored at
// chunk c ^ (r & 7) (XOR swizzle) so that ldmatrix and cp.async are free of bank conflicts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "stdha.h"

namespace zeroi2v {
namespace stdha {

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_sb, q_sh, q_sn;  // strides (elements) of the B*T, H, N dims; D is contiguous
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t o_sb, o_sh, o_sn;
  int bt, heads, n, n_kv, num_frames;  // n: query rows, n_kv: key/value rows
  int num_m_blocks;
  float scale_log2;  // scale * log2(e): softmax through exp2
  int offsets[ZEROI2V_STDHA_MAX_HEADS];
};

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockN = 64;

template <int D, int MT>
struct Config {
  static constexpr int kBlockM = kWarps * 16 * MT;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(D % 64 == 0, "the swizzle needs at least 8 chunks per row");
  static constexpr int kSmemQ = kBlockM * D;     // elements
  static constexpr int kSmemKV = kBlockN * D;    // elements per buffer
  static constexpr size_t kSmemBytes = (size_t)(kSmemQ + 4 * kSmemKV) * 2;  // Q + 2xK + 2xV
};

// ---------------------------------------------------------------------------------- PTX helpers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  // src-size 0 zero-fills the 16 bytes (tails: rows >= N read as zeros, never as garbage)
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> one 32-bit register of two 16-bit values (lower column in the low half).
template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (BF16) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));  // ex2(-inf) = +0
  return y;
}

// Element offset of (row, 16-byte chunk) in a swizzled shared tile of D columns.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Copy rows [row0, row0 + ROWS) of a (N, D) matrix with row stride `stride_n` into a swizzled
// shared tile; rows >= n are zero-filled (their source address is clamped to row 0).
template <int D, int ROWS>
__device__ __forceinline__ void load_tile(uint32_t s_base, const uint16_t* g, int64_t stride_n,
                                          int row0, int n, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % kThreads == 0, "tile does not split evenly over the block");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    const int i = it * kThreads + tid;
    const int r = i / kChunks;
    const int c = i % kChunks;
    const int grow = row0 + r;
    const bool pred = grow < n;
    const uint16_t* src = g + (int64_t)(pred ? grow : 0) * stride_n + c * 8;
    cp_async_16(s_base + swz<D>(r, c) * 2, src, pred);
  }
}

// ---------------------------------------------------------------------------------- the kernel

template <bool BF16, int D, int MT>
__global__ void __launch_bounds__(kThreads)
    stdha_fwd_kernel(const __grid_constant__ Params p) {
  using Cfg = Config<D, MT>;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = kBlockN;
  constexpr int kRowsPerWarp = 16 * MT;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + Cfg::kSmemQ;        // 2 buffers
  uint16_t* sV = sK + 2 * Cfg::kSmemKV;   // 2 buffers
  const uint32_t sQ_u = smem_u32(sQ);
  const uint32_t sK_u = smem_u32(sK);
  const uint32_t sV_u = smem_u32(sV);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // row within an 8-row group of a fragment
  const int c4 = lane % 4; // column pair within a fragment

  // block -> (bt, head, m block); m blocks of one (bt, head) are adjacent (K/V reuse in L2)
  int bid = blockIdx.x;
  const int mb = bid % p.num_m_blocks;
  bid /= p.num_m_blocks;
  const int h = bid % p.heads;
  const int bt = bid / p.heads;
  const int t = bt % p.num_frames;
  int s = t - p.offsets[h];
  if (s < 0 || s >= p.num_frames) s = t;  // SPEC §2 boundary rule
  const int src_bt = bt - t + s;

  const uint16_t* gQ = static_cast<const uint16_t*>(p.q) + (int64_t)bt * p.q_sb + (int64_t)h * p.q_sh;
  const uint16_t* gK = static_cast<const uint16_t*>(p.k) + (int64_t)src_bt * p.k_sb + (int64_t)h * p.k_sh;
  const uint16_t* gV = static_cast<const uint16_t*>(p.v) + (int64_t)src_bt * p.v_sb + (int64_t)h * p.v_sh;
  uint16_t* gO = static_cast<uint16_t*>(p.o) + (int64_t)bt * p.o_sb + (int64_t)h * p.o_sh;

  const int n = p.n;
  const int n_kv = p.n_kv;
  const int m0 = mb * BM;
  const int n_tiles = (n_kv + BN - 1) / BN;

  // prologue: group (Q, K0), group (V0)
  load_tile<D, BM>(sQ_u, gQ, p.q_sn, m0, n, tid);
  load_tile<D, BN>(sK_u, gK, p.k_sn, 0, n_kv, tid);
  cp_async_commit();
  load_tile<D, BN>(sV_u, gV, p.v_sn, 0, n_kv, tid);
  cp_async_commit();

  uint32_t qf[MT][D / 16][4];
  float o_acc[MT][D / 8][4];
  float m_run[MT][2];
  float l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[mt][j][e] = 0.f;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_run[mt][r] = -INFINITY;
      l_run[mt][r] = 0.f;
    }
  }

  const float sl2 = p.scale_log2;
  // m tiles wholly past the last query row (the ragged end of N) skip their MMAs and softmax. The
  // test depends only on the warp and the tile, so each branch is warp-uniform (mma.sync needs
  // the whole warp); the cooperative loads and the barriers stay shared. N = 197 in 64-row blocks:
  // 208 rows computed instead of 256. Skipping also the Q fragment loads, the P packing and the
  // epilogue staging (whose NaN rows are never stored) made the 128-row tile spill on sm_90a.
  bool live[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) live[mt] = m0 + warp * kRowsPerWarp + mt * 16 < n;

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    const bool has_next = j + 1 < n_tiles;
    if (has_next) {  // prefetch tile j+1 into the other buffer (freed at the end of step j-1)
      load_tile<D, BN>(sK_u + (buf ^ 1) * Cfg::kSmemKV * 2, gK, p.k_sn, (j + 1) * BN, n_kv, tid);
      cp_async_commit();
      load_tile<D, BN>(sV_u + (buf ^ 1) * Cfg::kSmemKV * 2, gV, p.v_sn, (j + 1) * BN, n_kv, tid);
      cp_async_commit();
      cp_async_wait<3>();  // K_j (and Q) have landed
    } else {
      cp_async_wait<1>();
    }
    __syncthreads();

    if (j == 0) {  // Q fragments stay in registers for the whole row block
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp * kRowsPerWarp + mt * 16 + (lane % 16);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          ldmatrix_x4(qf[mt][kk], sQ_u + swz<D>(row, kk * 2 + lane / 16) * 2);
        }
      }
    }

    // ---- S = Q K_j^T (fp32)
    float s_acc[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int jj = 0; jj < BN / 8; ++jj) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s_acc[mt][jj][e] = 0.f;
      }
    }
    const uint32_t sKb = sK_u + buf * Cfg::kSmemKV * 2;
    const int kv0 = j * BN;
    const bool tail = kv0 + BN > n_kv;
    // In the last tile, 16-column groups wholly past n_kv are skipped (warp-uniform branch):
    // their S stays 0 and is masked to -inf below, their P is 0. N = 197 computes 208 columns
    // instead of 256.
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int jj = 0; jj < BN / 8; jj += 2) {
        if (tail && kv0 + jj * 8 >= n_kv) continue;
        // matrices: (n-tile jj, d lo), (jj, d hi), (jj+1, d lo), (jj+1, d hi)
        const int row = jj * 8 + (lane % 8) + (lane / 16) * 8;
        const int chunk = kk * 2 + (lane / 8) % 2;
        uint32_t b[4];
        ldmatrix_x4(b, sKb + swz<D>(row, chunk) * 2);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (!live[mt]) continue;
          mma_16816<BF16>(s_acc[mt][jj], qf[mt][kk], b[0], b[1]);
          mma_16816<BF16>(s_acc[mt][jj + 1], qf[mt][kk], b[2], b[3]);
        }
      }
    }

    // ---- online softmax (rows g and g+8 of each m tile; a row lives in one quad of lanes)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (!live[mt]) continue;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < BN / 8; ++jj) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = s_acc[mt][jj][2 * r + e] * sl2;
            if (tail && kv0 + jj * 8 + 2 * c4 + e >= n_kv) x = -INFINITY;
            s_acc[mt][jj][2 * r + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // every tile has at least one valid column, so mx is finite
        const float m_new = fmaxf(m_run[mt][r], mx);
        const float alpha = fast_exp2(m_run[mt][r] - m_new);  // first tile: exp2(-inf) = 0
        m_run[mt][r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int jj = 0; jj < BN / 8; ++jj) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(s_acc[mt][jj][2 * r + e] - m_new);
            s_acc[mt][jj][2 * r + e] = pe;
            sum += pe;
          }
        }
        l_run[mt][r] = l_run[mt][r] * alpha + sum;  // per-lane partial, reduced at the end
#pragma unroll
        for (int dj = 0; dj < D / 8; ++dj) {
          o_acc[mt][dj][2 * r] *= alpha;
          o_acc[mt][dj][2 * r + 1] *= alpha;
        }
      }
    }

    if (has_next) {
      cp_async_wait<2>();  // V_j has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // ---- O += P V_j
    const uint32_t sVb = sV_u + buf * Cfg::kSmemKV * 2;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      if (tail && kv0 + kk * 16 >= n_kv) continue;  // P is 0 there
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack2<BF16>(s_acc[mt][2 * kk][0], s_acc[mt][2 * kk][1]);
        pa[mt][1] = pack2<BF16>(s_acc[mt][2 * kk][2], s_acc[mt][2 * kk][3]);
        pa[mt][2] = pack2<BF16>(s_acc[mt][2 * kk + 1][0], s_acc[mt][2 * kk + 1][1]);
        pa[mt][3] = pack2<BF16>(s_acc[mt][2 * kk + 1][2], s_acc[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dj = 0; dj < D / 8; dj += 2) {
        // matrices: (kv lo, d-tile dj), (kv hi, dj), (kv lo, dj+1), (kv hi, dj+1), transposed
        const int row = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        const int chunk = dj + lane / 16;
        uint32_t b[4];
        ldmatrix_x4_trans(b, sVb + swz<D>(row, chunk) * 2);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (!live[mt]) continue;
          mma_16816<BF16>(o_acc[mt][dj], pa[mt], b[0], b[1]);
          mma_16816<BF16>(o_acc[mt][dj + 1], pa[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // everyone is done with buffer `buf` before step j+1 refills it
  }

  // ---- epilogue: normalise, stage this warp's rows in its own part of sQ, 16-byte stores
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = 1.f / l;
      const int row = warp * kRowsPerWarp + mt * 16 + g + 8 * r;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) {
        const uint32_t packed =
            pack2<BF16>(o_acc[mt][dj][2 * r] * inv, o_acc[mt][dj][2 * r + 1] * inv);
        *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, dj) + 2 * c4) = packed;
      }
    }
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < kRowsPerWarp * kChunks / 32; ++it) {
    const int i = it * 32 + lane;
    const int r = warp * kRowsPerWarp + i / kChunks;
    const int c = i % kChunks;
    const int grow = m0 + r;
    if (grow < n) {
      *reinterpret_cast<uint4*>(gO + (int64_t)grow * p.o_sn + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<D>(r, c));
    }
  }
}

// Launch one instantiation; explicitly instantiated per dtype in stdha_fwd_{fp16,bf16}.cu.
template <bool BF16, int D, int MT>
cudaError_t launch_stdha_fwd_impl(Params& p, cudaStream_t stream) {
  using Cfg = Config<D, MT>;
  p.num_m_blocks = (p.n + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const int64_t blocks = (int64_t)p.num_m_blocks * p.heads * p.bt;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kernel = stdha_fwd_kernel<BF16, D, MT>;
  constexpr size_t smem = Cfg::kSmemBytes;
  if (smem > 48 * 1024) {
    // opt in to more than 48 KiB of dynamic shared memory (idempotent and cheap)
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<(unsigned)blocks, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The compiled (dtype, head_dim, m tiles per warp) combinations. Keep this list short: every
// entry is compiled for every target architecture (CI compiles on 2 cores).
#define ZEROI2V_STDHA_FOR_EACH_CONFIG(X, BF16) X(BF16, 64, 1) X(BF16, 64, 2) X(BF16, 128, 1)

#define ZEROI2V_STDHA_INSTANTIATE(BF16, D, MT) \
  template cudaError_t launch_stdha_fwd_impl<BF16, D, MT>(Params&, cudaStream_t);
#define ZEROI2V_STDHA_EXTERN(BF16, D, MT) \
  extern template cudaError_t launch_stdha_fwd_impl<BF16, D, MT>(Params&, cudaStream_t);

}  // namespace stdha
}  // namespace zeroi2v
