// PyTorch operator zeroi2v::stdha_fwd_cpu: fused STDHA forward on the CPU (float32, inference).
//
//   torch.ops.zeroi2v.stdha_fwd_cpu(Tensor q, Tensor k, Tensor v, int[] offsets, int num_frames,
//                                   float scale) -> Tensor
//
// q, k, v are (B*T, H, N, D) with the T frames of a video adjacent and D contiguous (typically
// views of a fused qkv activation). Returns (B*T, H, N, D), a view of a (B*T, N, H, D) buffer: the
// layout timm's `x.transpose(1, 2).reshape(B*T, N, C)` reads without a copy (as SDPA's output).
//
// Why: the shift-then-SDPA path moves the temporal heads' K/V through memory first; for ViT-L/14
// with 7 of 16 heads temporal over 32 frames that is ~30 MB, ~4-5 % of SDPA on a 2-core CPU. Here
// the shift is pointer arithmetic: a (frame, head, query block) task reads K/V of its source frame
// s(t, h) (docs/method.md §2, boundary: own frame) in place. The work is laid out as ATen's CPU flash
// attention lays it out (tasks in (frame, head, query block) order over one parallel region, 64
// query rows per block, BLAS sgemm for Q·K^T and P·V, a full-row softmax since ViT rows are short),
// so that it costs what SDPA costs.
//
// BLAS: sgemm_ (Fortran interface) from the BLAS that libtorch links (MKL in x86 wheels), taken as
// a weak symbol: where libtorch exports none the op raises and Python keeps the "torch" backend.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "op_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ZEROI2V_X86 1
#else
#define ZEROI2V_X86 0
#endif

extern "C" {
// Fortran BLAS, LP64 (int) interface; weak: resolved from libtorch's BLAS when it exports one.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace {

constexpr const char* kOp = "zeroi2v::stdha_fwd_cpu";

bool blas_available() { return sgemm_ != nullptr; }

// ---------------------------------------------------------------- softmax pieces (row of length n)

float row_max_scalar(const float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = exp(x[i] - mx); returns the sum.
float exp_sum_scalar(float* x, int64_t n, float mx) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    s += x[i];
  }
  return s;
}

#if ZEROI2V_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (softmax after subtracting the row max), ~1 ulp: x = n ln2 + r with
// |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial, 2^n through the exponent bits.
// Inputs below -87 (exp < 1.6e-38, nothing next to the row's 1) are clamped there.
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);  // ln2 lo
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) float row_max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float r = _mm_cvtss_f32(h);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

__attribute__((target("avx2,fma"))) float exp_sum_avx2(float* x, int64_t n, float mx) {
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmx));
    _mm256_storeu_ps(x + i, y);
    acc = _mm256_add_ps(acc, y);
  }
  float s = hsum256(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    s += x[i];
  }
  return s;
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// Softmax numerator of one row in place; returns its sum.
inline float softmax_row(float* x, int64_t n) {
#if ZEROI2V_X86
  if (cpu_has_avx2()) return exp_sum_avx2(x, n, row_max_avx2(x, n));
#endif
  return exp_sum_scalar(x, n, row_max_scalar(x, n));
}

// ------------------------------------------------------------------------------------ the op

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  c10::IntArrayRef offsets, int64_t num_frames, bool cpu) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->dim() == 4, kOp, ": q, k, v must have rank 4 (B*T, heads, tokens, "
                      "head_dim), got ", t->sizes());
    TORCH_CHECK_VALUE(!cpu || t->device().is_cpu(), kOp, ": expected CPU tensors, got ",
                      t->device());
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, kOp, ": float32 only, got ",
                      t->scalar_type());
    TORCH_CHECK_VALUE(t->stride(3) == 1 || t->size(3) == 1, kOp,
                      ": the last dimension must be contiguous, got strides ", t->strides());
  }
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(0) == v.size(0) && q.size(1) == k.size(1) &&
                        q.size(1) == v.size(1),
                    kOp, ": q, k, v must agree on batch*frames and heads, got ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(q.size(3) == k.size(3) && q.size(3) == v.size(3) && k.size(2) == v.size(2),
                    kOp, ": q, k, v need one head_dim and k, v one token count, got ", q.sizes(),
                    ", ", k.sizes(), ", ", v.sizes());
  zeroi2v::check_clip(kOp, q.size(0), q.size(1), offsets, num_frames);
  // sgemm_ takes 32-bit sizes and leading dimensions
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->size(2) < (int64_t{1} << 30) && t->stride(2) < (int64_t{1} << 30), kOp,
                      ": token count / row stride too large for BLAS, got ", t->sizes(), " ",
                      t->strides());
  }
}

at::Tensor stdha_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         c10::IntArrayRef offsets, int64_t num_frames, double scale) {
  check_inputs(q, k, v, offsets, num_frames, /*cpu=*/true);
  TORCH_CHECK(blas_available(), kOp, ": libtorch exports no BLAS sgemm_ here; use the 'torch' "
              "backend");
  const int64_t BT = q.size(0), H = q.size(1), N = q.size(2), Nk = k.size(2), D = q.size(3);
  const int64_t T = num_frames;
  // (B*T, N, H, D) memory, returned as a (B*T, H, N, D) view
  at::Tensor out = at::empty({BT, N, H, D}, q.options());
  if (out.numel() == 0) return out.transpose(1, 2);
  if (Nk == 0) return out.zero_().transpose(1, 2);

  // Query rows per task: about what ATen's CPU flash attention takes (64 for ViT token counts),
  // but N split evenly (257 -> 65+64+64+64, not 64x4 + a 1-row remainder task with its own GEMMs).
  const int64_t q_target = N >= 768 ? 256 : (N >= 192 ? 64 : 32);
  const int64_t q_slices = std::max<int64_t>(1, N / q_target);
  const int64_t q_split = (N + q_slices - 1) / q_slices;  // most rows any task gets
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  float* od = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t os0 = N * H * D, os1 = D, os2 = H * D;
  std::vector<int64_t> off(offsets.begin(), offsets.end());
  const float alpha = static_cast<float>(scale), one = 1.f, zero = 0.f;

  at::parallel_for(0, BT * H * q_slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(q_split * Nk);
    std::vector<float> inv_sum(q_split);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t slice = task % q_slices, h = (task / q_slices) % H, bt = task / (q_slices * H);
      const int64_t t = bt % T, src = t - off[h];
      const int64_t kv_row = (0 <= src && src < T) ? bt - t + src : bt;  // docs/method.md §2 boundary
      const int64_t m0 = slice * N / q_slices, rows = (slice + 1) * N / q_slices - m0;
      const float* qp = qd + bt * qs0 + h * qs1 + m0 * qs2;
      const float* kp = kd + kv_row * ks0 + h * ks1;
      const float* vp = vd + kv_row * vs0 + h * vs1;
      float* op = od + bt * os0 + h * os1 + m0 * os2;
      // Column-major view of row-major buffers: logits^T (Nk x rows) = K (Nk x D) . Q^T
      const int m1 = static_cast<int>(Nk), n1 = static_cast<int>(rows), k1 = static_cast<int>(D);
      const int lda1 = static_cast<int>(ks2), ldb1 = static_cast<int>(qs2), ldc1 = m1;
      sgemm_("T", "N", &m1, &n1, &k1, &alpha, kp, &lda1, qp, &ldb1, &zero, logits.data(), &ldc1);
      for (int64_t i = 0; i < rows; ++i) inv_sum[i] = 1.f / softmax_row(logits.data() + i * Nk, Nk);
      // out^T (D x rows) = V^T (D x Nk) . P^T (Nk x rows), written in place with row stride H*D
      const int m2 = static_cast<int>(D), n2 = n1, k2 = m1;
      const int lda2 = static_cast<int>(vs2), ldb2 = m1, ldc2 = static_cast<int>(os2);
      sgemm_("N", "N", &m2, &n2, &k2, &one, vp, &lda2, logits.data(), &ldb2, &zero, op, &ldc2);
      for (int64_t i = 0; i < rows; ++i) {
        float* row = op + i * os2;
        const float s = inv_sum[i];
        for (int64_t j = 0; j < D; ++j) row[j] *= s;
      }
    }
  });
  return out.transpose(1, 2);
}

at::Tensor stdha_fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          c10::IntArrayRef offsets, int64_t num_frames, double scale) {
  (void)scale;
  check_inputs(q, k, v, offsets, num_frames, /*cpu=*/false);
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

}  // namespace

// Whether this build can run the op (a BLAS sgemm_ was found in libtorch).
bool zeroi2v_stdha_cpu_available() { return blas_available(); }

TORCH_LIBRARY_FRAGMENT(zeroi2v, m) {
  m.def("stdha_fwd_cpu(Tensor q, Tensor k, Tensor v, int[] offsets, int num_frames, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(zeroi2v, CPU, m) { m.impl("stdha_fwd_cpu", &stdha_fwd_cpu); }

TORCH_LIBRARY_IMPL(zeroi2v, Meta, m) { m.impl("stdha_fwd_cpu", &stdha_fwd_meta); }
