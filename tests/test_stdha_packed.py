"""The packed qkv path: ``stdha_attention_packed`` and the Triton kernels writing the layouts the
model consumes, so that nothing is copied between the qkv and the output projections.

Without a GPU the Triton kernels run in the interpreter on CPU tensors (small shapes).
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ks = pytest.importorskip("zeroi2v.kernels.stdha")
kl = pytest.importorskip("zeroi2v.kernels.stdha_launch")

from _helpers import rel_err  # noqa: E402
from zeroi2v.nn import STDHAttention  # noqa: E402
from zeroi2v.ops import registry  # noqa: E402
from zeroi2v.ops.stdha import stdha_attention, stdha_attention_packed, stdha_reference  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.any_device  # benchmarks/gpu_check.py runs these on the GPU


def _qkv(bt, n, h, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bt, n, 3, h, d, generator=g).to(DEV, dtype).requires_grad_()


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_packed_entry_without_packed_backend_equals_unpacked(backend):
    """Backends without a packed function run on q, k, v views; same values and gradients."""
    T, offsets = 4, (1, -2, 0)
    qkv = _qkv(8, 9, 3, 16, torch.float64)
    out = stdha_attention_packed(qkv, T, offsets, backend=backend)
    assert out.shape == (8, 9, 48)
    (g_packed,) = torch.autograd.grad(out.square().sum(), qkv)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ref = stdha_attention(q, k, v, T, offsets, backend=backend).transpose(1, 2).reshape(8, 9, 48)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), qkv)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert torch.allclose(g_packed, g_ref, rtol=0, atol=1e-12)


def test_packed_entry_calls_a_registered_packed_function(monkeypatch):
    calls = []

    def fn(q, k, v, t, offsets, scale):
        calls.append("fn")
        return stdha_reference(q, k, v, t, offsets, scale)

    def packed(qkv, t, offsets, scale):
        calls.append(("packed", tuple(qkv.shape), t, offsets, scale))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return stdha_reference(q, k, v, t, offsets, scale).transpose(1, 2).contiguous()

    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    registry.register_backend("spy", fn, packed=packed)
    qkv = _qkv(4, 5, 2, 8).detach()
    out = stdha_attention_packed(qkv, 2, (1, 0), backend="spy", scale=0.5)
    assert calls == [("packed", (4, 5, 3, 2, 8), 2, (1, 0), 0.5)]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert torch.allclose(out, stdha_reference(q, k, v, 2, (1, 0), 0.5).transpose(1, 2).reshape(4, 5, 16))
    stdha_attention(q, k, v, 2, (1, 0), backend="spy")
    assert calls[-1] == "fn"


def test_packed_entry_errors():
    with pytest.raises(ValueError, match=r"reshape\(B\*T, N, 3, num_heads, head_dim\)"):
        stdha_attention_packed(torch.randn(4, 5, 48), 2, (1, 0))
    with pytest.raises(ValueError, match="divisible by num_frames"):
        stdha_attention_packed(torch.randn(4, 5, 3, 2, 8), 3, (1, 0))
    with pytest.raises(ValueError, match="offset"):
        stdha_attention_packed(torch.randn(4, 5, 3, 2, 8), 2, (2, 0))


# ----------------------------------------------------------------------------- Triton, packed
def test_triton_packed_writes_every_element_and_matches_reference():
    """NaN-filled buffers: the forward writes every output element, the backward every element of
    the packed gradient (dQ, dK, dV views of one tensor), ragged N at production block sizes."""
    T, H, N, D, offsets = 3, 2, 70, 32, (2, -1)
    qkv = _qkv(T, N, H, D).detach()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = D ** -0.5
    out = torch.full((T, N, H, D), float("nan"), device=DEV)
    _, lse = kl.stdha_triton_forward(q, k, v, T, offsets, scale, out=out.transpose(1, 2))
    dout = torch.randn(T, N, H, D, generator=torch.Generator().manual_seed(1)).to(DEV)
    dqkv = torch.full(qkv.shape, float("nan"), device=DEV)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    kl.stdha_triton_backward(dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, T, offsets,
                             scale, dq=dq, dk=dk, dv=dv)
    assert not out.isnan().any() and not dqkv.isnan().any()
    r = qkv.double().requires_grad_()
    rq, rk, rv = r.permute(2, 0, 3, 1, 4).unbind(0)
    ref = stdha_reference(rq, rk, rv, T, offsets, scale).transpose(1, 2)
    ref.backward(dout.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(dqkv, r.grad) < 1e-5
    # the packed launcher allocates and fills the same layouts
    out2, lse2 = kl.stdha_triton_packed_forward(qkv, T, offsets, scale)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    assert torch.equal(kl.stdha_triton_packed_backward(dout, qkv, out2, lse2, T, offsets, scale),
                       dqkv)


def test_triton_packed_backward_is_deterministic():
    qkv = _qkv(4, 33, 2, 32)
    grads = []
    for _ in range(2):
        qkv.grad = None
        stdha_attention_packed(qkv, 2, (1, -1), backend="triton").square().sum().backward()
        grads.append(qkv.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_packed_custom_op_opcheck():
    qkv = _qkv(4, 5, 2, 16)
    torch.library.opcheck(torch.ops.zeroi2v.stdha_triton_packed_fwd.default,
                          (qkv, [1, -1], 2, 0.25),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    # the unpacked op's fake output has the real strides too: (B*T, N, H, D) storage
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    torch.library.opcheck(torch.ops.zeroi2v.stdha_triton_fwd.default, (q, k, v, [1, -1], 2, 0.25),
                          test_utils=("test_faketensor",))


# ----------------------------------------------------------------------------- no copies
COPY_OPS = {"clone", "copy_", "copy", "_to_copy", "cat", "stack", "index_select", "contiguous",
            "index", "_unsafe_index", "gather"}


class _OpLog(TorchDispatchMode):
    """Names of the aten ops run outside the Triton kernel launches."""

    def __init__(self):
        super().__init__()
        self.ops, self.in_kernel = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _launches_hidden(log, monkeypatch):
    """The interpreter moves kernel arguments around with aten ops of its own; those are not the
    glue under test, so the log skips what happens inside a kernel launch."""
    class Hidden:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*a, **kw):
                log.in_kernel = True
                try:
                    return self.kernel[grid](*a, **kw)
                finally:
                    log.in_kernel = False
            return launch

    for name in ("stdha_fwd_kernel", "stdha_bwd_pre_kernel", "stdha_bwd_dq_kernel",
                 "stdha_bwd_dkdv_kernel"):
        monkeypatch.setattr(kl, name, Hidden(getattr(kl, name)))
    yield


def _attention_module(backend, qk_norm=False, dtype=torch.float32):
    torch.manual_seed(0)
    return STDHAttention(64, 2, num_frames=2, head_offsets=[1, -1], qkv_bias=True,
                         qk_norm=qk_norm, backend=backend).to(DEV, dtype)


def _step_ops(m, x, monkeypatch):
    log = _OpLog()
    with _launches_hidden(log, monkeypatch), log:
        m(x).square().sum().backward()
    return log.ops


def test_no_copy_between_projections_eager(monkeypatch):
    """STDHAttention forward + backward with the Triton backend: linear, views, the kernels and
    allocations, never a copy (the old path transposed O with a copy and stacked dq/dk/dv)."""
    x = torch.randn(4, 17, 64, generator=torch.Generator().manual_seed(2)).to(DEV).requires_grad_()
    ops_triton = _step_ops(_attention_module("triton"), x, monkeypatch)
    assert "addmm" in ops_triton and "mm" in ops_triton  # the log sees the projections
    assert not COPY_OPS & set(ops_triton), sorted(COPY_OPS & set(ops_triton))
    # the detector works: the torch backend copies (shifted K/V, SDPA's output transposed back)
    ops_torch = _step_ops(_attention_module("torch"), x, monkeypatch)
    assert COPY_OPS & set(ops_torch)


def test_no_copy_between_projections_compiled():
    """Same under torch.compile: the forward and backward graphs AOTAutograd hands to the
    compiler hold the packed custom ops and views, no copy."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    m = _attention_module("triton")
    x = torch.randn(4, 17, 64, generator=torch.Generator().manual_seed(2)).to(DEV).requires_grad_()
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    out = cm(x)
    out.square().sum().backward()
    g_compiled = x.grad.clone()
    assert len(graphs) == 2
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("stdha_triton_packed_fwd" in t for t in targets)
    assert any("stdha_triton_packed_bwd" in t for t in targets)
    copies = [t for t in targets if t.startswith("aten.") and t.split(".")[1] in COPY_OPS]
    assert not copies, copies
    x.grad = None
    ref = m(x)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    assert torch.allclose(g_compiled, x.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_module_triton_matches_torch_backend(qk_norm):
    """Packed path (and the unpacked fallback that q/k norms need) against the torch backend."""
    x = torch.randn(4, 17, 64, generator=torch.Generator().manual_seed(3)).to(DEV).requires_grad_()
    outs, grads = [], []
    for backend in ("triton", "torch"):
        m = _attention_module(backend, qk_norm=qk_norm)
        x.grad = None
        out = m(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append((x.grad.clone(), m.qkv.weight.grad.clone()))
    assert rel_err(outs[0], outs[1]) < 1e-5
    assert rel_err(grads[0][0], grads[1][0]) < 1e-5 and rel_err(grads[0][1], grads[1][1]) < 1e-5


def test_adapted_projections_on_the_packed_path():
    """Adapters at the qkv and proj sites (AdaptedLinear, as the video model puts them) feed the
    packed kernel and read its output: same result as the torch backend."""
    from zeroi2v.nn import AdaptedLinear, LinearAdapter

    outs = []
    for backend in ("triton", "torch"):
        m = _attention_module(backend)
        adapters = [LinearAdapter(64, dropout=0.0), LinearAdapter(64, dropout=0.0)]
        for a in adapters:
            with torch.no_grad():
                for p in a.parameters():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
        m.qkv = AdaptedLinear(m.qkv, adapters[0].to(DEV), "before")
        m.proj = AdaptedLinear(m.proj, adapters[1].to(DEV), "after")
        x = torch.randn(4, 17, 64, generator=torch.Generator().manual_seed(4)).to(DEV)
        with torch.no_grad():
            outs.append(m(x))
    assert rel_err(outs[0], outs[1]) < 1e-5
    assert outs[0].abs().sum() > 0
