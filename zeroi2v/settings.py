"""Every global switch of zeroi2v: read from the environment once, with one parser.

=============================  =========================  ==============================================
variable                       values (default first)     what it does
=============================  =========================  ==============================================
``ZEROI2V_NATIVE_SHIFT``       ``1`` / ``0``              the ``"torch"`` STDHA backend's in-place K/V shift
                                                          uses the native op ``shift_heads_`` when built
``ZEROI2V_FUSED_ADAPTERS``     ``auto`` / ``1`` / ``0``   fused adapter + frozen linear ops: automatic
                                                          (training on CUDA in fp16/bf16), always, never;
                                                          a model's ``set_fused_adapters`` wins
``ZEROI2V_ADAPTER_STRATEGY``   ``auto`` / ``residual`` /  how the fused adapter ops split their work
                               ``dual``                   (see :mod:`zeroi2v.ops.adapter`)
``ZEROI2V_STDHA_BLOCK_M``      unset / ``64`` / ``128``   query rows per tile of the CUDA STDHA kernel
                                                          (unset: chosen by size)
``ZEROI2V_DEBUG``              ``0`` / ``1``              the command line shows tracebacks
``ZEROI2V_NO_EXT``             ``0`` / ``1``              install without the native extension (build time)
``ZEROI2V_NO_CUDA_EXT``        ``0`` / ``1``              build only its CPU ops (build time)
``ZEROI2V_REQUIRE_CUDA_EXT``   ``0`` / ``1``              tests fail instead of skipping when the CUDA
                                                          extension is missing (CI)
``TRITON_INTERPRET``           ``0`` / ``1``              Triton's own switch: kernels run in its CPU
                                                          interpreter (the test suite sets it without a GPU)
=============================  =========================  ==============================================

A variable is read the first time its value is asked for; a value outside the list is a
``ValueError`` naming the variable and the values it takes. Code changes a switch for a
process with :func:`override` (a context manager, for tests too), never by assigning module
attributes.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class _Switch:
    env: str
    kind: str                    # "bool", "auto_bool", "choice", "int_choice"
    default: Any
    choices: tuple = ()

    def parse(self, raw: Optional[str]) -> Any:
        if raw is None or raw.strip() == "":
            return self.default
        v = raw.strip().lower()
        if self.kind in ("bool", "auto_bool"):
            if v == "auto" and self.kind == "auto_bool":
                return None
            if v in _TRUE or v in _FALSE:
                return v in _TRUE
            want = "auto, 1 or 0" if self.kind == "auto_bool" else "1 or 0"
        elif self.kind == "choice":
            if v in self.choices:
                return v
            want = ", ".join(self.choices)
        else:  # int_choice
            if v.isdigit() and int(v) in self.choices:
                return int(v)
            want = ", ".join(str(c) for c in self.choices) + " (or unset)"
        raise ValueError(f"{self.env}={raw!r} is not valid: expected {want}")


SWITCHES: dict[str, _Switch] = {
    "native_shift": _Switch("ZEROI2V_NATIVE_SHIFT", "bool", True),
    "fused_adapters": _Switch("ZEROI2V_FUSED_ADAPTERS", "auto_bool", None),
    "adapter_strategy": _Switch("ZEROI2V_ADAPTER_STRATEGY", "choice", "auto",
                                ("auto", "residual", "dual")),
    "stdha_block_m": _Switch("ZEROI2V_STDHA_BLOCK_M", "int_choice", None, (64, 128)),
    "debug": _Switch("ZEROI2V_DEBUG", "bool", False),
    "no_ext": _Switch("ZEROI2V_NO_EXT", "bool", False),
    "no_cuda_ext": _Switch("ZEROI2V_NO_CUDA_EXT", "bool", False),
    "require_cuda_ext": _Switch("ZEROI2V_REQUIRE_CUDA_EXT", "bool", False),
    "triton_interpret": _Switch("TRITON_INTERPRET", "bool", False),
}

_values: dict[str, Any] = {}


def get(name: str) -> Any:
    """The value of switch ``name`` (a key of :data:`SWITCHES`), read from the environment once."""
    if name not in _values:
        sw = SWITCHES[name]
        _values[name] = sw.parse(os.environ.get(sw.env))
    return _values[name]


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set switches for the duration of the block, e.g. ``override(native_shift=False)``."""
    unknown = [k for k in values if k not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown switch {unknown[0]!r}; known: {sorted(SWITCHES)}")
    saved = {k: _values.get(k, _MISSING) for k in values}
    _values.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is _MISSING:
                _values.pop(k, None)
            else:
                _values[k] = v


_MISSING = object()


def native_shift() -> bool:
    return get("native_shift")


def fused_adapters() -> Optional[bool]:
    return get("fused_adapters")


def adapter_strategy() -> str:
    return get("adapter_strategy")


def stdha_block_m() -> Optional[int]:
    return get("stdha_block_m")


def debug() -> bool:
    return get("debug")


def triton_interpret() -> bool:
    return get("triton_interpret")
