"""GPU speed of the CUDA STDHA forward kernel (``zeroi2v._C``) against Triton and plain SDPA.

    pytest benchmarks/test_bench_stdha_cuda.py --benchmark-only --benchmark-json=stdha_cuda.json
    python benchmarks/ratios.py stdha_cuda.json

Skipped without a GPU or without the built extension. Each group (one shape and dtype) holds
``cuda`` (this kernel), ``triton`` (when the Triton backend is available) and the baseline
``sdpa_no_shift`` (``F.scaled_dot_product_attention`` on the same views, no temporal shift: the
plain image ViT's attention, i.e. the cost STDHA must match). Inputs are views of a fused qkv
projection, as inside a ViT block. One round = ``INNER`` calls then one synchronisation;
``extra_info`` holds the per-call median time and the TFLOP/s (4·B·T·H·N²·D flops per call).

The result decides ``zeroi2v.kernels.cuda.CUDA_BACKEND_PRIORITY``: raise it above Triton's (10)
only if ``cuda`` is faster here on the target GPU. ``ZEROI2V_STDHA_BLOCK_M=64|128`` (read once
per process) forces the CUDA kernel's query-tile height for tuning runs.
"""
import pytest
import torch
import torch.nn.functional as F

from zeroi2v import PRESETS, available_backends, stdha_attention

pytestmark = pytest.mark.gpu

try:
    import zeroi2v._C  # noqa: F401
    HAS_EXT = True
except ImportError:
    HAS_EXT = False

INNER = 20

SHAPES = {
    # name: (B*T, H, N, D, T, offsets)
    "vitb16_bt64": (64, 12, 197, 64, 8, PRESETS["vit_b"]),
    "vitb16_bt256": (256, 12, 197, 64, 8, PRESETS["vit_b"]),
    "vitl14_bt64": (64, 16, 257, 64, 32, PRESETS["vit_l_32f"]),
    "vitl14_bt256": (256, 16, 257, 64, 32, PRESETS["vit_l_32f"]),
}


@pytest.mark.parametrize("impl", ["cuda", "triton", "sdpa_no_shift"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_stdha_forward(benchmark, shape, dtype, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if impl == "cuda" and not HAS_EXT:
        pytest.skip("zeroi2v._C not built")
    if impl == "triton" and "triton" not in available_backends():
        pytest.skip("Triton backend not available")
    bt, h, n, d, t, offsets = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(bt, n, 3, h, d, generator=gen, device="cuda").to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*T, H, N, D) strided views
    scale = d ** -0.5
    if impl == "sdpa_no_shift":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
    else:
        fn = lambda: stdha_attention(q, k, v, t, offsets, scale=scale, backend=impl)  # noqa: E731

    def run():
        with torch.inference_mode():
            for _ in range(INNER):
                out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.group = f"stdha-cuda-{shape}-{str(dtype).split('.')[-1]}"
    benchmark.pedantic(run, warmup_rounds=3, rounds=30, iterations=1)
    per_call = benchmark.stats.stats.median / INNER
    flops = 4.0 * bt * h * n * n * d
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        shape=[bt, h, n, d],
        num_frames=t,
        dtype=str(dtype),
        inner_calls=INNER,
        median_per_call_s=per_call,
        tflops=flops / per_call / 1e12,
    )
