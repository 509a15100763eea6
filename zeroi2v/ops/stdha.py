"""``stdha_attention``: spatial-temporal dual-headed attention (docs/method.md §2), its checks and
its pure-PyTorch backends.

This module is the single place that checks STDHA arguments (:func:`check_stdha_args`) and hands
them to a backend chosen by :mod:`zeroi2v.ops.registry`. It holds the two pure-PyTorch backends
side by side:

* ``"reference"`` — the definition, written plainly (per-head gather, explicit softmax). Every fast
  path is tested against it. It copies K/V and is slow on purpose.
* ``"torch"`` — K/V heads shifted by slice copies per run of heads sharing an offset (no Python
  loop over frames), then one ``F.scaled_dot_product_attention``. With ``inplace_kv=True`` (the
  caller owns K/V, as ``STDHAttention`` does) only the moving heads are copied. Runs anywhere,
  supports autograd, dropout and an additive attention bias.

Compiled backends (the Triton kernels in :mod:`zeroi2v.kernels.stdha`, the CUDA and CPU kernels of
the extension ``zeroi2v._C``) register themselves with the registry when imported; the registry's
functions are re-exported here as the op's public surface.
"""
from __future__ import annotations

import math
from functools import cache, lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _native, settings
from ..offsets import HeadOffsets, check_offsets, resolve_offsets, source_frames
from .registry import (
    Backend,
    Capabilities,
    Inputs,
    auto_backend,
    available_backends,
    explain_backend,
    get_backend,
    pick_backend,
    register_backend,
    wants_grad,
)

__all__ = [
    "stdha_attention", "stdha_attention_packed", "stdha_reference", "check_stdha_args",
    "qkv_views", "register_backend", "available_backends", "explain_backend", "auto_backend",
    "get_backend", "Backend", "Capabilities", "Inputs",
]


def check_stdha_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int,
             head_offsets: HeadOffsets, attn_bias: Optional[torch.Tensor] = None) -> tuple[int, ...]:
    """Check shapes and offsets; return the offsets as a tuple of ints."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 (B*T, heads, tokens, head_dim), got shape {tuple(t.shape)}"
            )
    if not (q.shape[0] == k.shape[0] == v.shape[0] and q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(
            "q, k, v must agree on batch*frames and heads, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[3] != k.shape[3] or k.shape[2] != v.shape[2]:
        raise ValueError(
            "q and k need the same head_dim and k, v the same token count, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    num_frames = int(num_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if q.shape[0] % num_frames:
        raise ValueError(
            f"wrong frame count: batch*frames = {q.shape[0]} is not divisible by "
            f"num_frames = {num_frames}"
        )
    if attn_bias is not None:
        want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        ok = attn_bias.is_floating_point() and attn_bias.dim() <= 4 and all(
            s in (1, w) for s, w in zip(attn_bias.shape[::-1], want[::-1]))
        if not ok:
            raise ValueError(f"attn_bias must be a float tensor broadcastable to (B*T, H, N, Nk) = "
                             f"{want} (added to the logits), got {attn_bias.dtype} "
                             f"{tuple(attn_bias.shape)}")
    if isinstance(head_offsets, (tuple, str)):  # hashable: what modules pass on every call
        return _checked_offsets(head_offsets, q.shape[1], num_frames)
    offsets = resolve_offsets(head_offsets, q.shape[1], num_frames)
    check_offsets(offsets, num_frames)
    return offsets


@lru_cache(maxsize=1024)
def _checked_offsets(head_offsets, num_heads: int, num_frames: int) -> tuple[int, ...]:
    # errors are raised, never cached
    offsets = resolve_offsets(head_offsets, num_heads, num_frames)
    check_offsets(offsets, num_frames)
    return offsets


def stdha_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_frames: int,
    head_offsets: HeadOffsets,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    attn_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    inplace_kv: bool = False,
) -> torch.Tensor:
    """Spatial-temporal dual-headed attention.

    Args:
        q, k, v: ``(B*T, H, N, D)`` in SDPA layout, the ``T`` frames of a video adjacent
            (row ``b*T + t``).
        num_frames: ``T``.
        head_offsets: ``H`` ints, or a layout name (``"auto"``, ``"spatial"``, a preset of
            :data:`zeroi2v.offsets.PRESETS`). Head ``h`` of frame ``t`` reads K/V of frame
            ``t - d_h``, or of frame ``t`` if that is outside the clip.
        scale: softmax scale, default ``1/sqrt(D)``.
        dropout_p: attention-probability dropout.
        attn_bias: additive logits bias broadcastable to ``(B*T, H, N, Nk)`` (e.g. BEiT's
            relative position bias ``(1, H, N, N)``); it depends on token positions only, so it
            applies whichever frame a head reads.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, or a registered compiled backend
            (``"triton"``, ``"cuda"``, ``"cpu"``).
        inplace_kv: the caller allows ``k`` and ``v`` to be overwritten (used by backends that
            declare it, e.g. ``"torch"`` when no gradient is needed; kernels never need it).

    Returns:
        ``(B*T, H, N, D)``, same dtype as ``q``.
    """
    offsets = check_stdha_args(q, k, v, num_frames, head_offsets, attn_bias)
    b, scale, needs_grad = _choose(q, k, v, backend, scale, dropout_p, attn_bias)
    return b(q, k, v, int(num_frames), offsets, scale, dropout_p=dropout_p, attn_bias=attn_bias,
             inplace_kv=inplace_kv and not needs_grad)


def stdha_attention_packed(
    qkv: torch.Tensor,
    num_frames: int,
    head_offsets: HeadOffsets,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    attn_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    inplace_kv: bool = False,
) -> torch.Tensor:
    """:func:`stdha_attention` on the packed output of a fused qkv projection.

    Args:
        qkv: ``(B*T, N, 3, H, D)``: the projection's ``(B*T, N, 3*H*D)`` output reshaped (a view).
        Others as in :func:`stdha_attention`.

    Returns:
        ``(B*T, N, H*D)``: what the output projection reads. A backend registered with a
        ``packed`` function (``"triton"``) reads qkv and writes this output and qkv's gradient
        in place, with no copy in between; any other backend runs on q, k, v views of ``qkv`` and
        its output is transposed back (free when it is stored as ``(B*T, N, H, D)``, as the
        ``"cuda"`` and ``"cpu"`` kernels store it).
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(
            f"qkv must be (B*T, tokens, 3, heads, head_dim), got shape {tuple(qkv.shape)}: reshape "
            "the qkv projection's output with .reshape(B*T, N, 3, num_heads, head_dim)"
        )
    bt, n, _, h, d = qkv.shape
    q, k, v = qkv_views(qkv)
    offsets = check_stdha_args(q, k, v, num_frames, head_offsets, attn_bias)
    b, scale, needs_grad = _choose(q, k, v, backend, scale, dropout_p, attn_bias)
    if b.packed is not None:
        return b.packed(qkv, int(num_frames), offsets, scale).flatten(2)
    out = b(q, k, v, int(num_frames), offsets, scale, dropout_p=dropout_p, attn_bias=attn_bias,
            inplace_kv=inplace_kv and not needs_grad)
    return out.transpose(1, 2).reshape(bt, n, h * d)


def qkv_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as ``(B*T, H, N, D)`` views of a packed ``(B*T, N, 3, H, D)`` tensor."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _choose(q, k, v, backend: str, scale: Optional[float], dropout_p: float, attn_bias):
    """The backend for validated inputs, the scale, and whether a gradient is needed."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = wants_grad(q, k, v, attn_bias)
    x = Inputs.of(q, k, v, needs_grad=needs_grad, dropout_p=dropout_p, attn_bias=attn_bias)
    return pick_backend(backend, q, k, v, x), scale, needs_grad


# ----------------------------------------------------------------------------- pure PyTorch


def stdha_reference(q, k, v, num_frames: int, head_offsets: HeadOffsets,
                    scale: Optional[float] = None, attn_bias: Optional[torch.Tensor] = None):
    """The definition of STDHA, written out: for each head, gather K/V frames, explicit softmax
    (``attn_bias``, broadcastable to ``(B*T, H, N, Nk)``, added to the logits). Arguments and
    their checks are :func:`stdha_attention`'s (``head_offsets``: ints, a preset, ``"auto"`` or
    ``"spatial"``).

    Computes in the input dtype; tests call it on float64 inputs as the ground truth.
    """
    offsets = check_stdha_args(q, k, v, num_frames, head_offsets, attn_bias)
    bt, h, n, d = q.shape
    t = int(num_frames)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    src = source_frames(offsets, t)  # (T, H)
    outs = []
    for head in range(h):
        # rows b*T + t of the output read rows b*T + s(t, head) of K and V
        rows = (torch.arange(bt) // t) * t + src[torch.arange(bt) % t, head]
        rows = rows.to(q.device)
        kh = k[:, head].index_select(0, rows)  # (B*T, N, D)
        vh = v[:, head].index_select(0, rows)
        logits = (q[:, head] @ kh.transpose(-1, -2)) * scale
        if attn_bias is not None:
            bias = attn_bias.expand(bt, h, q.shape[2], k.shape[2])[:, head]
            logits = logits + bias.to(logits.dtype)
        p = torch.softmax(logits, dim=-1)
        outs.append(p @ vh)
    return torch.stack(outs, dim=1)


@lru_cache(maxsize=256)
def head_runs(offsets: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """Maximal runs ``(h0, h1, d)`` of adjacent heads sharing offset ``d`` (presets: 3 or 4 runs)."""
    runs, h0 = [], 0
    for h in range(1, len(offsets) + 1):
        if h == len(offsets) or offsets[h] != offsets[h0]:
            runs.append((h0, h, offsets[h0]))
            h0 = h
    return tuple(runs)


def shift_frames(x: torch.Tensor, num_frames: int, d: int) -> torch.Tensor:
    """Frame ``t`` of the result is frame ``t - d`` of ``x``, or ``t`` itself outside the clip.

    ``x`` is ``(B*T, ...)``; the result is a new tensor built from two slices per video.
    """
    if d == 0:
        return x
    x5 = x.unflatten(0, (x.shape[0] // num_frames, num_frames))  # a view, even for strided x
    if d > 0:  # frames d.. read t-d; frames ..d keep their own
        parts = (x5[:, :d], x5[:, : num_frames - d])
    else:  # frames ..T+d read t-d; the last -d frames keep their own
        parts = (x5[:, -d:], x5[:, num_frames + d:])
    return torch.cat(parts, dim=1).flatten(0, 1)


@cache
def native_shift_op() -> Optional[Callable]:
    """``torch.ops.zeroi2v.shift_heads_`` if the extension ``zeroi2v._C`` provides it, else None."""
    if _native.load() is None:  # loading the library registers the op
        return None
    try:
        return torch.ops.zeroi2v.shift_heads_
    except (AttributeError, RuntimeError):
        return None


def shift_frames_(x: torch.Tensor, num_frames: int, d: int) -> None:
    """In-place :func:`shift_frames` in pure PyTorch: only the frames that move are copied, through
    one temporary (autograd records it)."""
    x5 = x.unflatten(0, (x.shape[0] // num_frames, num_frames))
    if d > 0:
        x5[:, d:] = x5[:, : num_frames - d].clone()
    elif d < 0:
        x5[:, : num_frames + d] = x5[:, -d:].clone()


def shift_heads_(tensors, num_frames: int, offsets: tuple[int, ...]) -> None:
    """Shift every head of each ``(B*T, H, N, D)`` tensor in ``tensors`` (K and V) in place by its
    offset (docs/method.md §2). CPU tensors with a contiguous last dimension and no autograd go through the
    native op when it is built (``zeroi2v.settings``: ``ZEROI2V_NATIVE_SHIFT``), in one call;
    otherwise :func:`shift_frames_` per run of heads. (The native op moves each row once, in one
    sweep over K and V for all heads, where pure PyTorch needs a temporary per run of heads.)"""
    runs = head_runs(tuple(offsets))
    if all(d == 0 for _, _, d in runs):
        return
    if settings.native_shift() and all(
        x.device.type == "cpu" and x.dim() == 4 and x.stride(-1) == 1 for x in tensors
    ) and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)):
        op = native_shift_op()
        if op is not None:
            op(list(tensors), num_frames, list(offsets))
            return
    for x in tensors:
        for h0, h1, d in runs:
            if d:
                shift_frames_(x[:, h0:h1], num_frames, d)


def _torch_backend(q, k, v, num_frames, offsets, scale, dropout_p=0.0, attn_bias=None,
                   inplace_kv=False):
    runs = head_runs(offsets)
    if inplace_kv:
        # K/V are the caller's scratch (a fresh qkv projection): move just the temporal heads
        # (2 of 12 for ViT-B) and run one plain SDPA. This is what makes STDHA nearly free on CPU.
        shift_heads_((k, v), num_frames, offsets)
    elif len(runs) > 1 or runs[0][2]:
        # One K and one V with every head in place (one pass each), then a single SDPA: cheaper
        # than one SDPA per run of heads.
        k = torch.cat([shift_frames(k[:, a:b], num_frames, d) for a, b, d in runs], dim=1)
        v = torch.cat([shift_frames(v[:, a:b], num_frames, d) for a, b, d in runs], dim=1)
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p,
                                          scale=scale)


def _reference_backend(q, k, v, num_frames, offsets, scale, attn_bias=None):
    return stdha_reference(q, k, v, num_frames, offsets, scale, attn_bias)


register_backend("reference", _reference_backend, caps=Capabilities(attn_bias=True, auto=False))
register_backend("torch", _torch_backend,
                 caps=Capabilities(dropout=True, attn_bias=True, inplace_kv=True))
