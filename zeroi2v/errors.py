"""Exceptions that mean "the user asked for something this library does not do", and the
"did you mean" hint their messages share."""
from __future__ import annotations

import difflib
from collections.abc import Sequence


class UnsupportedModelError(TypeError):
    """A timm model (or part of one) zeroi2v cannot turn into a video model; the message names
    the class and what is needed instead."""


def closest(key: str, valid: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or ``""``."""
    m = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {m[0]!r}?)" if m else ""


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it
    (for instance the ``onnx`` extra for ONNX export)."""
