"""The checks an STDHA backend must pass, generated from what it declares (its Capabilities):
every dtype and device it declares (where this machine has the device) matches the float64
definition, forward and, where it declares a backward, backward; every input it declares it
cannot run is refused by name with the reason, and ``"auto"`` never picks it for such inputs.

Used by ``test_backend_conformance.py`` for every registered backend and by
``test_toy_backend.py`` for a backend written in one test file. Imported as
``from _conformance import ...`` (pytest puts this folder on ``sys.path``).
"""
from __future__ import annotations

import pytest
import torch

from zeroi2v.ops import registry
from zeroi2v.ops import stdha as ops

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
T, OFFSETS = 2, (1, -1)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def head_dim(caps: registry.Capabilities) -> int:
    if caps.head_dims:
        return min(caps.head_dims)
    return min(32, caps.max_head_dim or 32)


def inputs(dtype, device, d, n=17, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * T, 2, n, d, generator=g).to(device, dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def runs_here(b: registry.Backend, device, dtype, d) -> bool:
    q, k, v = inputs(dtype, device, d)
    x = registry.Inputs.of(q, k, v, needs_grad=False)
    return not b.not_supported_reasons(q, k, v, x)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / max(b.double().norm(), 1e-30)).item()


def declared_cases(b: registry.Backend) -> list[tuple[str, torch.dtype]]:
    """(device, dtype) pairs ``b`` declares that this machine has a device for."""
    return [(dev, dt) for dev in (b.caps.devices or devices()) if dev in devices()
            for dt in b.caps.dtypes]


def check_matches_definition(name: str, device: str, dtype: torch.dtype) -> None:
    b = registry.get_backend(name)
    d = head_dim(b.caps)
    if not runs_here(b, device, dtype, d):  # e.g. Triton on CPU without the interpreter
        q, k, v = inputs(dtype, device, d)
        why = b.not_supported_reasons(q, k, v, registry.Inputs.of(q, k, v, needs_grad=False))
        pytest.skip(f"{name} declares {device}/{dtype} but not here: {'; '.join(why)}")
    grad = b.caps.backward
    q, k, v = inputs(dtype, device, d, requires_grad=grad)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        out = ops.stdha_attention(q, k, v, T, OFFSETS, backend=name)
    ref = ops.stdha_reference(*(t.detach().double().requires_grad_() for t in (q, k, v)),
                              T, OFFSETS)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel(out, ref) < TOL[dtype]
    if grad:
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device)
        got = torch.autograd.grad(out, (q, k, v), gout.to(dtype))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(ops.stdha_reference(*leaves, T, OFFSETS), leaves,
                                   gout.double())
        for a, w in zip(got, want):
            assert rel(a, w) < 5 * TOL[dtype]


def undeclared_cases(b: registry.Backend) -> list[tuple]:
    """(label, kwargs for inputs(), call kwargs, needs_grad) of inputs the declaration excludes."""
    caps = b.caps
    dev = next((dv for dv in (caps.devices or devices()) if dv in devices()), None)
    if dev is None:
        return []
    d = head_dim(caps)
    good = next((dt for dt in caps.dtypes if runs_here(b, dev, dt, d)), None)
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


def check_refused_and_passed_over(name: str, label: str, inp: dict, kw: dict,
                                  grad: bool) -> None:
    q, k, v = inputs(**inp)
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
