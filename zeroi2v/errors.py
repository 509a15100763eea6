"""Exceptions that mean "the user asked for something this library does not do"."""


class UnsupportedModelError(TypeError):
    """A timm model (or part of one) zeroi2v cannot turn into a video model; the message names
    the class and what is needed instead."""


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it
    (for instance the ``onnx`` extra for ONNX export)."""
