"""GPU speed and memory of the fused "adapter + frozen linear" ops against the unfused modules.

    pytest benchmarks/test_bench_adapter.py --benchmark-only --benchmark-json=adapter.json
    python benchmarks/ratios.py adapter.json          # median ratio to ``unfused`` per group

Groups (fp16, forward + backward, gradients for x and the adapter, frozen linear; cases from
``bench_cases.py``):

* ``adapter-{vitb16,vitl14}-{qkv,proj,fc1,fc2}``: one adapted linear of a block at ViT-B/16
  (tokens = 8 frames x 197 x 32 clips, C = 768, r = 192) and ViT-L/14 widths (8 x 257 x 32 tokens,
  C = 1024, r = 256), adapter dropout 0.1. ``qkv``/``fc1``: adapter -> linear (T / MLP adapter);
  ``proj``/``fc2``: linear -> adapter (S / MLP-out adapter).
* ``adapter-{...}-block``: the four of them in a row (a block's adapted linears).
* ``train-step-vitb16-8f``: a whole ZeroI2V ViT-B/16 (CLIP) training step, 8 frames, fp16
  autocast, AdamW.

Implementations: ``unfused`` (the nn modules), ``fused_residual`` and ``fused_dual`` (the two
strategies of :mod:`zeroi2v.kernels.adapter`; ``auto`` is ``residual`` for the adapter -> linear
ops and picks per linear for the others). ``extra_info``: ``peak_mem_mb`` (``max_memory_allocated``
during one forward+backward, above what was allocated before it), ``saved_mb`` (tensors autograd
saved for backward), ``ms_median`` (``triton.testing.do_bench``). All cases skip without CUDA.
"""
import os

import pytest
import torch

from bench_cases import (
    ADAPTER_IMPLS,
    ADAPTER_SITES,
    ADAPTER_WIDTHS,
    adapter_case,
    saved_mb,
    train_step_case,
)

pytestmark = pytest.mark.gpu
HAS_CUDA = torch.cuda.is_available()
DTYPE = torch.float16


def _measure(benchmark, step, zero_grads, rounds=20):
    """pytest-benchmark timing (synchronised) + peak memory / do_bench median."""
    import triton.testing

    for _ in range(3):  # warm-up: Triton autotuning and compilation happen here
        step()
        zero_grads()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    zero_grads()
    ms = triton.testing.do_bench(lambda: (step(), zero_grads()), warmup=5, rep=50,
                                 return_mode="median")

    def run():
        step()
        zero_grads()
        torch.cuda.synchronize()

    benchmark.extra_info.update(device=torch.cuda.get_device_name(), peak_mem_mb=round(peak, 1),
                                ms_median=ms)
    benchmark.pedantic(run, warmup_rounds=2, rounds=rounds, iterations=1)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ADAPTER_IMPLS)
@pytest.mark.parametrize("site", [*ADAPTER_SITES, "block"])
@pytest.mark.parametrize("width", [w for w in ADAPTER_WIDTHS if w != "tiny"])
def test_adapted_linear_fwd_bwd(benchmark, width, site, impl):
    step, zero_grads, forward = adapter_case(width, site, impl, DTYPE)
    tokens, C, r = ADAPTER_WIDTHS[width]
    benchmark.group = f"adapter-{width}-{site}"
    benchmark.extra_info.update(tokens=tokens, dim=C, bottleneck=r,
                                saved_mb=round(saved_mb(forward), 1))
    _measure(benchmark, step, zero_grads)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ADAPTER_IMPLS)
def test_train_step_vitb16_8frames(benchmark, impl):
    batch = int(os.environ.get("ZEROI2V_BENCH_BATCH", "32"))
    step, zero_grads, forward = train_step_case(impl, clips=batch, frames=8, dtype=DTYPE)
    benchmark.group = "train-step-vitb16-8f"
    benchmark.extra_info.update(batch=batch, frames=8, saved_mb=round(saved_mb(forward), 1))
    _measure(benchmark, step, zero_grads, rounds=10)
