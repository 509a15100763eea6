"""Build description of the native extension ``zeroi2v._C`` (used by the repository's setup.py).

``make_extension(cuda_home)`` returns ``(ext_modules, cmdclass)``. With a CUDA toolkit
(``cuda_home``; setup.py passes one when torch is a CUDA build, nvcc exists and
``ZEROI2V_NO_CUDA_EXT`` is not 1) the extension holds the CUDA STDHA kernel and the CPU ops; with
``cuda_home=None`` it holds only the CPU ops (``shift_cpu.cpp``, ``stdha_cpu.cpp``), built with the
host C++ compiler.

The build never fails the install (``BuildExt``): a CUDA build that fails falls back to the CPU
ops, a CPU build that fails (no C++ compiler, ...) to no extension, each with one line saying why.
Either way it writes a build record, ``_C_build.json`` next to the library (read by
``zeroi2v/_native.py``): the torch the library was compiled against, or why there is none.

Target architectures: ``TORCH_CUDA_ARCH_LIST`` when set (torch's build helpers turn it into
``-gencode`` flags, e.g. ``"8.0;9.0a"``); otherwise sm_80 (+ compute_80 PTX, which the driver
JIT-compiles for newer GPUs such as Blackwell) and sm_90a (Hopper). Parallel compile jobs follow
``MAX_JOBS`` (torch's ninja build); the sources are split so that two jobs overlap.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def build_switch(name: str) -> bool:
    """A build-time switch (``"no_ext"``, ``"no_cuda_ext"``) parsed by ``zeroi2v/settings.py``, the
    package's one parser (a bad value is an error naming the variable). The module is loaded by
    path: the package itself cannot be imported before its extension is built."""
    import importlib.util

    key = "_zeroi2v_build_settings"
    mod = sys.modules.get(key)
    if mod is None:
        path = os.path.join(os.path.dirname(_HERE), "zeroi2v", "settings.py")
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses look their module up while the class is made
        spec.loader.exec_module(mod)
    sw = mod.SWITCHES[name]
    return bool(sw.parse(os.environ.get(sw.env)))

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


#: Name of the build record next to the library; zeroi2v/_native.py reads the same file.
RECORD_NAME = "_C_build.json"
EXT_NAME = "zeroi2v._C"


def _cpu_extension(rel):
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(
        name=EXT_NAME,
        sources=[os.path.join(rel, s) for s in CPU_SOURCES],
        depends=[os.path.join(rel, h) for h in ("stdha.h", "op_checks.h")],
        include_dirs=[_HERE],
        extra_compile_args=["-O3", "-g0", *OPENMP_FLAGS],
        extra_link_args=OPENMP_FLAGS,
    )


def _cuda_extension(rel, cuda_home):
    from torch.utils.cpp_extension import CUDAExtension

    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        # torch adds -D__CUDA_NO_HALF_OPERATORS__ etc.; the kernel only uses intrinsics.
        *nvcc_arch_flags(),
    ]
    return CUDAExtension(
        name=EXT_NAME,
        sources=[os.path.join(rel, s) for s in SOURCES],
        depends=[os.path.join(rel, h) for h in HEADERS],
        include_dirs=[_HERE],
        library_dirs=[os.path.join(cuda_home, "lib64")],
        extra_compile_args={"cxx": ["-O3", "-g0", *OPENMP_FLAGS], "nvcc": nvcc_flags},
        extra_link_args=OPENMP_FLAGS,
        define_macros=[("ZEROI2V_WITH_CUDA", "1")],
    )


def make_extension(cuda_home):
    # Sources relative to setup.py's directory (setuptools wants relative paths).
    rel = os.path.relpath(_HERE, os.path.dirname(_HERE))
    cpu = _cpu_extension(rel)
    if cuda_home is None:
        return [cpu], {"build_ext": build_ext_class([])}
    # use_ninja follows torch's default (ninja when installed); MAX_JOBS caps its parallelism.
    return [_cuda_extension(rel, cuda_home)], {"build_ext": build_ext_class([cpu])}


def _say(msg: str) -> None:
    print(f"zeroi2v setup: {msg}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _missing_compiler():
    """Why the host C++ compiler cannot run, or None. torch's ninja build compiles with $CXX (else
    c++); checked up front because ninja's own failure only says "Error compiling objects"."""
    from torch.utils.cpp_extension import get_cxx_compiler

    cxx = get_cxx_compiler()
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} not found (install g++ or set CXX)"
    return None


def build_ext_class(fallbacks):
    """torch's BuildExtension that tries the configured extension, then each of ``fallbacks``
    (same name, fewer ops), and never fails the install; it writes the build record."""
    from setuptools.errors import BaseError, CCompilerError
    from torch.utils.cpp_extension import BuildExtension

    # What a failed compile or link raises: distutils' errors, torch's ninja (RuntimeError), a
    # missing tool (OSError) or a failed subprocess.
    build_errors = (CCompilerError, BaseError, RuntimeError, OSError, subprocess.SubprocessError)

    class BuildExt(BuildExtension):
        def finalize_options(self):
            # setuptools prepares each extension here (stubs, output names): the fallbacks too.
            configured = self.distribution.ext_modules
            self.distribution.ext_modules = list(configured or []) + list(fallbacks)
            try:
                super().finalize_options()
            finally:
                self.distribution.ext_modules = configured

        def run(self):
            attempts = list(self.extensions)
            if not attempts:
                return super().run()
            # run() replaces the compiler option by an instance, and clears inplace until it is done
            # (a failed run leaves it cleared): each attempt starts from the options as given.
            compiler_option, inplace = self.compiler, self.inplace
            reason = _missing_compiler()
            for ext in attempts if reason is None else ():
                self.extensions, self.compiler, self.inplace = [ext], compiler_option, inplace
                try:
                    super().run()
                except build_errors as exc:
                    reason = _first_line(exc)
                    if ext is not attempts[-1]:
                        _say(f"building the CUDA ops failed ({reason}): building the CPU ops only")
                    continue
                self._write_record(True, ("ZEROI2V_WITH_CUDA", "1") in ext.define_macros, reason)
                return
            _say(f"{EXT_NAME} not built ({reason}): installing without it, the pure-PyTorch paths "
                 "will run (pip install -v shows the compiler output)")
            self.extensions = []
            self._write_record(False, False, reason)

        def _write_record(self, built, with_cuda, reason):
            """The record sits beside the library: in the build tree (what a wheel packs) and, for
            editable and --inplace builds, in the source tree setuptools copied the library to."""
            import torch

            library = os.path.basename(self.get_ext_filename(EXT_NAME))
            record = {"built": built, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                      "with_cuda": with_cuda, "library": library if built else None, "reason": reason}
            for path in {self._library_path(False), self._library_path(self.inplace)}:
                if built:
                    record["size"] = os.path.getsize(path)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(os.path.join(os.path.dirname(path), RECORD_NAME), "w") as f:
                    json.dump(record, f, indent=1)

        def _library_path(self, inplace):
            saved, self.inplace = self.inplace, inplace
            try:
                return os.path.abspath(self.get_ext_fullpath(EXT_NAME))
            finally:
                self.inplace = saved

    return BuildExt
