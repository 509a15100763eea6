// PyTorch operator zeroi2v::stdha_fwd_cuda: a thin wrapper of the C API in stdha.h.
//
//   torch.ops.zeroi2v.stdha_fwd_cuda(Tensor q, Tensor k, Tensor v, int[] offsets,
//                                    int num_frames, float scale) -> Tensor
//
// Registered with the dispatcher (CUDA kernel + Meta kernel), so it works from Python, under
// torch.compile (the Meta kernel gives shapes, symbolic ones included), from TorchScript and from
// libtorch C++ (this file has no Python dependency; the CMake target zeroi2v_torch_ops builds it
// without the pybind11 module). Inference only: no autograd formula is registered.
//
// The offsets are a list of ints rather than a tensor: they are configuration, not data, so
// passing them by value keeps the launch free of host<->device copies and syncs, makes the call
// capturable in CUDA graphs, and lets torch.compile treat them as constants.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "op_checks.h"
#include "stdha.h"

namespace {

constexpr const char* kOp = "zeroi2v::stdha_fwd_cuda";

void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  c10::IntArrayRef offsets, int64_t num_frames) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kOp,
                    ": q, k, v must have rank 4 (B*T, heads, tokens, head_dim), got ", q.sizes(),
                    ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                    kOp, ": q, k, v must share a dtype, got ", q.scalar_type(), ", ",
                    k.scalar_type(), ", ", v.scalar_type());
  zeroi2v::check_offsets(kOp, offsets, num_frames);  // sizes may be symbolic here (Meta)
}

// The kernel reads rows with 16-byte cp.async: D must be contiguous and the pointer and other
// strides 16-byte aligned. Anything else (rare: odd views) is copied first into a fresh, hence
// aligned, contiguous tensor (clone, not contiguous(): a contiguous tensor at an odd storage
// offset would come back unchanged).
at::Tensor kernel_ready(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  t.stride(2) % 8 == 0 &&
                  (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// (B*T, H, N, D) view of a (B*T, N, H, D) buffer: the layout the output projection reads, so the
// model's transpose(1, 2).reshape(B*T, N, H*D) is a view, not a copy.
at::Tensor output_like(const at::Tensor& q, int64_t bt, int64_t heads, int64_t n, int64_t d) {
  return at::empty({bt, n, heads, d}, q.options()).transpose(1, 2);
}

at::Tensor stdha_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          c10::IntArrayRef offsets, int64_t num_frames, double scale) {
  check_common(q, k, v, offsets, num_frames);
  TORCH_CHECK_VALUE(q.is_cuda() && k.is_cuda() && v.is_cuda(), kOp,
                    ": q, k, v must be CUDA tensors");
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), kOp,
                    ": q, k, v must be on one device");
  const int64_t bt = q.size(0), heads = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t nkv = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == bt && v.size(0) == bt && k.size(1) == heads &&
                        v.size(1) == heads && v.size(2) == nkv && k.size(3) == d &&
                        v.size(3) == d,
                    kOp, ": shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ",
                    v.sizes());
  zeroi2v::check_clip(kOp, bt, heads, offsets, num_frames);
  TORCH_CHECK_VALUE(heads <= ZEROI2V_STDHA_MAX_HEADS, kOp, ": at most ",
                    ZEROI2V_STDHA_MAX_HEADS, " heads, got ", heads);
  int dtype;
  if (q.scalar_type() == at::kHalf) {
    dtype = ZEROI2V_DTYPE_FP16;
  } else if (q.scalar_type() == at::kBFloat16) {
    dtype = ZEROI2V_DTYPE_BF16;
  } else {
    TORCH_CHECK_VALUE(false, kOp, ": dtype must be float16 or bfloat16, got ", q.scalar_type());
  }
  TORCH_CHECK_VALUE(zeroi2v_stdha_supported(dtype, d), kOp, ": head_dim ", d,
                    " is not compiled (supported: 64, 128)");
  TORCH_CHECK_VALUE(nkv > 0 || nq == 0, kOp, ": k and v have no tokens");

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = output_like(q, bt, heads, nq, d);
  if (out.numel() == 0) return out;
  const at::Tensor qc = kernel_ready(q), kc = kernel_ready(k), vc = kernel_ready(v);
  const int64_t qs[3] = {qc.stride(0), qc.stride(1), qc.stride(2)};
  const int64_t ks[3] = {kc.stride(0), kc.stride(1), kc.stride(2)};
  const int64_t vs[3] = {vc.stride(0), vc.stride(1), vc.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  std::vector<int32_t> offs(offsets.begin(), offsets.end());
  const int status = zeroi2v_stdha_fwd(
      dtype, qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), out.data_ptr(), qs, ks, vs, os, bt,
      heads, nq, nkv, d, num_frames, offs.data(), static_cast<float>(scale),
      c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(status == ZEROI2V_OK, kOp, ": ", zeroi2v_status_string(status));
  return out;
}

// Shapes only (torch.compile / FakeTensor, symbolic sizes allowed).
at::Tensor stdha_fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          c10::IntArrayRef offsets, int64_t num_frames, double scale) {
  check_common(q, k, v, offsets, num_frames);
  const auto s = q.sym_sizes();
  return at::empty_symint({s[0], s[2], s[1], s[3]}, q.options()).transpose(1, 2);
}

}  // namespace

// FRAGMENT, not TORCH_LIBRARY: the Python/Triton side may define other ops in the same
// "zeroi2v" namespace (torch.library), and only one TORCH_LIBRARY block may own a namespace.
TORCH_LIBRARY_FRAGMENT(zeroi2v, m) {
  m.def(
      "stdha_fwd_cuda(Tensor q, Tensor k, Tensor v, int[] offsets, int num_frames, float scale)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(zeroi2v, CUDA, m) { m.impl("stdha_fwd_cuda", &stdha_fwd_cuda); }

TORCH_LIBRARY_IMPL(zeroi2v, Meta, m) { m.impl("stdha_fwd_cuda", &stdha_fwd_meta); }
