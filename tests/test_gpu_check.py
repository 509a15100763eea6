"""benchmarks/gpu_check.py without a GPU: the dry run, a smoke run of every benchmark step on tiny
CPU shapes (Triton interpreter), and its report (targets, markdown, summary, pytest notes) on
made-up GPU rows."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OUT", None)
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_every_step_within_the_deadline():
    gc = _load()
    r = _run("--dry-run")
    assert r.returncode == 0, r.stderr
    for step in gc.STEPS:
        assert f"  {step.name} " in r.stdout
    for f in ("tests/test_stdha_triton.py", "tests/test_fused_adapter.py",
              "tests/test_stdha_cuda.py", "tests/test_stdha_packed.py"):
        assert f in r.stdout
    # the Triton step runs the packed-path tests (marked any_device) with the gpu-marked ones
    triton = next(s for s in gc.STEPS if s.name == "tests_triton").command
    assert "tests/test_stdha_packed.py" in triton and "gpu or any_device" in triton
    foreground = sum(s.budget for s in gc.STEPS if not s.background)
    assert foreground <= gc.DEFAULT_DEADLINE <= 480  # the session's 8 minutes
    assert f"foreground budgets: {foreground:.0f} s" in r.stdout


def test_without_a_gpu_it_says_so():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = _run("--out", os.devnull + "_unused")
    assert r.returncode != 0
    assert "no CUDA GPU" in r.stderr and "--dry-run" in r.stderr


def test_smoke_run_of_every_benchmark_step(tmp_path):
    """Every benchmark step runs its real code path on tiny CPU shapes and records rows."""
    r = _run("--smoke", "--out", str(tmp_path), timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SMOKE RUN" in r.stdout
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").exists() and (tmp_path / "gpu_check.log").exists()
    steps = {s["name"]: s for s in rep["steps"]}
    for name in ("env", "bench_stdha", "bench_flex", "bench_adapter", "bench_train",
                 "bench_inference"):
        assert steps[name]["status"] == "ok", (name, steps[name]["note"], steps[name]["tail"])
    for name in ("build", "tests_triton", "tests_cuda"):
        assert steps[name]["status"] == "skipped"
    assert rep["env"]["source_sha256"] and rep["env"]["torch"]
    md = (tmp_path / "gpu_check.md").read_text()
    for field in ("| torch | ", "| triton | ", "| commit | ", "| driver | ", "| GPU | "):
        assert field in md
    rows = {(row["group"], row["impl"]): row for s in rep["steps"] for row in s["rows"]
            if "group" in row}
    for mode in ("fwd", "fwdbwd"):
        for impl in ("sdpa_no_shift", "triton", "triton_views", "stdha_torch"):
            row = rows[(f"stdha-tiny-{mode}", impl)]
            assert row["ms"] > 0 and row["err"] < 1e-4 and row["tflops"] > 0, row
    assert rows[("stdha-tiny-fwd", "flex")]["err"] < 1e-4
    assert rows[("stdha-tiny-fwdbwd", "flex")]["note"].startswith("unavailable")
    for site in ("qkv", "proj", "block"):
        for impl in ("unfused", "fused_residual", "fused_dual"):
            assert rows[(f"adapter-tiny-{site}", impl)]["ms"] > 0
    for impl in ("unfused", "fused_residual", "fused_dual"):
        assert rows[("train-vitb16-8f", impl)]["ms"] > 0
    assert rows[("inference-vitb16-8f", "plain_timm_vit")]["ms"] > 0
    assert rows[("inference-vitb16-8f", "merged_triton")]["ms"] > 0
    assert rows[("inference-vitb16-8f", "merged_cuda")]["note"].startswith("unavailable")


def test_report_on_gpu_shaped_rows():
    """Targets, markdown and summary from rows named as a GPU run names them."""
    gc = _load()

    def row(group, impl, ms, **kw):
        return dict(group=group, impl=impl, ms=ms, **kw)

    rows = [
        row("stdha-vitb16_bt64-fwdbwd", "sdpa_no_shift", 1.00, tflops=100.0, tbps=1.0),
        row("stdha-vitb16_bt64-fwdbwd", "triton", 1.04, tflops=96.0, tbps=0.9, err=3e-3),
        row("stdha-vitb16_bt64-fwdbwd", "stdha_torch", 1.30),
        row("adapter-vitb16-block", "unfused", 10.0, peak_mb=1000.0),
        row("adapter-vitb16-block", "fused_residual", 7.5, peak_mb=750.0),
        row("adapter-vitb16-block", "fused_dual", 9.0, peak_mb=900.0),
        row("inference-vitb16-8f", "plain_timm_vit", 20.0),
        row("inference-vitb16-8f", "merged_triton", 20.4),
    ]
    rep = dict(date="d", smoke=False, deadline_s=470, elapsed_s=400.0,
               env=dict(gpu="NVIDIA H200", driver="580", torch="2.11", triton="3.6",
                        commit="abc", copy_tbps=4.3, gemm_bf16_tflops=790.0),
               steps=[dict(name="bench_stdha", status="ok", seconds=60, budget=80, note="",
                           tail="", rows=rows),
                      dict(name="tests_triton", status="failed", seconds=100, budget=130,
                           note="2 failed, 300 passed", tail="",
                           rows=[{"failed": ["tests/test_x.py::test_a"]}])])
    got = {claim: (v, ok) for claim, v, _, ok in gc.targets(rep)}
    v, ok = got["STDHA fwd+bwd / SDPA-no-shift, vitb16_bt64"]
    assert v == pytest.approx(1.04) and ok
    v, ok = got["shift-copy+SDPA / STDHA fwd+bwd, vitb16_bt64"]
    assert v == pytest.approx(1.25) and ok is False
    v, ok = got["adapter block unfused/fused_residual time, vitb16"]
    assert v == pytest.approx(10 / 7.5) and ok
    v, ok = got["adapter block fused_dual/unfused peak memory, vitb16"]
    assert v == pytest.approx(0.9) and ok is False
    v, ok = got["adapter block fused_residual/unfused peak memory, vitb16"]
    assert v == pytest.approx(0.75) and ok
    assert got["inference merged_triton / plain timm ViT, vitb16-8f"] == (pytest.approx(1.02), None)
    md = gc.markdown(rep)
    for field in ("| GPU | NVIDIA H200", "| driver | 580 |", "| torch | 2.11 |", "| triton | 3.6 |",
                  "| commit | abc |", "tests/test_x.py::test_a"):
        assert field in md
    assert "| stdha-vitb16_bt64-fwdbwd | triton | 1.0400 | 96.0 | 0.90 | 1.040 |" in md
    text = gc.summary(rep)
    assert "| MISS | shift-copy+SDPA" in text and "| MET | STDHA fwd+bwd" in text
    assert "NVIDIA H200" in text and "commit abc" in text
    assert len(text.splitlines()) < 40  # one screen


def test_pytest_output_is_summarised_even_when_killed():
    gc = _load()
    done = ("[gw1] [ 30%] FAILED tests/test_b.py::test_z[N1]\n"
            "[gw0] [ 40%] PASSED tests/test_a.py::test_y\n"
            "FAILED tests/test_b.py::test_z[N1] - AssertionError: boom\n"
            "========= 1 failed, 1 passed, 3 skipped in 12.0s =========\n")
    assert gc.pytest_note(done) == ("1 failed, 1 passed, 3 skipped in 12.0s",
                                     ["tests/test_b.py::test_z[N1]"])
    killed = done.rsplit("FAILED tests", 1)[0] + "[gw1] [ 50%] SKIPPED tests/test_b.py::test_w\n"
    note, failed = gc.pytest_note(killed)
    assert note == "killed before the end; so far 1 passed, 1 failed, 1 skipped"
    assert failed == ["tests/test_b.py::test_z[N1]"]
