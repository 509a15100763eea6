"""STDHA semantics: the pure-PyTorch backends against an independent float64 definition."""
import math

import pytest
import torch

import zeroi2v
from _helpers import rel_err
from zeroi2v import PRESETS, source_frames, stdha_attention, stdha_reference
from zeroi2v.nn import STDHAttention


def explicit_stdha(q, k, v, T, offsets):
    """Independent of the library: loops over videos, frames and heads, boundary rule inline."""
    bt, h, n, d = q.shape
    out = torch.empty_like(q)
    for b in range(bt // T):
        for t in range(T):
            for head in range(h):
                s = t - offsets[head]
                if not 0 <= s < T:
                    s = t
                qh = q[b * T + t, head]
                kh, vh = k[b * T + s, head], v[b * T + s, head]
                p = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1)
                out[b * T + t, head] = p @ vh
    return out


def random_offsets(gen, h, T):
    return [int(x) for x in torch.randint(-(T - 1), T, (h,), generator=gen)]


def test_source_frames_boundary_rule():
    s = source_frames([1, -1, 2, 0], 4)
    assert s[:, 0].tolist() == [0, 0, 1, 2]  # +1: previous frame, first frame keeps its own
    assert s[:, 1].tolist() == [1, 2, 3, 3]  # -1: next frame, last keeps its own
    assert s[:, 2].tolist() == [0, 1, 0, 1]  # +2
    assert s[:, 3].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("N", [1, 197, 257])
@pytest.mark.parametrize("T", [1, 2, 8, 16])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_forward_matches_definition(N, T, backend):
    gen = torch.Generator().manual_seed(N * 100 + T)
    B, H, D = (2 if T <= 2 else 1), 3, 16
    q, k, v = (torch.randn(B * T, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    offsets = random_offsets(gen, H, T)
    ref = explicit_stdha(q, k, v, T, offsets)
    out = stdha_attention(q, k, v, T, offsets, backend=backend)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-12
    # float32 inputs stay within float rounding of the float64 definition
    out32 = stdha_attention(q.float(), k.float(), v.float(), T, offsets, backend=backend)
    assert out32.dtype == torch.float32
    assert rel_err(out32, ref) < 1e-5


@pytest.mark.parametrize("T,offsets", [(8, PRESETS["vit_b"]), (16, PRESETS["vit_b_long"])])
@pytest.mark.parametrize("N", [197, 257])
def test_backward_matches_reference(T, offsets, N):
    gen = torch.Generator().manual_seed(T + N)
    H = len(offsets)
    q, k, v = (torch.randn(T, H, N, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    g = torch.randn(T, H, N, 8, generator=gen, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "torch"):
        out = stdha_attention(q, k, v, T, offsets, backend=backend)
        grads[backend] = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(grads["torch"], grads["reference"]):
        assert rel_err(a, b) < 1e-12
    # Frames read by no query frame for a head get zero K/V gradient for that head: with +1,
    # the last frame is read by nobody (frame T-1 reads T-2, frame 0 reads itself).
    dk = grads["torch"][1]
    assert dk[T - 1, 0].abs().max() == 0
    assert dk[0, 0].abs().max() > 0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(0)
    T, offsets = 3, [1, -2, 0]
    q, k, v = (torch.randn(2 * T, 3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: stdha_attention(q, k, v, T, offsets, backend=backend), (q, k, v))


def test_zero_offsets_equal_sdpa():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8, 4, 17, 16, generator=gen) for _ in range(3))
    out = stdha_attention(q, k, v, 4, [0, 0, 0, 0])
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6)


def test_non_contiguous_qkv_views():
    gen = torch.Generator().manual_seed(2)
    T, H, N, D = 4, 4, 13, 8
    qkv = torch.randn(2 * T, N, 3, H, D, generator=gen, dtype=torch.float64)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not k.is_contiguous()
    offs = [1, -1, 3, 0]
    ref = explicit_stdha(q.contiguous(), k.contiguous(), v.contiguous(), T, offs)
    assert rel_err(stdha_attention(q, k, v, T, offs, backend="torch"), ref) < 1e-12


def test_custom_scale():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 2, 9, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    a = stdha_attention(q, k, v, 2, [1, 0], scale=0.5, backend="torch")
    b = stdha_reference(q, k, v, 2, (1, 0), scale=0.5)
    assert rel_err(a, b) < 1e-12


def test_auto_backend_on_cpu():
    """CPU: the fused kernel for float32 inference where the extension has it (tested in
    test_stdha_cpu.py), the pure-PyTorch backend for everything else."""
    assert {"reference", "torch"} <= set(zeroi2v.available_backends())
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(4, 2, 9, 8, generator=gen) for _ in range(3))
    ref = stdha_attention(q, k, v, 2, [1, -1], backend="torch")
    assert rel_err(stdha_attention(q, k, v, 2, [1, -1]), ref) < 1e-5
    qd, kd, vd = (x.double() for x in (q, k, v))
    assert torch.equal(stdha_attention(qd, kd, vd, 2, [1, -1]),
                       stdha_attention(qd, kd, vd, 2, [1, -1], backend="torch"))
    qg = q.clone().requires_grad_()
    assert torch.equal(stdha_attention(qg, k, v, 2, [1, -1]), ref)


# ----------------------------------------------------------------------------- bad input


def _qkv(bt=8, h=2, n=5, d=4):
    return [torch.randn(bt, h, n, d) for _ in range(3)]


def test_error_frames_not_divisible():
    with pytest.raises(ValueError, match="not divisible by num_frames"):
        stdha_attention(*_qkv(bt=6), 4, [1, 0])


def test_error_head_count():
    with pytest.raises(ValueError, match="head-count mismatch"):
        stdha_attention(*_qkv(), 4, [1, 0, 0])


def test_error_offset_too_large():
    with pytest.raises(ValueError, match=r"too large for 4 frames"):
        stdha_attention(*_qkv(), 4, [4, 0])
    with pytest.raises(ValueError, match=r"too large for 4 frames"):
        stdha_attention(*_qkv(), 4, [0, -4])


def test_error_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="rank 4"):
        stdha_attention(q[0], k, v, 4, [1, 0])


def test_error_unknown_preset_and_backend():
    with pytest.raises(ValueError, match="unknown head-offset preset"):
        stdha_attention(*_qkv(), 4, "vit_xl")
    with pytest.raises(ValueError, match="preset 'vit_b' is for 12 heads"):
        stdha_attention(*_qkv(), 4, "vit_b")
    with pytest.raises(ValueError, match="unknown STDHA backend"):
        stdha_attention(*_qkv(), 4, [1, 0], backend="nope")


# ----------------------------------------------------------------------------- module


def test_stdha_attention_loads_timm_weights_and_matches_definition():
    from timm.layers import Attention

    gen = torch.Generator().manual_seed(5)
    timm_attn = Attention(48, num_heads=4, qkv_bias=True)
    with torch.no_grad():
        for p in timm_attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    T = 4
    mod = STDHAttention(48, 4, num_frames=T, head_offsets=[1, -1, 2, 0], qkv_bias=True)
    mod.load_state_dict(timm_attn.state_dict(), strict=True)
    assert set(mod.state_dict()) == set(timm_attn.state_dict())
    wrapped = STDHAttention.from_timm(timm_attn, T, [1, -1, 2, 0])
    assert wrapped.qkv is timm_attn.qkv  # shares weights, adds none
    x = torch.randn(2 * T, 11, 48, generator=gen)
    # definition: timm's own projections + the explicit STDHA loop
    qkv = timm_attn.qkv(x).reshape(2 * T, 11, 3, 4, 12).permute(2, 0, 3, 1, 4)
    o = explicit_stdha(qkv[0].double(), qkv[1].double(), qkv[2].double(), T, [1, -1, 2, 0])
    expect = timm_attn.proj(o.float().transpose(1, 2).reshape(2 * T, 11, 48))
    for m in (mod, wrapped):
        assert rel_err(m(x), expect) < 1e-5
    # all offsets zero: the module is timm's attention
    spatial = STDHAttention.from_timm(timm_attn, T, "spatial")
    assert torch.allclose(spatial(x), timm_attn(x), atol=1e-5)


def test_stdha_attention_errors():
    mod = STDHAttention(32, 4, num_frames=4, head_offsets=[1, 0, 0, -1])
    with pytest.raises(ValueError, match="not divisible by num_frames"):
        mod(torch.randn(6, 5, 32))
    with pytest.raises(ValueError, match=r"\(B\*T, N, C\)"):
        mod(torch.randn(4, 5))
    with pytest.raises(ValueError, match="head-count mismatch"):
        STDHAttention(32, 4, num_frames=4, head_offsets=[1, 0])
    with pytest.raises(ValueError, match="too large"):
        STDHAttention(32, 4, num_frames=2, head_offsets=[2, 0, 0, 0])
    with pytest.raises(ValueError, match="preset 'vit_l' is for 16 heads"):
        STDHAttention(32, 4, num_frames=4, head_offsets="vit_l")
    with pytest.raises(TypeError, match="not a timm Attention"):
        STDHAttention.from_timm(torch.nn.Linear(4, 4), 4)


@pytest.mark.parametrize("offsets", [[1, -1, 0, 0], [2, 2, -3, 1], [0, 0, 0, 0]])
def test_inplace_kv_path(offsets):
    """The module's no-grad path shifts its own K/V in place; the result is the definition's."""
    gen = torch.Generator().manual_seed(6)
    T, H, N, D = 4, 4, 11, 8
    qkv = torch.randn(2 * T, N, 3, H, D, generator=gen, dtype=torch.float64)
    q, k, v = qkv.clone().permute(2, 0, 3, 1, 4).unbind(0)
    ref = explicit_stdha(q.clone(), k.clone(), v.clone(), T, offsets)
    with torch.no_grad():
        out = stdha_attention(q, k, v, T, offsets, backend="torch", inplace_kv=True)
    assert rel_err(out, ref) < 1e-12
    # with a gradient needed, the inputs are never touched
    k2 = qkv.permute(2, 0, 3, 1, 4)[1].clone().requires_grad_()
    before = k2.detach().clone()
    stdha_attention(q, k2, v, T, offsets, backend="torch", inplace_kv=True)
    assert torch.equal(k2.detach(), before)


def _offset_functions():
    """Every public function that takes head offsets (issue #23: one keyword for all of them)."""
    from zeroi2v import offsets, ops
    from zeroi2v.nn import attention

    fns = [ops.stdha_attention, ops.stdha_attention_packed, ops.stdha_reference,
           offsets.resolve_offsets, offsets.check_offsets, offsets.clamp_offsets,
           offsets.source_frames, attention.stdha_from_timm, STDHAttention.from_timm,
           STDHAttention.set_temporal, zeroi2v.create_video_model]
    try:  # Triton is a dependency on Linux; elsewhere its module does not import
        from zeroi2v.kernels import stdha as ks
        from zeroi2v.kernels import stdha_launch as kl
    except ImportError:
        return fns
    return fns + [ks.stdha_triton, ks.stdha_triton_packed, kl.stdha_triton_forward,
                  kl.stdha_triton_backward, kl.stdha_triton_packed_forward,
                  kl.stdha_triton_packed_backward]


@pytest.mark.parametrize("fn", _offset_functions(), ids=lambda f: f.__qualname__)
def test_every_public_function_names_its_offsets_head_offsets(fn):
    import inspect

    params = inspect.signature(fn).parameters
    assert "head_offsets" in params and "offsets" not in params


def test_every_form_of_head_offsets_gives_the_same_attention():
    """Ints (list, tuple, tensor), a preset name and "auto" for the same layout agree in the op,
    its packed form and the reference, passed by keyword (``stdha_reference(..., "vit_b")`` used
    to fail with ``invalid literal for int()``)."""
    from zeroi2v.offsets import check_offsets, clamp_offsets, resolve_offsets
    from zeroi2v.ops import stdha_attention_packed

    T, H = 8, 12
    qkv = torch.randn(T, 5, 3, H, 8, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ints = PRESETS["vit_b"]
    forms = [list(ints), tuple(ints), torch.tensor(ints), "vit_b", "auto"]
    want = explicit_stdha(q, k, v, T, ints)
    for form in forms:
        assert rel_err(stdha_reference(q, k, v, T, head_offsets=form), want) < 1e-12, form
        assert rel_err(stdha_attention(q, k, v, T, head_offsets=form), want) < 1e-12, form
        packed = stdha_attention_packed(qkv, T, head_offsets=form)
        assert rel_err(packed, want.transpose(1, 2).flatten(2)) < 1e-12, form
        assert torch.equal(source_frames(head_offsets=form if form != "auto" else ints,
                                         num_frames=T), source_frames(ints, T))
    # "spatial" is plain attention in every function that knows the head count
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_err(stdha_reference(q, k, v, T, head_offsets="spatial"), plain) < 1e-12
    assert resolve_offsets("spatial", 3) == (0, 0, 0)
    # presets work where no head count is known; the head-count layouts say what is missing
    assert clamp_offsets(head_offsets="vit_l_long", num_frames=3) == (1, 1, -1, -1, 2, -2, 2) + (0,) * 9
    with pytest.raises(ValueError, match=r"too large for 2 frames"):
        check_offsets(head_offsets="vit_b_long", num_frames=2)
    for name in ("auto", "spatial"):
        with pytest.raises(ValueError, match=f"head_offsets='{name}' depends on the head count"):
            source_frames(name, T)
    with pytest.raises(ValueError, match="unknown head-offset preset 'vit_x'"):
        stdha_reference(q, k, v, T, "vit_x")
    with pytest.raises(ValueError, match="is for 12 heads but the attention has 3"):
        stdha_reference(q[:, :3], k[:, :3], v[:, :3], T, "vit_b")
