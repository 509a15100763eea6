"""Native CPU op ``torch.ops.zeroi2v.shift_heads_`` (csrc/shift_cpu.cpp) against the PyTorch shift.

Skipped when the extension is not built, unless ZEROI2V_REQUIRE_CUDA_EXT=1 (CI), which turns the
skip into a failure: the op is part of every build of ``zeroi2v._C``, CPU-only ones included.
"""
import os

import pytest
import torch

import zeroi2v.ops.stdha as ops
from zeroi2v import PRESETS, settings, stdha_attention
from zeroi2v.ops.stdha import head_runs, native_shift_op, shift_frames, shift_heads_

OP = native_shift_op()
pytestmark = pytest.mark.skipif(
    OP is None and os.environ.get("ZEROI2V_REQUIRE_CUDA_EXT", "0") != "1",
    reason="zeroi2v._C (native shift op) not built",
)


@pytest.fixture
def op():
    if OP is None:
        pytest.fail("ZEROI2V_REQUIRE_CUDA_EXT=1 but zeroi2v._C / torch.ops.zeroi2v.shift_heads_ is missing")
    return OP


def _qkv(bt, n, h, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(bt, n, 3, h, d, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)


def _expected(x, T, offsets):
    """The definition: every run of heads through the out-of-place PyTorch shift."""
    return torch.cat([shift_frames(x[:, a:b], T, d) for a, b, d in head_runs(tuple(offsets))], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,N,offsets", [
    (8, 197, PRESETS["vit_b"]),
    (16, 197, PRESETS["vit_b_long"]),
    (32, 257, PRESETS["vit_l_long"]),
    (8, 257, (3, -7, 7, 0, -1, -1)),
    (2, 1, (1, 0, -1)),
    (4, 17, (-2, -2, 3, 3)),   # every head temporal
    (1, 5, (0, 0)),            # one frame: nothing moves
])
def test_matches_pytorch_shift(op, dtype, T, N, offsets):
    """K and V of a fused qkv activation (heads packed) in one call; exact equality, since a shift
    only moves data, and q is untouched."""
    h = len(offsets)
    qkv = _qkv(2 * T, N, h, 16, dtype)
    before = qkv.clone()
    k, v = qkv[1], qkv[2]
    ref_k, ref_v = _expected(k, T, offsets), _expected(v, T, offsets)
    op([k, v], T, list(offsets))
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    assert torch.equal(qkv[0], before[0])


def test_non_packed_heads_contiguous_and_single_tensor(op):
    """Every 4-D layout with a contiguous last dimension: heads not adjacent, plain contiguous; one
    tensor or several of different layouts and dtypes."""
    T, offsets = 4, [2, -3, 0, 1, 1]
    x = torch.randn(3 * T, 5, 9, 8, dtype=torch.float64)
    ref = _expected(x, T, offsets)
    op([x], T, offsets)
    assert torch.equal(x, ref)
    y = torch.randn(2 * T, 9, 10, 8, dtype=torch.float32).transpose(1, 2)  # (BT, H=10, N=9, D)
    view = y[:, ::2]  # heads 2 apart: H stride != D
    z = torch.randn(2 * T, 5, 9, 8, dtype=torch.bfloat16)
    refs = [_expected(view, T, offsets), _expected(z, T, offsets)]
    op([view, z], T, offsets)
    assert torch.equal(view, refs[0]) and torch.equal(z, refs[1])


def test_errors(op):
    x = torch.randn(8, 2, 3, 4)
    with pytest.raises(ValueError, match="not divisible by num_frames"):
        op([x], 3, [1, 0])
    with pytest.raises(ValueError, match="too large"):
        op([x], 4, [4, 0])
    with pytest.raises(ValueError, match="2 heads"):
        op([x], 4, [1, 0, 0])
    with pytest.raises(ValueError, match="rank 4"):
        op([torch.randn(8, 3, 4)], 4, [1, 0, 0])
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        op([torch.randn(8, 2, 4, 3).transpose(2, 3)], 4, [1, 0])
    with pytest.raises(ValueError, match="must agree"):
        op([x, torch.randn(8, 2, 5, 4)], 4, [1, 0])


def test_meta_kernel_checks_shapes(op):
    """torch.compile / fake tensors see the same validation as the CPU kernel."""
    x = torch.empty(8, 2, 3, 4, device="meta")
    op([x], 4, [1, -1])  # accepted, does nothing
    with pytest.raises(ValueError, match="too large"):
        op([x], 4, [4, 0])


@pytest.mark.parametrize("preset", ["vit_b", "vit_b_long", "vit_l_long"])
def test_stdha_inplace_native_equals_pure(op, preset, monkeypatch):
    """The torch backend's in-place path gives bit-identical outputs with and without the op."""
    offsets = PRESETS[preset]
    h = len(offsets)
    T = 8
    outs = {}
    for native in (True, False):
        monkeypatch.setitem(settings._values, "native_shift", native)
        q, k, v = _qkv(2 * T, 197, h, 16, torch.float32, seed=3).unbind(0)
        with torch.inference_mode():
            outs[native] = stdha_attention(q, k, v, T, offsets, backend="torch", inplace_kv=True)
    assert torch.equal(outs[True], outs[False])
    q, k, v = _qkv(2 * T, 197, h, 16, torch.float64, seed=3).unbind(0)
    ref = stdha_attention(q, k, v, T, offsets, backend="reference")
    assert (outs[True].double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_shift_heads_uses_op_only_without_grad(op, monkeypatch):
    """With a gradient needed the pure PyTorch path runs (autograd records it); values agree."""
    T, offsets = 4, (1, -1, 0)
    x = torch.randn(2 * T, 3, 5, 8, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(ops, "native_shift_op", lambda: lambda *a: calls.append(a) or op(*a))
    leaf = x.clone().requires_grad_()
    y = leaf * 1.0  # a non-leaf that needs grad
    shift_heads_((y,), T, offsets)
    assert y.grad_fn is not None and not calls
    y.sum().backward()
    assert torch.equal(y.detach(), _expected(x, T, offsets))
    z = x.clone()
    shift_heads_((z,), T, offsets)
    assert len(calls) == 1 and torch.equal(z, _expected(x, T, offsets))
