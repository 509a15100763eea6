"""Build script. Metadata lives in pyproject.toml; this file only adds the optional CUDA extension.

The extension ``zeroi2v._C`` (sources in ``csrc/``) is built when all of these hold:
  * torch is importable in the build environment (install with ``--no-build-isolation``),
  * torch is a CUDA build and nvcc is found (``CUDA_HOME``, else /usr/local/cuda, else PATH),
  * ``ZEROI2V_NO_CUDA_EXT`` is not set to 1.
Otherwise the package installs without it (Triton / PyTorch paths) and one line says why.
Honours ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` (through torch's build helpers).
"""
import os
import shutil
import sys

from setuptools import setup


def _say(msg: str) -> None:
    print(f"zeroi2v setup: {msg}", file=sys.stderr)


def _find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def cuda_extensions():
    """Return (ext_modules, cmdclass) for the CUDA extension, or ([], {}) with one line saying why."""
    if os.environ.get("ZEROI2V_NO_CUDA_EXT", "0") == "1":
        _say("ZEROI2V_NO_CUDA_EXT=1: skipping the CUDA extension")
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        _say("torch not importable in the build env (use --no-build-isolation): skipping the CUDA extension")
        return [], {}
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is not a CUDA build: skipping the CUDA extension")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _say("nvcc not found (set CUDA_HOME): skipping the CUDA extension")
        return [], {}
    # torch guesses CUDA_HOME at import time; set ours before its build helpers read it.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        from csrc_build import make_extension  # csrc/ build description, kept beside the sources
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
        try:
            from csrc_build import make_extension
        except ImportError:
            _say("csrc/csrc_build.py not present: skipping the CUDA extension")
            return [], {}
    return make_extension(cuda_home)


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
