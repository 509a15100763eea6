"""Installing and loading the native extension ``zeroi2v._C``.

* the built library is the one for the running torch, and the loader imports it;
* a library whose build record names another torch (or is missing) is never imported: one
  warning says why and what to do, and the pure-PyTorch paths give the same results;
* without a C++ compiler the editable build succeeds, says why in one line, and records it;
* the build backend compiles against the target environment's torch when it has one.

Set ZEROI2V_REQUIRE_CUDA_EXT=1 (CI does) to turn "extension not built" skips into failures.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from zeroi2v import _native

ROOT = Path(__file__).resolve().parent.parent
REQUIRE = os.environ.get("ZEROI2V_REQUIRE_CUDA_EXT", "0") == "1"


def _run(code, cwd=None, env=None, python=sys.executable, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([python, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _copy_package(dst: Path) -> Path:
    """The zeroi2v Python package alone (no native library, no build record)."""
    shutil.copytree(ROOT / "zeroi2v", dst / "zeroi2v",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", _native.RECORD_NAME))
    return dst


# Run in a fresh interpreter: STDHA through the dispatcher ("auto", then the in-place shift the
# native op would take) against the definition, plus what the loader said.
_PURE_PATH_CHECK = """
    import sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch, zeroi2v
        from zeroi2v import _native
        from zeroi2v.ops.stdha import native_shift_op
        q, k, v = torch.randn(3, 2 * 4, 12, 9, 16).unbind(0)
        out = zeroi2v.stdha_attention(q, k, v, num_frames=4, head_offsets="vit_b")
        ref = zeroi2v.stdha_reference(q.double(), k.double(), v.double(), 4, zeroi2v.PRESETS["vit_b"])
        assert (out.double() - ref).abs().max().item() < 1e-5
        assert native_shift_op() is None and "zeroi2v._C" not in sys.modules
        assert "cpu" not in zeroi2v.available_backends()
    lines = [str(w.message) for w in caught if "zeroi2v._C" in str(w.message)]
    print("WHY:", _native.why_not())
    for line in lines:
        print("WARNING:", line)
"""


def _warnings(stdout):
    return [line[len("WARNING: "):] for line in stdout.splitlines() if line.startswith("WARNING: ")]


def test_built_extension_is_for_the_running_torch():
    module = _native.load()
    if module is None:
        if REQUIRE:
            pytest.fail(f"ZEROI2V_REQUIRE_CUDA_EXT=1 but {_native.why_not()}")
        pytest.skip(_native.why_not())
    record = json.loads((Path(module.__file__).parent / _native.RECORD_NAME).read_text())
    assert record["built"] and record["torch"] == torch.__version__
    assert record["library"] == Path(module.__file__).name
    assert sys.modules["zeroi2v._C"] is module and _native.why_not() is None
    if REQUIRE:  # CI has nvcc and a CUDA build of torch: the CUDA ops must be in
        assert module.WITH_CUDA and record["with_cuda"]
    # The library runs against this torch: its shift op moves head 0 of frame 1 to frame 2.
    x = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2, 2)  # (B*T, H, N, D)
    expected = x.clone()
    expected[1:, 0] = x[:-1, 0]
    torch.ops.zeroi2v.shift_heads_([x], 3, [1, 0])
    assert torch.equal(x, expected)


@pytest.mark.parametrize("record,expected", [
    (None, "no matching build record"),
    ({"built": True, "torch": "0.0.1", "library": "LIB", "size": "SIZE"},
     "built against torch 0.0.1 but torch"),
    ({"built": True, "torch": "TORCH", "library": "LIB", "size": -1}, "no matching build record"),
    ({"built": True, "torch": "TORCH", "library": "other.so", "size": "SIZE"}, "no matching build record"),
    ({"built": False, "torch": "TORCH", "reason": "no C++ compiler"},
     "not built at install (no C++ compiler)"),
])
def test_loader_refuses_a_library_it_cannot_vouch_for(tmp_path, record, expected):
    """The decision is taken from the record alone, before the library is opened: the library here
    is not even a shared object, so trying to import it would fail differently."""
    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"not a shared library")
    if record is not None:
        subst = {"LIB": library.name, "SIZE": library.stat().st_size, "TORCH": torch.__version__}
        record = {key: subst.get(val, val) if isinstance(val, str) else val for key, val in record.items()}

    class Spec:
        origin = str(library)

    reason, warn = _native._refusal(Spec, record)
    assert reason is not None and expected in reason and warn
    assert "pip install -e ." in reason and "\n" not in reason


def test_loader_accepts_its_own_record(tmp_path):
    library = tmp_path / "_C.so"
    library.write_bytes(b"x" * 10)
    record = {"built": True, "torch": torch.__version__, "library": "_C.so", "size": 10}

    class Spec:
        origin = str(library)

    assert _native._refusal(Spec, record) == (None, False)


def test_mismatched_library_is_not_loaded_and_pure_paths_run(tmp_path):
    """End to end in a fresh interpreter: a library recorded for another torch is never opened
    (it is garbage here: opening it would raise), one warning names both torch versions and the
    fix, and STDHA still gives the definition's result on the pure-PyTorch paths."""
    pkg = _copy_package(tmp_path)
    library = pkg / "zeroi2v" / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"garbage")
    (pkg / "zeroi2v" / _native.RECORD_NAME).write_text(json.dumps(
        {"built": True, "torch": "1.0.0", "library": library.name, "size": library.stat().st_size}))
    res = _run(_PURE_PATH_CHECK, cwd=tmp_path, env={"PYTHONPATH": str(pkg)})
    assert res.returncode == 0, res.stderr
    (warning,) = _warnings(res.stdout)
    assert f"built against torch 1.0.0 but torch {torch.__version__} is running" in warning
    assert "pip install -e ." in warning


def _copy_sources(dst: Path) -> Path:
    """What a clone holds for building: packaging files, csrc/ and the package."""
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "csrc", dst / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    return _copy_package(dst)


def _build_editable(src: Path, out: Path, env):
    """PEP 660's build_editable hook, what `pip install -e .` calls, run in ``src``."""
    out.mkdir()
    return _run(f"""
        import sys
        sys.path.insert(0, "csrc")
        import build_backend
        print("WHEEL:", build_backend.build_editable({str(out)!r}))
    """, cwd=src, env=env, timeout=900)


def test_editable_build_without_compiler_succeeds_and_says_why(tmp_path):
    """PEP 660's build_editable hook (what `pip install -e .` calls) with the C++ compiler pointing
    nowhere: the hook succeeds, prints one line saying why there is no extension, records it, and
    the package then runs on the pure-PyTorch paths with that reason in one warning."""
    src = _copy_sources(tmp_path / "src")
    missing = str(tmp_path / "no-such-compiler")
    build = _build_editable(src, tmp_path / "wheel", env={"CC": missing, "CXX": missing})
    assert build.returncode == 0, build.stderr[-3000:]
    assert "WHEEL: zeroi2v-" in build.stdout
    said = [line for line in build.stderr.splitlines()
            if line.startswith("zeroi2v setup: zeroi2v._C not built")]
    assert len(said) == 1 and "no C++ compiler" in said[0] and missing in said[0], build.stderr[-3000:]
    record = json.loads((src / "zeroi2v" / _native.RECORD_NAME).read_text())
    assert record["built"] is False and missing in record["reason"]
    assert not list((src / "zeroi2v").glob("_C*.so"))

    res = _run(_PURE_PATH_CHECK, cwd=tmp_path, env={"PYTHONPATH": str(src)})
    assert res.returncode == 0, res.stderr
    (warning,) = _warnings(res.stdout)
    assert "not built at install (no C++ compiler" in warning


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_failed_cuda_build_falls_back_to_the_cpu_ops(tmp_path):
    """An nvcc that fails (here a stand-in that exits 1) costs the CUDA kernel, not the CPU ops: one
    line says so, the CPU-only library is built and recorded, and it loads and runs. Builds the CPU
    ops for real (about a minute on 2 cores): the only test of the CPU-only build, which is what
    every machine without CUDA gets."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'nvcc: broken on purpose' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    src = _copy_sources(tmp_path / "src")
    build = _build_editable(src, tmp_path / "wheel", env={"CUDA_HOME": str(nvcc.parent.parent)})
    assert build.returncode == 0, build.stderr[-3000:]
    said = [line for line in build.stderr.splitlines() if line.startswith("zeroi2v setup: building")]
    if torch.version.cuda is not None:  # setup.py chose CUDA, which must fail over to the CPU ops
        assert len(said) == 1 and "building the CPU ops only" in said[0], build.stderr[-3000:]
    record = json.loads((src / "zeroi2v" / _native.RECORD_NAME).read_text())
    assert record["built"] and not record["with_cuda"] and record["torch"] == torch.__version__
    res = _run("""
        import torch, zeroi2v
        from zeroi2v import _native
        module = _native.load()
        assert module is not None and not module.WITH_CUDA, _native.why_not()
        assert "cpu" in zeroi2v.available_backends()
        q, k, v = torch.randn(3, 2 * 4, 12, 9, 16).unbind(0)
        out = zeroi2v.stdha_attention(q, k, v, num_frames=4, head_offsets="vit_b", backend="cpu")
        ref = zeroi2v.stdha_reference(q.double(), k.double(), v.double(), 4, zeroi2v.PRESETS["vit_b"])
        assert (out.double() - ref).abs().max().item() < 1e-5
        print("OK")
    """, cwd=tmp_path, env={"PYTHONPATH": str(src)})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def _isolated_backend(python, overlay: Path, code, env=None):
    """Run ``code`` the way pip runs a build hook in build isolation: under the target's
    interpreter, with the target's site-packages off sys.path and only the build requirements
    (setuptools, from ``overlay``) on it."""
    prelude = f"""
        import sys
        sys.path[:] = ([p for p in sys.path if "site-packages" not in p]
                       + [{str(overlay)!r}, {str(ROOT / "csrc")!r}])
        import importlib.util, build_backend
    """
    return _run(textwrap.dedent(prelude) + textwrap.dedent(code), env=env, python=python)


@pytest.fixture
def setuptools_overlay(tmp_path):
    import _distutils_hack
    import setuptools

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    for mod in (setuptools, _distutils_hack):
        os.symlink(Path(mod.__file__).parent, overlay / Path(mod.__file__).parent.name)
    return overlay


def test_build_backend_uses_the_target_envs_torch(setuptools_overlay):
    res = _isolated_backend(sys.executable, setuptools_overlay, f"""
        assert importlib.util.find_spec("torch") is None   # hidden, as in pip's isolated build
        assert build_backend.get_requires_for_build_editable() == []
        assert build_backend.get_requires_for_build_wheel() == []
        build_backend._use_target_torch()
        import torch
        assert torch.__version__ == {torch.__version__!r} and torch.__file__ == {torch.__file__!r}
        print("OK")
    """)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_build_backend_asks_for_torch_when_the_target_has_none(tmp_path, setuptools_overlay):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    res = _isolated_backend(str(venv / "bin" / "python"), setuptools_overlay, """
        assert build_backend.get_requires_for_build_editable() == ["torch"]
        print("OK")
    """)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr
    no_ext = _isolated_backend(str(venv / "bin" / "python"), setuptools_overlay, """
        assert build_backend.get_requires_for_build_editable() == []
        print("OK")
    """, env={"ZEROI2V_NO_EXT": "1"})
    assert no_ext.returncode == 0 and "OK" in no_ext.stdout, no_ext.stderr
