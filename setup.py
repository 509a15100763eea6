"""Build script. Metadata lives in pyproject.toml; this file only adds the native extension.

The extension ``zeroi2v._C`` (sources in ``csrc/``) is built against the torch of the build
(``pip install -e .``: the one installed in the target environment, else the one pip installs,
see csrc/build_backend.py) unless ``ZEROI2V_NO_EXT`` is 1:
  * with the CUDA STDHA kernel and the CPU ops when torch is a CUDA build, nvcc is found
    (``CUDA_HOME``, else /usr/local/cuda, else PATH) and ``ZEROI2V_NO_CUDA_EXT`` is not 1;
  * otherwise with the CPU ops only (host C++ compiler).
A failed build never fails the install (csrc/csrc_build.py); one line says what was built and why.
Honours ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` (through torch's build helpers).
"""
import os
import shutil
import sys

from setuptools import setup


def _say(msg: str) -> None:
    print(f"zeroi2v setup: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _csrc_build():
    """csrc/csrc_build.py, the build description kept beside the sources (None if absent)."""
    try:
        import csrc_build
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
        try:
            import csrc_build
        except ImportError:
            return None
    return csrc_build


def native_extensions():
    """Return (ext_modules, cmdclass) for zeroi2v._C, or ([], {}), with one line saying which."""
    build = _csrc_build()
    if build is None:
        _say("csrc/csrc_build.py not present: skipping the native extension")
        return [], {}
    if build.build_switch("no_ext"):
        _say("ZEROI2V_NO_EXT=1: skipping the native extension")
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        _say("torch is not importable here: skipping the native extension (pip install -e . provides torch)")
        return [], {}
    make_extension = build.make_extension
    why_not = None
    if build.build_switch("no_cuda_ext"):
        why_not = "ZEROI2V_NO_CUDA_EXT=1"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    cuda_home = None if why_not else _find_cuda_home()
    if why_not is None and cuda_home is None:
        why_not = "nvcc not found (set CUDA_HOME)"
    if why_not:
        _say(f"{why_not}: the extension will hold the CPU ops only (no CUDA kernel)")
        return make_extension(None)
    # torch guesses CUDA_HOME at import time; set ours before its build helpers read it.
    os.environ["CUDA_HOME"] = cuda_home
    _say(f"the extension will hold the CUDA and CPU ops (torch {torch.__version__}, CUDA from {cuda_home})")
    return make_extension(cuda_home)


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
