"""Every registered STDHA backend does what its declared Capabilities say, and nothing else.

The cases are generated from each backend's declaration (``_conformance.py``): every dtype and
device it declares (where this machine has the device) must match the float64 definition, forward
and, where it declares a backward, backward; every input it declares it cannot run must be refused
by name with the reason, and ``"auto"`` must never pick it for such inputs.
"""
from __future__ import annotations

import pytest
import torch

from _conformance import (
    OFFSETS,
    T,
    check_matches_definition,
    check_refused_and_passed_over,
    declared_cases,
    inputs,
    undeclared_cases,
)
from zeroi2v.ops import registry
from zeroi2v.ops import stdha as ops


def _backends():
    registry.available_backends()  # load the optional ones
    return sorted(registry._BACKENDS.values(), key=lambda b: b.name)


CASES = [(b.name, dev, dt) for b in _backends() for dev, dt in declared_cases(b)]


@pytest.mark.parametrize("name,device,dtype", CASES,
                         ids=[f"{n}-{d}-{str(t)[6:]}" for n, d, t in CASES])
def test_declared_inputs_match_the_definition(name, device, dtype):
    check_matches_definition(name, device, dtype)


REFUSALS = [(b.name, *case) for b in _backends() for case in undeclared_cases(b)]


@pytest.mark.parametrize("name,label,inp,kw,grad", REFUSALS,
                         ids=[f"{r[0]}-{r[1]}" for r in REFUSALS])
def test_undeclared_inputs_are_refused_and_auto_passes_over(name, label, inp, kw, grad):
    check_refused_and_passed_over(name, label, inp, kw, grad)


def test_auto_picks_the_highest_priority_backend_that_can_run():
    q, k, v = inputs(torch.float32, "cpu", 64)
    with torch.no_grad():
        chosen, reasons = ops.explain_backend(q, k, v)
    b = registry.get_backend(chosen)
    assert not b.not_supported_reasons(q, k, v, registry.Inputs.of(q, k, v, needs_grad=False),
                                       auto=True)
    for other, why in reasons.items():  # a runnable backend passed over has a lower priority
        assert why or registry.get_backend(other).priority < b.priority, other


def test_pure_pytorch_backends_take_any_device():
    """"torch" and "reference" declare no device list: meta tensors (shape tracing) work."""
    q, k, v = (t.to("meta") for t in inputs(torch.float32, "cpu", 16))
    with torch.no_grad():
        chosen, _ = ops.explain_backend(q, k, v)
        out = ops.stdha_attention(q, k, v, T, OFFSETS)
    assert chosen == "torch" and out.shape == q.shape and out.device.type == "meta"


def test_every_built_in_backend_has_its_rank_in_the_one_table():
    """Priorities live in registry.PRIORITIES only: each backend registered by the package (the
    plugins that import here, and the two pure-PyTorch ones) runs at its table entry."""
    for b in _backends():
        assert b.name in registry.PRIORITIES, b.name
        assert b.priority == registry.PRIORITIES[b.name], b.name
