// PyTorch operator zeroi2v::shift_frames_: STDHA's temporal shift of K or V, in place, on the CPU.
//
//   torch.ops.zeroi2v.shift_frames_(Tensor(a!) x, int num_frames, int offset) -> ()
//
// x is (B*T, H, N, D) with the T frames of a video adjacent and D contiguous; typically the K or V
// view of a run of heads inside a fused qkv activation. Afterwards frame t holds what frame
// t - offset held, and frames whose source lies outside the clip keep their own (SPEC §2).
//
// Why a native op: in pure PyTorch an overlapping in-place move needs a temporary (clone, then
// copy back), i.e. twice the memory traffic plus an allocation. Walking each (video, token) column
// in the right order (descending t for offset > 0) moves every row exactly once with memcpy, which
// makes the shift about 3-4x cheaper on the CPU (benchmarks/test_bench_core.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr const char* kOp = "zeroi2v::shift_frames_";

void shift_frames_cpu(at::Tensor& x, int64_t num_frames, int64_t offset) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), kOp, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must have rank 4 (B*T, heads, tokens, head_dim), got ",
                    x.sizes());
  TORCH_CHECK_VALUE(num_frames >= 1, kOp, ": num_frames must be >= 1, got ", num_frames);
  TORCH_CHECK_VALUE(x.size(0) % num_frames == 0, kOp, ": batch*frames = ", x.size(0),
                    " is not divisible by num_frames = ", num_frames);
  TORCH_CHECK_VALUE(offset > -num_frames && offset < num_frames, kOp, ": offset ", offset,
                    " is too large for ", num_frames, " frames (|offset| < num_frames)");
  TORCH_CHECK_VALUE(x.stride(3) == 1 || x.size(3) == 1, kOp,
                    ": the last dimension must be contiguous, got strides ", x.strides());
  if (offset == 0 || x.numel() == 0) return;

  const int64_t T = num_frames, B = x.size(0) / T, H = x.size(1), N = x.size(2), D = x.size(3);
  const int64_t shift = offset > 0 ? offset : -offset;
  const int64_t es = x.element_size();
  const int64_t sf = x.stride(0) * es, sh = x.stride(1) * es, sn = x.stride(2) * es;
  // Heads laid out back to back (the usual fused-qkv view): one memcpy covers all of them.
  const bool packed = H == 1 || x.stride(1) == D;
  const int64_t hrows = packed ? 1 : H;
  const int64_t row_bytes = (packed ? H : 1) * D * es;
  // Tasks: (video, head row, chunk of tokens); each walks its frames in an order that reads every
  // source row before it is overwritten. Chunks of tokens keep consecutive copies close in memory.
  constexpr int64_t kTokens = 16;
  const int64_t chunks = (N + kTokens - 1) / kTokens;
  char* base = static_cast<char*>(x.data_ptr());

  // Threads only pay off for large moves: waking them costs more than copying a small tensor, so
  // each thread gets at least ~256 KiB (smaller shifts run on the calling thread).
  const int64_t task_bytes = (T - shift) * kTokens * row_bytes;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, task_bytes));
  at::parallel_for(0, B * hrows * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, h = (task / chunks) % hrows, b = task / (chunks * hrows);
      const int64_t n0 = c * kTokens, n1 = std::min(N, n0 + kTokens);
      char* video = base + b * T * sf + h * sh;
      auto move = [&](int64_t dst, int64_t src) {
        for (int64_t n = n0; n < n1; ++n) {
          std::memcpy(video + dst * sf + n * sn, video + src * sf + n * sn, row_bytes);
        }
      };
      if (offset > 0) {  // frame t <- t - offset, for t = T-1 down to offset
        for (int64_t t = T - 1; t >= shift; --t) move(t, t - shift);
      } else {  // frame t <- t + shift, for t = 0 up to T-1-shift
        for (int64_t t = 0; t + shift < T; ++t) move(t, t + shift);
      }
    }
  });
}

void shift_frames_meta(at::Tensor& x, int64_t num_frames, int64_t offset) {
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must have rank 4, got ", x.sizes());
  (void)num_frames;
  (void)offset;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zeroi2v, m) {
  m.def("shift_frames_(Tensor(a!) x, int num_frames, int offset) -> ()");
}

TORCH_LIBRARY_IMPL(zeroi2v, CPU, m) { m.impl("shift_frames_", &shift_frames_cpu); }

TORCH_LIBRARY_IMPL(zeroi2v, Meta, m) { m.impl("shift_frames_", &shift_frames_meta); }
