"""Sweep the Triton STDHA launch parameters on a GPU (the ``CONFIGS`` table is untuned).

    python benchmarks/gpu_stdha_sweep.py [--kinds fwd bwd_dq bwd_dkdv] [--quick]

For each ViT shape and kernel, every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) is
checked for correctness against the ``"torch"`` backend and timed with ``triton.testing.do_bench``
(median ms); the other kernels keep their table defaults. The best candidate per (shape, kernel)
is printed last: copy it into ``zeroi2v.kernels.stdha_launch.CONFIGS`` if it beats the default clearly on
every shape. Needs CUDA; prints nothing it did not measure.
"""
import argparse
import itertools
import math

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["fwd", "bwd_dq", "bwd_dkdv"])
    ap.add_argument("--quick", action="store_true", help="fewer candidates")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    from bench_cases import ATTN_SHAPES
    from zeroi2v import stdha_attention
    from zeroi2v.kernels import stdha_launch as ks

    dtype = getattr(torch, args.dtype)
    shapes = {k: ATTN_SHAPES[k] for k in ("vitb16_bt256", "vitl14_t32_bt64")}
    blocks = [32, 64] if args.quick else [16, 32, 64, 128]
    warps = [4] if args.quick else [2, 4, 8]
    stages = [2] if args.quick else [1, 2, 3, 4]
    print(f"device: {torch.cuda.get_device_name()}  dtype: {dtype}")
    best = {}
    for sname, (B, T, H, N, D, offsets) in shapes.items():
        g = torch.Generator(device="cpu").manual_seed(0)
        qkv = torch.randn(B * T, N, 3, H, D, generator=g).to("cuda", dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale = 1.0 / math.sqrt(D)
        ref = stdha_attention(q, k, v, T, offsets, backend="torch").float()
        do = torch.randn_like(q)
        o, lse = ks.stdha_triton_forward(q, k, v, T, offsets, scale)
        dref = ks.stdha_triton_backward(do, q, k, v, o, lse, T, offsets, scale)
        for kind in args.kinds:
            rows = []
            for bm, bn, w, s in itertools.product(blocks, blocks, warps, stages):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                try:
                    # fn is timed before the loop moves on, hence noqa: B023 below
                    with ks.block_config(**{kind: cfg}):
                        if kind == "fwd":
                            out, _ = ks.stdha_triton_forward(q, k, v, T, offsets, scale)
                            err = ((out.float() - ref).norm() / ref.norm()).item()
                            fn = lambda: ks.stdha_triton_forward(q, k, v, T, offsets, scale)  # noqa: E731, B023
                        else:
                            grads = ks.stdha_triton_backward(do, q, k, v, o, lse, T, offsets,
                                                             scale)
                            err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                      for a, b in zip(grads, dref))
                            fn = lambda: ks.stdha_triton_backward(  # noqa: E731
                                do, q, k, v, o, lse, T, offsets, scale)  # noqa: B023
                        ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
                except OutOfResources:
                    continue
                ok = err < 2e-2
                rows.append((ms, cfg, err, ok))
                print(f"{sname:18s} {kind:9s} {cfg} err={err:.2e} {'ok ' if ok else 'BAD'} "
                      f"{ms:.4f} ms", flush=True)
            good = sorted([r for r in rows if r[3]], key=lambda r: r[0])
            if good:
                best[(sname, kind)] = good[0]
    print("\nbest per (shape, kernel):")
    for (sname, kind), (ms, cfg, _err, _) in best.items():
        print(f"  {sname:18s} {kind:9s} {ms:.4f} ms  {cfg}")


if __name__ == "__main__":
    main()
