"""GPU speed and memory of the fused "adapter + frozen linear" ops against the unfused modules.

    pytest benchmarks/test_bench_adapter.py --benchmark-only --benchmark-json=adapter.json
    python benchmarks/ratios.py adapter.json          # median ratio to ``unfused`` per group

Groups (fp16, forward + backward, gradients for x and the adapter, frozen linear):

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
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.gpu
HAS_CUDA = torch.cuda.is_available()
DTYPE = torch.float16
IMPLS = ["unfused", "fused_residual", "fused_dual"]
WIDTHS = {
    # name: (tokens, C, r)
    "vitb16": (8 * 197 * 32, 768, 192),
    "vitl14": (8 * 257 * 32, 1024, 256),
}
SITES = {"qkv": ("pre", 3), "proj": ("post", 1), "fc1": ("pre", 4), "fc2": ("post", 4)}


def _pair(kind, C, r, mult, gen):
    from zeroi2v.nn import LinearAdapter

    adapter = LinearAdapter(C, ratio=r / C, scale=0.5, dropout=0.1)
    lin = nn.Linear(C, mult * C) if kind == "pre" else nn.Linear(mult * C, C)
    with torch.no_grad():
        nn.init.normal_(adapter.fc2.weight, std=0.02, generator=gen)
    return adapter.to("cuda", DTYPE).train(), lin.to("cuda", DTYPE).requires_grad_(False)


def _site_fn(kind, adapter, lin, impl):
    from zeroi2v.kernels import adapter as fa

    if impl == "unfused":
        return (lambda x: lin(adapter(x))) if kind == "pre" else (lambda x: adapter(lin(x)))
    strategy = impl.split("_", 1)[1]
    if kind == "pre":
        return lambda x: fa.adapter_then_linear(adapter, lin, x, strategy=strategy)
    return lambda x: fa.linear_then_adapter(lin, adapter, x, strategy=strategy)


def _saved_mb(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total[0] / 2**20


def _measure(benchmark, step, zero_grads, rounds=20):
    """pytest-benchmark timing (synchronised) + peak memory / saved bytes / do_bench median."""
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
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("site", [*SITES, "block"])
@pytest.mark.parametrize("width", list(WIDTHS))
def test_adapted_linear_fwd_bwd(benchmark, width, site, impl):
    tokens, C, r = WIDTHS[width]
    gen = torch.Generator().manual_seed(0)
    sites = list(SITES) if site == "block" else [site]
    fns, xs, params = [], [], []
    for s in sites:
        kind, mult = SITES[s]
        adapter, lin = _pair(kind, C, r, mult, gen)
        fns.append(_site_fn(kind, adapter, lin, impl))
        k_in = C if kind == "pre" else mult * C
        xs.append(torch.randn(tokens, k_in, generator=gen).to("cuda", DTYPE).requires_grad_())
        params.extend(adapter.parameters())
    grads = [torch.randn(f(x).shape, generator=gen).to("cuda", DTYPE) * 0.01
             for f, x in zip(fns, xs)]

    def forward():
        return [f(x) for f, x in zip(fns, xs)]

    def step():
        torch.autograd.backward(forward(), grads)

    def zero_grads():
        for t in (*xs, *params):
            t.grad = None

    benchmark.group = f"adapter-{width}-{site}"
    benchmark.extra_info.update(tokens=tokens, dim=C, bottleneck=r, saved_mb=round(_saved_mb(forward), 1))
    _measure(benchmark, step, zero_grads)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_vitb16_8frames(benchmark, impl, monkeypatch):
    from zeroi2v import create_video_model

    batch = int(os.environ.get("ZEROI2V_BENCH_BATCH", "32"))
    T = 8
    torch.manual_seed(0)
    model = create_video_model("vit_base_patch16_clip_quickgelu_224", T, 400,
                               head_offsets="vit_b").cuda().train()
    for blk in model.backbone.blocks:
        blk.fused_adapters = impl != "unfused"
    if impl != "unfused":
        monkeypatch.setenv("ZEROI2V_ADAPTER_STRATEGY", impl.split("_", 1)[1])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, T, 224, 224, device="cuda")
    y = torch.randint(0, 400, (batch,), device="cuda")

    def forward():
        with torch.autocast("cuda", dtype=DTYPE):
            return F.cross_entropy(model(x), y)

    def step():
        forward().backward()
        opt.step()

    def zero_grads():
        opt.zero_grad(set_to_none=True)

    benchmark.group = "train-step-vitb16-8f"
    benchmark.extra_info.update(batch=batch, frames=T, saved_mb=round(_saved_mb(forward), 1))
    _measure(benchmark, step, zero_grads, rounds=10)
