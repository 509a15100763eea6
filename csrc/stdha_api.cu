// Plain C API of the STDHA forward kernel (see stdha.h): argument checks and tile selection.
#include "stdha.h"
#include "stdha_kernel.cuh"

namespace zeroi2v {
namespace stdha {
ZEROI2V_STDHA_FOR_EACH_CONFIG(ZEROI2V_STDHA_EXTERN, false)
ZEROI2V_STDHA_FOR_EACH_CONFIG(ZEROI2V_STDHA_EXTERN, true)

namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

bool strides_ok(const int64_t s[3]) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

// Rows per thread block for head_dim 64: 128 (2 m tiles per warp: K/V fragments reused twice)
// unless that pads N more than 64-row blocks would (N = 257: 384 vs 320 rows) or leaves fewer
// blocks than a GPU has warp schedulers to fill. zeroi2v_stdha_set_block_m forces a choice (the
// Python side passes ZEROI2V_STDHA_BLOCK_M, validated, for benchmarking). Heuristic, to be tuned
// with measurements.
int g_forced_m_tiles = 0;  // 0: by size; 1: 64 rows; 2: 128 rows

int choose_m_tiles(int64_t n, int64_t bt, int64_t heads) {
  if (g_forced_m_tiles) return g_forced_m_tiles;
  const int64_t blocks128 = (n + 127) / 128;
  const int64_t blocks64 = (n + 63) / 64;
  const bool no_extra_padding = blocks128 * 2 == blocks64;
  const bool enough_blocks = blocks128 * bt * heads >= 264;  // 2 waves of 132 SMs (H100)
  return (no_extra_padding && enough_blocks) ? 2 : 1;
}

}  // namespace
}  // namespace stdha
}  // namespace zeroi2v

extern "C" {

int zeroi2v_stdha_set_block_m(int block_m) {
  if (block_m != 0 && block_m != 64 && block_m != 128) return ZEROI2V_ERR_INVALID_ARGUMENT;
  zeroi2v::stdha::g_forced_m_tiles = block_m / 64;
  return 0;
}

int zeroi2v_stdha_supported(int dtype, int64_t head_dim) {
  if (dtype != ZEROI2V_DTYPE_FP16 && dtype != ZEROI2V_DTYPE_BF16) return 0;
  return head_dim == 64 || head_dim == 128;
}

int zeroi2v_stdha_fwd(int dtype, const void* q, const void* k, const void* v, void* out,
                      const int64_t q_strides[3], const int64_t k_strides[3],
                      const int64_t v_strides[3], const int64_t out_strides[3],
                      int64_t batch_frames, int64_t heads, int64_t q_tokens, int64_t kv_tokens,
                      int64_t head_dim, int64_t num_frames, const int32_t* head_offsets,
                      float scale, void* stream) {
  using namespace zeroi2v::stdha;
  if (!zeroi2v_stdha_supported(dtype, head_dim)) return ZEROI2V_ERR_UNSUPPORTED;
  if (batch_frames < 0 || q_tokens < 0 || kv_tokens < 0 || heads < 1 || heads > ZEROI2V_STDHA_MAX_HEADS ||
      num_frames < 1 || batch_frames % num_frames != 0 || batch_frames > 0x7fffffffLL ||
      q_tokens > 0x7fffffffLL || kv_tokens > 0x7fffffffLL)
    return ZEROI2V_ERR_INVALID_ARGUMENT;
  if (!q_strides || !k_strides || !v_strides || !out_strides || !head_offsets)
    return ZEROI2V_ERR_INVALID_ARGUMENT;
  for (int64_t h = 0; h < heads; ++h) {
    if (head_offsets[h] <= -num_frames || head_offsets[h] >= num_frames)
      return ZEROI2V_ERR_INVALID_ARGUMENT;
  }
  if (batch_frames == 0 || q_tokens == 0) return ZEROI2V_OK;  // nothing to compute
  if (kv_tokens == 0) return ZEROI2V_ERR_INVALID_ARGUMENT;     // softmax over no keys
  if (!q || !k || !v || !out) return ZEROI2V_ERR_INVALID_ARGUMENT;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out) ||
      !strides_ok(q_strides) || !strides_ok(k_strides) || !strides_ok(v_strides) ||
      !strides_ok(out_strides))
    return ZEROI2V_ERR_MISALIGNED;

  Params p;
  memset(&p, 0, sizeof(p));
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = out;
  p.q_sb = q_strides[0], p.q_sh = q_strides[1], p.q_sn = q_strides[2];
  p.k_sb = k_strides[0], p.k_sh = k_strides[1], p.k_sn = k_strides[2];
  p.v_sb = v_strides[0], p.v_sh = v_strides[1], p.v_sn = v_strides[2];
  p.o_sb = out_strides[0], p.o_sh = out_strides[1], p.o_sn = out_strides[2];
  p.bt = (int)batch_frames;
  p.heads = (int)heads;
  p.n = (int)q_tokens;
  p.n_kv = (int)kv_tokens;
  p.num_frames = (int)num_frames;
  p.scale_log2 = scale * 1.4426950408889634f;  // log2(e)
  for (int64_t h = 0; h < heads; ++h) p.offsets[h] = head_offsets[h];

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool bf16 = dtype == ZEROI2V_DTYPE_BF16;
  cudaError_t err;
  if (head_dim == 64) {
    const int mt = choose_m_tiles(q_tokens, batch_frames, heads);
    if (bf16)
      err = mt == 2 ? launch_stdha_fwd_impl<true, 64, 2>(p, s) : launch_stdha_fwd_impl<true, 64, 1>(p, s);
    else
      err = mt == 2 ? launch_stdha_fwd_impl<false, 64, 2>(p, s) : launch_stdha_fwd_impl<false, 64, 1>(p, s);
  } else {  // 128
    err = bf16 ? launch_stdha_fwd_impl<true, 128, 1>(p, s) : launch_stdha_fwd_impl<false, 128, 1>(p, s);
  }
  return err == cudaSuccess ? ZEROI2V_OK : ZEROI2V_ERR_CUDA_BASE + (int)err;
}

const char* zeroi2v_status_string(int status) {
  switch (status) {
    case ZEROI2V_OK:
      return "success";
    case ZEROI2V_ERR_INVALID_ARGUMENT:
      return "invalid argument (sizes, frame count, head count or offsets out of range)";
    case ZEROI2V_ERR_UNSUPPORTED:
      return "unsupported dtype or head_dim (compiled: fp16/bf16, head_dim 64 and 128)";
    case ZEROI2V_ERR_MISALIGNED:
      return "pointers and strides must be 16-byte aligned (strides multiples of 8 elements)";
    default:
      if (status >= ZEROI2V_ERR_CUDA_BASE)
        return cudaGetErrorString(static_cast<cudaError_t>(status - ZEROI2V_ERR_CUDA_BASE));
      return "unknown zeroi2v status";
  }
}

}  // extern "C"
