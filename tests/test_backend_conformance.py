"""Every registered STDHA backend does what its declared Capabilities say, and nothing else.

The cases are generated from each backend's declaration: every dtype and device it declares
(where this machine has the device) must match the float64 definition, forward and, where it
declares a backward, backward; every input it declares it cannot run must be refused by name
with the reason, and ``"auto"`` must never pick it for such inputs.
"""
from __future__ import annotations

import pytest
import torch

from zeroi2v.ops import registry
from zeroi2v.ops import stdha as ops

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
T, OFFSETS = 2, (1, -1)


def _backends():
    ops.available_backends()  # load the optional ones
    return sorted(registry._BACKENDS.values(), key=lambda b: b.name)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _head_dim(caps):
    if caps.head_dims:
        return min(caps.head_dims)
    return min(32, caps.max_head_dim or 32)


def _inputs(dtype, device, d, n=17, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * T, 2, n, d, generator=g).to(device, dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _runs_here(b, device, dtype, d):
    q, k, v = _inputs(dtype, device, d)
    x = ops.Inputs.of(q, k, v, needs_grad=False)
    return not b.not_supported_reasons(q, k, v, x)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / max(b.double().norm(), 1e-30)).item()


CASES = [(b.name, dev, dt) for b in _backends() for dev in (b.caps.devices or _devices())
         if dev in _devices() for dt in b.caps.dtypes]


@pytest.mark.parametrize("name,device,dtype", CASES,
                         ids=[f"{n}-{d}-{str(t)[6:]}" for n, d, t in CASES])
def test_declared_inputs_match_the_definition(name, device, dtype):
    b = ops.get_backend(name)
    d = _head_dim(b.caps)
    if not _runs_here(b, device, dtype, d):  # e.g. Triton on CPU without the interpreter
        q, k, v = _inputs(dtype, device, d)
        why = b.not_supported_reasons(q, k, v, ops.Inputs.of(q, k, v, needs_grad=False))
        pytest.skip(f"{name} declares {device}/{dtype} but not here: {'; '.join(why)}")
    grad = b.caps.backward
    q, k, v = _inputs(dtype, device, d, requires_grad=grad)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        out = ops.stdha_attention(q, k, v, T, OFFSETS, backend=name)
    ref = ops.stdha_reference(*(t.detach().double().requires_grad_() for t in (q, k, v)),
                              T, OFFSETS)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, ref) < TOL[dtype]
    if grad:
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device)
        got = torch.autograd.grad(out, (q, k, v), gout.to(dtype))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(ops.stdha_reference(*leaves, T, OFFSETS), leaves,
                                   gout.double())
        for a, w in zip(got, want):
            assert _rel(a, w) < 5 * TOL[dtype]


def _undeclared(b):
    """(label, kwargs for _inputs, call kwargs, needs_grad) of inputs the declaration excludes."""
    caps = b.caps
    dev = next((dv for dv in (caps.devices or _devices()) if dv in _devices()), None)
    if dev is None:
        return []
    d = _head_dim(caps)
    good = next((dt for dt in caps.dtypes if _runs_here(b, dev, dt, d)), None)
    if good is None:
        return []
    out = []
    for dt in TOL:
        if dt not in caps.dtypes:
            out.append((f"dtype {dt}", dict(dtype=dt, device=dev, d=d), {}, False))
    if not caps.backward:
        out.append(("grad", dict(dtype=good, device=dev, d=d, requires_grad=True), {}, True))
    if not caps.attn_bias:
        out.append(("bias", dict(dtype=good, device=dev, d=d),
                    dict(attn_bias=torch.zeros(2, 17, 17, device=dev, dtype=good)), False))
    if not caps.dropout:
        out.append(("dropout", dict(dtype=good, device=dev, d=d), dict(dropout_p=0.5), False))
    if caps.max_head_dim is not None:
        out.append(("head_dim", dict(dtype=good, device=dev, d=caps.max_head_dim + 16), {},
                    False))
    if caps.head_dims is not None:
        out.append(("head_dim", dict(dtype=good, device=dev, d=max(caps.head_dims) + 8), {},
                    False))
    return out


REFUSALS = [(b.name, *case) for b in _backends() for case in _undeclared(b)]


@pytest.mark.parametrize("name,label,inp,kw,grad", REFUSALS,
                         ids=[f"{r[0]}-{r[1]}" for r in REFUSALS])
def test_undeclared_inputs_are_refused_and_auto_passes_over(name, label, inp, kw, grad):
    q, k, v = _inputs(**inp)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        with pytest.raises(ValueError, match=f"the {name!r} STDHA backend cannot run"):
            ops.stdha_attention(q, k, v, T, OFFSETS, backend=name, **kw)
        bias = kw.get("attn_bias")
        chosen, reasons = ops.explain_backend(q, k, v, dropout_p=kw.get("dropout_p", 0.0),
                                              attn_bias=bias)
        assert chosen != name and reasons[name]
        out = ops.stdha_attention(q, k, v, T, OFFSETS, backend="auto", **kw)
        assert out.shape == q.shape


def test_auto_picks_the_highest_priority_backend_that_can_run():
    q, k, v = _inputs(torch.float32, "cpu", 64)
    with torch.no_grad():
        chosen, reasons = ops.explain_backend(q, k, v)
    b = ops.get_backend(chosen)
    assert not b.not_supported_reasons(q, k, v, ops.Inputs.of(q, k, v, needs_grad=False),
                                       auto=True)
    for other, why in reasons.items():  # a runnable backend passed over has a lower priority
        assert why or ops.get_backend(other).priority < b.priority, other


def test_pure_pytorch_backends_take_any_device():
    """"torch" and "reference" declare no device list: meta tensors (shape tracing) work."""
    q, k, v = (t.to("meta") for t in _inputs(torch.float32, "cpu", 16))
    with torch.no_grad():
        chosen, _ = ops.explain_backend(q, k, v)
        out = ops.stdha_attention(q, k, v, T, OFFSETS)
    assert chosen == "torch" and out.shape == q.shape and out.device.type == "meta"
