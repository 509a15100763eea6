"""GPU speed of STDHA attention: the Triton kernel against the alternatives (bf16).

    pytest benchmarks/test_bench_stdha.py --benchmark-only --benchmark-json=stdha.json
    python benchmarks/ratios.py stdha.json          # median ratio to ``sdpa_no_shift`` per group

Implementations, on identical inputs (views of one fused qkv projection, as in a ViT block):

* ``triton``        zeroi2v's Triton kernel (temporal gather inside the kernel, no K/V copy)
* ``stdha_torch``   the ``"torch"`` backend: shifted K/V copies + ``F.scaled_dot_product_attention``
* ``sdpa_no_shift`` plain SDPA without any shift: the image ViT's cost, i.e. the zero-cost target
* ``flex``          FlexAttention over each flattened clip ``(B, H, T*N, D)`` with a per-head
                    frame mask (``kv frame == s(q frame, h)``), compiled

Modes: ``fwd`` (inference) and ``fwdbwd`` (forward + backward w.r.t. the fused qkv).

Every case skips without CUDA. The pytest-benchmark timing synchronises the device in the timed
function; ``extra_info`` also holds ``ms_median`` from ``triton.testing.do_bench`` (CUDA events,
L2 flushed between runs) and the achieved ``tflops`` / ``tbps`` derived from it. Both count only
the *useful* work of attention — FLOPs: 4·BT·H·N²·D forward, 2.5× that backward (the usual
flash-attention accounting, no recomputation); bytes: the minimum traffic, reading q, k, v and
writing o (+ log-sum-exp) forward, additionally reading q, k, v, o, dO and writing dq, dk, dv
backward — so the numbers are comparable across implementations that do more or less work.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from zeroi2v import PRESETS, stdha_attention
from zeroi2v.offsets import source_frames

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.gpu

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch
    flex_attention = None

SHAPES = {
    # name: (B, T, H, N, D, offsets)
    "vitb16_bt64": (8, 8, 12, 197, 64, PRESETS["vit_b"]),
    "vitb16_bt256": (32, 8, 12, 197, 64, PRESETS["vit_b"]),
    "vitl14_t32_bt64": (2, 32, 16, 257, 64, PRESETS["vit_l_32f"]),
    "vitl14_t32_bt256": (8, 32, 16, 257, 64, PRESETS["vit_l_32f"]),
}
IMPLS = ["triton", "stdha_torch", "sdpa_no_shift", "flex"]
MODES = ["fwd", "fwdbwd"]
DTYPE = torch.bfloat16

_flex_compiled = None


def _flex():
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def _work(B, T, H, N, D, mode, elem=2):
    bt = B * T
    flops = 4.0 * bt * H * N * N * D
    tensor = bt * H * N * D * elem
    rows = bt * H * N * 4  # fp32 log-sum-exp / delta
    nbytes = 4 * tensor + rows
    if mode == "fwdbwd":
        flops *= 3.5
        nbytes += 8 * tensor + 2 * rows
    return flops, nbytes


def _make_fn(impl, B, T, H, N, D, offsets, mode):
    bt = B * T
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(bt, N, 3, H, D, generator=gen).to("cuda", DTYPE)
    qkv.requires_grad_(mode == "fwdbwd")
    scale = 1.0 / math.sqrt(D)

    if impl == "flex":
        if flex_attention is None:
            pytest.skip("FlexAttention not available in this torch")
        # Frames of a video are adjacent rows: (B*T, N, 3, H, D) is (B, T*N, 3, H, D), no copy.
        q, k, v = qkv.view(B, T * N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        src = source_frames(offsets, T, "cuda")  # (T, H)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx // N) == src[q_idx // N, h]

        block_mask = create_block_mask(mask_mod, B=None, H=H, Q_LEN=T * N, KV_LEN=T * N,
                                       device="cuda")
        fa = _flex()

        def attn():
            return fa(q, k, v, block_mask=block_mask, scale=scale)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if impl == "sdpa_no_shift":
            def attn():
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            backend = "triton" if impl == "triton" else "torch"
            if backend == "triton":
                pytest.importorskip("zeroi2v.kernels.stdha")

            def attn():
                return stdha_attention(q, k, v, T, offsets, scale=scale, backend=backend)

    if mode == "fwd":
        def fn():
            with torch.inference_mode():
                return attn()
    else:
        out0 = attn()
        dout = torch.randn_like(out0)
        del out0

        def fn():
            out = attn()
            return torch.autograd.grad(out, qkv, dout)[0]

    return fn, (q, k, v)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_stdha_attention_speed(benchmark, shape, impl, mode):
    B, T, H, N, D, offsets = SHAPES[shape]
    fn, (q, k, v) = _make_fn(impl, B, T, H, N, D, offsets, mode)

    if impl == "triton" and mode == "fwd":
        # never time a wrong kernel
        with torch.inference_mode():
            ref = stdha_attention(q, k, v, T, offsets, backend="torch").float()
            out = fn().float()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2

    def run():
        r = fn()
        torch.cuda.synchronize()
        return r

    benchmark.group = f"stdha-{shape}-{mode}"
    flops, nbytes = _work(B, T, H, N, D, mode)
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
