"""Fused "adapter + frozen linear" ops (zeroi2v.ops.adapter over zeroi2v.kernels.adapter) against
the unfused modules.

CPU: Triton interpreter, float32 fused vs float64 reference modules, small shapes, ragged token
counts. GPU (``@pytest.mark.gpu``): ViT-B / ViT-L widths in float16/bfloat16.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zeroi2v import create_video_model, merge_adapters, settings
from zeroi2v.kernels import adapter as fa
from zeroi2v.nn import AdaptedLinear, LinearAdapter
from zeroi2v.ops import adapter as oa

HAS_CUDA = torch.cuda.is_available()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class FixedMask(nn.Module):
    """Inverted dropout with a given keep-mask: what ``nn.Dropout`` computes for that mask."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, u):
        return u * self.mask.to(u.dtype) / (1 - self.p)


def make_pair(kind, C, r, n_other, dtype, device, gen, scale=0.5, p=0.0):
    """(adapter, frozen linear) with random non-zero weights (fc2 would start at zero)."""
    adapter = LinearAdapter(C, ratio=r / C, scale=scale, dropout=p).to(device, dtype)
    lin = nn.Linear(C, n_other) if kind == "pre" else nn.Linear(n_other, C)
    lin = lin.to(device, dtype).requires_grad_(False)
    with torch.no_grad():  # activations of order one at any width
        for t in [*adapter.parameters(), *lin.parameters()]:
            t.copy_(torch.randn(t.shape, generator=gen) * (t.shape[-1] ** -0.5 if t.dim() == 2 else 0.3))
    assert adapter.hidden == r
    return adapter, lin


def unfused(kind, adapter, lin, x):
    return lin(adapter(x)) if kind == "pre" else adapter(lin(x))


def fused(kind, adapter, lin, x, **kw):
    if kind == "pre":
        return oa.adapter_then_linear(adapter, lin.weight, lin.bias, x, **kw)
    return oa.linear_then_adapter(adapter, lin.weight, lin.bias, x, **kw)


def compare(kind, lead, C, r, n_other, p, strategy, dtype, device, ref_dtype, tol, seed=0):
    """Forward and every gradient (x, A, a, B, b2) of the fused op vs the unfused modules.

    Weights and inputs are drawn, rounded to ``dtype``, and the reference runs in ``ref_dtype``
    on exactly those values: what is left is the fused op's own arithmetic error."""
    gen = torch.Generator().manual_seed(seed)
    adapter, lin = make_pair(kind, C, r, n_other, ref_dtype, "cpu", gen, p=p)
    with torch.no_grad():
        for t in [*adapter.parameters(), *lin.parameters()]:
            t.copy_(t.to(dtype).to(ref_dtype))
    k_in = C if kind == "pre" else n_other
    x = torch.randn(*lead, k_in, generator=gen).to(dtype).float()
    mask = torch.rand(*lead, r, generator=gen) >= p if p > 0 else None
    dy = torch.randn(*lead, n_other if kind == "pre" else C, generator=gen).to(dtype).float()

    ref_a, ref_l = copy.deepcopy(adapter).train(), copy.deepcopy(lin)
    if mask is not None:
        ref_a.drop = FixedMask(mask, p)
    xr = x.to(ref_dtype).requires_grad_()
    yr = unfused(kind, ref_a, ref_l, xr)
    yr.backward(dy.to(ref_dtype))

    fus_a, fus_l = adapter.to(device, dtype).train(), lin.to(device, dtype)
    xf = x.to(device, dtype).requires_grad_()
    yf = fused(kind, fus_a, fus_l, xf, mask=None if mask is None else mask.to(device),
               strategy=strategy)
    yf.backward(dy.to(device, dtype))

    assert yf.shape == yr.shape and yf.dtype == dtype
    errs = {"y": rel_err(yf, yr), "x": rel_err(xf.grad, xr.grad)}
    for name, pf, pr in [("A", fus_a.fc1.weight, ref_a.fc1.weight), ("a", fus_a.fc1.bias, ref_a.fc1.bias),
                         ("B", fus_a.fc2.weight, ref_a.fc2.weight), ("b2", fus_a.fc2.bias, ref_a.fc2.bias)]:
        assert pf.grad is not None and pf.grad.dtype == pf.dtype, name
        errs[name] = rel_err(pf.grad, pr.grad)
    assert fus_l.weight.grad is None
    assert all(torch.isfinite(t).all() for t in (yf, xf.grad))
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors over {tol}: {bad}"


# (lead shape of x, C, r, N_out for "pre" / K_in for "post"); token counts are ragged
CPU_SHAPES = {
    "pre": [((37,), 32, 8, 96), ((2, 25), 64, 16, 128), ((5,), 48, 12, 48)],
    "post": [((37,), 32, 8, 32), ((3, 13), 32, 8, 128), ((50,), 64, 16, 64)],
}
CPU_CASES = [(k, *s) for k in ("pre", "post") for s in CPU_SHAPES[k]]


# ‖fused − float64 reference‖ / ‖reference‖ on the same rounded operands; measured in the
# interpreter: fp16 ~4e-4, bf16 ~4e-3 (the output's own rounding is most of it)
CPU_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("strategy", ["residual", "dual"])
@pytest.mark.parametrize("kind,lead,C,r,n_other", CPU_CASES)
def test_fused_matches_unfused_cpu(kind, lead, C, r, n_other, strategy, p):
    compare(kind, lead, C, r, n_other, p, strategy, torch.float32, "cpu", torch.float64, 2e-5)


# half precision in the interpreter: bf16 dots go through the shared upcast helper there
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("strategy", ["residual", "dual"])
@pytest.mark.parametrize("kind,lead,C,r,n_other", [CPU_CASES[1], CPU_CASES[5]],
                         ids=["pre", "post"])
def test_fused_half_precision_cpu(kind, lead, C, r, n_other, strategy, dtype):
    compare(kind, lead, C, r, n_other, 0.25, strategy, dtype, "cpu", torch.float64,
            CPU_TOL[dtype])


# which of x and the adapter's (A, a, B, b2) want a gradient: the branches of the shared
# adapter-gradient code of both Functions (frozen adapter, first block's frozen input, ...)
GRAD_SETS = {"x only": ("x",), "adapter only": ("A", "a", "B", "b2"), "fc1 only": ("A", "a"),
             "fc2 and x": ("x", "B", "b2"), "A only": ("A",)}


@pytest.mark.parametrize("strategy", ["residual", "dual"])
@pytest.mark.parametrize("wanted", list(GRAD_SETS))
@pytest.mark.parametrize("kind", ["pre", "post"])
def test_fused_gives_exactly_the_gradients_asked_for(kind, wanted, strategy):
    names = GRAD_SETS[wanted]
    C, r, n_other, p = 32, 8, 64, 0.25
    gen = torch.Generator().manual_seed(3)
    adapter, lin = make_pair(kind, C, r, n_other, torch.float64, "cpu", gen, p=p)
    x = torch.randn(29, C if kind == "pre" else n_other, generator=gen, dtype=torch.float64)
    mask = torch.rand(29, r, generator=gen) >= p
    dy = torch.randn(29, n_other if kind == "pre" else C, generator=gen, dtype=torch.float64)
    grads = []
    for run in ("ref", "fused"):
        a = copy.deepcopy(adapter).train()
        params = dict(A=a.fc1.weight, a=a.fc1.bias, B=a.fc2.weight, b2=a.fc2.bias)
        for n, t in params.items():
            t.requires_grad_(n in names)
        xi = x.clone().requires_grad_("x" in names)
        if run == "ref":
            a.drop = FixedMask(mask, p)
            y = unfused(kind, a, lin, xi)
        else:
            y = fused(kind, a.float(), lin.float(), xi.float(), mask=mask, strategy=strategy)
        y.backward(dy.to(y.dtype))
        grads.append({n: t.grad for n, t in dict(params, x=xi).items()})
    ref, got = grads
    for n in ("x", "A", "a", "B", "b2"):
        assert (got[n] is None) == (n not in names), n
        if n in names:
            assert rel_err(got[n], ref[n]) < 2e-5, n


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_auto_strategy_and_drawn_mask(kind, monkeypatch):
    """Without a mask the op draws one with ``dropout_mask``; the result is the unfused module
    under that very mask."""
    drawn = []
    orig = oa.dropout_mask

    def record(shape, p, device):
        m = orig(shape, p, device)
        drawn.append(m)
        return m

    monkeypatch.setattr(oa, "dropout_mask", record)
    gen = torch.Generator().manual_seed(1)
    p = 0.3
    adapter, lin = make_pair(kind, 32, 8, 64, torch.float32, "cpu", gen, p=p)
    x = torch.randn(41, 32 if kind == "pre" else 64, generator=gen)
    y = fused(kind, adapter, lin, x)
    assert len(drawn) == 1 and drawn[0].shape == (41, 8) and drawn[0].dtype == torch.bool
    adapter.drop = FixedMask(drawn[0], p)
    assert rel_err(y, unfused(kind, adapter, lin, x)) < 1e-5


def test_dropout_mask_rate():
    m = oa.dropout_mask((4000, 16), 0.25, "cpu")
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.75) < 0.02


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_eval_no_grad_and_frozen_only(kind):
    """Eval mode: no dropout, equals the module; inputs without grad; only adapter params grad."""
    gen = torch.Generator().manual_seed(2)
    adapter, lin = make_pair(kind, 32, 8, 96, torch.float32, "cpu", gen, p=0.5)
    adapter.eval()
    x = torch.randn(2, 19, 32 if kind == "pre" else 96, generator=gen)
    with torch.no_grad():
        y = fused(kind, adapter, lin, x)
    assert rel_err(y, unfused(kind, adapter, lin, x)) < 1e-5
    adapter.train()
    fused(kind, adapter, lin, x).sum().backward()  # x needs no grad
    assert all(p.grad is not None for p in adapter.parameters())
    lin.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        fused(kind, adapter, lin, x)


def test_bad_inputs():
    gen = torch.Generator().manual_seed(3)
    adapter, lin = make_pair("pre", 32, 8, 64, torch.float32, "cpu", gen, p=0.1)
    x = torch.randn(10, 32)
    with pytest.raises(ValueError, match="mask"):
        fused("pre", adapter, lin, x, mask=torch.ones(10, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="strategy"):
        fused("pre", adapter, lin, x, strategy="fast")
    with pytest.raises(ValueError, match="dim"):
        fused("pre", adapter, lin, torch.randn(10, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_fused_gemm_all_terms_strided(dtype):
    """The kernel itself: residual + dense + masked low-rank + bias, transposed-view operands."""
    gen = torch.Generator().manual_seed(4)
    M, N, K1, K2 = 45, 40, 72, 24

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    res = rnd(M, N)
    a1 = rnd(M, K1)
    b1 = rnd(K1, N).t()  # (N, K1) view, column-major
    a2 = rnd(K2, M).t()  # (M, K2) view
    b2 = rnd(N, K2)
    mask = torch.rand(M, K2, generator=gen) > 0.4
    bias = torch.randn(N, generator=gen)  # fp32, as the ops pass it
    out = fa.fused_gemm(torch.empty(M, N, dtype=dtype), res=res, a1=a1, b1=b1, a2=a2, b2=b2,
                        mask=mask, bias=bias)
    ref = res.double() + a1.double() @ b1.double().t() + (a2.double() * mask) @ b2.double().t() + bias
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else CPU_TOL[dtype])


# --------------------------------------------------------------------------- the video model
def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                             mlp_ratio=2.0, num_classes=0)


class Replay(nn.Module):
    """Dropout that replays recorded keep-masks in call order."""

    def __init__(self, masks, p):
        super().__init__()
        self.masks, self.p = masks, p

    def forward(self, u):
        return u * self.masks.pop(0).reshape(u.shape).to(u.dtype) / (1 - self.p)


def _train_step(model, x, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return loss.detach(), grads


def _one_step_fused_vs_unfused(model, x, y, p, tol, monkeypatch, autocast_dtype=None):
    """Train one step fused (masks recorded) and unfused (masks replayed); compare everything."""
    fused_m, unfused_m = model, copy.deepcopy(model)
    fused_m.set_fused_adapters(True)
    unfused_m.set_fused_adapters(False)
    masks = []
    orig = oa.dropout_mask

    def record(shape, p_, device):
        m = orig(shape, p_, device)
        masks.append(m)
        return m

    monkeypatch.setattr(oa, "dropout_mask", record)
    calls = {"pre": 0, "post": 0}
    for name, key in [("adapter_then_linear", "pre"), ("linear_then_adapter", "post")]:
        fn = getattr(oa, name)

        def counted(*a, _fn=fn, _key=key, **k):
            calls[_key] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(oa, name, counted)

    ac = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype
          else torch.autocast(x.device.type, enabled=False))
    with ac:
        loss_f, grads_f = _train_step(fused_m, x, y)
    depth = len(model.backbone.blocks)
    assert calls == {"pre": 2 * depth, "post": 2 * depth}
    assert len(masks) == (4 * depth if p > 0 else 0)
    if p > 0:
        for i in range(depth):
            for adapter in unfused_m.adapters(i).values():
                adapter.drop = Replay(masks, p)
    with ac:
        loss_u, grads_u = _train_step(unfused_m, x, y)
    assert calls == {"pre": 2 * depth, "post": 2 * depth}  # the unfused run used no fused op
    assert not masks  # every recorded mask was replayed, in the same order
    assert rel_err(loss_f, loss_u) < tol
    assert grads_f.keys() == grads_u.keys()
    bad = {n: rel_err(grads_f[n], grads_u[n]) for n in grads_f
           if not rel_err(grads_f[n], grads_u[n]) < tol}
    assert not bad, bad
    # same parameters, same layout: the state dicts match key for key after the step
    sf, su = fused_m.state_dict(), unfused_m.state_dict()
    assert list(sf) == list(su)
    assert max(rel_err(sf[k], su[k]) for k in sf if sf[k].is_floating_point()) < tol
    return fused_m


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_model_one_step_fused_equals_unfused_cpu(p, monkeypatch):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = create_video_model(_tiny_vit(), 2, 5, head_offsets=[1, -1, 0, 0],
                               adapter_dropout=p, head_dropout=0.0).train()
    model.set_attn_backend("torch")  # attention is not under test here: keep it cheap on CPU
    with torch.no_grad():
        for prm in model.parameters():
            if prm.requires_grad:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.1)
    x = torch.randn(2, 3, 2, 32, 32, generator=gen)  # 2 videos x 2 frames x 17 tokens = 68 rows
    y = torch.tensor([1, 3])
    trained = _one_step_fused_vs_unfused(model, x, y, p, 1e-4, monkeypatch)
    # a model trained through the fused path merges exactly like any other
    trained.eval()
    with torch.no_grad():
        assert rel_err(merge_adapters(trained)(x), trained(x)) < 1e-5


def test_model_auto_mode_stays_unfused_on_cpu():
    """Automatic mode fuses only when training on CUDA in half precision; the switch
    (ZEROI2V_FUSED_ADAPTERS) forces either path, a model's own setting wins over it."""
    from zeroi2v.models.video_vit import fused_adapters_active

    model = create_video_model(_tiny_vit(), 2, 5, head_offsets=[1, -1, 0, 0]).train()
    cpu = torch.device("cpu")
    assert not fused_adapters_active(model, cpu, torch.float32, training=True)
    with settings.override(fused_adapters=True):
        assert fused_adapters_active(model, cpu, torch.float32, training=True)
        model.set_fused_adapters(False)
        assert not fused_adapters_active(model, cpu, torch.float32, training=True)
    model.set_fused_adapters(None)
    with settings.override(fused_adapters=False):
        assert not fused_adapters_active(model, torch.device("cuda"), torch.bfloat16,
                                         training=True)
    with pytest.raises(ValueError, match="ZEROI2V_FUSED_ADAPTERS='maybe'"):
        settings.SWITCHES["fused_adapters"].parse("maybe")
    lin = model.adapted_linears()[0]
    why = oa.fused_not_supported_reasons(torch.randn(4, 32), lin.weight, lin.bias,
                                         lin.get_adapter(), automatic=True)
    assert "not on CUDA" in why
    with pytest.raises(ValueError, match="cannot run here: the linear is trained"):
        lin.weight.requires_grad_(True)
        oa.adapted_linear(torch.randn(4, 32), lin.weight, lin.bias, lin.get_adapter(), "before",
                          fused=True)


def test_adapted_linear_folds_exactly_and_keeps_timm_names():
    gen = torch.Generator().manual_seed(7)
    lin = nn.Linear(24, 40).double().requires_grad_(False)
    for position, dim in (("before", 24), ("after", 40)):
        adapter = LinearAdapter(dim, scale=0.7).double()
        with torch.no_grad():
            for t in adapter.parameters():
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.2)
        al = AdaptedLinear(lin, adapter, position).eval()
        assert {"weight", "bias", "adapter.fc1.weight"} <= set(al.state_dict())
        x = torch.randn(6, 24, generator=gen, dtype=torch.float64)
        merged = al.to_linear()
        assert type(merged) is nn.Linear
        assert (merged(x) - al(x)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="cannot go after"):
        AdaptedLinear(lin, LinearAdapter(24), "after")


# --------------------------------------------------------------------------- GPU
# (C, r, N_out of the "pre" linears / K_in of the "post" linears), M = 3*197 + 2 tokens (ragged)
GPU_WIDTHS = {"vit_b": (768, 192), "vit_l": (1024, 256)}
GPU_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("strategy", ["auto", "residual", "dual"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("kind,mult", [("pre", 3), ("pre", 4), ("post", 1), ("post", 4)],
                         ids=["qkv", "fc1", "proj", "fc2"])
@pytest.mark.parametrize("width", list(GPU_WIDTHS))
def test_fused_matches_unfused_gpu(width, kind, mult, p, strategy, dtype):
    C, r = GPU_WIDTHS[width]
    compare(kind, (3 * 197 + 2,), C, r, mult * C, p, strategy, dtype, "cuda", torch.float32,
            GPU_TOL[dtype])


@pytest.mark.gpu
def test_model_auto_mode_fuses_on_cuda():
    from zeroi2v.models.video_vit import fused_adapters_active

    model = create_video_model(_tiny_vit(), 2, 5, head_offsets=[1, -1, 0, 0]).cuda().train()
    dev = torch.device("cuda")
    assert not fused_adapters_active(model, dev, torch.float32, training=True)
    assert fused_adapters_active(model, dev, torch.float16, training=True)
    assert not fused_adapters_active(model, dev, torch.bfloat16, training=False)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_model_one_step_fused_equals_unfused_gpu(p, monkeypatch):
    """ViT-B/16 (CLIP) widths, 2 blocks, 8 frames, fp16 autocast, ragged 197-token frames."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    model = create_video_model("vit_base_patch16_clip_quickgelu_224", 8, 10, head_offsets="vit_b",
                               adapter_dropout=p, head_dropout=0.0, depth=2).cuda().train()
    with torch.no_grad():
        for prm in model.parameters():
            if prm.requires_grad:
                prm.copy_(torch.randn(prm.shape, generator=gen).cuda() * 0.02)
    x = torch.randn(2, 3, 8, 224, 224, generator=gen).cuda()
    y = torch.tensor([1, 3], device="cuda")
    _one_step_fused_vs_unfused(model, x, y, p, 2e-2, monkeypatch, autocast_dtype=torch.float16)
