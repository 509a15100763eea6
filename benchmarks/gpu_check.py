"""The one command to run first on a GPU: build, run the gpu-marked tests, time the benchmark cases.

    python benchmarks/gpu_check.py              # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --dry-run    # the steps and their time budgets, no GPU needed
    python benchmarks/gpu_check.py --smoke      # every benchmark step on tiny CPU shapes (Triton
                                                # interpreter): checks the wiring, times nothing real

A thin runner: the tests are pytest's (every ``@pytest.mark.gpu`` / ``any_device`` test), the
cases and their work counts are ``bench_cases.py``'s. Each step runs in its own process with its
own time budget, and the whole run ends within ``--deadline`` seconds; a step that fails, overruns
or cannot run here is recorded as such and the next one starts. The extension builds in the
background from the start; the steps that need it wait for it, and benchmarks wait for it to end
so that the compiler does not compete with them for the CPU.

Outputs (``--out``, default ``$OUT`` when set, else ``benchmarks/results/gpu/``), rewritten after
every step: ``gpu_check.json`` (GPU, driver, torch, triton, commit, measured copy and GEMM
ceilings, every step's status and output tail, every benchmark row: median ms from CUDA events
with L2 flushed, TFLOP/s and TB/s of the useful work, peak memory, error against the reference),
``gpu_check.md`` (the same as tables) and ``gpu_check.log`` (every step's full output). A
one-screen summary with the issue's targets is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
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
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DEADLINE = 470.0  # seconds for the whole run; the session's budget is 8 minutes
SMOKE_BUDGET_SCALE = 4    # --smoke: the interpreter on shared CPUs is slower than any GPU step
MARKERS = "gpu or any_device"


def gpu_test_files(exclude=()) -> list[str]:
    """Test files with tests of MARKERS (read, not imported: the GPU machine may lack packages
    other test modules import)."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path) as f:
            text = f.read()
        if ("mark.gpu" in text or "mark.any_device" in text) and \
                os.path.basename(path) not in exclude:
            out.append(os.path.relpath(path, ROOT))
    return out


def _pytest(files, workers):
    # -v: one line per test as it ends, so a step killed at its budget still shows its progress
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-m", MARKERS,
           *files]
    if _importable("xdist") and workers > 1:
        cmd += ["-n", str(workers)]
    return cmd + (["--timeout", "120"] if _importable("pytest_timeout") else [])


def _importable(mod) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


@dataclass
class Step:
    name: str
    budget: float            # seconds, compilation included
    what: str
    command: Optional[list] = None  # a subprocess; None: the benchmark cases of this step
    env: dict = field(default_factory=dict)
    needs_build: bool = False
    background: bool = False


BUILD_ENV = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a"),
             "MAX_JOBS": os.environ.get("MAX_JOBS", str(max(1, (os.cpu_count() or 2) // 2)))}
if os.path.exists("/usr/local/cuda/bin/nvcc") and "CUDA_HOME" not in os.environ:
    BUILD_ENV["CUDA_HOME"] = "/usr/local/cuda"

STEPS = [
    Step("env", 20, "GPU, driver, versions, commit; device copy and bf16 GEMM ceilings"),
    Step("build", 240, "python setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=9.0a)",
         [sys.executable, "setup.py", "build_ext", "--inplace"], BUILD_ENV, background=True),
    Step("tests_triton", 130, "the gpu-marked tests of the Triton STDHA and fused-adapter files, "
         "and the packed-path tests on CUDA tensors",
         _pytest(gpu_test_files(exclude=("test_stdha_cuda.py",)), workers=6)),
    Step("bench_stdha", 80, "STDHA fwd and fwd+bwd, ViT-B/16 and ViT-L/14 shapes: triton "
         "(packed), triton on views, shift-copy + SDPA, SDPA without shift"),
    Step("bench_flex", 45, "FlexAttention with a per-head frame mask, same shapes (compiled)"),
    Step("bench_adapter", 50, "fused vs unfused adapter linears (block, qkv, proj, fc1, fc2), "
         "fwd+bwd time and peak memory"),
    Step("bench_train", 40, "one ViT-B/16 8-frame training step, fused vs unfused adapters"),
    Step("tests_cuda", 40, "the gpu-marked tests of the CUDA extension",
         _pytest(["tests/test_stdha_cuda.py"], workers=1), {"ZEROI2V_REQUIRE_CUDA_EXT": "1"},
         needs_build=True),
    Step("bench_cuda", 20, "CUDA STDHA forward vs triton / SDPA, bf16 and fp16",
         needs_build=True),
    Step("bench_inference", 30, "merged ZeroI2V ViT-B/16 (triton, cuda) vs the plain timm ViT, "
         "8 clips x 8 frames, bf16"),
]
STEP_NAMES = [s.name for s in STEPS]


# ----------------------------------------------------------------------------- benchmark cases
def _ms(fn, smoke):
    """Median ms of ``fn()``: CUDA events with L2 flushed (triton's do_bench); one wall-clock
    call for --smoke (the interpreter's time means nothing)."""
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import torch
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))


def _rates(flops, nbytes, ms):
    return {"flops": flops, "bytes": nbytes,
            "tflops": flops / (ms * 1e-3) / 1e12 if flops and ms else None,
            "tbps": nbytes / (ms * 1e-3) / 1e12 if nbytes and ms else None}


def _attention(impl, shape, mode, dtype, device, smoke):
    import bench_cases as bc

    fn, reference = bc.attention_case(impl, *shape, mode, dtype, device, compile_flex=not smoke)
    out, expected = reference()
    err = float(((out - expected).norm() / expected.norm().clamp_min(1e-30)).item())
    if not err < 2e-2:  # never time a wrong kernel
        return {"err": err, "note": "WRONG: not timed"}
    ms = _ms(fn, smoke)
    return {"ms": ms, "err": err, **_rates(*bc.attention_work(*shape[:5], mode), ms)}


def _training(case, flops, nbytes, smoke):
    """Warm-up (compilation, autotuning), then the peak memory of one step above what was
    allocated before it (MiB; None on CPU) and the median time of a step."""
    step, zero_grads = case[:2]
    peak = None
    for _ in range(0 if smoke else 2):
        step()
        zero_grads()
    if not smoke:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        zero_grads()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = _ms(lambda: (step(), zero_grads()), smoke)
    return {"ms": ms, "peak_mb": peak, **_rates(flops, nbytes, ms)}


#: Shapes per attention step, most important first (a step cut at its budget keeps those).
ATTN_PLAN = {"bench_stdha": ("vitb16_bt64", "vitb16_bt256", "vitl14_t32_bt64"),
             "bench_flex": ("vitb16_bt64", "vitl14_t32_bt64", "vitb16_bt256"),
             "bench_cuda": ("vitb16_bt64", "vitb16_bt256", "vitl14_t32_bt64")}


def cases(step: str, smoke: bool):
    """``(group, impl, fields, measure)`` of every case of a benchmark step; ``measure()`` returns
    the row's measured fields or raises ``bench_cases.Unavailable``."""
    import torch

    import bench_cases as bc

    dev = "cpu" if smoke else "cuda"
    half, fp16 = (torch.float32, torch.float32) if smoke else (torch.bfloat16, torch.float16)
    if step == "env":
        yield "env", "info", {}, lambda: {"env": env_info(smoke)}
    elif step in ATTN_PLAN:
        shapes = ({"tiny": bc.AttnShape(1, 2, 2, 17, 32, (1, -1))} if smoke else
                  {k: bc.ATTN_SHAPES[k] for k in ATTN_PLAN[step]})
        impls, modes, dtypes = {
            "bench_stdha": (("sdpa_no_shift", "triton", "triton_views", "stdha_torch"),
                            ("fwd", "fwdbwd"), (half,)),
            "bench_flex": (("flex",), ("fwd", "fwdbwd"), (half,)),
            "bench_cuda": (("sdpa_no_shift", "cuda", "triton_views"), ("fwd",), (half, fp16)),
        }[step]
        for dt in dtypes:
            prefix = f"cuda-{str(dt)[6:]}-" if step == "bench_cuda" else "stdha-"
            for name, s in shapes.items():
                for mode in modes:
                    for impl in impls:
                        yield (f"{prefix}{name}-{mode}", impl,
                               dict(shape=[s.batch_frames, s.heads, s.tokens, s.head_dim],
                                    T=s.frames, mode=mode, dtype=str(dt)[6:]),
                               lambda i=impl, s=s, m=mode, d=dt: _attention(i, s, m, d, dev, smoke))
    elif step == "bench_adapter":
        # blocks first: they carry the targets, and compile / autotune what single sites reuse
        plan = ([("tiny", "block"), ("tiny", "qkv"), ("tiny", "proj")] if smoke else
                [("vitb16", "block"), ("vitl14", "block")] + [("vitb16", s) for s in bc.ADAPTER_SITES])
        for width, site in plan:
            for impl in bc.ADAPTER_IMPLS:
                def measure(w=width, s=site, i=impl):
                    case = bc.adapter_case(w, s, i, fp16, dev)
                    return dict(_training(case, *bc.adapter_work(w, s), smoke),
                                saved_mb=bc.saved_mb(case[2]))
                yield f"adapter-{width}-{site}", impl, {}, measure
    elif step == "bench_train":
        clips, frames = (1, 2) if smoke else (8, 8)
        flops = None if smoke else bc.vit_train_flops(197, clips * frames, 768, 12, 192)
        for impl in bc.ADAPTER_IMPLS:
            yield ("train-vitb16-8f", impl, dict(clips=clips, frames=frames),
                   lambda i=impl: _training(bc.train_step_case(i, clips, frames, dev, fp16,
                                                               tiny=smoke), flops, None, smoke))
    elif step == "bench_inference":
        clips, frames = (1, 2) if smoke else (8, 8)
        flops = None if smoke else bc.vit_forward_flops(197, clips * frames, 768, 12)

        def infer(impl):
            ms = _ms(bc.inference_case(impl, clips, frames, dev, half, tiny=smoke), smoke)
            return {"ms": ms, **_rates(flops, None, ms)}
        for impl in bc.INFERENCE_IMPLS:
            yield ("inference-vitb16-8f", impl, dict(clips=clips, frames=frames),
                   lambda i=impl: infer(i))


def run_cases(step, smoke, rows_path, deadline):
    """Inside a step's process: measure each case and append its row (a failing case is
    recorded and the next one runs)."""
    import gc

    from bench_cases import Unavailable

    for group, impl, fields, measure in cases(step, smoke):
        row = dict(group=group, impl=impl, **fields)
        if deadline - time.time() < 4:
            row["note"] = "skipped: step out of time"
        else:
            try:
                row.update(measure())
            except Unavailable as exc:
                row["note"] = f"unavailable: {exc}"
            except Exception as exc:  # noqa: BLE001 - recorded, the next case runs
                row["note"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {group:28} {impl:16} {_fmt(row.get('ms'), '9.4f')} ms {row.get('note', '')}",
              flush=True)
        if not smoke:  # peak-memory numbers start clean
            import torch

            gc.collect()
            torch.cuda.empty_cache()


def env_info(smoke):
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__,
                torch_cuda=torch.version.cuda, commit=commit(), source_sha256=source_hash())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                            "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        if r.returncode == 0 and r.stdout.strip():
            info["driver"] = r.stdout.split(",")[1].strip()
    if smoke:
        return dict(info, gpu="none (smoke run on CPU)")
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    x = torch.randn(2, 2**29, device="cuda", dtype=torch.bfloat16)  # a 1 GiB copy: 2 GiB moved
    info["copy_tbps"] = 2 * x[0].nbytes / (_ms(lambda: x[1].copy_(x[0]), False) * 1e-3) / 1e12
    a = torch.randn(2, 8192, 8192, device="cuda", dtype=torch.bfloat16)
    info["gemm_bf16_tflops"] = 2 * 8192**3 / (_ms(lambda: a[0] @ a[1], False) * 1e-3) / 1e12
    return info


def commit():
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
    """sha256 over the package, native and benchmark sources (path + content, sorted): names the
    code a run measured where the copied tree has no .git."""
    h = hashlib.sha256()
    pats = ("zeroi2v/**/*.py", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.cuh", "csrc/**/*.h",
            "benchmarks/*.py", "tests/*.py", "setup.py")
    for path in sorted({p for pat in pats for p in glob.glob(os.path.join(ROOT, pat), recursive=True)}):
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the runner
def _start(cmd, env, log_path):
    """``cmd`` in its own process group (so that it can be killed whole), output to the log."""
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait(proc, timeout):
    """Return code, or None after killing the process group at ``timeout`` seconds."""
    try:
        return proc.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _tail(path, n=3000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def pytest_note(text):
    """(summary line, failed test ids) of pytest output; without a summary (the run was killed),
    counts of the per-test result lines so far."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if ln.startswith("=") and any(
        w in ln for w in (" passed", " failed", " error", " skipped", "no tests ran"))), "")
    if summary:
        return summary, [ln.split(" ", 1)[1].split(" - ")[0] for ln in lines
                         if ln.startswith(("FAILED ", "ERROR "))]
    counts = {w: sum(f" {w.upper()}" in ln for ln in lines)
              for w in ("passed", "failed", "skipped", "error")}
    return ("killed before the end; so far " + ", ".join(f"{n} {w}" for w, n in counts.items() if n),
            [ln.split(" FAILED ", 1)[1].split()[0] for ln in lines
             if " FAILED " in ln and "::" in ln.split(" FAILED ", 1)[1]])


class Runner:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.deadline = self.t0 + args.deadline
        self.work = tempfile.mkdtemp(prefix="gpu_check_")
        self.results = {s.name: dict(name=s.name, status="pending", seconds=0.0, budget=s.budget,
                                     note="", tail="", rows=[]) for s in STEPS}
        self.env_info, self.build = {}, None
        os.makedirs(args.out, exist_ok=True)
        self.log_path = os.path.join(args.out, "gpu_check.log")
        open(self.log_path, "w").close()

    def _env(self, extra=None):
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
        if self.args.smoke:
            env["TRITON_INTERPRET"] = "1"
        return dict(env, **(extra or {}))

    def _say(self, msg):
        print(f"[gpu_check {time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def _finish(self, res, log, rc, secs):
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {res['name']} =====\n{_tail(log, 10**7)}")
        bad = [r for r in res["rows"] if str(r.get("note", "")).startswith(("error", "WRONG"))]
        if bad:
            res["note"] = f"{len(bad)} case(s) with errors or wrong results"
        res.update(seconds=round(secs, 1), tail=_tail(log),
                   status="timeout" if rc is None else "ok" if rc == 0 and not bad else "failed")
        self._say(f"{res['name']}: {res['status']} in {secs:.0f} s {res['note']}")
        self.write()

    def start_build(self, step):
        res = self.results[step.name]
        if self.args.smoke or step.name not in self.args.steps:
            # not built here: the steps that need it find out (test_stdha_cuda fails loudly)
            res.update(status="skipped", note="smoke run" if self.args.smoke else "not selected")
        else:
            self._say(f"build: started in the background (budget {step.budget:.0f} s)")
            log = os.path.join(self.work, "build.log")
            self.build = (step, log, time.time(), _start(step.command, self._env(step.env), log))
            res["status"] = "running"

    def wait_build(self):
        """Wait for the background build (at most its budget); False if it failed here."""
        res = self.results["build"]
        if self.build is not None:
            step, log, started, proc = self.build
            self.build = None
            rc = _wait(proc, min(started + step.budget, self.deadline) - time.time())
            res["note"] = "" if rc == 0 else "killed at its budget" if rc is None else f"exit {rc}"
            self._finish(res, log, rc, time.time() - started)
        return res["status"] not in ("failed", "timeout") and not self.args.smoke

    def run_step(self, step):
        res, smoke = self.results[step.name], self.args.smoke
        skip = ("not selected" if step.name not in self.args.steps else
                "smoke run" if smoke and step.command else
                f"needs the extension; build {self.results['build']['status']}"
                if step.needs_build and not self.wait_build() else None)
        if skip is None and step.command is None and step.name != "env" and not smoke:
            self.wait_build()  # keep the compiler off the CPU while timing
        budget = min(step.budget * (SMOKE_BUDGET_SCALE if smoke else 1), self.deadline - time.time())
        if skip is None and budget < 5:
            skip = "out of time (global deadline)"
        if skip:
            res.update(status="skipped", note=skip)
            return self._say(f"{step.name}: skipped ({skip})")
        self._say(f"{step.name}: {step.what} (budget {budget:.0f} s)")
        log, rows = (os.path.join(self.work, f"{step.name}.{x}") for x in ("log", "jsonl"))
        t0 = time.time()
        if step.command:
            rc = _wait(_start(step.command, self._env(step.env), log), budget)
            res["note"], failed = pytest_note(_tail(log, 2000000))
            res["rows"] = [{"failed": failed}] if failed else []
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--run-step", step.name, "--rows",
                   rows, "--step-deadline", str(time.time() + budget - 2)] + (["--smoke"] * smoke)
            rc = _wait(_start(cmd, self._env(), log), budget)
            res["rows"] = [json.loads(ln) for ln in _tail(rows, 10**9).splitlines() if ln.strip()]
            for r in res["rows"]:
                self.env_info.update(r.get("env", {}))
            res["rows"] = [r for r in res["rows"] if "env" not in r]
        self._finish(res, log, rc, time.time() - t0)

    def run(self):
        for step in STEPS:
            (self.start_build if step.background else self.run_step)(step)
        self.wait_build()
        self.write()
        print(summary(self.report()), flush=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def report(self):
        return dict(tool="benchmarks/gpu_check.py", version=2,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    smoke=self.args.smoke, deadline_s=self.args.deadline,
                    elapsed_s=round(time.time() - self.t0, 1), env=self.env_info,
                    steps=list(self.results.values()))

    def write(self):
        rep = self.report()
        with open(os.path.join(self.args.out, "gpu_check.json"), "w") as f:
            json.dump(rep, f, indent=1)
        with open(os.path.join(self.args.out, "gpu_check.md"), "w") as f:
            f.write(markdown(rep))


# ----------------------------------------------------------------------------- reports
BASELINES = ("sdpa_no_shift", "unfused", "plain_timm_vit")
#: The issue's targets: (claim, groups, field, numerator impl, denominator impl, target), one
#: line per matching group; a target of None is reported, not judged.
TARGETS = [
    ("STDHA fwd+bwd / SDPA-no-shift", "stdha-*-fwdbwd", "ms", "triton", "sdpa_no_shift", "<= 1.05"),
    ("shift-copy+SDPA / STDHA fwd+bwd", "stdha-*-fwdbwd", "ms", "stdha_torch", "triton", ">= 1.3"),
    *[(f"adapter block unfused/{i} time", "adapter-*-block", "ms", "unfused", i, ">= 1.25")
      for i in ("fused_residual", "fused_dual")],
    *[(f"adapter block {i}/unfused peak memory", "adapter-*-block", "peak_mb", i, "unfused",
       "<= 0.80") for i in ("fused_residual", "fused_dual")],
    *[(f"train step unfused/{i}", "train-*", "ms", "unfused", i, None)
      for i in ("fused_residual", "fused_dual")],
    *[(f"inference {i} / plain timm ViT", "inference-*", "ms", i, "plain_timm_vit", None)
      for i in ("merged_triton", "merged_cuda")],
]


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def _rows(rep):
    return [r for s in rep["steps"] for r in s["rows"] if "group" in r]


def targets(rep):
    """(claim, value, target, met: True/False/None) for every target and matching group."""
    rows, out = _rows(rep), []
    for claim, pattern, key, num, den, target in TARGETS:
        head, tail = pattern.split("*")
        for g in sorted({r["group"] for r in rows if fnmatch.fnmatch(r["group"], pattern)}):
            got = {r["impl"]: r.get(key) for r in rows if r["group"] == g}
            v = got[num] / got[den] if got.get(num) and got.get(den) else None
            ok = None if v is None or target is None else (
                v <= float(target[3:]) if target.startswith("<=") else v >= float(target[3:]))
            out.append((f"{claim}, {g[len(head):len(g) - len(tail)]}", v, target or "(report)",
                        ok))
    return out


def markdown(rep):
    env = rep.get("env", {})
    lines = ["# gpu_check results", "",
             f"Written by `python benchmarks/gpu_check.py` on {rep['date']} "
             f"({'SMOKE RUN on CPU: wiring only, no real timings' if rep['smoke'] else 'GPU run'}).",
             "", "| | |", "|---|---|",
             f"| GPU | {env.get('gpu', '?')} (sm {env.get('capability', '?')}, "
             f"{env.get('sms', '?')} SMs, {env.get('memory_gib', '?')} GiB) |",
             *[f"| {label} | {env.get(key, '?')} |" for label, key in (
                 ("driver", "driver"), ("torch", "torch"), ("CUDA (torch)", "torch_cuda"),
                 ("triton", "triton"), ("python", "python"), ("commit", "commit"),
                 ("source sha256", "source_sha256"))],
             f"| ceilings | copy {_fmt(env.get('copy_tbps'), '.2f')} TB/s, bf16 GEMM "
             f"{_fmt(env.get('gemm_bf16_tflops'), '.0f')} TFLOP/s (measured here) |",
             f"| elapsed | {rep['elapsed_s']} s of {rep['deadline_s']} s |",
             "", "## Steps", "", "| step | status | seconds | budget | note |",
             "|---|---|---|---|---|"]
    for s in rep["steps"]:
        failed = next((r["failed"] for r in s["rows"] if "failed" in r), [])
        note = s["note"] + (" — failed: " + ", ".join(failed[:20]) if failed else "")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget']:.0f} | "
                     f"{note.replace('|', '/')} |")
    lines += ["", "## Targets", "", "| | claim | value | target |", "|---|---|---|---|"]
    lines += [f"| {'–' if ok is None else 'MET' if ok else 'MISS'} | {claim} | {_fmt(v, '.3f')} | "
              f"{target.replace('|', '/')} |" for claim, v, target, ok in targets(rep)]
    for s in rep["steps"]:
        rows = [r for r in s["rows"] if "group" in r]
        if not rows:
            continue
        base = {r["group"]: r["ms"] for r in rows if r["impl"] in BASELINES and r.get("ms")}
        lines += ["", f"## {s['name']}", "",
                  "Median ms (CUDA events, L2 flushed); TFLOP/s and TB/s of the useful work "
                  "(same for every implementation of a group); × = time / the group's baseline.",
                  "", "| group | impl | ms | TFLOP/s | TB/s | × baseline | peak MiB | rel. err | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            x = r["ms"] / base[r["group"]] if r.get("ms") and r["group"] in base else None
            lines.append(
                f"| {r['group']} | {r['impl']} | {_fmt(r.get('ms'), '.4f')} | "
                f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('tbps'), '.2f')} | {_fmt(x, '.3f')} | "
                f"{_fmt(r.get('peak_mb'), '.0f')} | {_fmt(r.get('err'), '.1e')} | "
                f"{str(r.get('note', '')).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def summary(rep):
    """One screen: the machine in a line, then the markdown's steps and targets."""
    env, md = rep.get("env", {}), markdown(rep)
    steps = md[md.index("## Steps"):].split("\n## bench", 1)[0]
    return (f"gpu_check: {env.get('gpu', '?')}, driver {env.get('driver', '?')}, torch "
            f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, commit "
            f"{env.get('commit', '?')}, {rep['elapsed_s']} s of {rep['deadline_s']} s"
            + (" (SMOKE RUN: CPU, tiny shapes, interpreter; the numbers mean nothing)"
               if rep["smoke"] else "") + "\n\n" + steps.rstrip())


# ----------------------------------------------------------------------------- entry
def dry_run(args):
    print(f"gpu_check steps (deadline {args.deadline:.0f} s for the whole run):")
    print(f"  {'step':16} {'budget s':>8}  runs")
    for s in STEPS:
        tag = " [background, from t=0]" if s.background else " [after build]" if s.needs_build else ""
        sel = "" if s.name in args.steps else "  (not selected)"
        print(f"  {s.name:16} {s.budget:8.0f}  {s.what}{tag}{sel}")
    files = gpu_test_files()
    print(f"test files ({MARKERS}): {', '.join(files)}")
    for f in files + ["setup.py"]:
        if not os.path.exists(os.path.join(ROOT, f)):
            raise SystemExit(f"gpu_check: error: {f} is missing")
    total = sum(s.budget for s in STEPS if not s.background)
    print(f"foreground budgets: {total:.0f} s; build (background): "
          f"{next(s.budget for s in STEPS if s.background):.0f} s; every step is also cut at the "
          f"{args.deadline:.0f} s deadline")
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
    ap.add_argument("--run-step", choices=[s.name for s in STEPS if not s.command],
                    help=argparse.SUPPRESS)
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
    elif args.dry_run:
        dry_run(args)
    elif args.run_step:  # inside a step's own process
        if args.smoke:
            os.environ["TRITON_INTERPRET"] = "1"
        sys.path[:0] = [ROOT, HERE]
        run_cases(args.run_step, args.smoke, args.rows, args.step_deadline or time.time() + 60)
    else:
        if not args.smoke:
            r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
            if r.stdout.strip() != "True":
                raise SystemExit("gpu_check: error: no CUDA GPU visible to torch here; use "
                                 "--dry-run (list the steps) or --smoke (CPU wiring check)")
        Runner(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
