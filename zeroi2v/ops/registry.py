"""Where kernels plug into the ops: the STDHA backend registry and its choice, the fused adapter's
registration, the one priority table and the modules that register on import.

Layers point one way: this module knows kernel modules by name only (:data:`PLUGINS`) and imports
them lazily; they import it and call :func:`register_backend` / :func:`register_fused_adapter`.
Every STDHA backend declares what it can run (:class:`Capabilities`); the choice knows no backend
by name. ``backend="auto"`` picks the backend of highest priority (:data:`PRIORITIES`) whose
:meth:`Backend.not_supported_reasons` is empty; a backend asked for by name that cannot run the
inputs raises with those reasons; :func:`explain_backend` says what ``"auto"`` would pick and why.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

#: Modules that register something when imported, per op. They are imported on first need (the
#: ``"auto"`` choice, :func:`available_backends`, the fused adapter dispatch); an ImportError (no
#: Triton, the extension not built: ``zeroi2v._native`` says why) means "not available here".
PLUGINS: dict[str, tuple[str, ...]] = {
    "stdha": ("zeroi2v.kernels.stdha", "zeroi2v.kernels.native_cuda",
              "zeroi2v.kernels.native_cpu"),
    "adapter": ("zeroi2v.kernels.adapter",),
}

#: The rank of each built-in STDHA backend for ``backend="auto"``: the highest that can run the
#: inputs wins. Triton ranks above the CUDA forward until a GPU run measures the CUDA kernel faster
#: (benchmarks/test_bench_stdha_cuda.py); "cuda" and "cpu" never compete (one device each); both
#: rank above the pure-PyTorch "torch"; "reference" is never picked by "auto" and is listed last.
#: A backend registered from outside the package passes its own ``priority``.
PRIORITIES: dict[str, int] = {"triton": 10, "cuda": 5, "cpu": 5, "torch": 0, "reference": -100}

# fn(q, k, v, num_frames, offsets: tuple[int, ...], scale: float, **declared) -> (B*T, H, N, D);
# ``declared`` holds dropout_p / attn_bias / inplace_kv for the backends that declare them.
BackendFn = Callable[..., torch.Tensor]
# packed(qkv (B*T, N, 3, H, D), num_frames, offsets, scale) -> out (B*T, N, H, D), contiguous
PackedFn = Callable[[torch.Tensor, int, tuple, float], torch.Tensor]
# extra_reasons(q, k, v) -> reasons a declaration cannot express (GPU generation, interpreter)
ReasonsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list]
_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Inputs:
    """What a backend needs to know about one call to say whether it can run it."""

    device: torch.device
    dtype: torch.dtype
    num_heads: int
    head_dim: int
    needs_grad: bool
    dropout: bool
    attn_bias: bool
    last_dim_contiguous: bool

    @classmethod
    def of(cls, q, k, v, *, needs_grad: bool, dropout_p: float = 0.0,
           attn_bias: Optional[torch.Tensor] = None) -> Inputs:
        dtypes = {q.dtype, k.dtype, v.dtype}
        return cls(q.device, q.dtype if len(dtypes) == 1 else None, q.shape[1], q.shape[-1],
                   bool(needs_grad), dropout_p > 0, attn_bias is not None,
                   all(t.stride(-1) == 1 for t in (q, k, v)))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run. ``auto_*`` narrow what ``backend="auto"`` picks it for (a kernel
    may run fp32 when asked for by name but is only the fastest choice for fp16/bf16)."""

    devices: Optional[tuple[str, ...]] = None     # None: any device type (cpu, cuda, mps, meta ...)
    dtypes: tuple[torch.dtype, ...] = _ALL_DTYPES
    head_dims: Optional[tuple[int, ...]] = None   # None: any up to max_head_dim
    max_head_dim: Optional[int] = None
    max_heads: Optional[int] = None
    backward: bool = True
    dropout: bool = False
    attn_bias: bool = False
    inplace_kv: bool = False          # honours inplace_kv=True (may overwrite the caller's K/V)
    needs_contiguous_last_dim: bool = False
    auto: bool = True                 # "auto" may pick it at all
    auto_devices: Optional[tuple[str, ...]] = None
    auto_dtypes: Optional[tuple[torch.dtype, ...]] = None
    auto_head_dims: Optional[tuple[int, ...]] = None

    def reasons(self, x: Inputs, *, auto: bool) -> list[str]:
        out = []
        devices = (self.auto_devices or self.devices) if auto else self.devices
        if devices is not None and x.device.type not in devices:
            out.append(f"runs on {'/'.join(devices)}, not {x.device.type}")
        dtypes = (self.auto_dtypes or self.dtypes) if auto else self.dtypes
        if x.dtype is None:
            out.append("q, k, v have different dtypes")
        elif x.dtype not in dtypes:
            out.append(f"supports {', '.join(str(d).replace('torch.', '') for d in dtypes)}, "
                       f"not {str(x.dtype).replace('torch.', '')}")
        dims = (self.auto_head_dims or self.head_dims) if auto else self.head_dims
        if dims is not None and x.head_dim not in dims:
            out.append(f"head_dim {x.head_dim} not in {list(dims)}")
        if self.max_head_dim is not None and x.head_dim > self.max_head_dim:
            out.append(f"head_dim {x.head_dim} > {self.max_head_dim}")
        if self.max_heads is not None and x.num_heads > self.max_heads:
            out.append(f"{x.num_heads} heads > {self.max_heads}")
        if x.needs_grad and not self.backward:
            out.append("inference only (no backward): call it under torch.no_grad()")
        if x.dropout and not self.dropout:
            out.append("no attention dropout")
        if x.attn_bias and not self.attn_bias:
            out.append("no attention bias")
        if self.needs_contiguous_last_dim and not x.last_dim_contiguous:
            out.append("needs q, k, v with a contiguous last dimension")
        return out


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    caps: Capabilities
    priority: int = 0
    packed: Optional[PackedFn] = None
    check: Optional[ReasonsFn] = field(default=None, compare=False)

    def not_supported_reasons(self, q, k, v, x: Inputs, *, auto: bool = False) -> list[str]:
        """Why this backend cannot run these inputs (empty: it can)."""
        out = self.caps.reasons(x, auto=auto)
        if not out and self.check is not None:
            out = list(self.check(q, k, v))
        if auto and not self.caps.auto:
            out.append("not chosen automatically (ask for it by name)")
        return out

    def __call__(self, q, k, v, num_frames, offsets, scale, *, dropout_p=0.0, attn_bias=None,
                 inplace_kv=False):
        kw = {}
        if self.caps.dropout:
            kw["dropout_p"] = dropout_p
        if self.caps.attn_bias:
            kw["attn_bias"] = attn_bias
        if self.caps.inplace_kv:
            kw["inplace_kv"] = inplace_kv
        return self.fn(q, k, v, num_frames, offsets, scale, **kw)


_BACKENDS: dict[str, Backend] = {}
_loaded: set[str] = set()  # ops whose PLUGINS were imported (failures are not retried)


def load_plugins(op: str) -> None:
    """Import the modules of :data:`PLUGINS` ``[op]`` once; absent ones are skipped."""
    if op in _loaded:
        return
    _loaded.add(op)
    for mod in PLUGINS[op]:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass  # optional: no Triton / extension not built


def register_backend(name: str, fn: BackendFn, *, caps: Optional[Capabilities] = None,
                     priority: Optional[int] = None, packed: Optional[PackedFn] = None,
                     check: Optional[ReasonsFn] = None) -> None:
    """Make ``fn`` available as ``stdha_attention(..., backend=name)``.

    ``fn(q, k, v, num_frames, offsets, scale)`` receives validated arguments, plus
    ``dropout_p``/``attn_bias``/``inplace_kv`` keywords for what ``caps`` says it supports.
    ``caps`` (:class:`Capabilities`) says what it can run; ``check(q, k, v)`` may add reasons
    the declaration cannot express (e.g. the GPU generation). ``"auto"`` picks the backend of
    highest ``priority`` (default: its entry in :data:`PRIORITIES`, else 0) with no reason against
    it. ``packed``, if given, is what ``stdha_attention_packed`` calls instead of ``fn``: it takes
    the packed ``(B*T, N, 3, H, D)`` qkv and returns ``(B*T, N, H, D)`` (its gradient, if any, is
    one packed tensor: no stack of dq, dk, dv).
    """
    if priority is None:
        priority = PRIORITIES.get(name, 0)
    _BACKENDS[name] = Backend(name, fn, caps or Capabilities(), priority, packed, check)


def available_backends() -> list[str]:
    """Names of the registered STDHA backends (importing the optional ones first)."""
    load_plugins("stdha")
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        load_plugins("stdha")
    if name not in _BACKENDS:
        raise ValueError(f"unknown STDHA backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name]


def _by_priority() -> list[Backend]:
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def pick_backend(name: str, q, k, v, x: Inputs) -> Backend:
    """The backend ``name`` (``"auto"``: the best that can run ``x``); a ValueError with the
    reasons when it cannot."""
    if name != "auto":
        b = get_backend(name)
        why = b.not_supported_reasons(q, k, v, x)
        if why:
            raise ValueError(f"the {name!r} STDHA backend cannot run these inputs: "
                             f"{'; '.join(why)}")
        return b
    load_plugins("stdha")
    for b in _by_priority():
        if not b.not_supported_reasons(q, k, v, x, auto=True):
            return b
    raise ValueError("no STDHA backend can run these inputs: "
                     + "; ".join(f"{n}: {', '.join(r)}" for n, r in
                                 _reasons_all(q, k, v, x).items()))


def _reasons_all(q, k, v, x: Inputs) -> dict[str, list[str]]:
    return {b.name: b.not_supported_reasons(q, k, v, x, auto=True) for b in _by_priority()}


def wants_grad(q, k, v, attn_bias) -> bool:
    """Whether autograd will want a gradient of any of these (what the choice must honour)."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, attn_bias))


def explain_backend(q, k, v, *, needs_grad: Optional[bool] = None, dropout_p: float = 0.0,
                    attn_bias: Optional[torch.Tensor] = None) -> tuple[str, dict[str, list[str]]]:
    """``(backend "auto" picks, {backend: reasons it was not picked})`` for these inputs
    (``needs_grad`` defaults to whether they require a gradient)."""
    if needs_grad is None:
        needs_grad = wants_grad(q, k, v, attn_bias)
    x = Inputs.of(q, k, v, needs_grad=needs_grad, dropout_p=dropout_p, attn_bias=attn_bias)
    chosen = pick_backend("auto", q, k, v, x).name
    return chosen, {n: r for n, r in _reasons_all(q, k, v, x).items() if n != chosen}


def auto_backend(device, dtype: torch.dtype, head_dim: int, num_heads: int = 1,
                 needs_grad: bool = False) -> str:
    """The backend ``backend="auto"`` picks for inputs of this device, dtype and head size."""
    t = torch.empty(1, num_heads, 1, head_dim, device=device, dtype=dtype)
    return explain_backend(t, t, t, needs_grad=needs_grad)[0]


# ----------------------------------------------------------------------------- fused adapter
@dataclass(frozen=True)
class FusedAdapter:
    """The fused "adapter + frozen linear" implementation, on 2-D inputs already checked by
    :mod:`zeroi2v.ops.adapter`:

    * ``adapter_then_linear(x, A, a, B, b2, W, b, scale, p, mask, strategy)`` -> ``linear(adapter(x))``
    * ``linear_then_adapter(x, W, b, A, a, B, b2, scale, p, mask, strategy)`` -> ``adapter(linear(x))``

    both differentiable for ``x`` and the adapter's ``A, a, B, b2``."""

    adapter_then_linear: Callable[..., torch.Tensor]
    linear_then_adapter: Callable[..., torch.Tensor]


_FUSED_ADAPTER: dict[str, FusedAdapter] = {}


def register_fused_adapter(impl: FusedAdapter) -> None:
    """Install the fused adapter implementation (``zeroi2v.kernels.adapter`` does on import)."""
    _FUSED_ADAPTER["impl"] = impl


def fused_adapter() -> Optional[FusedAdapter]:
    """The registered fused adapter implementation, or None where none imports (no Triton)."""
    load_plugins("adapter")
    return _FUSED_ADAPTER.get("impl")
