"""A new STDHA backend is one file: this one.

The toy below is a complete backend (a function, its declared Capabilities, one
``register_backend`` call), written here and nowhere else. Registered, it must pass the same
generated conformance checks as the package's own backends (``_conformance.py``), and
``explain_backend`` must pick it when it is declared best and pass it over, with the reason,
where its declaration excludes the inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _conformance import (
    check_matches_definition,
    check_refused_and_passed_over,
    declared_cases,
    inputs,
    undeclared_cases,
)
from zeroi2v.offsets import source_frames
from zeroi2v.ops import registry
from zeroi2v.ops import stdha as ops

# ----------------------------------------------------------------------------- the toy backend
NAME = "toy"
#: CPU, fp32/fp64, head_dim up to 64, forward and backward; no dropout, no attention bias.
CAPS = registry.Capabilities(devices=("cpu",), dtypes=(torch.float32, torch.float64),
                             max_head_dim=64)
PRIORITY = 1000  # declared best: above every built-in backend


def toy_stdha(q, k, v, num_frames, offsets, scale):
    """Gather each head's K/V rows from its source frame, then one SDPA (differentiable)."""
    bt, h = q.shape[:2]
    t = torch.arange(bt, device=q.device) % num_frames
    rows = (torch.arange(bt, device=q.device) - t)[:, None] + source_frames(
        offsets, num_frames, q.device)[t]                       # (B*T, H) source rows
    heads = torch.arange(h, device=q.device)
    return F.scaled_dot_product_attention(q, k[rows, heads], v[rows, heads], scale=scale)


def register_toy() -> None:
    registry.register_backend(NAME, toy_stdha, caps=CAPS, priority=PRIORITY)


# ----------------------------------------------------------------------------- the checks
@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    registry.load_plugins("stdha")  # the package's own backends, into the real table first
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    register_toy()
    yield


_TOY = registry.Backend(NAME, toy_stdha, CAPS, PRIORITY)  # what register_toy() builds
CASES = declared_cases(_TOY)
REFUSALS = undeclared_cases(_TOY)


def test_the_toy_is_registered_with_its_declaration():
    assert NAME in ops.available_backends()
    assert registry.get_backend(NAME) == _TOY
    assert {(d, t) for d, t in CASES} == {("cpu", torch.float32), ("cpu", torch.float64)}
    assert {label for label, *_ in REFUSALS} == {
        "dtype torch.float16", "dtype torch.bfloat16", "bias", "dropout", "head_dim"}


@pytest.mark.parametrize("device,dtype", CASES, ids=[f"{d}-{str(t)[6:]}" for d, t in CASES])
def test_toy_matches_the_definition(device, dtype):
    check_matches_definition(NAME, device, dtype)


@pytest.mark.parametrize("label,inp,kw,grad", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_toy_refuses_what_it_does_not_declare(label, inp, kw, grad):
    check_refused_and_passed_over(NAME, label, inp, kw, grad)


@pytest.mark.parametrize("grad", [False, True])
def test_auto_picks_the_toy_when_it_is_declared_best(grad):
    q, k, v = inputs(torch.float32, "cpu", 32, requires_grad=grad)
    chosen, reasons = ops.explain_backend(q, k, v)
    assert chosen == NAME and NAME not in reasons
    calls = []
    registry.register_backend(NAME, lambda *a: calls.append(1) or toy_stdha(*a), caps=CAPS,
                              priority=PRIORITY)
    with torch.enable_grad() if grad else torch.no_grad():
        out = ops.stdha_attention(q, k, v, 2, (1, -1))
    assert calls == [1] and out.shape == q.shape


def test_auto_passes_the_toy_over_with_its_reasons():
    q, k, v = inputs(torch.float32, "cpu", 80)  # head_dim above what it declares
    with torch.no_grad():
        chosen, reasons = ops.explain_backend(q, k, v)
    assert chosen != NAME and reasons[NAME] == ["head_dim 80 > 64"]
