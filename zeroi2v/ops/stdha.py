"""``stdha_attention``: spatial-temporal dual-headed attention (SPEC §2) and its backend dispatch.

This module is the single place that validates STDHA arguments and picks a backend. It holds the
two pure-PyTorch backends side by side:

* ``"reference"`` — the definition, written plainly (per-head gather, explicit softmax). Every fast
  path is tested against it. It copies K/V and is slow on purpose.
* ``"torch"`` — K/V heads shifted by slice copies per run of heads sharing an offset (no Python
  loop over frames), then one ``F.scaled_dot_product_attention``. With ``inplace_kv=True`` (the
  caller owns K/V, as ``STDHAttention`` does) only the moving heads are copied. Runs anywhere,
  supports autograd and dropout.

Compiled backends (the Triton kernel in :mod:`zeroi2v.kernels`, the CUDA and the fused CPU kernels
of the extension ``zeroi2v._C``) call :func:`register_backend` when they are imported; ``backend="auto"`` imports them lazily and
picks the highest-priority backend that supports the inputs.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _native
from ..offsets import HeadOffsets, check_offsets, resolve_offsets, source_frames

# fn(q, k, v, num_frames, offsets: tuple[int, ...], scale: float) -> out (B*T, H, N, D)
BackendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, tuple, float], torch.Tensor]
# supports(q, k, v, needs_grad) -> bool
SupportsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], bool]
# packed(qkv (B*T, N, 3, H, D), num_frames, offsets, scale) -> out (B*T, N, H, D), contiguous
PackedFn = Callable[[torch.Tensor, int, tuple, float], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    supports: SupportsFn
    priority: int
    inference_only: bool = False
    packed: Optional[PackedFn] = None


_BACKENDS: dict[str, Backend] = {}
# Optional modules that register backends on import; tried once, failures are remembered.
_PLUGINS = ("zeroi2v.kernels.stdha", "zeroi2v.kernels.cuda", "zeroi2v.kernels.cpu")
_plugins_loaded = False


def register_backend(
    name: str, fn: BackendFn, *, supports: Optional[SupportsFn] = None, priority: int = 0,
    inference_only: bool = False, packed: Optional[PackedFn] = None,
) -> None:
    """Make ``fn`` available as ``stdha_attention(..., backend=name)``.

    ``fn`` receives validated arguments. ``supports(q, k, v, needs_grad)`` tells ``"auto"`` whether
    the backend can take these inputs (device, dtype, head_dim, autograd); ``"auto"`` picks the
    supporting backend with the highest ``priority``. An ``inference_only`` backend (no backward)
    named explicitly for inputs that need a gradient gets a ``ValueError`` here, not a call.
    ``packed``, if given, is what :func:`stdha_attention_packed` calls instead of ``fn``: it takes
    the packed ``(B*T, N, 3, H, D)`` qkv and returns ``(B*T, N, H, D)`` (its gradient, if any, is
    one packed tensor: no stack of dq, dk, dv).
    """
    _BACKENDS[name] = Backend(name, fn, supports or (lambda q, k, v, g: True), priority,
                              inference_only, packed)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in _PLUGINS:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass  # optional: no Triton / extension not built


def available_backends() -> list[str]:
    """Names of the registered backends (importing the optional ones first)."""
    _load_plugins()
    return sorted(_BACKENDS)


def _pick_backend(name: str, q, k, v, needs_grad: bool, dropout_p: float) -> Backend:
    if name != "auto":
        if name not in _BACKENDS:
            _load_plugins()
        if name not in _BACKENDS:
            raise ValueError(f"unknown STDHA backend {name!r}; available: {available_backends()}")
        if dropout_p > 0 and name != "torch":
            raise ValueError(f"attention dropout is only supported by the 'torch' backend, not {name!r}")
        return _BACKENDS[name]
    if dropout_p > 0:
        return _BACKENDS["torch"]
    _load_plugins()
    best = None
    for b in _BACKENDS.values():
        if b.name == "reference":
            continue
        if (best is None or b.priority > best.priority) and b.supports(q, k, v, needs_grad):
            best = b
    return best or _BACKENDS["torch"]


def auto_backend(device, dtype: torch.dtype, head_dim: int, num_heads: int = 1,
                 needs_grad: bool = False) -> str:
    """The backend ``backend="auto"`` picks for inputs of this device, dtype and head size."""
    t = torch.empty(1, num_heads, 1, head_dim, device=device, dtype=dtype)
    return _pick_backend("auto", t, t, t, needs_grad, 0.0).name


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int,
             head_offsets: HeadOffsets) -> tuple[int, ...]:
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
    backend: str = "auto",
    inplace_kv: bool = False,
) -> torch.Tensor:
    """Spatial-temporal dual-headed attention.

    Args:
        q, k, v: ``(B*T, H, N, D)`` in SDPA layout, the ``T`` frames of a video adjacent
            (row ``b*T + t``).
        num_frames: ``T``.
        head_offsets: ``H`` ints (or a preset name from :data:`zeroi2v.offsets.PRESETS`). Head ``h``
            of frame ``t`` reads K/V of frame ``t - d_h``, or of frame ``t`` if that is outside
            the clip.
        scale: softmax scale, default ``1/sqrt(D)``.
        dropout_p: attention-probability dropout (``"torch"`` backend only).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, or a registered compiled backend
            (``"triton"``, ``"cuda"``, ``"cpu"``).
        inplace_kv: the caller allows ``k`` and ``v`` to be overwritten (honoured by the
            ``"torch"`` backend when no gradient is needed; kernels never need it).

    Returns:
        ``(B*T, H, N, D)``, same dtype as ``q``.
    """
    offsets = validate(q, k, v, num_frames, head_offsets)
    b, scale, needs_grad = _choose(q, k, v, backend, scale, dropout_p)
    return _call(b, q, k, v, int(num_frames), offsets, scale, dropout_p, inplace_kv and not needs_grad)


def stdha_attention_packed(
    qkv: torch.Tensor,
    num_frames: int,
    head_offsets: HeadOffsets,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
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
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    offsets = validate(q, k, v, num_frames, head_offsets)
    b, scale, needs_grad = _choose(q, k, v, backend, scale, dropout_p)
    if b.packed is not None:
        return b.packed(qkv, int(num_frames), offsets, scale).flatten(2)
    out = _call(b, q, k, v, int(num_frames), offsets, scale, dropout_p,
                inplace_kv and not needs_grad)
    return out.transpose(1, 2).reshape(bt, n, h * d)


def _choose(q, k, v, backend: str, scale: Optional[float], dropout_p: float):
    """The backend for validated inputs, the scale, and whether a gradient is needed."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    b = _pick_backend(backend, q, k, v, needs_grad, dropout_p)
    if needs_grad and b.inference_only:
        trainable = sorted(n for n, x in _BACKENDS.items() if not x.inference_only and n != "reference")
        raise ValueError(
            f"the {b.name!r} STDHA backend is inference-only (no backward); use one of {trainable} "
            "for training, or call it under torch.no_grad() / torch.inference_mode()"
        )
    return b, scale, needs_grad


def _call(b: Backend, q, k, v, num_frames: int, offsets, scale: float, dropout_p: float,
          inplace_kv: bool):
    if b.name == "torch":
        return _torch_backend(q, k, v, num_frames, offsets, scale, dropout_p, inplace_kv)
    return b.fn(q, k, v, num_frames, offsets, scale)


# ----------------------------------------------------------------------------- pure PyTorch


def stdha_reference(q, k, v, num_frames: int, offsets, scale: Optional[float] = None):
    """The definition of STDHA, written out: for each head, gather K/V frames, explicit softmax.

    Computes in the input dtype; tests call it on float64 inputs as the ground truth.
    """
    offsets = tuple(offsets)
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


#: Use the native CPU op ``torch.ops.zeroi2v.shift_heads_`` (csrc/shift_cpu.cpp) for the in-place
#: shift when the extension is built: it moves each row once, in one sweep over K and V for all
#: heads, where pure PyTorch needs a temporary per run of heads (twice the memory traffic).
#: ``ZEROI2V_NATIVE_SHIFT=0`` (or setting this to False) turns it off.
USE_NATIVE_SHIFT: bool = os.environ.get("ZEROI2V_NATIVE_SHIFT", "1").strip().lower() not in ("0", "off", "false")


@lru_cache(maxsize=None)
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
    offset (SPEC §2). CPU tensors with a contiguous last dimension and no autograd go through the
    native op when it is built (see ``USE_NATIVE_SHIFT``), in one call; otherwise
    :func:`shift_frames_` per run of heads."""
    runs = head_runs(tuple(offsets))
    if all(d == 0 for _, _, d in runs):
        return
    if USE_NATIVE_SHIFT and all(
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


def _torch_backend(q, k, v, num_frames, offsets, scale, dropout_p=0.0, inplace_kv=False):
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
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


register_backend("reference", lambda q, k, v, t, o, s: stdha_reference(q, k, v, t, o, s), priority=-100)
register_backend("torch", _torch_backend, priority=0)
