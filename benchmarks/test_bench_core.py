"""CPU/GPU speed of the pure-PyTorch path: the cost of STDHA and of a merged model.

    pytest benchmarks/test_bench_core.py --benchmark-only --benchmark-json=core.json
    python benchmarks/ratios.py core.json

Each group holds a candidate and its baseline on identical inputs; ``ratios.py`` prints the
median-time ratio per group (the numbers the README quotes).
"""
import pytest
import timm
import torch
import torch.nn.functional as F

from zeroi2v import PRESETS, create_video_model, merge_adapters, stdha_attention

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


ATTN_SHAPES = {
    # name: (B*T, H, N, D, T, offsets)
    "vitb16_bt16": (16, 12, 197, 64, 8, PRESETS["vit_b"]),
    "vitl14_bt32": (32, 16, 257, 64, 32, PRESETS["vit_l_long"]),
}


@pytest.mark.parametrize("impl", ["sdpa_no_shift", "stdha_torch_inplace", "stdha_torch_copy"])
@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
def test_attention_forward(benchmark, shape, impl):
    bt, h, n, d, t, offsets = ATTN_SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    # a fused qkv projection's views, as inside a ViT block
    qkv = torch.randn(bt, n, 3, h, d, generator=gen).to(DEV).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    benchmark.group = f"attention-{shape}"
    if impl == "sdpa_no_shift":
        fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    elif impl == "stdha_torch_inplace":
        # what STDHAttention does at inference: K/V are its own qkv activations, shifted in place
        # (re-shifting the same buffer every round is the same work on still-random data)
        fn = lambda: stdha_attention(q, k, v, t, offsets, backend="torch", inplace_kv=True)  # noqa: E731
    else:  # the functional default: the caller's K/V are left untouched, shifted copies are made
        fn = lambda: stdha_attention(q, k, v, t, offsets, backend="torch")  # noqa: E731

    def run():
        with torch.inference_mode():
            out = fn()
        _sync()
        return out

    benchmark.extra_info.update(device=str(DEV), shape=[bt, h, n, d], num_frames=t)
    benchmark.pedantic(run, warmup_rounds=2, rounds=15, iterations=1)


@pytest.fixture(scope="module")
def vit_pair():
    """A merged ZeroI2V ViT-B/16 (CLIP) with trained-looking adapters, and the plain timm ViT."""
    name, T = "vit_base_patch16_clip_quickgelu_224", 8
    gen = torch.Generator().manual_seed(0)
    model = create_video_model(name, T, 400, head_offsets="vit_b").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    merged = merge_adapters(model).to(DEV)
    plain = timm.create_model(name, num_classes=400).eval().to(DEV)
    x = torch.randn(1, 3, T, 224, 224, generator=gen).to(DEV)
    return merged, plain, x


@pytest.mark.parametrize("impl", ["plain_timm_vit", "merged_zeroi2v"])
def test_vit_b16_8frames_forward(benchmark, vit_pair, impl):
    merged, plain, x = vit_pair
    benchmark.group = "model-vitb16-8frames"
    frames = x.transpose(1, 2).flatten(0, 1)  # the same B*T frames for the image model
    fn = (lambda: plain(frames)) if impl == "plain_timm_vit" else (lambda: merged(x))

    def run():
        with torch.inference_mode():
            out = fn()
        _sync()
        return out

    benchmark.extra_info.update(device=str(DEV), frames=x.shape[2])
    benchmark.pedantic(run, warmup_rounds=1, rounds=7, iterations=1)
