"""Build description of the native extension ``zeroi2v._C`` (used by the repository's setup.py).

``make_extension(cuda_home)`` returns ``(ext_modules, cmdclass)``. With a CUDA toolkit
(``cuda_home``; setup.py passes one when torch is a CUDA build, nvcc exists and
``ZEROI2V_NO_CUDA_EXT`` is not 1) the extension holds the CUDA STDHA kernel and the CPU ops; with
``cuda_home=None`` it holds only the CPU ops (``shift_cpu.cpp``), built with the host C++ compiler
and marked optional: a failed CPU-only build leaves a working install on the pure PyTorch paths.

Target architectures: ``TORCH_CUDA_ARCH_LIST`` when set (torch's build helpers turn it into
``-gencode`` flags, e.g. ``"8.0;9.0a"``); otherwise sm_80 (+ compute_80 PTX, which the driver
JIT-compiles for newer GPUs such as Blackwell) and sm_90a (Hopper). Parallel compile jobs follow
``MAX_JOBS`` (torch's ninja build); the sources are split so that two jobs overlap.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

CPU_SOURCES = (
    "module.cpp",        # pybind11 module zeroi2v._C
    "shift_cpu.cpp",     # torch.ops.zeroi2v.shift_heads_ (CPU + Meta kernels)
    "stdha_cpu.cpp",     # torch.ops.zeroi2v.stdha_fwd_cpu (CPU + Meta kernels)
)
SOURCES = CPU_SOURCES + (
    "stdha_ops.cpp",     # torch.ops.zeroi2v.stdha_fwd_cuda (CUDA + Meta kernels)
    "stdha_api.cu",      # plain C API (stdha.h)
    "stdha_fwd_fp16.cu", # kernel instantiations, one file per dtype
    "stdha_fwd_bf16.cu",
)
HEADERS = ("stdha.h", "stdha_kernel.cuh", "op_checks.h")

DEFAULT_GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_80,code=compute_80",
    "-gencode=arch=compute_90a,code=sm_90a",
)


def nvcc_arch_flags() -> list[str]:
    """Explicit -gencode flags, or [] to let torch derive them from TORCH_CUDA_ARCH_LIST."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return []
    return list(DEFAULT_GENCODE)


# at::parallel_for is header-inline: without -fopenmp it runs the whole range on the calling thread
# (and BLAS calls inside it go multi-threaded on tiny matrices). libgomp is the one torch loads.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


def make_extension(cuda_home):
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Sources relative to setup.py's directory (setuptools wants relative paths).
    root = os.path.dirname(_HERE)
    rel = os.path.relpath(_HERE, root)
    if cuda_home is None:
        ext = CppExtension(
            name="zeroi2v._C",
            sources=[os.path.join(rel, s) for s in CPU_SOURCES],
            depends=[os.path.join(rel, h) for h in ("stdha.h", "op_checks.h")],
            include_dirs=[_HERE],
            extra_compile_args=["-O3", "-g0", *OPENMP_FLAGS],
            extra_link_args=OPENMP_FLAGS,
            optional=True,
        )
        return [ext], {"build_ext": BuildExtension}
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        # torch adds -D__CUDA_NO_HALF_OPERATORS__ etc.; the kernel only uses intrinsics.
        *nvcc_arch_flags(),
    ]
    ext = CUDAExtension(
        name="zeroi2v._C",
        sources=[os.path.join(rel, s) for s in SOURCES],
        depends=[os.path.join(rel, h) for h in HEADERS],
        include_dirs=[_HERE],
        library_dirs=[os.path.join(cuda_home, "lib64")],
        extra_compile_args={"cxx": ["-O3", "-g0", *OPENMP_FLAGS], "nvcc": nvcc_flags},
        extra_link_args=OPENMP_FLAGS,
        define_macros=[("ZEROI2V_WITH_CUDA", "1")],
    )
    # use_ninja follows torch's default (ninja when installed); MAX_JOBS caps its parallelism.
    return [ext], {"build_ext": BuildExtension}
