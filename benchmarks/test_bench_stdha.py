"""GPU speed of STDHA attention: the Triton kernel against the alternatives (bf16).

    pytest benchmarks/test_bench_stdha.py --benchmark-only --benchmark-json=stdha.json
    python benchmarks/ratios.py stdha.json          # median ratio to ``sdpa_no_shift`` per group

Implementations and shapes are those of ``bench_cases.py`` (``ATTN_IMPLS`` less ``cuda``, which
``test_bench_stdha_cuda.py`` covers), on identical inputs: views of one fused qkv projection, as
in a ViT block. Modes: ``fwd`` (inference) and ``fwdbwd`` (forward + backward w.r.t. the qkv).
Each implementation is checked against the ``"torch"`` backend before it is timed.

Every case skips without CUDA. The pytest-benchmark timing synchronises the device in the timed
function; ``extra_info`` also holds ``ms_median`` from ``triton.testing.do_bench`` (CUDA events,
L2 flushed between runs) and the achieved ``tflops`` / ``tbps`` derived from it, counting only
the useful work (``bench_cases.attention_work``), so they compare across implementations.
``gpu_check.py`` runs the same cases in one command with a time budget.
"""
import pytest
import torch

from bench_cases import ATTN_IMPLS, ATTN_SHAPES, Unavailable, attention_case, attention_work

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.gpu

IMPLS = [i for i in ATTN_IMPLS if i != "cuda"]
MODES = ["fwd", "fwdbwd"]
DTYPE = torch.bfloat16


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
def test_stdha_attention_speed(benchmark, shape, impl, mode):
    B, T, H, N, D, offsets = ATTN_SHAPES[shape]
    try:
        fn, reference = attention_case(impl, B, T, H, N, D, offsets, mode, DTYPE)
    except Unavailable as exc:
        pytest.skip(str(exc))
    out, expected = reference()  # never time a wrong kernel
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2

    def run():
        r = fn()
        torch.cuda.synchronize()
        return r

    benchmark.group = f"stdha-{shape}-{mode}"
    flops, nbytes = attention_work(B, T, H, N, D, mode)
    do_bench = pytest.importorskip("triton.testing").do_bench
    fn()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), dtype=str(DTYPE), impl=impl, mode=mode,
        B=B, T=T, H=H, N=N, D=D, offsets=list(offsets),
        ms_median=ms, tflops=flops / (ms * 1e-3) / 1e12, tbps=nbytes / (ms * 1e-3) / 1e12,
        flops=flops, bytes=nbytes,
    )
    benchmark.pedantic(run, warmup_rounds=5, rounds=50, iterations=1)
