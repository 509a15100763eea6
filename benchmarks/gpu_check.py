"""The one command to run first on a GPU (sized for a short H200 session): build, test, time.

    python benchmarks/gpu_check.py              # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --dry-run    # the steps and their time budgets, no GPU needed
    python benchmarks/gpu_check.py --smoke      # every benchmark step on tiny CPU shapes (Triton
                                                # interpreter): checks the wiring, times nothing real

Steps run in order, each in its own process with its own time budget; the whole run ends within
``--deadline`` seconds (default 470, compilation included). A step that fails, overruns (it is
killed) or cannot run here is recorded as such and the next one starts, so one bad kernel never
costs the session. The extension build starts first, in the background, while the Triton tests
run; the steps that need it wait for it. Benchmarks wait for the build to finish so that the
compiler does not compete with kernel launches for the CPU.

Outputs (``--out``, default ``$OUT`` when set, else ``benchmarks/results/gpu/``), rewritten after
every step so an interrupted run still leaves its results:

* ``gpu_check.json``  machine (GPU, driver, torch, triton, commit), measured ceilings (device copy
  TB/s, bf16 GEMM TFLOP/s), every step's status and output tail, every benchmark row (median ms
  from CUDA events with L2 flushed, TFLOP/s and TB/s of the useful work, peak memory, error
  against the reference where one applies);
* ``gpu_check.md``    the same as tables;
* ``gpu_check.log``   the full output of every step.

A one-screen summary, with the issue's targets marked, is printed last. Needs only what the GPU
machine has (torch, triton, timm, pytest; pytest-xdist and pytest-timeout are used when present).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DEADLINE = 470.0  # seconds for the whole run; the session's budget is 8 minutes
SMOKE_BUDGET_SCALE = 4    # --smoke: the interpreter on shared CPUs is slower than any GPU step


# ----------------------------------------------------------------------------- the steps
@dataclass
class Step:
    name: str
    budget: float            # seconds, compilation included
    what: str
    kind: str                # "command" (a subprocess) or "bench" (a function of this file)
    needs_build: bool = False
    background: bool = False
    command: Optional[Callable[[Args], list]] = None
    env: Optional[Callable[[Args], dict]] = None


def _gpu_test_files(exclude=()):
    """Test files holding @pytest.mark.gpu tests (found by reading them: importing every test
    module would need packages the GPU machine lacks, e.g. decord)."""
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path) as f:
            if "mark.gpu" in f.read() and os.path.basename(path) not in exclude:
                files.append(os.path.relpath(path, ROOT))
    return files


def _pytest_cmd(args, files, marker="gpu", workers=6):
    # -v: one line per test as it ends, so a step killed at its budget still shows its progress
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", *files]
    if marker:
        cmd += ["-m", marker]
    if _importable("xdist") and workers > 1:
        cmd += ["-n", str(workers)]
    if _importable("pytest_timeout"):
        cmd += ["--timeout", "120"]
    return cmd


def _build_env(args):
    env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a"),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(max(1, (os.cpu_count() or 2) // 2)))}
    if os.path.exists("/usr/local/cuda/bin/nvcc") and "CUDA_HOME" not in os.environ:
        env["CUDA_HOME"] = "/usr/local/cuda"
    return env


STEPS = [
    Step("env", 20, "GPU, driver, versions, commit; device copy and bf16 GEMM ceilings", "bench"),
    Step("build", 240, "python setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=9.0a), in the "
         "background", "command", background=True,
         command=lambda a: [sys.executable, "setup.py", "build_ext", "--inplace"], env=_build_env),
    Step("tests_triton", 130, "every gpu-marked test of the Triton STDHA and fused-adapter files "
         "(fp16/bf16 grid vs float64, backward, determinism, torch.compile), and the packed-path "
         "tests on CUDA tensors", "command",
         command=lambda a: _pytest_cmd(a, _gpu_test_files(exclude=("test_stdha_cuda.py",)))),
    Step("bench_stdha", 80, "STDHA fwd and fwd+bwd, ViT-B/16 B*T 64/256 N 197, ViT-L/14 H 16 "
         "N 257 T 32: triton (packed), triton on views, shift-copy + SDPA, SDPA without shift",
         "bench"),
    Step("bench_flex", 45, "FlexAttention with a per-head frame mask, same shapes (compiled)",
         "bench"),
    Step("bench_adapter", 50, "fused vs unfused adapter linears (qkv, proj, fc1, fc2, block), "
         "fwd+bwd time and peak memory", "bench"),
    Step("bench_train", 40, "one ViT-B/16 8-frame training step, fused vs unfused adapters",
         "bench"),
    Step("tests_cuda", 40, "every gpu-marked test of the CUDA extension", "command",
         needs_build=True,
         command=lambda a: _pytest_cmd(a, ["tests/test_stdha_cuda.py"], workers=1),
         env=lambda a: {"ZEROI2V_REQUIRE_CUDA_EXT": "1"}),
    Step("bench_cuda", 20, "CUDA STDHA forward vs triton / SDPA, fp16 and bf16", "bench",
         needs_build=True),
    Step("bench_inference", 30, "merged ZeroI2V ViT-B/16 (triton, cuda) vs the plain timm ViT, "
         "8 clips x 8 frames, bf16", "bench"),
]
STEP_NAMES = [s.name for s in STEPS]
# test_stdha_packed.py holds no gpu mark but runs on CUDA tensors when there are some
PACKED_TESTS = "tests/test_stdha_packed.py"


def _importable(mod):
    import importlib.util

    return importlib.util.find_spec(mod) is not None


# ----------------------------------------------------------------------------- measuring
class Ctx:
    """Device, dtype, sizes and timer of a benchmark step (GPU, or tiny CPU shapes for --smoke)."""

    def __init__(self, smoke: bool, rows_path: str, deadline: float):
        import torch

        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.half = torch.float32 if smoke else torch.bfloat16
        self.fp16 = torch.float32 if smoke else torch.float16
        self.rows_path = rows_path
        self.deadline = deadline

    def time_left(self):
        return self.deadline - time.time()

    def ms(self, fn):
        """Median milliseconds of ``fn()``: CUDA events with L2 flushed between runs (triton's
        do_bench) on a GPU; a few wall-clock runs for --smoke."""
        if self.smoke:  # one call: the interpreter is slow and the number means nothing
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        import torch
        from triton.testing import do_bench

        fn()
        torch.cuda.synchronize()
        return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))

    def peak_mb(self, fn):
        """Peak memory of one ``fn()`` above what was allocated before it (MiB; None on CPU)."""
        if self.smoke:
            return None
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def free(self):
        """Give cached device memory back between cases (peak-memory numbers start clean)."""
        if not self.smoke:
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def row(self, **row):
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        ms = row.get("ms")
        print(f"  {row.get('group', ''):28} {row.get('impl', ''):16} "
              f"{'' if ms is None else f'{ms:9.4f} ms'} {row.get('note', '')}", flush=True)


def _rate(x, ms):
    return None if (x is None or ms is None or ms <= 0) else x / (ms * 1e-3) / 1e12


def _rel(a, b):
    return float(((a - b).norm() / b.norm().clamp_min(1e-30)).item())


def _tiny_attention_shapes():
    return {"tiny": (1, 2, 2, 17, 32, (1, -1))}


def _case(ctx, group, impl, run, min_left=4.0, **fields):
    """Run one benchmark case and record its row: ``run()`` returns the measured fields, or
    raises (Unavailable: recorded as such; anything else: recorded as an error, and the step
    goes on with its next case)."""
    from bench_cases import Unavailable

    row = dict(group=group, impl=impl, **fields)
    if ctx.time_left() < min_left:
        return ctx.row(**row, note="skipped: step out of time")
    try:
        row.update(run())
    except Unavailable as exc:
        row["note"] = f"unavailable: {exc}"
    except Exception as exc:  # noqa: BLE001 - recorded, the next case runs
        row["note"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
    ctx.row(**row)


def _attention_rows(ctx, impls, shapes, modes, group_prefix, dtype, compile_flex=True):
    from bench_cases import attention_case, attention_work

    def run(impl, B, T, H, N, D, offsets, mode):
        fn, reference = attention_case(impl, B, T, H, N, D, offsets, mode, dtype, ctx.device,
                                       compile_flex=compile_flex)
        out, expected = reference()
        err = _rel(out, expected)
        if not err < 2e-2:  # never time a wrong kernel
            return dict(err=err, note="WRONG: not timed")
        ms = ctx.ms(fn)
        flops, nbytes = attention_work(B, T, H, N, D, mode, elem=2)
        return dict(ms=ms, err=err, flops=flops, bytes=nbytes, tflops=_rate(flops, ms),
                    tbps=_rate(nbytes, ms))

    for shape, (B, T, H, N, D, offsets) in shapes.items():
        for mode in modes:
            for impl in impls:
                # _case calls the lambda before the loop moves on, hence noqa: B023
                _case(ctx, f"{group_prefix}{shape}-{mode}", impl,
                      lambda: run(impl, B, T, H, N, D, offsets, mode), min_left=3.0,  # noqa: B023
                      shape=[B * T, H, N, D], T=T, mode=mode, dtype=str(dtype).split(".")[-1])


def bench_env(ctx):
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__,
                torch_cuda=torch.version.cuda, commit=_commit(), source_sha256=source_hash())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                            "clocks.max.mem", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        if r.returncode == 0 and r.stdout.strip():
            info["driver"] = r.stdout.split(",")[1].strip()
    if not ctx.smoke:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        # ceilings: a device-to-device copy (bytes read + written), a bf16 GEMM on random data
        n = 2**29  # 1 GiB of bf16
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        ms = ctx.ms(lambda: y.copy_(x))
        info["copy_tbps"] = 2 * n * 2 / (ms * 1e-3) / 1e12
        del x, y
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ms = ctx.ms(lambda: a @ b)
        info["gemm_bf16_tflops"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    else:
        info["gpu"] = "none (smoke run on CPU)"
    ctx.row(group="env", impl="info", note="", **{"env": info})


def bench_stdha(ctx):
    from bench_cases import ATTN_SHAPES

    shapes = _tiny_attention_shapes() if ctx.smoke else {
        k: ATTN_SHAPES[k] for k in ("vitb16_bt64", "vitb16_bt256", "vitl14_t32_bt64")}
    _attention_rows(ctx, ["sdpa_no_shift", "triton", "triton_views", "stdha_torch"], shapes,
                    ["fwd", "fwdbwd"], "stdha-", ctx.half)


def bench_flex(ctx):
    from bench_cases import ATTN_SHAPES

    shapes = _tiny_attention_shapes() if ctx.smoke else {
        k: ATTN_SHAPES[k] for k in ("vitb16_bt64", "vitl14_t32_bt64", "vitb16_bt256")}
    _attention_rows(ctx, ["flex"], shapes, ["fwd", "fwdbwd"], "stdha-", ctx.half,
                    compile_flex=not ctx.smoke)


def bench_cuda(ctx):
    from bench_cases import ATTN_SHAPES

    shapes = _tiny_attention_shapes() if ctx.smoke else {
        k: ATTN_SHAPES[k] for k in ("vitb16_bt64", "vitb16_bt256", "vitl14_t32_bt64")}
    for dtype in (ctx.half, ctx.fp16):
        _attention_rows(ctx, ["sdpa_no_shift", "cuda", "triton_views"], shapes, ["fwd"],
                        f"cuda-{str(dtype).split('.')[-1]}-", dtype)


def _train_like(ctx, step, zero_grads):
    """Warm-up (compilation, autotuning), then peak memory and median time of step + zero_grads."""
    for _ in range(0 if ctx.smoke else 2):
        step()
        zero_grads()
    return ctx.peak_mb(lambda: (step(), zero_grads())), ctx.ms(lambda: (step(), zero_grads()))


def bench_adapter(ctx):
    from bench_cases import ADAPTER_IMPLS, ADAPTER_SITES, adapter_case, adapter_work, saved_mb

    # blocks first: they carry the targets, and compile / autotune what the single sites reuse
    plan = ([("tiny", "block"), ("tiny", "qkv"), ("tiny", "proj")] if ctx.smoke else
            [("vitb16", "block"), ("vitl14", "block")] + [("vitb16", s) for s in ADAPTER_SITES])

    def run(width, site, impl):
        step, zero_grads, forward = adapter_case(width, site, impl, ctx.fp16, ctx.device)
        peak, ms = _train_like(ctx, step, zero_grads)
        flops, nbytes = adapter_work(width, site)
        return dict(ms=ms, peak_mb=peak, saved_mb=saved_mb(forward), flops=flops, bytes=nbytes,
                    tflops=_rate(flops, ms), tbps=_rate(nbytes, ms))

    for width, site in plan:
        for impl in ADAPTER_IMPLS:
            _case(ctx, f"adapter-{width}-{site}", impl, lambda: run(width, site, impl))  # noqa: B023
            ctx.free()


def bench_train(ctx):
    from bench_cases import ADAPTER_IMPLS, train_step_case, vit_train_flops

    clips, frames = (1, 2) if ctx.smoke else (8, 8)

    def run(impl):
        peak, ms = _train_like(ctx, *train_step_case(impl, clips, frames, ctx.device, ctx.fp16,
                                                     tiny=ctx.smoke)[:2])
        flops = None if ctx.smoke else vit_train_flops(197, clips * frames, 768, 12, 192)
        return dict(ms=ms, peak_mb=peak, flops=flops, tflops=_rate(flops, ms))

    for impl in ADAPTER_IMPLS:
        _case(ctx, "train-vitb16-8f", impl, lambda: run(impl), min_left=6.0, clips=clips,  # noqa: B023
              frames=frames)
        ctx.free()


def bench_inference(ctx):
    from bench_cases import INFERENCE_IMPLS, inference_case, vit_forward_flops

    clips, frames = (1, 2) if ctx.smoke else (8, 8)

    def run(impl):
        ms = ctx.ms(inference_case(impl, clips, frames, ctx.device, ctx.half, tiny=ctx.smoke))
        flops = None if ctx.smoke else vit_forward_flops(197, clips * frames, 768, 12)
        return dict(ms=ms, flops=flops, tflops=_rate(flops, ms))

    for impl in INFERENCE_IMPLS:
        _case(ctx, "inference-vitb16-8f", impl, lambda: run(impl), clips=clips, frames=frames)  # noqa: B023
        ctx.free()


BENCHES = {"env": bench_env, "bench_stdha": bench_stdha, "bench_flex": bench_flex,
           "bench_cuda": bench_cuda, "bench_adapter": bench_adapter, "bench_train": bench_train,
           "bench_inference": bench_inference}
BASELINES = ("sdpa_no_shift", "unfused", "plain_timm_vit")


# ----------------------------------------------------------------------------- provenance
def _commit():
    if os.environ.get("ZEROI2V_COMMIT"):
        return os.environ["ZEROI2V_COMMIT"]
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
            return r.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no git here; compare source_sha256 with --source-hash on a checkout)"


def source_hash():
    """sha256 over the package, native and benchmark sources (path + content, sorted): identifies
    the code a run measured where the copied tree has no .git."""
    h = hashlib.sha256()
    pats = ("zeroi2v/**/*.py", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.cuh", "csrc/**/*.h",
            "benchmarks/*.py", "tests/*.py", "setup.py")
    files = sorted({p for pat in pats for p in glob.glob(os.path.join(ROOT, pat), recursive=True)})
    for path in files:
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the runner
@dataclass
class Result:
    name: str
    status: str = "pending"      # ok, failed, timeout, skipped, error
    seconds: float = 0.0
    budget: float = 0.0
    note: str = ""
    tail: str = ""
    rows: list = field(default_factory=list)


class Args:
    pass


def _run_process(cmd, env, log_path, timeout):
    """Run ``cmd`` (own process group) with output to ``log_path``; kill it at ``timeout``.
    Returns (returncode or None on timeout, seconds)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.time() - t0


def _tail(path, n=3000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _pytest_note(text):
    """(summary line, failed test ids) of pytest output; without a summary (the run was killed),
    counts of the per-test result lines so far."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if ln.startswith("=")
                    and any(w in ln for w in (" passed", " failed", " error", " skipped",
                                              "no tests ran"))), "")
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in lines
              if ln.startswith(("FAILED ", "ERROR "))]
    if not summary:
        counts = {w: sum(f" {w.upper()}" in ln for ln in lines) for w in ("passed", "failed",
                                                                          "skipped", "error")}
        summary = "killed before the end; so far " + ", ".join(f"{n} {w}" for w, n in
                                                               counts.items() if n)
        failed = [ln.split(" FAILED ", 1)[1].split()[0] for ln in lines if " FAILED " in ln
                  and "::" in ln.split(" FAILED ", 1)[1]]
    return summary, failed


class Runner:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.deadline
        self.work = tempfile.mkdtemp(prefix="gpu_check_")
        self.results = {s.name: Result(s.name, budget=s.budget) for s in STEPS}
        self.env_info = {}
        self.build_proc = None
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.log_path = os.path.join(self.out, "gpu_check.log")
        open(self.log_path, "w").close()

    # -- helpers
    def left(self):
        return self.deadline - time.time()

    def _env(self, extra=None):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + HERE + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        if self.args.smoke:
            env["TRITON_INTERPRET"] = "1"
        env.update(extra or {})
        return env

    def _append_log(self, name, path):
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {name} =====\n")
            log.write(_tail(path, 10**7))

    def _say(self, msg):
        print(f"[gpu_check {time.time() - self.t0:6.1f}s] {msg}", flush=True)

    # -- steps
    def _extension_ok(self):
        """Whether zeroi2v._C imports here with its CUDA kernel; (ok, message)."""
        try:
            r = subprocess.run([sys.executable, "-c", "import zeroi2v._C as c; "
                                "assert c.WITH_CUDA, 'built without CUDA'; print('imports')"],
                               cwd=ROOT, env=self._env(), capture_output=True, text=True,
                               timeout=60)
        except subprocess.TimeoutExpired:
            return False, "import check timed out"
        return r.returncode == 0, ("zeroi2v._C imports" if r.returncode == 0
                                   else f"zeroi2v._C does not import: {r.stderr[-300:]}")

    def start_build(self, step):
        res = self.results[step.name]
        if self.args.smoke:
            res.status, res.note = "skipped", "smoke run"
            return
        if step.name not in self.args.steps:
            ok, msg = self._extension_ok()
            res.status, res.note = ("prebuilt" if ok else "skipped"), f"not selected; {msg}"
            return
        log = os.path.join(self.work, "build.log")
        self._say(f"build: started in the background (budget {step.budget:.0f} s)")
        self.build_log = open(log, "w")
        self.build_started = time.time()
        self.build_proc = subprocess.Popen(step.command(self.args), cwd=ROOT,
                                           env=self._env(step.env(self.args)),
                                           stdout=self.build_log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        res.status = "running"

    def wait_build(self):
        """Block until the background build ends (or its budget / the deadline runs out)."""
        res = self.results["build"]
        if self.build_proc is None or res.status != "running":
            return res.status in ("ok", "prebuilt")
        step = next(s for s in STEPS if s.name == "build")
        limit = min(self.build_started + step.budget, self.deadline) - time.time()
        try:
            rc = self.build_proc.wait(timeout=max(0.1, limit))
        except subprocess.TimeoutExpired:
            os.killpg(self.build_proc.pid, signal.SIGKILL)
            self.build_proc.wait()
            rc = None
        self.build_log.close()
        log = self.build_log.name
        res.seconds = time.time() - self.build_started
        res.tail = _tail(log)
        self._append_log("build", log)
        if rc == 0:  # the extension must import and hold the CUDA kernel
            ok, res.note = self._extension_ok()
            res.status = "ok" if ok else "failed"
        else:
            res.status = "timeout" if rc is None else "failed"
            res.note = res.note or ("killed at its budget" if rc is None else f"exit code {rc}")
        self._say(f"build: {res.status} in {res.seconds:.0f} s {res.note}")
        self.write()
        return res.status == "ok"

    def run_step(self, step):
        res = self.results[step.name]
        if step.name not in self.args.steps:
            res.status, res.note = "skipped", "not selected"
            return
        if self.args.smoke and step.kind == "command":
            res.status, res.note = "skipped", "smoke run"
            return
        if step.needs_build and not self.wait_build():
            res.status = "skipped"
            res.note = f"needs the extension; build {self.results['build'].status}"
            self._say(f"{step.name}: skipped ({res.note})")
            return
        if step.kind == "bench" and step.name != "env" and not self.args.smoke:
            self.wait_build()  # keep the compiler off the CPU while timing
        budget = min(step.budget * (SMOKE_BUDGET_SCALE if self.args.smoke else 1), self.left())
        if budget < 5:
            res.status, res.note = "skipped", "out of time (global deadline)"
            self._say(f"{step.name}: skipped ({res.note})")
            return
        self._say(f"{step.name}: {step.what} (budget {budget:.0f} s)")
        log = os.path.join(self.work, f"{step.name}.log")
        if step.kind == "command":
            cmd = step.command(self.args)
            rc, secs = _run_process(cmd, self._env(step.env(self.args) if step.env else None),
                                    log, budget)
            is_pytest = "pytest" in cmd
            if is_pytest:
                res.note, failed = _pytest_note(_tail(log, 2000000))
            if step.name == "tests_triton" and rc is not None and budget - secs > 10:
                # the packed-path tests hold no gpu mark; here they run on CUDA tensors
                plog = os.path.join(self.work, "tests_packed.log")
                rc2, secs2 = _run_process(_pytest_cmd(self.args, [PACKED_TESTS], marker=None,
                                                      workers=1), self._env(), plog,
                                          budget - secs)
                with open(log, "a") as f:
                    f.write("\n" + _tail(plog, 10**7))
                secs += secs2
                summary2, failed2 = _pytest_note(_tail(plog, 2000000))
                res.note += f"; {PACKED_TESTS}: {summary2}"
                failed += failed2
                rc = None if rc2 is None else (rc or rc2)
            if is_pytest and failed:
                res.rows = [{"failed": failed}]
        else:
            rows_path = os.path.join(self.work, f"{step.name}.jsonl")
            cmd = [sys.executable, os.path.abspath(__file__), "--run-step", step.name,
                   "--rows", rows_path, "--step-deadline", str(time.time() + budget - 2)]
            if self.args.smoke:
                cmd.append("--smoke")
            rc, secs = _run_process(cmd, self._env(), log, budget)
            res.rows = _read_rows(rows_path)
            if step.name == "env":
                for r in res.rows:
                    self.env_info.update(r.get("env", {}))
        bad = [r for r in res.rows if str(r.get("note", "")).startswith(("error", "WRONG"))]
        if bad:
            res.note = f"{len(bad)} case(s) with errors or wrong results"
        res.seconds = secs
        res.tail = _tail(log)
        res.status = "timeout" if rc is None else ("ok" if rc == 0 and not bad else "failed")
        self._append_log(step.name, log)
        self._say(f"{step.name}: {res.status} in {secs:.0f} s {res.note}")
        self.write()

    def run(self):
        for step in STEPS:
            if step.background:
                self.start_build(step)
        for step in STEPS:
            if not step.background:
                self.run_step(step)
        if self.build_proc is not None:
            self.wait_build()
        self.write()
        print(summary(self.report()), flush=True)
        shutil.rmtree(self.work, ignore_errors=True)

    # -- outputs
    def report(self):
        return dict(
            tool="benchmarks/gpu_check.py", version=1,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            smoke=self.args.smoke, deadline_s=self.args.deadline,
            elapsed_s=round(time.time() - self.t0, 1), env=self.env_info,
            steps=[dict(name=r.name, status=r.status, seconds=round(r.seconds, 1),
                        budget=r.budget, note=r.note, tail=r.tail,
                        rows=[x for x in r.rows if "env" not in x])
                   for r in self.results.values()])

    def write(self):
        rep = self.report()
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(rep, f, indent=1)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write(markdown(rep))


def _read_rows(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    except OSError:
        pass
    return rows


# ----------------------------------------------------------------------------- reports
def _with_ratios(rows):
    """Each row's median time over its group's baseline (sdpa_no_shift / unfused / plain)."""
    base = {}
    for r in rows:
        if r.get("impl") in BASELINES and r.get("ms"):
            base[r["group"]] = r["ms"]
    for r in rows:
        b = base.get(r.get("group"))
        r["x_baseline"] = (r["ms"] / b) if (b and r.get("ms")) else None
    return rows


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown(rep):
    env = rep.get("env", {})
    lines = [
        "# gpu_check results",
        "",
        f"Written by `python benchmarks/gpu_check.py` on {rep['date']} "
        f"({'SMOKE RUN on CPU: wiring only, no real timings' if rep['smoke'] else 'GPU run'}).",
        "",
        "| | |", "|---|---|",
        f"| GPU | {env.get('gpu', '?')} (sm {env.get('capability', '?')}, "
        f"{env.get('sms', '?')} SMs, {env.get('memory_gib', '?')} GiB) |",
        f"| driver | {env.get('driver', '?')} |",
        f"| torch / CUDA | {env.get('torch', '?')} / {env.get('torch_cuda', '?')} |",
        f"| triton | {env.get('triton', '?')} |",
        f"| python | {env.get('python', '?')} |",
        f"| commit | {env.get('commit', '?')} |",
        f"| source sha256 | {env.get('source_sha256', '?')} |",
        f"| ceilings | copy {_fmt(env.get('copy_tbps'), '.2f')} TB/s, bf16 GEMM "
        f"{_fmt(env.get('gemm_bf16_tflops'), '.0f')} TFLOP/s (measured here) |",
        f"| elapsed | {rep['elapsed_s']} s of {rep['deadline_s']} s |",
        "",
        "## Steps", "",
        "| step | status | seconds | budget | note |", "|---|---|---|---|---|",
    ]
    for s in rep["steps"]:
        note = s["note"].replace("|", "/")
        if s["rows"] and "failed" in s["rows"][0]:
            note += " — failed: " + ", ".join(s["rows"][0]["failed"][:20])
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget']:.0f} | {note} |")
    for s in rep["steps"]:
        rows = [r for r in s["rows"] if "group" in r]
        if not rows:
            continue
        lines += ["", f"## {s['name']}", "",
                  "Median ms (CUDA events, L2 flushed); TFLOP/s and TB/s of the useful work "
                  "(same for every implementation of a group); × = time / the group's baseline.",
                  "",
                  "| group | impl | ms | TFLOP/s | TB/s | × baseline | peak MiB | rel. err | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in _with_ratios(rows):
            lines.append(
                f"| {r['group']} | {r['impl']} | {_fmt(r.get('ms'), '.4f')} | "
                f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('tbps'), '.2f')} | "
                f"{_fmt(r.get('x_baseline'), '.3f')} | {_fmt(r.get('peak_mb'), '.0f')} | "
                f"{_fmt(r.get('err'), '.1e')} | {str(r.get('note', '')).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _ratio(rows, group, num, den):
    ms = {r["impl"]: r.get("ms") for r in rows if r.get("group") == group}
    a, b = ms.get(num), ms.get(den)
    return (a / b) if (a and b) else None


def targets(rep):
    """The issue's targets against what was measured: (claim, value, target, ok)."""
    rows = [r for s in rep["steps"] for r in s["rows"] if "group" in r]
    groups = sorted({r["group"] for r in rows})
    out = []
    for g in groups:
        if not (g.startswith("stdha-") and g.endswith("-fwdbwd")):
            continue
        shape = g[len("stdha-"):-len("-fwdbwd")]
        v = _ratio(rows, g, "triton", "sdpa_no_shift")
        out.append((f"STDHA fwd+bwd / SDPA-no-shift, {shape}", v, "<= 1.05",
                    None if v is None else v <= 1.05))
        v = _ratio(rows, g, "stdha_torch", "triton")
        out.append((f"shift-copy+SDPA / STDHA fwd+bwd, {shape}", v, ">= 1.3",
                    None if v is None else v >= 1.3))
    for g in groups:
        if not (g.startswith("adapter-") and g.endswith("-block")):
            continue
        width = g.split("-")[1]
        ms = {r["impl"]: r for r in rows if r.get("group") == g}
        u = ms.get("unfused", {})
        for impl in ("fused_residual", "fused_dual"):
            f = ms.get(impl, {})
            v = (u["ms"] / f["ms"]) if (u.get("ms") and f.get("ms")) else None
            out.append((f"adapter block speed-up unfused/{impl}, {width}", v, ">= 1.25",
                        None if v is None else v >= 1.25))
            pu, pf = u.get("peak_mb"), f.get("peak_mb")
            v = (1 - pf / pu) if (pu and pf) else None
            out.append((f"adapter block memory saved by {impl}, {width}", v, ">= 0.20",
                        None if v is None else v >= 0.20))
    for impl in ("fused_residual", "fused_dual"):
        v = _ratio(rows, "train-vitb16-8f", "unfused", impl)
        out.append((f"train step speed-up unfused/{impl}", v, "(report)", None))
    for impl in ("merged_triton", "merged_cuda"):
        v = _ratio(rows, "inference-vitb16-8f", impl, "plain_timm_vit")
        out.append((f"inference {impl} / plain timm ViT", v, "≈ 1", None))
    return out


def summary(rep):
    env = rep.get("env", {})
    lines = ["", "=" * 78,
             f"zeroi2v gpu_check  {env.get('gpu', '?')}  driver {env.get('driver', '?')}  "
             f"torch {env.get('torch', '?')}  triton {env.get('triton', '?')}",
             f"commit {str(env.get('commit', '?'))[:40]}  elapsed {rep['elapsed_s']} s / "
             f"{rep['deadline_s']} s  ceilings: copy {_fmt(env.get('copy_tbps'), '.2f')} TB/s, "
             f"bf16 GEMM {_fmt(env.get('gemm_bf16_tflops'), '.0f')} TFLOP/s",
             f"{'step':16} {'status':8} {'s':>5} {'budget':>6}  note"]
    for s in rep["steps"]:
        lines.append(f"{s['name']:16} {s['status']:8} {s['seconds']:5.0f} {s['budget']:6.0f}  "
                     f"{s['note'][:60]}")
    lines.append("targets:")
    for claim, v, target, ok in targets(rep):
        mark = "  --" if ok is None else (" MET" if ok else "MISS")
        lines.append(f"  {mark} {claim:52} {_fmt(v, '.3f'):>7}  {target}")
    if rep["smoke"]:
        lines.append("SMOKE RUN: CPU, tiny shapes, interpreter; the numbers mean nothing.")
    lines.append("=" * 78)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry
def dry_run(args):
    total = 0.0
    print(f"gpu_check steps (deadline {args.deadline:.0f} s for the whole run):")
    print(f"  {'step':16} {'budget s':>8}  runs")
    for s in STEPS:
        fg = not s.background
        total += s.budget if fg else 0
        tag = " [background, from t=0]" if s.background else (" [after build]" if s.needs_build else "")
        sel = "" if s.name in args.steps else "  (not selected)"
        print(f"  {s.name:16} {s.budget:8.0f}  {s.what}{tag}{sel}")
    files = _gpu_test_files()
    print(f"gpu-marked test files: {', '.join(files)} (+ {PACKED_TESTS}, all of it)")
    for f in files + [PACKED_TESTS, "setup.py"]:
        if not os.path.exists(os.path.join(ROOT, f)):
            raise SystemExit(f"gpu_check: error: {f} is missing")
    print(f"foreground budgets: {total:.0f} s; build (background): "
          f"{next(s.budget for s in STEPS if s.background):.0f} s; every step is also cut at "
          f"the {args.deadline:.0f} s deadline")
    print(f"outputs: {args.out}/gpu_check.json, gpu_check.md, gpu_check.log")
    if total > args.deadline:
        raise SystemExit(f"gpu_check: error: budgets ({total:.0f} s) do not fit the deadline")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="list steps and budgets; run nothing")
    ap.add_argument("--smoke", action="store_true",
                    help="benchmark steps on tiny CPU shapes through the Triton interpreter")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results", "gpu"),
                    help="output folder (default: $OUT, else benchmarks/results/gpu)")
    ap.add_argument("--deadline", type=float, default=None,
                    help=f"seconds for the whole run (default {DEFAULT_DEADLINE:.0f}; "
                         f"x{SMOKE_BUDGET_SCALE} with --smoke)")
    ap.add_argument("--steps", nargs="+", default=STEP_NAMES, choices=STEP_NAMES, metavar="STEP",
                    help=f"run only these ({', '.join(STEP_NAMES)})")
    ap.add_argument("--source-hash", action="store_true",
                    help="print the source sha256 a run records, and exit")
    ap.add_argument("--run-step", choices=sorted(BENCHES), help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--step-deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.deadline is None:
        args.deadline = DEFAULT_DEADLINE * (SMOKE_BUDGET_SCALE if args.smoke else 1)
    if args.deadline <= 0:
        ap.error("--deadline must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.source_hash:
        print(source_hash())
        return 0
    if args.dry_run:
        dry_run(args)
        return 0
    if args.run_step:  # inside a step's own process
        if args.smoke:
            os.environ["TRITON_INTERPRET"] = "1"
        sys.path[:0] = [ROOT, HERE]
        ctx = Ctx(args.smoke, args.rows, args.step_deadline or time.time() + 60)
        if not args.smoke:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("gpu_check: error: no CUDA GPU (use --dry-run or --smoke)")
        BENCHES[args.run_step](ctx)
        return 0
    if not args.smoke:
        r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
        if r.stdout.strip() != "True":
            raise SystemExit("gpu_check: error: no CUDA GPU visible to torch here; use --dry-run "
                             "(list the steps) or --smoke (CPU wiring check)")
    Runner(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
