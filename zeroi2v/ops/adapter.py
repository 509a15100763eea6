"""A linear adapter next to a frozen linear (docs/method.md §3): the functional op, its reference and its
dispatch.

The adapter is ``adapter(x) = x + s * fc2(dropout(fc1(x)))``. In a ZeroI2V model it always sits
right before a frozen linear ``(W, b)`` (the attention's input projection, the MLP's first
layer) or right after one (the attention's output projection, the MLP's last layer):

* :func:`adapted_linear` with ``position="before"``: ``linear(adapter(x))``;
* ``position="after"``: ``adapter(linear(x))``.

Two implementations, the same mathematics:

* ``"reference"`` — the modules composed (``F.linear`` and the adapter's ``nn.Linear`` layers);
  what runs on CPU, at inference and in float32 by default, and what the fused ops are tested
  against;
* ``"fused"`` — one ``autograd.Function`` per (adapter, linear) pair over the Triton GEMM of
  :mod:`zeroi2v.kernels.adapter`, which registers itself with :mod:`zeroi2v.ops.registry` when
  imported (this module never imports it): fewer passes over the activations and lower peak
  memory in training.

``fused=None`` (automatic) takes the fused op when training on CUDA in float16/bfloat16 (autocast
included) and the pair allows it; ``True`` takes it wherever it can run (also on CPU through the
Triton interpreter, and an error with the reasons where it cannot); ``False`` never. The
environment variable ``ZEROI2V_FUSED_ADAPTERS`` (:mod:`zeroi2v.settings`) sets the default.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import settings
from .registry import FusedAdapter, fused_adapter

POSITIONS = ("before", "after")
STRATEGIES = ("auto", "residual", "dual")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- dispatch


def adapted_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], adapter,
                   position: str, *, fused: Optional[bool] = None,
                   mask: Optional[torch.Tensor] = None, strategy: Optional[str] = None
                   ) -> torch.Tensor:
    """``F.linear(adapter(x), weight, bias)`` (``position="before"``) or
    ``adapter(F.linear(x, weight, bias))`` (``"after"``) for a
    :class:`~zeroi2v.nn.LinearAdapter` ``adapter``; see the module doc for ``fused``. ``mask``
    (bool, True = keep) fixes the adapter's dropout draw (fused op only)."""
    if position not in POSITIONS:
        raise ValueError(f"position must be 'before' or 'after', got {position!r}")
    mode = settings.fused_adapters() if fused is None else fused
    if mode is not False:
        why = fused_not_supported_reasons(x, weight, bias, adapter, automatic=mode is None)
        if not why:
            fn = adapter_then_linear if position == "before" else linear_then_adapter
            return fn(adapter, weight, bias, x, mask=mask, strategy=strategy)
        if mode is True:
            raise ValueError("the fused adapter op cannot run here: " + "; ".join(why))
    if mask is not None:
        raise ValueError("mask= applies to the fused adapter op only")
    if position == "before":
        return F.linear(adapter(x), weight, bias)
    return adapter(F.linear(x, weight, bias))


def fused_not_supported_reasons(x: torch.Tensor, weight: torch.Tensor,
                                bias: Optional[torch.Tensor], adapter,
                                automatic: bool = False) -> list[str]:
    """Why the fused op does not apply to this (adapter, linear) pair and input (empty: it does).
    ``automatic`` adds the conditions of the automatic mode (training on CUDA in fp16/bf16)."""
    out = []
    if fused_adapter() is None:
        out.append("Triton is not available")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        out.append("the linear is trained (the fused op gives frozen weights no gradient)")
    if adapter.fc1.bias is None or adapter.fc2.bias is None:
        out.append("the adapter's layers have no bias")
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if dt not in _FUSED_DTYPES:
        out.append(f"{dt} inputs")
    if automatic:
        if not (adapter.training and torch.is_grad_enabled()):
            out.append("not training (the unfused modules are as fast at inference)")
        if not x.is_cuda:
            out.append("not on CUDA")
        if dt not in (torch.float16, torch.bfloat16):
            out.append("not float16/bfloat16")
    elif not x.is_cuda and not settings.triton_interpret():
        out.append("CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1)")
    return out


# ----------------------------------------------------------------------------- fused functional


def _prepare(x, tensors, mask, p, training, r):
    """Flatten ``x`` to 2-D, apply autocast's dtype, validate/draw the dropout mask."""
    dev = x.device
    if torch.is_autocast_enabled(dev.type):
        dt = torch.get_autocast_dtype(dev.type)
        x = x.to(dt)
        tensors = [None if t is None else t.to(dt) for t in tensors]
    if x.dtype not in _FUSED_DTYPES:
        raise ValueError(f"fused adapter ops support float16/bfloat16/float32, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        mask = None
    elif mask is None:
        mask = dropout_mask((x2.shape[0], r), p, dev)
    else:
        if mask.dtype != torch.bool or mask.shape[-1] != r or mask.numel() != x2.shape[0] * r:
            raise ValueError(f"mask must be a bool tensor of shape {(*lead, r)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        mask = mask.reshape(x2.shape[0], r).contiguous()
    return x2, lead, tensors, mask


def _check_adapter_shapes(C, A, a, B, b2):
    r = A.shape[0]
    if A.shape != (r, C) or a.shape != (r,) or B.shape != (C, r) or b2.shape != (C,):
        raise ValueError(f"adapter shapes A {tuple(A.shape)}, a {tuple(a.shape)}, B "
                         f"{tuple(B.shape)}, b2 {tuple(b2.shape)} do not fit dim {C}")
    return r


def check_frozen_linear(*ts) -> None:
    """The fused ops give the frozen linear no gradient: refuse a weight or bias that wants one."""
    for t in ts:
        if t is not None and t.requires_grad:
            raise ValueError("fused adapter ops give no gradient to the frozen linear: its weight "
                             "and bias must not require grad (use the unfused modules)")


def resolve_strategy(strategy: Optional[str]) -> str:
    """``strategy``, else ``ZEROI2V_ADAPTER_STRATEGY``; one of :data:`STRATEGIES`."""
    s = strategy or settings.adapter_strategy()
    if s not in STRATEGIES:
        raise ValueError(f"unknown fused-adapter strategy {s!r}; expected one of {STRATEGIES}")
    return s


def fused_adapter_then_linear(x, A, a, B, b2, W, b=None, *, scale: float, p: float = 0.0,
                         training: bool = True, mask: Optional[torch.Tensor] = None,
                         strategy: Optional[str] = None) -> torch.Tensor:
    """``F.linear(adapter(x), W, b)`` with ``adapter(x) = x + scale * (drop(x A^T + a) B^T + b2)``,
    as one fused op.

    ``x`` is ``(..., C)``; ``A (r, C)``, ``a (r)``, ``B (C, r)``, ``b2 (C)`` are the adapter's fc1
    and fc2; ``W (N, C)``, ``b (N)`` the frozen linear (no gradient). Dropout with probability
    ``p`` when ``training``; ``mask`` (bool, ``(..., r)``, True = keep) replaces the random draw.
    ``strategy``: ``"auto"``/``"residual"``/``"dual"`` (how the work is split:
    :mod:`zeroi2v.kernels.adapter`; default ``ZEROI2V_ADAPTER_STRATEGY``, else ``"auto"``).
    """
    impl = _require()
    strategy = resolve_strategy(strategy)
    C = x.shape[-1]
    r = _check_adapter_shapes(C, A, a, B, b2)
    if W.shape[1] != C or (b is not None and b.shape != (W.shape[0],)):
        raise ValueError(f"linear weight {tuple(W.shape)} does not take inputs of dim {C}")
    check_frozen_linear(W, b)
    x2, lead, (A, a, B, b2, W, b), mask = _prepare(x, [A, a, B, b2, W, b], mask, p, training, r)
    with torch.autocast(x2.device.type, enabled=False):
        y = impl.adapter_then_linear(x2, A, a, B, b2, W, b, float(scale), float(p), mask,
                                     "dual" if strategy == "dual" else "residual")
    return y.reshape(*lead, W.shape[0])


def fused_linear_then_adapter(x, W, b, A, a, B, b2, *, scale: float, p: float = 0.0,
                         training: bool = True, mask: Optional[torch.Tensor] = None,
                         strategy: Optional[str] = None) -> torch.Tensor:
    """``adapter(F.linear(x, W, b))``: ``z + scale * (drop(z A^T + a) B^T + b2)``, ``z = x W^T + b``,
    as one fused op.

    ``x`` is ``(..., K)``; ``W (C, K)``, ``b (C)`` the frozen linear (no gradient); ``A (r, C)``,
    ``a (r)``, ``B (C, r)``, ``b2 (C)`` the adapter. ``p``/``training``/``mask``/``strategy`` as in
    :func:`fused_adapter_then_linear`.
    """
    impl = _require()
    strategy = resolve_strategy(strategy)
    C = W.shape[0]
    if x.shape[-1] != W.shape[1] or (b is not None and b.shape != (C,)):
        raise ValueError(f"linear weight {tuple(W.shape)} does not take inputs of dim {x.shape[-1]}")
    r = _check_adapter_shapes(C, A, a, B, b2)
    check_frozen_linear(W, b)
    x2, lead, (W, b, A, a, B, b2), mask = _prepare(x, [W, b, A, a, B, b2], mask, p, training, r)
    with torch.autocast(x2.device.type, enabled=False):
        y = impl.linear_then_adapter(x2, W, b, A, a, B, b2, float(scale), float(p), mask,
                                     strategy)
    return y.reshape(*lead, C)


def _require() -> FusedAdapter:
    impl = fused_adapter()
    if impl is None:
        raise ValueError("the fused adapter ops need Triton, which is not available")
    return impl


def adapter_then_linear(adapter, weight, bias, x: torch.Tensor, *,
                        mask: Optional[torch.Tensor] = None, strategy: Optional[str] = None):
    """``linear(adapter(x))`` for a :class:`~zeroi2v.nn.LinearAdapter` and a frozen linear's
    ``weight`` and ``bias`` (the fused op)."""
    return fused_adapter_then_linear(
        x, adapter.fc1.weight, adapter.fc1.bias, adapter.fc2.weight, adapter.fc2.bias,
        weight, bias, scale=adapter.scale, p=adapter.drop.p, training=adapter.training,
        mask=mask, strategy=strategy)


def linear_then_adapter(adapter, weight, bias, x: torch.Tensor, *,
                        mask: Optional[torch.Tensor] = None, strategy: Optional[str] = None):
    """``adapter(linear(x))`` for a frozen linear's ``weight`` and ``bias`` and a
    :class:`~zeroi2v.nn.LinearAdapter` (the fused op)."""
    return fused_linear_then_adapter(
        x, weight, bias, adapter.fc1.weight, adapter.fc1.bias, adapter.fc2.weight,
        adapter.fc2.bias, scale=adapter.scale, p=adapter.drop.p, training=adapter.training,
        mask=mask, strategy=strategy)


def dropout_mask(shape, p: float, device) -> torch.Tensor:
    """Keep-mask for inverted dropout with drop probability ``p`` (``True`` = keep), drawn from
    the torch RNG of ``device`` (what the fused ops draw when given no mask)."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)

