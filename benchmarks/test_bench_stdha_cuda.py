"""GPU speed of the CUDA STDHA forward kernel (``zeroi2v._C``) against Triton and plain SDPA.

    pytest benchmarks/test_bench_stdha_cuda.py --benchmark-only --benchmark-json=stdha_cuda.json
    python benchmarks/ratios.py stdha_cuda.json

Skipped without a GPU or without the built extension. Each group (one shape of
``bench_cases.ATTN_SHAPES`` and a dtype) holds ``cuda`` (this kernel), ``triton_views`` (the
Triton kernel on the same q/k/v views), ``triton`` (its packed path) and the baseline
``sdpa_no_shift`` (the plain image ViT's attention, the cost STDHA must match). One round =
``INNER`` calls then one synchronisation; ``extra_info`` holds the per-call median time and the
TFLOP/s of the useful work.

The result decides ``PRIORITIES["cuda"]`` in ``zeroi2v/ops/registry.py``: raise it above
Triton's only if ``cuda`` is faster here on the target GPU. ``ZEROI2V_STDHA_BLOCK_M=64|128``
(read once per process) forces the CUDA kernel's query-tile height for tuning runs.
"""
import pytest
import torch

from bench_cases import ATTN_SHAPES, Unavailable, attention_case, attention_work

pytestmark = pytest.mark.gpu

INNER = 20


@pytest.mark.parametrize("impl", ["cuda", "triton_views", "triton", "sdpa_no_shift"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
def test_stdha_forward(benchmark, shape, dtype, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    B, T, H, N, D, offsets = ATTN_SHAPES[shape]
    try:
        fn, reference = attention_case(impl, B, T, H, N, D, offsets, "fwd", dtype)
    except Unavailable as exc:
        pytest.skip(str(exc))
    out, expected = reference()
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2

    def run():
        for _ in range(INNER):
            out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.group = f"stdha-cuda-{shape}-{str(dtype).split('.')[-1]}"
    benchmark.pedantic(run, warmup_rounds=3, rounds=30, iterations=1)
    per_call = benchmark.stats.stats.median / INNER
    flops, _ = attention_work(B, T, H, N, D, "fwd")
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), shape=[B * T, H, N, D], num_frames=T,
        dtype=str(dtype), inner_calls=INNER, median_per_call_s=per_call,
        tflops=flops / per_call / 1e12,
    )
