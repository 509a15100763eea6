"""Benchmark cases shared by the pytest-benchmark files and ``gpu_check.py``: the one place that
says what is timed (shapes, implementations, inputs) and how much work it is.

Every builder returns plain callables; nothing here times anything. A case that cannot run in
this environment raises :class:`Unavailable` with the reason (the pytest files skip on it,
``gpu_check.py`` records it).
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zeroi2v import PRESETS
from zeroi2v.offsets import source_frames


class Unavailable(Exception):
    """This case cannot run here (no GPU, no extension, no FlexAttention, ...)."""


# ----------------------------------------------------------------------------- attention
class AttnShape(NamedTuple):
    """One attention call of a ViT block: ``clips`` videos of ``frames`` frames, ``heads`` heads
    of ``head_dim`` channels over ``tokens`` tokens per frame, STDHA head ``offsets``. Unpacks as
    ``B, T, H, N, D, offsets``, the argument order of :func:`attention_case`."""

    clips: int
    frames: int
    heads: int
    tokens: int
    head_dim: int
    offsets: tuple

    @property
    def batch_frames(self) -> int:
        """B*T, the leading dimension of q, k and v."""
        return self.clips * self.frames


# The keys are benchmark ids (test ids, groups, gpu_check rows): keep them stable.
#: GPU shapes (test_bench_stdha*, gpu_check.py, gpu_stdha_sweep.py).
ATTN_SHAPES = {
    "vitb16_bt64": AttnShape(8, 8, 12, 197, 64, PRESETS["vit_b"]),
    "vitb16_bt256": AttnShape(32, 8, 12, 197, 64, PRESETS["vit_b"]),
    "vitl14_t32_bt64": AttnShape(2, 32, 16, 257, 64, PRESETS["vit_l_32f"]),
    "vitl14_t32_bt256": AttnShape(8, 32, 16, 257, 64, PRESETS["vit_l_32f"]),
}
#: CPU shapes (test_bench_core.py; benchmarks/results/cpu refers to these ids).
CPU_ATTN_SHAPES = {
    "vitb16_bt16": AttnShape(2, 8, 12, 197, 64, PRESETS["vit_b"]),
    "vitl14_bt32": AttnShape(1, 32, 16, 257, 64, PRESETS["vit_l_long"]),
}
#: triton: the packed path STDHAttention runs (qkv in, (B*T, N, H*D) out, packed gradient);
#: triton_views: the kernels on q/k/v views (separate dq/dk/dv); cuda: the CUDA C++ forward;
#: stdha_torch: shift-copy + SDPA (the authors' approach); sdpa_no_shift: plain attention, the
#: image ViT's cost; flex: FlexAttention over each flattened clip with a per-head frame mask.
ATTN_IMPLS = ("triton", "triton_views", "cuda", "stdha_torch", "sdpa_no_shift", "flex")


def attention_work(B, T, H, N, D, mode, elem=2):
    """Useful FLOPs and minimum bytes of one call, the same for every implementation: 4·BT·H·N²·D
    forward, 2.5x that more backward (no recomputation counted); bytes: q, k, v read and o (+ fp32
    log-sum-exp) written forward; q, k, v, o, dO read and dq, dk, dv written backward."""
    bt = B * T
    flops = 4.0 * bt * H * N * N * D
    tensor = bt * H * N * D * elem
    rows = bt * H * N * 4
    nbytes = 4 * tensor + rows
    if mode == "fwdbwd":
        flops *= 3.5
        nbytes += 8 * tensor + 2 * rows
    return flops, nbytes


_flex_compiled = {}


def _flex(compiled: bool):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"FlexAttention not in this torch ({exc})") from exc
    if not compiled:
        return create_block_mask, flex_attention
    if "fn" not in _flex_compiled:
        _flex_compiled["fn"] = torch.compile(flex_attention, dynamic=False)
    return create_block_mask, _flex_compiled["fn"]


def attention_case(impl, B, T, H, N, D, offsets, mode, dtype=torch.bfloat16, device="cuda",
                   seed=0, compile_flex=True):
    """``(fn, reference)`` for one STDHA implementation on views of one fused qkv projection.

    ``fn()`` runs the call alone, returning each implementation's natural output layout
    (``mode="fwd"``: under inference_mode; ``"fwdbwd"``: forward and the gradient w.r.t. qkv);
    only ``triton`` (packed) already returns what the output projection reads, the others would
    need a transposing copy in a model. ``reference()`` returns ``(out, expected)`` as
    (B*T, N, H*D) float tensors, expected from the ``"torch"`` backend, to check the
    implementation before timing it.
    """
    from zeroi2v import available_backends, stdha_attention
    from zeroi2v.ops.stdha import stdha_attention_packed

    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; known: {ATTN_IMPLS}")
    if impl in ("triton", "triton_views") and "triton" not in available_backends():
        raise Unavailable("Triton backend not available")
    if impl == "cuda":
        if torch.device(device).type != "cuda":
            raise Unavailable("the CUDA kernel needs CUDA tensors")
        if "cuda" not in available_backends():
            raise Unavailable("CUDA extension zeroi2v._C not built")
        if mode != "fwd":
            raise Unavailable("the CUDA kernel is forward-only")
    bt, scale = B * T, 1.0 / math.sqrt(D)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(bt, N, 3, H, D, generator=gen).to(device, dtype)
    qkv.requires_grad_(mode == "fwdbwd")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def flat(o):  # (B*T, H, N, D) -> (B*T, N, H*D), what the output projection reads
        return o.transpose(1, 2).reshape(bt, N, H * D)

    def natural_flat(o):  # this impl's output -> (B*T, N, H*D)
        if impl == "triton":
            return o
        if impl == "flex":  # (B, H, T*N, D)
            return o.view(B, H, T, N, D).permute(0, 2, 3, 1, 4).reshape(bt, N, H * D)
        return flat(o)

    if impl == "flex":
        if mode == "fwdbwd" and torch.device(device).type == "cpu":
            raise Unavailable("FlexAttention has no backward on CPU")
        create_block_mask, fa = _flex(compile_flex)
        # frames of a video are adjacent rows: (B*T, N, 3, H, D) is (B, T*N, 3, H, D), no copy
        fq, fk, fv = qkv.view(B, T * N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        src = source_frames(offsets, T, device)  # (T, H)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx // N) == src[q_idx // N, h]

        block_mask = create_block_mask(mask_mod, B=None, H=H, Q_LEN=T * N, KV_LEN=T * N,
                                       device=device)

        def attn():
            return fa(fq, fk, fv, block_mask=block_mask, scale=scale)  # (B, H, T*N, D)
    elif impl == "triton":
        def attn():
            return stdha_attention_packed(qkv, T, offsets, scale=scale, backend="triton")
    elif impl == "sdpa_no_shift":
        def attn():
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        backend = {"triton_views": "triton", "cuda": "cuda", "stdha_torch": "torch"}[impl]

        def attn():
            return stdha_attention(q, k, v, T, offsets, scale=scale, backend=backend)

    def reference():
        with torch.inference_mode():
            out = natural_flat(attn())
            # sdpa_no_shift computes plain attention: its reference is STDHA with no shift
            expected = flat(stdha_attention(q, k, v, T, (0,) * H if impl == "sdpa_no_shift"
                                            else offsets, scale=scale, backend="torch"))
        return out.float(), expected.float()

    if mode == "fwd":
        def fn():
            with torch.inference_mode():
                return attn()
    else:
        with torch.no_grad():
            dout = torch.randn(attn().shape, generator=gen).to(device, dtype)

        def fn():
            return torch.autograd.grad(attn(), qkv, dout)[0]

    return fn, reference


# ----------------------------------------------------------------------------- adapters
ADAPTER_WIDTHS = {
    # name: (tokens, C, r): 32 clips x 8 frames x 197 / 257 tokens
    "vitb16": (8 * 197 * 32, 768, 192),
    "vitl14": (8 * 257 * 32, 1024, 256),
    "tiny": (64, 64, 16),  # gpu_check --smoke (CPU interpreter)
}
#: (arrangement, width multiple of the linear's other side): qkv / fc1 follow the T / MLP adapter,
#: proj / fc2 precede the S / MLP-out adapter
ADAPTER_SITES = {"qkv": ("pre", 3), "proj": ("post", 1), "fc1": ("pre", 4), "fc2": ("post", 4)}
ADAPTER_IMPLS = ("unfused", "fused_residual", "fused_dual")


def adapter_pair(kind, C, r, mult, gen, dtype=torch.float16, device="cuda"):
    """A LinearAdapter (fc2 non-zero, dropout 0.1) and its frozen nn.Linear."""
    from zeroi2v.nn import LinearAdapter

    adapter = LinearAdapter(C, ratio=r / C, scale=0.5, dropout=0.1)
    lin = nn.Linear(C, mult * C) if kind == "pre" else nn.Linear(mult * C, C)
    with torch.no_grad():
        nn.init.normal_(adapter.fc2.weight, std=0.02, generator=gen)
    return adapter.to(device, dtype).train(), lin.to(device, dtype).requires_grad_(False)


def adapter_site_fn(kind, adapter, lin, impl):
    from zeroi2v.ops import adapter as oa

    if impl == "unfused":
        return (lambda x: lin(adapter(x))) if kind == "pre" else (lambda x: adapter(lin(x)))
    strategy = impl.split("_", 1)[1]
    if kind == "pre":
        return lambda x: oa.adapter_then_linear(adapter, lin.weight, lin.bias, x, strategy=strategy)
    return lambda x: oa.linear_then_adapter(adapter, lin.weight, lin.bias, x, strategy=strategy)


def adapter_case(width, site, impl, dtype=torch.float16, device="cuda", seed=0):
    """``(step, zero_grads, forward)`` for one adapted linear (``site`` in ADAPTER_SITES) or all
    four of a block (``site="block"``): forward + backward w.r.t. x and the adapter."""
    n_tok, C, r = ADAPTER_WIDTHS[width]
    gen = torch.Generator().manual_seed(seed)
    sites = list(ADAPTER_SITES) if site == "block" else [site]
    fns, xs, params = [], [], []
    for s in sites:
        kind, mult = ADAPTER_SITES[s]
        adapter, lin = adapter_pair(kind, C, r, mult, gen, dtype, device)
        fns.append(adapter_site_fn(kind, adapter, lin, impl))
        k_in = C if kind == "pre" else mult * C
        xs.append(torch.randn(n_tok, k_in, generator=gen).to(device, dtype).requires_grad_())
        params.extend(adapter.parameters())
    with torch.no_grad():
        grads = [torch.randn(f(x).shape, generator=gen).to(device, dtype) * 0.01
                 for f, x in zip(fns, xs)]

    def forward():
        return [f(x) for f, x in zip(fns, xs)]

    def step():
        torch.autograd.backward(forward(), grads)

    def zero_grads():
        for t in (*xs, *params):
            t.grad = None

    return step, zero_grads, forward


def adapter_work(width, site, elem=2):
    """FLOPs of forward + backward (frozen GEMM forward and input-gradient, the adapter's two
    skinny GEMMs forward and their three backward products) and minimum bytes (x, y, dy, dx,
    the frozen weight read twice)."""
    n_tok, C, r = ADAPTER_WIDTHS[width]
    flops = nbytes = 0.0
    for s in (list(ADAPTER_SITES) if site == "block" else [site]):
        _, mult = ADAPTER_SITES[s]
        flops += 2 * 2.0 * n_tok * C * mult * C + 5 * 2.0 * n_tok * C * r
        nbytes += elem * (2 * n_tok * C + 2 * n_tok * mult * C + 2 * C * mult * C)
    return flops, nbytes


def saved_mb(fn):
    """MiB of tensors autograd saves for backward during ``fn()``."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total[0] / 2**20


@contextlib.contextmanager
def adapter_strategy(impl):
    """The fused-adapter strategy of ``impl`` for code that does not pass one (the video model)."""
    from zeroi2v import settings

    if not impl.startswith("fused_"):
        yield
        return
    with settings.override(adapter_strategy=impl.split("_", 1)[1]):
        yield


# ----------------------------------------------------------------------------- whole models
VIT_B16 = "vit_base_patch16_clip_quickgelu_224"


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                             num_classes=0)


def video_model(frames, tiny=False, classes=400):
    """A ZeroI2V ViT-B/16 (CLIP; ``tiny``: a 2-block 64-wide ViT for CPU smoke runs)."""
    from zeroi2v import create_video_model

    backbone = _tiny_vit() if tiny else VIT_B16
    offsets = [1, -1] if tiny else "vit_b"
    return create_video_model(backbone, frames, classes, head_offsets=offsets)


def train_step_case(impl, clips=8, frames=8, device="cuda", dtype=torch.float16, tiny=False,
                    seed=0):
    """``(step, zero_grads, forward)``: one training step (fp16 autocast, AdamW on the trainable
    parameters) of a ZeroI2V ViT-B/16 on ``clips`` clips of ``frames`` frames."""
    torch.manual_seed(seed)
    model = video_model(frames, tiny).to(device).train()
    model.set_fused_adapters(impl != "unfused")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)
    size = 32 if tiny else 224
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(clips, 3, frames, size, size, generator=gen).to(device)
    y = torch.randint(0, 400, (clips,), generator=gen).to(device)

    def forward():
        with adapter_strategy(impl), torch.autocast(device_type=torch.device(device).type,
                                                    dtype=dtype):
            return F.cross_entropy(model(x), y)

    def step():
        forward().backward()  # the fused ops keep their forward's strategy for the backward
        opt.step()

    def zero_grads():
        opt.zero_grad(set_to_none=True)

    return step, zero_grads, forward


def vit_forward_flops(tokens_per_frame, frames, C, depth, r=None):
    """Forward FLOPs of a ViT on ``frames`` images: the block linears (24 C² per token), attention
    (4 N C per token), and, with ``r``, four adapters (8 C r per token). Embedding/head ignored."""
    per_token = 24.0 * C * C + 4.0 * tokens_per_frame * C + (8.0 * C * r if r else 0.0)
    return per_token * tokens_per_frame * frames * depth


INFERENCE_IMPLS = ("plain_timm_vit", "merged_triton", "merged_cuda")


def inference_case(impl, clips=8, frames=8, device="cuda", dtype=torch.bfloat16, tiny=False,
                   seed=0):
    """``fn`` for inference on ``clips`` x ``frames`` frames: the plain timm ViT on the frames, or
    the merged ZeroI2V model on the clips with the Triton or the CUDA STDHA backend."""
    import timm

    from zeroi2v import available_backends, merge_adapters
    from zeroi2v.nn import STDHAttention

    if impl not in INFERENCE_IMPLS:
        raise ValueError(f"unknown inference impl {impl!r}; known: {INFERENCE_IMPLS}")
    size = 32 if tiny else 224
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(clips, 3, frames, size, size, generator=gen).to(device, dtype)
    if impl == "plain_timm_vit":
        model = (_tiny_vit() if tiny else timm.create_model(VIT_B16, num_classes=400)).eval()
        model = model.to(device, dtype)
        frames_x = x.transpose(1, 2).flatten(0, 1)  # the same B*T frames

        def fn():
            with torch.inference_mode():
                return model(frames_x)
        return fn
    backend = impl.split("_", 1)[1]
    if backend == "cuda" and torch.device(device).type != "cuda":
        raise Unavailable("the CUDA kernel needs CUDA tensors")
    if backend not in available_backends():
        raise Unavailable(f"STDHA backend {backend!r} not available")
    torch.manual_seed(seed)
    video = video_model(frames, tiny).eval()
    with torch.no_grad():
        for p in video.parameters():
            if p.requires_grad:  # trained-looking adapters (fc2 starts at zero)
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    merged = merge_adapters(video).to(device, dtype)
    for m in merged.modules():
        if isinstance(m, STDHAttention):
            m.backend = backend

    def fn():
        with torch.inference_mode():
            return merged(x)
    return fn


def vit_train_flops(tokens_per_frame, frames, C, depth, r):
    """FLOPs of a training step with frozen linears and trainable adapters: the linears forward
    and their input gradient (2x), attention forward + backward (3.5x), the adapters forward,
    input and weight gradients (3x)."""
    tokens = tokens_per_frame * frames * depth
    return tokens * (2 * 24.0 * C * C + 3.5 * 4.0 * tokens_per_frame * C + 3 * 8.0 * C * r)
