"""Kernels compiled for real GPUs without one: what the Triton interpreter cannot check.

The interpreter runs the kernels' arithmetic but not the compiler: dot shapes and layouts,
wgmma lowering, register allocation. Here every Triton kernel is compiled for sm_80 (A100) and
sm_90a (H100/H200) with the argument specialisation of a real ViT-B/16 launch
(``tests/triton_offline.py``) and must not spill registers; the CUDA C++ kernel is assembled by
ptxas for both targets with the same requirement. Each test skips cleanly where its compiler
(Triton's NVIDIA backend, nvcc) is not installed.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _offline(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(HERE, "triton_offline.py"), *args], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if rows and "skip" in rows[0]:
        pytest.skip(rows[0]["skip"])
    return rows


def _spills(rows):
    return [r for r in rows if r["local"] or r["stack"]]


def test_stdha_triton_kernels_compile_without_spills():
    """The four STDHA kernels, bf16, head dims 64 and 128 (their two config rows), both targets;
    on sm_90a the matrix kernels lower to wgmma. (fp16 compiles to the same register counts:
    benchmarks/results/offline/stdha.md.)"""
    rows = _offline("stdha", "--dtype", "bf16")
    assert {(r["arch"], r["head_dim"]) for r in rows} == {(80, 64), (80, 128), (90, 64), (90, 128)}
    assert len(rows) == 16
    assert not _spills(rows), _spills(rows)
    for r in rows:
        if r["arch"] == 90 and r["kernel"] != "stdha_bwd_pre_kernel":
            assert r["wgmma"], r


def test_adapter_autotune_configs_compile_without_spills():
    """Every autotune candidate of the fused adapter GEMM, with each flag set its call sites use
    (dropout mask and bias on and off), bf16, both targets."""
    from zeroi2v.kernels import adapter as fa

    rows = _offline("adapter", "--dtype", "bf16")
    per_arch = 2 * (len(fa._GEMM_CONFIGS) + len(fa._APPLY_CONFIGS))  # two flag sets each
    assert len(rows) == 2 * per_arch
    assert not _spills(rows), _spills(rows)


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    for cand in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return os.path.join(cand, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.parametrize("gencode", ["arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a"],
                         ids=["sm_80", "sm_90a"])
def test_cuda_kernel_assembles_without_spills(gencode, tmp_path):
    """ptxas -v on the bf16 instantiations (head_dim 64 with 64- and 128-row tiles, 128): no
    stack frame, no spill stores or loads."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    r = subprocess.run(
        [nvcc, "-O3", "--expt-relaxed-constexpr", f"-gencode={gencode}", "-Xptxas", "-v", "-c",
         os.path.join(ROOT, "csrc", "stdha_fwd_bf16.cu"), "-I", os.path.join(ROOT, "csrc"),
         "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                        r.stderr)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    assert len(frames) == 3 and len(regs) == 3, r.stderr[-4000:]
    assert all(f == ("0", "0", "0") for f in frames), r.stderr[-4000:]
