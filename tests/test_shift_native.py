"""Native CPU op ``torch.ops.zeroi2v.shift_frames_`` (csrc/shift_cpu.cpp) against the PyTorch shift.

Skipped when the extension is not built, unless ZEROI2V_REQUIRE_CUDA_EXT=1 (CI), which turns the
skip into a failure: the op is part of every build of ``zeroi2v._C``, CPU-only ones included.
"""
import os

import pytest
import torch

import zeroi2v.ops.stdha as ops
from zeroi2v import stdha_attention
from zeroi2v.ops.stdha import native_shift_op, shift_frames, shift_frames_

OP = native_shift_op()
pytestmark = pytest.mark.skipif(
    OP is None and os.environ.get("ZEROI2V_REQUIRE_CUDA_EXT", "0") != "1",
    reason="zeroi2v._C (native shift op) not built",
)


@pytest.fixture
def op():
    if OP is None:
        pytest.fail("ZEROI2V_REQUIRE_CUDA_EXT=1 but zeroi2v._C / torch.ops.zeroi2v.shift_frames_ is missing")
    return OP


def _qkv(bt, n, h, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(bt, n, 3, h, d, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,N,offset", [(8, 197, 1), (8, 197, -1), (8, 257, 3), (16, 257, -15),
                                        (2, 1, 1), (4, 17, -2), (1, 5, 0)])
def test_matches_pytorch_shift(op, dtype, T, N, offset):
    """Views of a fused qkv activation (heads packed), exact equality: a shift only moves data."""
    qkv = _qkv(2 * T, N, 6, 16, dtype)
    k = qkv[1]
    for h0, h1 in ((0, 2), (3, 4), (0, 6)):
        before = qkv.clone()
        ref = shift_frames(k[:, h0:h1].clone(), T, offset)
        op(k[:, h0:h1], T, offset)
        assert torch.equal(k[:, h0:h1], ref)
        # nothing outside the slice changed (other heads, q and v)
        mask = torch.ones_like(qkv, dtype=torch.bool)
        mask[1, :, h0:h1] = False
        assert torch.equal(qkv[mask], before[mask])
        qkv.copy_(before)


def test_non_packed_heads_and_contiguous(op):
    """Every 4-D layout with a contiguous last dimension: heads not adjacent, plain contiguous."""
    T = 4
    x = torch.randn(3 * T, 5, 9, 8, dtype=torch.float64)
    ref = shift_frames(x.clone(), T, 2)
    op(x, T, 2)
    assert torch.equal(x, ref)
    y = torch.randn(2 * T, 9, 6, 8, dtype=torch.float64).transpose(1, 2)  # (BT, H=6, N=9, D), H stride != D
    view = y[:, ::2]
    ref = shift_frames(view.clone(), T, -3)
    op(view, T, -3)
    assert torch.equal(view, ref)


def test_errors(op):
    x = torch.randn(8, 2, 3, 4)
    with pytest.raises(ValueError, match="not divisible by num_frames"):
        op(x, 3, 1)
    with pytest.raises(ValueError, match="too large"):
        op(x, 4, 4)
    with pytest.raises(ValueError, match="rank 4"):
        op(torch.randn(8, 3, 4), 4, 1)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        op(torch.randn(8, 2, 4, 3).transpose(2, 3), 4, 1)


@pytest.mark.parametrize("preset", ["vit_b", "vit_b_long", "vit_l_long"])
def test_stdha_inplace_native_equals_pure(op, preset, monkeypatch):
    """The torch backend's in-place path gives bit-identical outputs with and without the op."""
    from zeroi2v import PRESETS

    offsets = PRESETS[preset]
    h = len(offsets)
    T = 8
    outs = {}
    for native in (True, False):
        monkeypatch.setattr(ops, "USE_NATIVE_SHIFT", native)
        q, k, v = _qkv(2 * T, 197, h, 16, torch.float32, seed=3).unbind(0)
        with torch.inference_mode():
            outs[native] = stdha_attention(q, k, v, T, offsets, backend="torch", inplace_kv=True)
    assert torch.equal(outs[True], outs[False])
    q, k, v = _qkv(2 * T, 197, h, 16, torch.float64, seed=3).unbind(0)
    ref = stdha_attention(q, k, v, T, offsets, backend="reference")
    assert (outs[True].double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_shift_frames_inplace_uses_op_only_without_grad(op):
    """With a gradient needed the pure PyTorch path runs (autograd records it); values agree."""
    T = 4
    x = torch.randn(2 * T, 3, 5, 8, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    y = leaf * 1.0  # a non-leaf that needs grad
    shift_frames_(y, T, 1)
    assert y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(y.detach(), shift_frames(x, T, 1))
