/* zeroi2v STDHA forward: plain C API of the CUDA kernel (no libtorch, no Python).
 *
 * STDHA (docs/method.md §2): for output row bt = b*T + t and head h, the keys and values come from row
 * b*T + s, where s = t - d_h if 0 <= t - d_h < T, else s = t (boundary: keep the own frame).
 *     out[bt, h] = softmax(q[bt, h] · k[src, h]^T * scale) · v[src, h]
 * The source frame is chosen by pointer arithmetic while K/V tiles are loaded: no shifted copy.
 *
 * Tensors are (B*T, H, N, D) with unit stride along D; the other three strides (in elements, for
 * the B*T, H and N dimensions) are passed, so strided views of a fused qkv projection work as
 * they are. Pointers and the three strides must be 16-byte aligned (strides multiples of 8
 * elements); `zeroi2v_stdha_fwd` returns ZEROI2V_ERR_MISALIGNED otherwise.
 *
 * Supported: fp16 and bf16, head_dim 64 and 128 (q, k, v and out share it), any N >= 1, up to ZEROI2V_STDHA_MAX_HEADS heads.
 * Softmax is computed online in fp32, accumulation in fp32 (tensor cores, mma.sync m16n8k16).
 * Needs sm_80 or newer. Forward only.
 */
#ifndef ZEROI2V_STDHA_H_
#define ZEROI2V_STDHA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ZEROI2V_STDHA_MAX_HEADS 128

typedef enum {
  ZEROI2V_DTYPE_FP16 = 0,
  ZEROI2V_DTYPE_BF16 = 1
} zeroi2v_dtype;

typedef enum {
  ZEROI2V_OK = 0,
  ZEROI2V_ERR_INVALID_ARGUMENT = 1, /* sizes, frame count, offsets out of range, null pointers */
  ZEROI2V_ERR_UNSUPPORTED = 2,      /* dtype or head_dim without a compiled kernel */
  ZEROI2V_ERR_MISALIGNED = 3,       /* a pointer or stride is not 16-byte aligned */
  ZEROI2V_ERR_CUDA_BASE = 1000      /* status = 1000 + cudaError_t of the failed CUDA call */
} zeroi2v_status;

/* Launch the forward kernel on `stream` (a cudaStream_t; NULL = legacy default stream).
 *   q, k, v, out     device pointers, element type `dtype`
 *   *_strides[3]     strides in elements of the B*T, H and N dimensions (D has stride 1)
 *   batch_frames     B*T (rows; a multiple of num_frames)
 *   heads, head_dim, num_frames
 *   q_tokens         N of q and out; kv_tokens: N of k and v (usually the same)
 *   head_offsets     host array of `heads` ints d_h with |d_h| < num_frames (copied at launch)
 *   scale            softmax scale, usually 1/sqrt(head_dim)
 * Returns a zeroi2v_status; asynchronous kernel faults surface at the next synchronisation. */
int zeroi2v_stdha_fwd(int dtype, const void* q, const void* k, const void* v, void* out,
                      const int64_t q_strides[3], const int64_t k_strides[3],
                      const int64_t v_strides[3], const int64_t out_strides[3],
                      int64_t batch_frames, int64_t heads, int64_t q_tokens, int64_t kv_tokens,
                      int64_t head_dim, int64_t num_frames, const int32_t* head_offsets,
                      float scale, void* stream);

/* 1 if a kernel is compiled for this dtype and head_dim, else 0. */
int zeroi2v_stdha_supported(int dtype, int64_t head_dim);

/* Query rows per tile of the head_dim-64 kernel: 64 or 128, or 0 to choose by size (the
   default). Any other value: ZEROI2V_ERR_INVALID_ARGUMENT, nothing changed. */
int zeroi2v_stdha_set_block_m(int block_m);

/* Human-readable message for a status code (CUDA errors included). */
const char* zeroi2v_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* ZEROI2V_STDHA_H_ */
