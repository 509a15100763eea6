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
``ZEROI2V_MEMORY_LIMIT``       ``auto`` / a size          the most memory one file, config or video may
                               (``16GB``, ``64GiB``)      ask for (auto: half of this machine's memory,
                                                          see :mod:`zeroi2v.limits`)
``ZEROI2V_MAX_VIDEO_PIXELS``   ``8.8M`` / a count         the largest video frame (width x height) read
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
    kind: str                    # "bool", "auto_bool", "choice", "int_choice", "size", "count"
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
        elif self.kind in ("size", "count"):
            if v == "auto" and self.kind == "size":
                return None
            n = parse_amount(v, binary_i=self.kind == "size")
            if n is not None and n >= 1:
                return n
            want = ("auto or a size such as 16GB, 64GiB, 500MB" if self.kind == "size"
                    else "a positive count such as 8.9M or 33177600")
        else:  # int_choice
            if v.isdigit() and int(v) in self.choices:
                return int(v)
            want = ", ".join(str(c) for c in self.choices) + " (or unset)"
        raise ValueError(f"{self.env}={raw!r} is not valid: expected {want}")


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_amount(text: str, binary_i: bool = True) -> Optional[int]:
    """``"16GB"`` -> 16e9, ``"64GiB"`` -> 64 * 2**30, ``"8.9M"`` -> 8.9e6, ``"1024"`` -> 1024; None
    for anything else. A trailing ``b`` (bytes) is optional; ``binary_i`` allows ``Ki``/``Mi``..."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.strip().lower())
    if not m or (m.group(2) or "").endswith("i") and not binary_i:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


SWITCHES: dict[str, _Switch] = {
    "native_shift": _Switch("ZEROI2V_NATIVE_SHIFT", "bool", True),
    "fused_adapters": _Switch("ZEROI2V_FUSED_ADAPTERS", "auto_bool", None),
    "adapter_strategy": _Switch("ZEROI2V_ADAPTER_STRATEGY", "choice", "auto",
                                ("auto", "residual", "dual")),
    "stdha_block_m": _Switch("ZEROI2V_STDHA_BLOCK_M", "int_choice", None, (64, 128)),
    "debug": _Switch("ZEROI2V_DEBUG", "bool", False),
    "memory_limit": _Switch("ZEROI2V_MEMORY_LIMIT", "size", None),
    "max_video_pixels": _Switch("ZEROI2V_MAX_VIDEO_PIXELS", "count", 4096 * 2160),
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


def memory_limit() -> Optional[int]:
    """``ZEROI2V_MEMORY_LIMIT`` in bytes, or None for automatic (see :mod:`zeroi2v.limits`)."""
    return get("memory_limit")


def max_video_pixels() -> int:
    return get("max_video_pixels")


def triton_interpret() -> bool:
    return get("triton_interpret")
