"""STDHA with additive attention biases (BEiT's relative position bias) and with rotary position
embeddings (Eva: EVA-02, DINOv3), each against the float64 definition written out here."""
from __future__ import annotations

import pytest
import timm
import torch

from _helpers import make_qkv, rel_err
from zeroi2v.nn import STDHBeitAttention, STDHEvaAttention
from zeroi2v.ops.stdha import explain_backend, stdha_attention, stdha_reference


def _explicit(q, k, v, t, offsets, scale, bias=None):
    """STDHA by hand: head h of frame i attends to frame i - d_h when it exists, else to itself."""
    bt, h, n, d = q.shape
    out = torch.empty_like(q)
    for row in range(bt):
        i = row % t
        for head, off in enumerate(offsets):
            src = row - off if 0 <= i - off < t else row
            logits = q[row, head] @ k[src, head].T * scale
            if bias is not None:
                logits = logits + bias.expand(bt, h, n, n)[row, head]
            out[row, head] = torch.softmax(logits, -1) @ v[src, head]
    return out


@pytest.mark.parametrize("n", [1, 17, 197])
@pytest.mark.parametrize("bias_shape", ["heads", "full"])
def test_attn_bias_reference_and_torch_backend(n, bias_shape):
    t, h, d = 4, 3, 16
    offsets = (1, -1, 0)
    q, k, v = make_qkv(2 * t, h, n, d, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    shape = (h, n, n) if bias_shape == "heads" else (2 * t, h, n, n)
    bias = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = d ** -0.5
    ref = stdha_reference(q, k, v, t, offsets, scale, attn_bias=bias)
    with torch.no_grad():
        assert rel_err(ref, _explicit(q, k, v, t, offsets, scale, bias)) < 1e-12
        if n > 1:  # the bias changes the result (a test that could fail)
            assert rel_err(stdha_reference(q, k, v, t, offsets, scale), ref) > 1e-3
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        out = stdha_attention(qq, kk, vv, t, offsets, attn_bias=bias.to(dtype), backend="torch")
        assert rel_err(out, ref) < tol
        got = torch.autograd.grad(out, (qq, kk, vv), grad.to(dtype))
        for a, b in zip(got, want):  # (dq is zero for N = 1: compare against max(|b|, 1))
            assert (a.double() - b).norm() / max(b.norm(), 1.0) < tol * 10


def test_fused_backends_decline_a_bias_and_say_so():
    q, k, v = (x.float() for x in make_qkv(4, 2, 17, 64))
    bias = torch.randn(2, 17, 17)
    with torch.no_grad():
        chosen, reasons = explain_backend(q, k, v, attn_bias=bias)
        chosen_plain, _ = explain_backend(q, k, v)
    assert chosen == "torch"
    for name, why in reasons.items():
        if name != "reference":
            assert any("bias" in r for r in why), (name, why)
    if "cpu" in reasons:  # the fused CPU kernel is built: without a bias it is the pick
        assert chosen_plain == "cpu"
    for name in set(reasons) - {"reference"}:
        with pytest.raises(ValueError, match="bias"):
            stdha_attention(q, k, v, 2, (1, -1), attn_bias=bias, backend=name)


def test_attn_bias_shape_is_checked():
    q, k, v = make_qkv(4, 2, 5, 8)
    with pytest.raises(ValueError, match=r"attn_bias must be .*\(B\*T, H, N, Nk\)"):
        stdha_attention(q, k, v, 2, (1, 0), attn_bias=torch.zeros(3, 5, 5, dtype=q.dtype))


# ----------------------------------------------------------------------------- modules


def _block(name, **kw):
    return timm.create_model(name, depth=1, num_classes=0, **kw).double().eval()


def test_eva_rope_per_frame_then_gather():
    """EVA-02: q and k are rotated per frame (prefix tokens left alone), then a temporal head
    compares its frame's queries with the source frame's keys; written out in float64."""
    from timm.layers import apply_rot_embed_cat

    vit = _block("eva02_tiny_patch14_224", img_size=28)
    attn = vit.blocks[0].attn
    t, offsets = 4, (1, -1, 0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * t, 5, vit.embed_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for p in attn.parameters():  # q/v biases and the norm are zero/one at init
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    rope = vit.rope.get_embed().double()
    ours = STDHEvaAttention.from_timm(attn, t, offsets, backend="reference")
    with torch.no_grad():
        got = ours(x, rope=rope)
        qkv = x @ attn.qkv.weight.T + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = qkv.reshape(2 * t, 5, 3, 3, -1).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope)], 2)
        k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope)], 2)
        o = _explicit(q, k, v, t, offsets, attn.scale).transpose(1, 2).flatten(2)
        want = attn.proj(attn.norm(o))
        assert rel_err(got, want) < 1e-12
        # spatial heads: exactly timm's own module
        ours.set_temporal(t, "spatial")
        assert rel_err(ours(x, rope=rope), attn(x, rope=rope)) < 1e-12
        # and the offsets matter
        assert rel_err(got, attn(x, rope=rope)) > 1e-3


@pytest.mark.parametrize("name,kw", [
    ("eva02_base_patch14_224", dict(img_size=28)),   # separate q/k/v projections
    ("vit_small_patch16_dinov3", dict(img_size=32)),  # RoPE, registers, layer scale
])
def test_eva_variants_match_timm_with_spatial_heads(name, kw):
    vit = _block(name, **kw)
    attn = vit.blocks[0].attn
    g = torch.Generator().manual_seed(0)
    img = torch.randn(4, 3, *vit.patch_embed.img_size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        x, rope = vit._pos_embed(vit.patch_embed(img))  # tokens and rope as timm makes them
    assert rope is not None
    ours = STDHEvaAttention.from_timm(attn, 2, "spatial", backend="torch")
    with torch.no_grad():
        assert rel_err(ours(x, rope=rope), attn(x, rope=rope)) < 1e-12


def test_beit_relative_position_bias():
    """BEiTv2: the relative position bias is the same for every frame read (it depends on token
    positions only) and is added to every head's logits."""
    vit = _block("beitv2_base_patch16_224", img_size=32)
    attn = vit.blocks[0].attn
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(generator=g)
        attn.q_bias.normal_(generator=g)
    t, h = 2, attn.num_heads
    offsets = (1, -1) + (0,) * (h - 2)
    n = vit.patch_embed.num_patches + 1
    x = torch.randn(2 * t, n, vit.embed_dim, generator=g, dtype=torch.float64)
    ours = STDHBeitAttention.from_timm(attn, t, offsets, backend="auto")
    with torch.no_grad():
        got = ours(x)
        qkv = x @ attn.qkv.weight.T + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = qkv.reshape(2 * t, n, 3, h, -1).permute(2, 0, 3, 1, 4)
        bias = attn._get_rel_pos_bias()
        o = _explicit(q, k, v, t, offsets, attn.scale, bias).transpose(1, 2).flatten(2)
        assert rel_err(got, attn.proj(o)) < 1e-12
        ours.set_temporal(t, "spatial")
        assert rel_err(ours(x), attn(x)) < 1e-12
