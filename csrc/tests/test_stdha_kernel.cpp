// Standalone test of the STDHA kernel through its C API (no libtorch). Registered with ctest.
//
// 1. Argument checks of the C API (no GPU needed): unsupported dtype/head_dim, misalignment,
//    offsets out of range.
// 2. On a GPU: random fp16/bf16 inputs, contiguous and fused-qkv (strided) layouts, random
//    per-head offsets, masked tails (N not a multiple of the tiles); the output buffer is
//    poisoned with NaN first; compared with a float64 CPU reference of docs/method.md §2 on the same
//    (rounded) inputs: ||out - ref|| / ||ref|| <= 5e-3 (fp16) / 1e-2 (bf16).
// Without a usable GPU, part 2 is skipped and the program exits with 77 (ctest SKIP_RETURN_CODE).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "stdha.h"

namespace {

constexpr int kSkip = 77;
int g_failures = 0;

#define EXPECT(cond, ...)                                      \
  do {                                                         \
    if (!(cond)) {                                             \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
      std::printf(__VA_ARGS__);                                \
      std::printf("\n");                                       \
      ++g_failures;                                            \
    }                                                          \
  } while (0)

uint16_t to_bits(float x, int dtype) {
  uint16_t b;
  if (dtype == ZEROI2V_DTYPE_FP16) {
    __half h = __float2half_rn(x);
    std::memcpy(&b, &h, 2);
  } else {
    __nv_bfloat16 h = __float2bfloat16_rn(x);
    std::memcpy(&b, &h, 2);
  }
  return b;
}

float from_bits(uint16_t b, int dtype) {
  if (dtype == ZEROI2V_DTYPE_FP16) {
    __half h;
    std::memcpy(&h, &b, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &b, 2);
  return __bfloat162float(h);
}

void test_argument_checks() {
  const int64_t s[3] = {8 * 64 * 12, 64, 12 * 64};
  const int64_t bad[3] = {8 * 64 * 12, 64, 12 * 64 + 4};
  const int32_t offs[12] = {1, -1};
  void* fake = reinterpret_cast<void*>(uintptr_t{0x10000});  // never dereferenced
  void* odd = reinterpret_cast<void*>(uintptr_t{0x10002});
  auto call = [&](int dtype, const void* q, const int64_t* qs, int64_t d, int64_t T,
                  const int32_t* o) {
    return zeroi2v_stdha_fwd(dtype, q, fake, fake, fake, qs, s, s, s, 16, 12, 8, 8, d, T, o,
                             0.125f, nullptr);
  };
  EXPECT(call(7, fake, s, 64, 8, offs) == ZEROI2V_ERR_UNSUPPORTED, "unknown dtype");
  EXPECT(call(ZEROI2V_DTYPE_FP16, fake, s, 48, 8, offs) == ZEROI2V_ERR_UNSUPPORTED, "head_dim 48");
  EXPECT(call(ZEROI2V_DTYPE_BF16, odd, s, 64, 8, offs) == ZEROI2V_ERR_MISALIGNED, "pointer");
  EXPECT(call(ZEROI2V_DTYPE_BF16, fake, bad, 64, 8, offs) == ZEROI2V_ERR_MISALIGNED, "stride");
  EXPECT(call(ZEROI2V_DTYPE_FP16, fake, s, 64, 3, offs) == ZEROI2V_ERR_INVALID_ARGUMENT,
         "B*T not a multiple of T");
  const int32_t too_far[12] = {8};
  EXPECT(call(ZEROI2V_DTYPE_FP16, fake, s, 64, 8, too_far) == ZEROI2V_ERR_INVALID_ARGUMENT,
         "|offset| >= T");
  EXPECT(zeroi2v_stdha_supported(ZEROI2V_DTYPE_FP16, 64) && zeroi2v_stdha_supported(ZEROI2V_DTYPE_BF16, 128),
         "supported()");
  EXPECT(std::strlen(zeroi2v_status_string(ZEROI2V_ERR_MISALIGNED)) > 0, "status string");
}

struct Case {
  int B, T, H, N, D, dtype;
  bool fused_qkv;  // q, k, v are strided views of one (B*T, N, 3, H, D) buffer
};

// Reference (float64) of docs/method.md §2 on logical (BT, H, N, D) arrays.
void reference(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
               const std::vector<float>& v, const std::vector<int32_t>& offs,
               std::vector<double>& out) {
  const int BT = c.B * c.T, H = c.H, N = c.N, D = c.D;
  const double scale = 1.0 / std::sqrt(double(D));
  out.assign(size_t(BT) * H * N * D, 0.0);
  std::vector<double> logits(N);
  for (int bt = 0; bt < BT; ++bt) {
    const int t = bt % c.T;
    for (int h = 0; h < H; ++h) {
      int s = t - offs[h];
      if (s < 0 || s >= c.T) s = t;
      const int src = bt - t + s;
      const size_t qb = (size_t(bt) * H + h) * N * D, kb = (size_t(src) * H + h) * N * D;
      for (int i = 0; i < N; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j < N; ++j) {
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += double(q[qb + size_t(i) * D + d]) * k[kb + size_t(j) * D + d];
          logits[j] = acc * scale;
          mx = std::max(mx, logits[j]);
        }
        double sum = 0;
        for (int j = 0; j < N; ++j) sum += (logits[j] = std::exp(logits[j] - mx));
        for (int d = 0; d < D; ++d) {
          double acc = 0;
          for (int j = 0; j < N; ++j) acc += logits[j] * v[kb + size_t(j) * D + d];
          out[qb + size_t(i) * D + d] = acc / sum;
        }
      }
    }
  }
}

#define CUDA_OK(x)                                                                   \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      ++g_failures;                                                                  \
      return;                                                                        \
    }                                                                                \
  } while (0)

void run_case(const Case& c, std::mt19937& rng) {
  const int BT = c.B * c.T, H = c.H, N = c.N, D = c.D;
  const size_t numel = size_t(BT) * H * N * D;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int> off_dist(-(c.T - 1), c.T - 1);
  std::vector<int32_t> offs(H);
  for (auto& o : offs) o = off_dist(rng);

  // logical (BT, H, N, D) values, rounded to the dtype
  std::vector<float> lq(numel), lk(numel), lv(numel);
  for (auto* vec : {&lq, &lk, &lv})
    for (auto& x : *vec) x = from_bits(to_bits(normal(rng), c.dtype), c.dtype);

  // device storage and strides
  std::vector<uint16_t> hq, hk, hv;
  int64_t qs[3], ks[3], vs[3];
  size_t q_off = 0, k_off = 0, v_off = 0, storage = 0;
  if (c.fused_qkv) {
    storage = 3 * numel;
    hq.assign(storage, 0);
    const int64_t st[3] = {int64_t(N) * 3 * H * D, D, int64_t(3) * H * D};
    for (int i = 0; i < 3; ++i) qs[i] = ks[i] = vs[i] = st[i];
    q_off = 0, k_off = size_t(H) * D, v_off = size_t(2) * H * D;
  } else {
    storage = numel;
    const int64_t st[3] = {int64_t(H) * N * D, int64_t(N) * D, D};
    for (int i = 0; i < 3; ++i) qs[i] = ks[i] = vs[i] = st[i];
  }
  auto scatter = [&](std::vector<uint16_t>& dst, size_t base, const int64_t* st,
                     const std::vector<float>& src) {
    for (int bt = 0; bt < BT; ++bt)
      for (int h = 0; h < H; ++h)
        for (int n = 0; n < N; ++n)
          for (int d = 0; d < D; ++d)
            dst[base + bt * st[0] + h * st[1] + n * st[2] + d] =
                to_bits(src[((size_t(bt) * H + h) * N + n) * D + d], c.dtype);
  };
  uint16_t *dq = nullptr, *dk = nullptr, *dv = nullptr, *dout = nullptr;
  if (c.fused_qkv) {
    scatter(hq, q_off, qs, lq);
    scatter(hq, k_off, ks, lk);
    scatter(hq, v_off, vs, lv);
    CUDA_OK(cudaMalloc(&dq, storage * 2));
    CUDA_OK(cudaMemcpy(dq, hq.data(), storage * 2, cudaMemcpyHostToDevice));
    dk = dq + k_off;
    dv = dq + v_off;
  } else {
    hq.assign(numel, 0), hk.assign(numel, 0), hv.assign(numel, 0);
    scatter(hq, 0, qs, lq), scatter(hk, 0, ks, lk), scatter(hv, 0, vs, lv);
    CUDA_OK(cudaMalloc(&dq, numel * 2));
    CUDA_OK(cudaMalloc(&dk, numel * 2));
    CUDA_OK(cudaMalloc(&dv, numel * 2));
    CUDA_OK(cudaMemcpy(dq, hq.data(), numel * 2, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dk, hk.data(), numel * 2, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dv, hv.data(), numel * 2, cudaMemcpyHostToDevice));
  }
  CUDA_OK(cudaMalloc(&dout, numel * 2));
  CUDA_OK(cudaMemset(dout, 0xff, numel * 2));  // 0xffff is NaN in fp16 and bf16: poison
  const int64_t os[3] = {int64_t(H) * N * D, int64_t(N) * D, D};

  const int status = zeroi2v_stdha_fwd(c.dtype, dq, dk, dv, dout, qs, ks, vs, os, BT, H, N, N, D,
                                       c.T, offs.data(), float(1.0 / std::sqrt(double(D))),
                                       nullptr);
  EXPECT(status == ZEROI2V_OK, "launch: %s", zeroi2v_status_string(status));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint16_t> hout(numel);
  CUDA_OK(cudaMemcpy(hout.data(), dout, numel * 2, cudaMemcpyDeviceToHost));
  cudaFree(dq);
  if (!c.fused_qkv) cudaFree(dk), cudaFree(dv);
  cudaFree(dout);

  std::vector<double> ref;
  reference(c, lq, lk, lv, offs, ref);
  double num = 0, den = 0;
  size_t nonfinite = 0;
  for (size_t i = 0; i < numel; ++i) {
    const double o = from_bits(hout[i], c.dtype);
    if (!std::isfinite(o)) ++nonfinite;
    num += (o - ref[i]) * (o - ref[i]);
    den += ref[i] * ref[i];
  }
  const double err = std::sqrt(num / den);
  const double tol = c.dtype == ZEROI2V_DTYPE_FP16 ? 5e-3 : 1e-2;
  const bool ok = nonfinite == 0 && err <= tol;
  std::printf("%s B=%d T=%d H=%d N=%d D=%d %s %s: rel err %.2e, non-finite %zu\n",
              ok ? "ok  " : "FAIL", c.B, c.T, c.H, c.N, c.D,
              c.dtype == ZEROI2V_DTYPE_FP16 ? "fp16" : "bf16",
              c.fused_qkv ? "fused-qkv" : "contiguous", err, nonfinite);
  if (!ok) ++g_failures;
}

}  // namespace

int main() {
  test_argument_checks();
  if (g_failures) {
    std::printf("%d argument-check failure(s)\n", g_failures);
    return 1;
  }
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("SKIP: no CUDA device (%s); argument checks passed\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return kSkip;
  }
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess || prop.major < 8) {
    std::printf("SKIP: the kernel needs sm_80+, device 0 is sm_%d%d\n", prop.major, prop.minor);
    return kSkip;
  }
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  std::mt19937 rng(1234);
  const Case cases[] = {
      {2, 1, 1, 1, 64, ZEROI2V_DTYPE_FP16, false},   {1, 2, 12, 17, 64, ZEROI2V_DTYPE_BF16, false},
      {1, 8, 12, 197, 64, ZEROI2V_DTYPE_FP16, true}, {1, 8, 12, 197, 64, ZEROI2V_DTYPE_BF16, true},
      {1, 4, 16, 257, 64, ZEROI2V_DTYPE_FP16, false}, {3, 8, 12, 197, 64, ZEROI2V_DTYPE_BF16, false},
      {1, 2, 4, 65, 128, ZEROI2V_DTYPE_FP16, true},  {1, 2, 4, 130, 128, ZEROI2V_DTYPE_BF16, false},
  };
  for (const Case& c : cases) run_case(c, rng);
  if (g_failures) {
    std::printf("%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("all cases passed\n");
  return 0;
}
