"""Fused CPU kernel ``torch.ops.zeroi2v.stdha_fwd_cpu`` (backend ``"cpu"``) against the definition.

Skipped when the extension is not built, unless ZEROI2V_REQUIRE_CUDA_EXT=1 (CI), which turns the
skip into a failure: the op is part of every build of ``zeroi2v._C``, CPU-only ones included.
"""
import math
import os

import pytest
import torch

from _helpers import make_qkv, rel_err
from zeroi2v import PRESETS, create_video_model, stdha_attention, stdha_reference
from zeroi2v.nn import STDHAttention
from zeroi2v.ops import registry

try:
    import zeroi2v.kernels.native_cpu as cpu_backend
except ImportError as exc:
    cpu_backend, _IMPORT_ERROR = None, exc
else:
    _IMPORT_ERROR = None

pytestmark = pytest.mark.skipif(
    cpu_backend is None and os.environ.get("ZEROI2V_REQUIRE_CUDA_EXT", "0") != "1",
    reason=f"zeroi2v._C fused CPU kernel not available ({_IMPORT_ERROR})",
)


@pytest.fixture
def op():
    if cpu_backend is None:
        pytest.fail(f"ZEROI2V_REQUIRE_CUDA_EXT=1 but the 'cpu' backend is missing: {_IMPORT_ERROR}")
    return torch.ops.zeroi2v.stdha_fwd_cpu


def _random_offsets(h, t, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(int(x) for x in torch.randint(-(t - 1), t, (h,), generator=gen))


CASES = [
    # (B, T, H, N, D, offsets or None for random)
    (2, 8, 12, 197, 64, PRESETS["vit_b"]),
    (1, 16, 12, 197, 64, PRESETS["vit_b_long"]),
    (1, 32, 16, 257, 64, PRESETS["vit_l_long"]),
    (2, 8, 16, 257, 64, PRESETS["vit_l"]),
    (3, 2, 4, 17, 32, None),
    (2, 16, 6, 50, 16, None),
    (1, 1, 3, 5, 8, (0, 0, 0)),
    (2, 4, 5, 1, 8, None),       # one token
    (1, 3, 2, 800, 64, (1, -2)),  # long rows: 256-row query blocks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}N{c[3]}D{c[4]}")
def test_matches_reference(op, case):
    b, t, h, n, d, offsets = case
    offsets = offsets or _random_offsets(h, t, seed=n + h)
    q, k, v = make_qkv(b * t, h, n, d, seed=t * 7 + n, fused=True)
    ref = stdha_reference(q, k, v, t, offsets)
    q32, k32, v32 = (x.float() for x in (q, k, v))
    out = op(q32, k32, v32, list(offsets), t, 1.0 / math.sqrt(d))
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    # the layout timm reshapes without a copy: (B*T, N, H, D) memory
    assert out.transpose(1, 2).is_contiguous()
    # inputs untouched (no in-place shift)
    assert torch.equal(k32, k.float()) and torch.equal(v32, v.float())


def test_contiguous_inputs_other_scale_and_kv_length(op):
    """Plain contiguous tensors, a non-default scale, and K/V with fewer tokens than Q."""
    t, offsets = 4, (2, 0, -1)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2 * t, 3, 33, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2 * t, 3, 20, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2 * t, 3, 20, 16, generator=gen, dtype=torch.float64)
    ref = stdha_reference(q, k, v, t, offsets, scale=0.3)
    out = op(q.float(), k.float(), v.float(), list(offsets), t, 0.3)
    assert rel_err(out, ref) < 1e-5


def test_large_logits_stay_finite(op):
    """Softmax subtracts the row max: logits of several hundred give the reference, not inf/nan."""
    q, k, v = make_qkv(4, 2, 40, 8, seed=5, fused=True)
    q = q * 60.0
    ref = stdha_reference(q, k, v, 2, (1, -1))
    out = op(q.float(), k.float(), v.float(), [1, -1], 2, 1.0 / math.sqrt(8))
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-4


def test_auto_picks_cpu_only_without_grad(op, monkeypatch):
    calls = []
    real = cpu_backend.stdha_cpu
    monkeypatch.setitem(registry._BACKENDS, "cpu",
                        registry.Backend("cpu", lambda *a: calls.append(1) or real(*a),
                                         cpu_backend.CAPABILITIES, registry.PRIORITIES["cpu"]))
    q, k, v = (x.float() for x in make_qkv(8, 4, 17, 8, seed=2, fused=True))
    with torch.no_grad():
        out = stdha_attention(q, k, v, 4, (1, 0, -1, 2))
    assert calls == [1]
    ref = stdha_attention(q.double(), k.double(), v.double(), 4, (1, 0, -1, 2), backend="reference")
    assert rel_err(out, ref) < 1e-5
    qg = q.clone().requires_grad_()
    stdha_attention(qg, k, v, 4, (1, 0, -1, 2)).sum().backward()  # autograd: the torch backend
    assert calls == [1] and qg.grad is not None
    with torch.no_grad():
        stdha_attention(q.double(), k.double(), v.double(), 4, (1, 0, -1, 2))  # float64: torch
        stdha_attention(q, k, v, 4, (1, 0, -1, 2), dropout_p=0.0)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="inference only"):
        stdha_attention(qg, k, v, 4, (1, 0, -1, 2), backend="cpu")


def test_module_and_merged_model_use_it(op):
    """STDHAttention at inference equals its training-mode (torch backend) output; a whole video
    model in eval mode under no_grad equals the same model with the kernel switched off."""
    torch.manual_seed(0)
    attn = STDHAttention(64, 4, num_frames=4, head_offsets=(1, -1, 0, 2), qkv_bias=True).eval()
    x = torch.randn(8, 19, 64)
    with torch.no_grad():
        fast = attn(x)
    slow = attn(x)  # grad enabled and parameters require grad: the torch backend
    assert rel_err(fast, slow) < 1e-5
    model = create_video_model("vit_tiny_patch16_224", 4, 5, head_offsets=(1, -1, 0)).eval()
    video = torch.randn(1, 3, 4, 224, 224)
    with torch.no_grad():
        a = model(video)
        for m in model.modules():
            if isinstance(m, STDHAttention):
                m.backend = "torch"
        b = model(video)
    assert rel_err(a, b) < 1e-5


def test_errors(op):
    q = torch.randn(8, 2, 5, 4)
    with pytest.raises(ValueError, match="not divisible by num_frames"):
        op(q, q, q, [1, 0], 3, 0.5)
    with pytest.raises(ValueError, match="too large"):
        op(q, q, q, [4, 0], 4, 0.5)
    with pytest.raises(ValueError, match="2 heads"):
        op(q, q, q, [1, 0, 0], 4, 0.5)
    with pytest.raises(ValueError, match="float32 only"):
        op(q.double(), q.double(), q.double(), [1, 0], 4, 0.5)
    with pytest.raises(ValueError, match="rank 4"):
        op(q[0], q[0], q[0], [1, 0], 4, 0.5)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        qt = torch.randn(8, 2, 4, 5).transpose(2, 3)
        op(qt, qt, qt, [1, 0], 4, 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        op(q, q, torch.randn(8, 2, 5, 6), [1, 0], 4, 0.5)


def test_meta_and_empty(op):
    m = torch.empty(8, 2, 5, 4, device="meta")
    out = op(m, m, m, [1, -1], 4, 0.5)
    assert out.shape == (8, 2, 5, 4) and out.device.type == "meta"
    e = torch.randn(0, 2, 5, 4)
    assert op(e, e, e, [0, 0], 4, 0.5).shape == (0, 2, 5, 4)
