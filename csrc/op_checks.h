// Argument checks shared by the zeroi2v operators (stdha_fwd_cuda, stdha_fwd_cpu, shift_heads_):
// the clip layout and the head offsets of docs/method.md §2, with one wording for every op.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace zeroi2v {

// num_frames >= 1 and every |offset| < num_frames. Needs no tensor sizes, so Meta kernels with
// symbolic shapes can call it.
inline void check_offsets(const char* op, c10::IntArrayRef offsets, int64_t num_frames) {
  TORCH_CHECK_VALUE(num_frames >= 1, op, ": num_frames must be >= 1, got ", num_frames);
  for (int64_t d : offsets) {
    TORCH_CHECK_VALUE(d > -num_frames && d < num_frames, op, ": head offset ", d,
                      " is too large for ", num_frames, " frames (|offset| < num_frames)");
  }
}

// check_offsets, plus: batch*frames rows hold whole clips and there is one offset per head.
inline void check_clip(const char* op, int64_t batch_frames, int64_t heads,
                       c10::IntArrayRef offsets, int64_t num_frames) {
  check_offsets(op, offsets, num_frames);
  TORCH_CHECK_VALUE(batch_frames % num_frames == 0, op, ": wrong frame count: batch*frames = ",
                    batch_frames, " is not divisible by num_frames = ", num_frames);
  TORCH_CHECK_VALUE(static_cast<int64_t>(offsets.size()) == heads, op, ": got ", offsets.size(),
                    " head offsets for ", heads, " heads");
}

}  // namespace zeroi2v
