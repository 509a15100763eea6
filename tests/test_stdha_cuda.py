"""CUDA extension ``zeroi2v._C``: the STDHA forward kernel against the float64 definition.

Two kinds of tests:

* build/registration tests (no GPU needed). CI builds the extension on every run
  (``pip install --no-build-isolation -e .`` with nvcc present), so these run there; they skip
  only when the package was installed without the extension or with its CPU-only build (no
  toolkit / ZEROI2V_NO_CUDA_EXT=1).
  Set ZEROI2V_REQUIRE_CUDA_EXT=1 to turn that skip into a failure (CI does, so that a broken
  build cannot hide behind a skip).
* ``@pytest.mark.gpu`` numerics tests: skipped without a CUDA GPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from _helpers import TOL, rel_err
from zeroi2v import PRESETS, stdha_attention, stdha_reference

try:
    import zeroi2v._C as _C  # noqa: N812
except ImportError as exc:  # extension not built
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None
    if not getattr(_C, "WITH_CUDA", False):  # a CPU-only build (ZEROI2V_NO_CUDA_EXT=1 / no nvcc)
        _C, _IMPORT_ERROR = None, ImportError("zeroi2v._C was built without CUDA (CPU ops only)")

needs_ext = pytest.mark.skipif(
    _C is None and os.environ.get("ZEROI2V_REQUIRE_CUDA_EXT", "0") != "1",
    reason=f"zeroi2v._C not built ({_IMPORT_ERROR})",
)

HAS_CUDA = torch.cuda.is_available()


PRESETS_VIT_B = tuple(PRESETS["vit_b"])


# ------------------------------------------------------------------------ no GPU needed


@needs_ext
def test_extension_imports_and_registers_op():
    if _C is None:
        raise _IMPORT_ERROR  # ZEROI2V_REQUIRE_CUDA_EXT=1 and no extension: fail loudly
    assert hasattr(torch.ops.zeroi2v, "stdha_fwd_cuda")
    schema = str(torch.ops.zeroi2v.stdha_fwd_cuda.default._schema)
    assert "int[] offsets" in schema and "int num_frames" in schema
    assert _C.supported("float16", 64) and _C.supported("bfloat16", 64)
    assert not _C.supported("float32", 64) and not _C.supported("float16", 48)
    assert 64 in _C.HEAD_DIMS


@needs_ext
def test_backend_registered_with_documented_priority():
    from zeroi2v.ops import registry

    assert "cuda" in zeroi2v_available()
    b = registry._BACKENDS["cuda"]
    assert b.priority == registry.PRIORITIES["cuda"]
    # below Triton (10) until a GPU measurement says otherwise
    assert registry.PRIORITIES["cuda"] < registry.PRIORITIES["triton"] == 10
    cpu = torch.randn(2, 2, 5, 64, dtype=torch.float16)
    x = registry.Inputs.of(cpu, cpu, cpu, needs_grad=False)
    assert b.not_supported_reasons(cpu, cpu, cpu, x, auto=True)  # CPU tensors are never picked


def zeroi2v_available():
    from zeroi2v import available_backends

    return available_backends()


@needs_ext
def test_meta_kernel_gives_shapes():
    q = torch.empty(16, 12, 197, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(16, 12, 50, 64, dtype=torch.bfloat16, device="meta")
    out = torch.ops.zeroi2v.stdha_fwd_cuda(q, k, k, [1, -1] + [0] * 10, 8, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
    # the CUDA kernel's layout: (B*T, N, H, D) storage, so proj reads it without a copy
    assert out.stride() == (197 * 12 * 64, 64, 12 * 64, 1)
    with pytest.raises(ValueError, match="too large"):
        torch.ops.zeroi2v.stdha_fwd_cuda(q, q, q, [8] + [0] * 11, 8, 0.125)


@needs_ext
def test_traceable_by_torch_export_with_symbolic_batch():
    """The Meta kernel propagates (symbolic) shapes: what torch.compile needs, checked on CPU."""

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, [1, -1], 4, 0.125) + 1

    q, k, v = (torch.randn(8, 2, 17, 64).half() for _ in range(3))
    bt = torch.export.Dim("bt")
    ep = torch.export.export(M(), (q, k, v), dynamic_shapes=({0: bt}, {0: bt}, {0: bt}))
    assert "zeroi2v.stdha_fwd_cuda" in ep.graph_module.code


@needs_ext
def test_torchscript_can_call_the_op():
    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, [1, -1], 2, 0.125)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(f)
    assert "zeroi2v::stdha_fwd_cuda" in str(scripted.graph)


@needs_ext
def test_cpu_inputs_are_rejected():
    x = torch.randn(2, 1, 3, 64, dtype=torch.float16)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.ops.zeroi2v.stdha_fwd_cuda(x, x, x, [0], 2, 1.0)


# ------------------------------------------------------------------------ GPU numerics


def _make_qkv(bt, h, n, d, dtype, layout, gen):
    """Random q, k, v on the GPU in one of three layouts (values never all zero)."""
    dev = "cuda"
    if layout == "contiguous":
        return [torch.randn(bt, h, n, d, generator=gen, device=dev).to(dtype) for _ in range(3)]
    if layout == "qkv":  # views of a fused projection (B*T, N, 3, H, D) -> (B*T, H, N, D)
        qkv = torch.randn(bt, n, 3, h, d, generator=gen, device=dev).to(dtype)
        return [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    if layout == "padded":  # strided along heads/tokens, and odd-offset storage
        big = torch.randn(3, bt, h + 1, n + 3, d, generator=gen, device=dev).to(dtype)
        return [big[i, :, 1:, 2 : n + 2] for i in range(3)]
    if layout == "misaligned":  # 8-byte storage offset and a non-unit D stride: copied first
        flat = torch.randn(3 * bt * h * n * d + 4, generator=gen, device=dev).to(dtype)
        q = flat[4 : 4 + bt * h * n * d].view(bt, h, n, d)
        k = torch.randn(bt, h, d, n, generator=gen, device=dev).to(dtype).transpose(-1, -2)
        v = flat[4 + bt * h * n * d : 4 + 2 * bt * h * n * d].view(bt, h, n, d)
        return [q, k, v]
    raise ValueError(layout)


def _check(bt, T, h, n, d, dtype, layout, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = _make_qkv(bt, h, n, d, dtype, layout, gen)
    cpu_gen = torch.Generator().manual_seed(seed)
    offsets = [int(x) for x in torch.randint(-(T - 1), T, (h,), generator=cpu_gen)]
    scale = 1.0 / math.sqrt(d)
    with torch.no_grad():
        out = stdha_attention(q, k, v, T, offsets, backend="cuda")
    ref = stdha_reference(q.double(), k.double(), v.double(), T, offsets, scale)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # stored as (B*T, N, H, D): what proj reads
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"rel err {err:.2e} (T={T} H={h} N={n} {dtype} {layout} {offsets})"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 17, 197, 257])
@pytest.mark.parametrize("T", [1, 2, 8])
@pytest.mark.parametrize("h", [1, 12, 16])
def test_matches_reference(dtype, n, T, h):
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    bt = T * (2 if T < 8 else 1)
    _check(bt, T, h, n, 64, dtype, "contiguous", seed=n * 1000 + T * 10 + h)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["qkv", "padded", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [17, 197, 257])
def test_non_contiguous_inputs(layout, dtype, n):
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    _check(16, 8, 12, n, 64, dtype, layout, seed=7 * n)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 65, 197])
def test_head_dim_128(dtype, n):
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    _check(8, 4, 4, n, 128, dtype, "contiguous", seed=n)


@pytest.mark.gpu
def test_large_batch_uses_wide_tiles():
    # ViT-B/16 shape: 128-row tiles are chosen here (N=197, many blocks)
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    _check(64, 8, 12, 197, 64, torch.float16, "qkv", seed=3)
    _check(64, 8, 16, 256, 64, torch.bfloat16, "contiguous", seed=4)


@pytest.mark.gpu
def test_boundary_rule_and_presets_exactly():
    """Offsets at the clip ends: frames that read their own K/V (docs/method.md §2)."""
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, h, n, d = 4, 12, 33, 64
    q, k, v = (torch.randn(2 * T, h, n, d, generator=gen, device="cuda").half() for _ in range(3))
    offsets = [1, -1, 2, -2, 3, -3, 0, 0, 1, 1, -1, 0]
    with torch.no_grad():
        out = stdha_attention(q, k, v, T, offsets, backend="cuda")
        ref = stdha_reference(q.double(), k.double(), v.double(), T, offsets)
    assert rel_err(out, ref) < TOL[torch.float16]
    # each head separately: a spatial-only run on pre-gathered frames gives the same thing
    for head, dh in enumerate(offsets):
        for t in range(T):
            s = t - dh if 0 <= t - dh < T else t
            for b in range(2):
                qh = q[b * T + t, head].double()
                kh, vh = k[b * T + s, head].double(), v[b * T + s, head].double()
                expect = torch.softmax(qh @ kh.T / math.sqrt(d), -1) @ vh
                assert rel_err(out[b * T + t, head], expect) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 197, 257])
def test_poisoned_output_and_no_input_writes(n):
    """Every output element is written, and the inputs are left untouched."""
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    gen = torch.Generator(device="cuda").manual_seed(1)
    T, h, d = 2, 3, 64
    q, k, v = (torch.randn(2 * T, h, n, d, generator=gen, device="cuda").bfloat16() for _ in range(3))
    copies = [x.clone() for x in (q, k, v)]
    # a freed NaN block of exactly the output's size: the caching allocator hands it to the op,
    # so an element the kernel fails to store stays NaN
    poison = torch.full((2 * T, h, n, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    poison_ptr = poison.data_ptr()
    del poison
    with torch.no_grad():
        out = torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, [1, -1, 0], T, 1 / 8)
    torch.cuda.synchronize()
    if out.data_ptr() != poison_ptr:
        pytest.skip("allocator did not reuse the poisoned block")
    assert torch.isfinite(out).all()
    for x, c in zip((q, k, v), copies):
        assert torch.equal(x, c)
    ref = stdha_reference(q.double(), k.double(), v.double(), T, [1, -1, 0], 1 / 8)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_q_and_kv_token_counts_may_differ():
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(4, 2, 70, 64, generator=gen, device="cuda").half()
    k = torch.randn(4, 2, 130, 64, generator=gen, device="cuda").half()
    v = torch.randn(4, 2, 130, 64, generator=gen, device="cuda").half()
    with torch.no_grad():
        out = torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, [1, 0], 2, 0.125)
    ref = stdha_reference(q.double(), k.double(), v.double(), 2, [1, 0], 0.125)
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.gpu
def test_auto_dispatch_and_grad_rules():
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    from zeroi2v.ops import registry

    q = torch.randn(8, 12, 197, 64, device="cuda", dtype=torch.float16)
    b = registry._BACKENDS["cuda"]

    def why(t, grad):
        return b.not_supported_reasons(t, t, t, registry.Inputs.of(t, t, t, needs_grad=grad))

    assert why(q, False) == []
    assert "inference only" in why(q, True)[0]
    assert why(q.float(), False)
    q32 = torch.randn(8, 12, 197, 32, device="cuda", dtype=torch.float16)
    assert "head_dim 32" in why(q32, False)[0]
    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="inference only"):
        stdha_attention(qg, q, q, 8, "vit_b", backend="cuda")


@pytest.mark.gpu
def test_output_feeds_the_projection_without_a_copy():
    """The packed entry on the CUDA op: the (B*T, N, H*D) result is a view of the kernel's output."""
    if _C is None:
        pytest.skip("zeroi2v._C not built")
    from zeroi2v.ops.stdha import stdha_attention_packed

    gen = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(16, 197, 3, 12, 64, generator=gen, device="cuda").half()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    with torch.no_grad():
        o = torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, list(PRESETS_VIT_B), 8, 0.125)
        flat = o.transpose(1, 2).reshape(16, 197, 768)
        assert flat.data_ptr() == o.data_ptr() and flat._base is not None
        out = stdha_attention_packed(qkv, 8, "vit_b", backend="cuda")
    ref = stdha_reference(q.double(), k.double(), v.double(), 8, PRESETS_VIT_B, 0.125)
    assert rel_err(out, ref.transpose(1, 2).reshape(16, 197, 768)) < TOL[torch.float16]


@pytest.mark.gpu
def test_torch_compile():
    if _C is None:
        pytest.skip("zeroi2v._C not built")

    def f(q, k, v):
        return torch.ops.zeroi2v.stdha_fwd_cuda(q, k, v, [1, -1] + [0] * 10, 8, 0.125) * 2

    q, k, v = (torch.randn(16, 12, 197, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    with torch.no_grad():
        out = torch.compile(f, fullgraph=True)(q, k, v)
    ref = 2 * stdha_reference(q.double(), k.double(), v.double(), 8, [1, -1] + [0] * 10, 0.125)
    assert rel_err(out, ref) < TOL[torch.float16]
