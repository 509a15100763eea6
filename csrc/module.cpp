// Python module zeroi2v._C. Importing it loads this shared library, whose static initialisers
// register torch.ops.zeroi2v.shift_heads_ (shift_cpu.cpp), torch.ops.zeroi2v.stdha_fwd_cpu
// (stdha_cpu.cpp) and, in a CUDA build
// (ZEROI2V_WITH_CUDA), torch.ops.zeroi2v.stdha_fwd_cuda (stdha_ops.cpp). Needs no GPU: nothing here
// touches the CUDA runtime. The attributes below only describe what was compiled.
#include <pybind11/pybind11.h>

#include <string>

#include "stdha.h"

namespace py = pybind11;

bool zeroi2v_stdha_cpu_available();  // stdha_cpu.cpp

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stdha_cpu_available", &zeroi2v_stdha_cpu_available,
        "Whether torch.ops.zeroi2v.stdha_fwd_cpu can run (libtorch exports a BLAS sgemm_).");
#ifdef ZEROI2V_WITH_CUDA
  m.doc() =
      "zeroi2v native extension: STDHA CUDA forward kernel, registered as "
      "torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, offsets, num_frames, scale), and the CPU ops "
      "torch.ops.zeroi2v.stdha_fwd_cpu(q, k, v, offsets, num_frames, scale) and "
      "torch.ops.zeroi2v.shift_heads_(xs, num_frames, offsets).";
  m.attr("WITH_CUDA") = true;
  m.def(
      "supported",
      [](const std::string& dtype, int64_t head_dim) {
        if (dtype == "float16") return zeroi2v_stdha_supported(ZEROI2V_DTYPE_FP16, head_dim) != 0;
        if (dtype == "bfloat16") return zeroi2v_stdha_supported(ZEROI2V_DTYPE_BF16, head_dim) != 0;
        return false;
      },
      py::arg("dtype"), py::arg("head_dim"),
      "Whether a kernel is compiled for dtype ('float16' or 'bfloat16') and head_dim.");
  m.attr("HEAD_DIMS") = py::make_tuple(64, 128);
  m.attr("MAX_HEADS") = ZEROI2V_STDHA_MAX_HEADS;
  m.def(
      "set_block_m",
      [](int block_m) {
        if (zeroi2v_stdha_set_block_m(block_m) != 0)
          throw py::value_error("CUDA STDHA block size must be 64 or 128 (or 0: by size), got " +
                                std::to_string(block_m));
      },
      py::arg("block_m"), "Force the CUDA kernel's query rows per tile (64, 128; 0: by size).");
#else
  m.doc() =
      "zeroi2v native extension (CPU only): torch.ops.zeroi2v.stdha_fwd_cpu(q, k, v, offsets, "
      "num_frames, scale) and torch.ops.zeroi2v.shift_heads_(xs, num_frames, offsets).";
  m.attr("WITH_CUDA") = false;
#endif
}
