// PyTorch operator zeroi2v::shift_heads_: STDHA's temporal shift of K and V, in place, on the CPU.
//
//   torch.ops.zeroi2v.shift_heads_(Tensor(a!)[] xs, int num_frames, int[] offsets) -> ()
//
// Every x in xs is (B*T, H, N, D) with the T frames of a video adjacent and D contiguous;
// typically the K and the V view of a fused qkv activation. Afterwards, for head h, frame t holds
// what frame t - offsets[h] held, and frames whose source lies outside the clip keep their own
// (docs/method.md §2). Heads with offset 0 are not touched.
//
// Why a native op: in pure PyTorch an overlapping in-place move needs a temporary (clone, then
// copy back), i.e. twice the memory traffic plus an allocation, and one pass over the activation
// per run of heads and per tensor. Here every row moves exactly once (memcpy, walking frames in an
// order that reads each source before it is overwritten), and one sweep handles all heads of K
// and V: a task owns a few tokens of one video across all frames, so the rows it touches (one
// 4 KiB page each in a fused qkv layout) stay in the TLB and caches while every run of heads, in
// K and in V, is moved. Separate passes per run and tensor cost about twice as much for ViT-L/14
// (benchmarks/test_bench_core.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "op_checks.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr const char* kOp = "zeroi2v::shift_heads_";

struct Run {
  int64_t h0, h1, offset;
};

void check(at::TensorList xs, int64_t num_frames, c10::IntArrayRef offsets, bool cpu) {
  TORCH_CHECK_VALUE(!xs.empty(), kOp, ": no tensors given");
  const auto& x0 = xs[0];
  for (const auto& x : xs) {
    TORCH_CHECK_VALUE(!cpu || x.device().is_cpu(), kOp, ": expected CPU tensors, got ", x.device());
    TORCH_CHECK_VALUE(x.dim() == 4, kOp,
                      ": tensors must have rank 4 (B*T, heads, tokens, head_dim), got ", x.sizes());
    TORCH_CHECK_VALUE(x.sizes().slice(0, 3) == x0.sizes().slice(0, 3), kOp,
                      ": tensors must agree on batch*frames, heads and tokens, got ", x0.sizes(),
                      " and ", x.sizes());
    TORCH_CHECK_VALUE(x.stride(3) == 1 || x.size(3) == 1, kOp,
                      ": the last dimension must be contiguous, got strides ", x.strides());
  }
  zeroi2v::check_clip(kOp, x0.size(0), x0.size(1), offsets, num_frames);
}

// Maximal runs of adjacent heads sharing a non-zero offset.
std::vector<Run> temporal_runs(c10::IntArrayRef offsets) {
  std::vector<Run> runs;
  const int64_t H = static_cast<int64_t>(offsets.size());
  for (int64_t h0 = 0, h = 1; h <= H; ++h) {
    if (h < H && offsets[h] == offsets[h0]) continue;
    if (offsets[h0] != 0) runs.push_back({h0, h, offsets[h0]});
    h0 = h;
  }
  return runs;
}

void shift_heads_cpu(at::TensorList xs, int64_t num_frames, c10::IntArrayRef offsets) {
  check(xs, num_frames, offsets, /*cpu=*/true);
  const std::vector<Run> runs = temporal_runs(offsets);
  const int64_t T = num_frames, B = xs[0].size(0) / T, N = xs[0].size(2);
  if (runs.empty() || xs[0].numel() == 0) return;

  // Tasks: (video, chunk of tokens). kTokens rows per frame keep one task's rows (T * kTokens
  // pages in a fused qkv layout) within the TLB while all runs and tensors are moved.
  constexpr int64_t kTokens = 8;
  const int64_t chunks = (N + kTokens - 1) / kTokens;
  int64_t task_bytes = 0;
  for (const auto& x : xs) {
    for (const Run& r : runs) {
      const int64_t a = r.offset > 0 ? r.offset : -r.offset;
      task_bytes += (T - a) * kTokens * (r.h1 - r.h0) * x.size(3) * x.element_size();
    }
  }
  // Threads only pay off for large moves: waking them costs more than copying a small tensor, so
  // each thread gets at least ~256 KiB (smaller shifts run on the calling thread).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, task_bytes));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, n0 = (task % chunks) * kTokens;
      const int64_t n1 = std::min(N, n0 + kTokens);
      for (const Run& r : runs) {
        for (const auto& x : xs) {
          const int64_t es = x.element_size(), D = x.size(3);
          const int64_t sf = x.stride(0) * es, sh = x.stride(1) * es, sn = x.stride(2) * es;
          // heads laid out back to back (the usual fused-qkv view): one memcpy per row for the run
          const bool packed = r.h1 - r.h0 == 1 || x.stride(1) == D;
          const int64_t row_bytes = (packed ? r.h1 - r.h0 : 1) * D * es;
          for (int64_t h = r.h0; h < (packed ? r.h0 + 1 : r.h1); ++h) {
            char* video = static_cast<char*>(x.data_ptr()) + b * T * sf + h * sh;
            const auto move = [&](int64_t dst, int64_t src) {
              for (int64_t n = n0; n < n1; ++n) {
                std::memcpy(video + dst * sf + n * sn, video + src * sf + n * sn, row_bytes);
              }
            };
            if (r.offset > 0) {  // frame t <- t - offset, for t = T-1 down to offset
              for (int64_t t = T - 1; t >= r.offset; --t) move(t, t - r.offset);
            } else {  // frame t <- t + |offset|, for t = 0 up to T-1-|offset|
              for (int64_t t = 0; t - r.offset < T; ++t) move(t, t - r.offset);
            }
          }
        }
      }
    }
  });
}

void shift_heads_meta(at::TensorList xs, int64_t num_frames, c10::IntArrayRef offsets) {
  check(xs, num_frames, offsets, /*cpu=*/false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zeroi2v, m) {
  m.def("shift_heads_(Tensor(a!)[] xs, int num_frames, int[] offsets) -> ()");
}

TORCH_LIBRARY_IMPL(zeroi2v, CPU, m) { m.impl("shift_heads_", &shift_heads_cpu); }

TORCH_LIBRARY_IMPL(zeroi2v, Meta, m) { m.impl("shift_heads_", &shift_heads_meta); }
