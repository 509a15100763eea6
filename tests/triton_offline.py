"""Compile the Triton kernels for GPUs without having one, as a real launch would, and read their
register and local-memory use off the cubin.

    python tests/triton_offline.py stdha|adapter [--arch 80 90] [--jobs 2] [--md]

prints one JSON line per compiled kernel: ``{"kernel", "arch", "dtype", "config", "regs",
"local", "stack", "shared", "wgmma"}`` (``--md``: a markdown table, as committed under
benchmarks/results/offline/). ``local`` / ``stack`` bytes > 0 mean register spills.

How "as a real launch would": the ops' own Python launchers run on CPU tensors of ViT-B/16 shapes
(packed qkv views, the adapter's call sites forward and backward) with the kernel objects swapped
for recorders; each recorded ``(args, kwargs)`` then goes through Triton's own argument binder,
so pointers and integers get the alignment/divisibility specialisation (``tt.divisibility = 16``,
unit strides as constants) that the same call on GPU tensors gets. Needs Triton's NVIDIA backend
(bundled ptxas and cuobjdump), not a GPU. Must run without ``TRITON_INTERPRET`` (the interpreter
replaces ``@triton.jit`` functions); tests call it in a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def available() -> str:
    """'' if offline compilation works here, else why not."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set"
    try:
        import triton

        if "nvidia" not in triton.backends.backends:
            return "Triton has no NVIDIA backend"
        _tool("ptxas")
        _tool("cuobjdump")
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot compile here"
        return f"{type(exc).__name__}: {exc}"
    return ""


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


class _Recorder:
    """Stands in for a JIT kernel or autotuner: ``rec[grid](*args, **kw)`` records the call."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, args, kwargs))
        return launch


# ----------------------------------------------------------------------------- launches recorded
def stdha_launches(dtype: torch.dtype, head_dim: int):
    """(kernel name, args, kwargs) of the four STDHA kernels at ViT-B/16 shapes (B*T = 64,
    N = 197, packed qkv views as in STDHAttention), forward and backward."""
    import zeroi2v.kernels.stdha_launch as ks

    calls: list = []
    names = ("stdha_fwd_kernel", "stdha_bwd_pre_kernel", "stdha_bwd_dq_kernel",
             "stdha_bwd_dkdv_kernel")
    saved = {n: getattr(ks, n) for n in names}
    saved_interp = ks.interpreting
    try:
        for n in names:
            setattr(ks, n, _Recorder(n, calls))
        ks.interpreting = lambda: True  # let the launchers take CPU tensors; nothing runs
        bt, n, h, d = 64, 197, 768 // head_dim, head_dim
        qkv = torch.empty(bt, n, 3, h, d, dtype=dtype)
        offsets = [1, -1] + [0] * (h - 2)
        out, lse = ks.stdha_triton_packed_forward(qkv, 8, offsets, d ** -0.5)
        ks.stdha_triton_packed_backward(torch.empty_like(out), qkv, out, lse, 8, offsets,
                                        d ** -0.5)
    finally:
        for n, f in saved.items():
            setattr(ks, n, f)
        ks.interpreting = saved_interp
    return [(name, args, kwargs, getattr(ks, name)) for name, args, kwargs in calls]


def adapter_launches(dtype: torch.dtype):
    """(site, args, flags) of every fused_gemm call of the adapter ops, forward and backward, at
    ViT-B/16 widths (C = 768, r = 192; qkv, proj, fc1, fc2), dropout on, both strategies."""
    from zeroi2v.kernels import adapter as fa
    from zeroi2v.ops import adapter as oa

    calls: list = []
    saved = (fa._gemm_tuned, fa._apply_tuned)
    try:
        fa._gemm_tuned, fa._apply_tuned = _Recorder("gemm", calls), _Recorder("apply", calls)
        # ViT-B widths; few tokens (the host-side matmuls run for real), but divisible by 16
        # as B*T*197 is for B*T = 64: the same specialisation as the real M
        m, c, r = 16, 768, 192
        g = torch.Generator().manual_seed(0)

        def rnd(*shape, grad=False):
            return (torch.randn(*shape, generator=g) * 0.02).to(dtype).requires_grad_(grad)

        A, a, B, b2 = rnd(r, c, grad=True), rnd(r, grad=True), rnd(c, r, grad=True), rnd(c, grad=True)
        for strategy in ("residual", "dual"):
            for mult in (3, 4):  # adapter -> qkv / fc1
                W, b = rnd(mult * c, c), rnd(mult * c)
                y = oa.fused_adapter_then_linear(rnd(m, c, grad=True), A, a, B, b2, W, b,
                                                 scale=0.5, p=0.1, strategy=strategy)
                y.backward(torch.ones_like(y))
            for mult in (1, 4):  # proj / fc2 -> adapter
                W, b = rnd(c, mult * c), rnd(c)
                y = oa.fused_linear_then_adapter(rnd(m, mult * c, grad=True), W, b, A, a, B, b2,
                                                 scale=0.5, p=0.1, strategy=strategy)
                y.backward(torch.ones_like(y))
    finally:
        fa._gemm_tuned, fa._apply_tuned = saved
    return calls


# ----------------------------------------------------------------------------- compile + inspect
def compile_launch(fn, arch: int, args, kwargs):
    """Compile JIT function ``fn`` for sm_``arch`` (90 means sm_90a) with the specialisation
    Triton's launcher derives from ``args``/``kwargs``; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                          options=options.__dict__)


def resources(kernel) -> dict:
    """Registers, local/stack bytes (spills) and dynamic shared memory of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return dict(regs=int(fields["REG"]), local=int(fields["LOCAL"]), stack=int(fields["STACK"]),
                shared=int(kernel.metadata.shared), wgmma="wgmma" in kernel.asm["ptx"])


def _cfg_repr(kwargs: dict, keys) -> dict:
    return {k: kwargs[k] for k in keys if k in kwargs}


def _stdha_job(job):
    arch, dname, head_dim = job
    rows = []
    for name, args, kwargs, fn in stdha_launches(DTYPES[dname], head_dim):
        kern = compile_launch(fn, arch, args, kwargs)
        rows.append(dict(kernel=name, arch=arch, dtype=dname, head_dim=head_dim,
                         config=_cfg_repr(kwargs, ("BLOCK_M", "BLOCK_N", "num_warps",
                                                   "num_stages")),
                         **resources(kern)))
    return rows


def _adapter_job(job):
    from zeroi2v.kernels import adapter as fa

    arch, dname, table = job
    configs = fa._GEMM_CONFIGS if table == "gemm" else fa._APPLY_CONFIGS
    # one launch per distinct flag set: the tile config, not the shapes, decides registers
    seen, launches = set(), []
    for name, args, kwargs in adapter_launches(DTYPES[dname]):
        key = tuple(sorted((k, v) for k, v in kwargs.items() if k.startswith("HAS_")))
        if name == table and key not in seen:
            seen.add(key)
            launches.append((args, kwargs))
    rows = []
    for cfg in configs:
        for args, flags in launches:
            kw = dict(flags, **cfg.all_kwargs())
            m, n, k1, k2 = args[8:12]
            kw["EVEN_K1"] = k1 % kw["BLOCK_K"] == 0
            kw["EVEN_K2"] = k2 % kw["BLOCK_K2"] == 0
            kern = compile_launch(fa._fused_gemm_kernel, arch, args, kw)
            rows.append(dict(kernel=f"fused_gemm[{table}]", arch=arch, dtype=dname,
                             flags={k: v for k, v in flags.items() if k.startswith("HAS_")},
                             config=_cfg_repr(kw, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps",
                                                   "num_stages")),
                             **resources(kern)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["stdha", "adapter"])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--md", action="store_true", help="a markdown table instead of JSON lines")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(json.dumps({"skip": why}))
        return
    if args.what == "stdha":
        jobs = [(a, d, hd) for a in args.arch for d in args.dtype for hd in args.head_dim]
        work = _stdha_job
    else:
        jobs = [(a, d, t) for a in args.arch for d in args.dtype for t in ("gemm", "apply")]
        work = _adapter_job
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = pool.map(work, jobs)
        if not args.md:
            for rows in results:
                for row in rows:
                    print(json.dumps(row), flush=True)
            return
        import triton

        print(f"Compiled offline by `python tests/triton_offline.py {args.what} --md` (Triton "
              f"{triton.__version__}); registers and local/stack bytes read from the cubin. "
              "sm 90 means sm_90a.\n")
        print("| kernel | sm | dtype | config | registers | spill (local/stack B) | shared B "
              "| wgmma |\n|---|---|---|---|---|---|---|---|")
        for rows in results:
            for r in rows:
                cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
                if "flags" in r:
                    cfg += " " + ",".join(k[4:] for k, v in r["flags"].items() if v)
                elif "head_dim" in r:
                    cfg = f"D={r['head_dim']} {cfg}"
                print(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {cfg} | {r['regs']} | "
                      f"{r['local']}/{r['stack']} | {r['shared']} | {'yes' if r['wgmma'] else 'no'} |")


if __name__ == "__main__":
    main()
