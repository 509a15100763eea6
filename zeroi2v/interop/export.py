"""Graph exports of a (merged) model: ``torch.export`` programs and ONNX files.

The model file itself (safetensors + JSON) is :meth:`zeroi2v.ZeroI2VViT.save_pretrained`; these
exports are for runtimes that do not run Python (ONNX Runtime, ExecuTorch, TensorRT ...).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from ..files import PathLike
from ..models.merge import merge_adapters

# ----------------------------------------------------------------------------- graph exports


@contextlib.contextmanager
def export_mode(model, example: torch.Tensor):
    """Eval mode and every attention on the pure-PyTorch ``"torch"`` STDHA backend (slices,
    concatenation and SDPA: standard ops)."""
    attns = model.attentions()
    saved = [a.backend for a in attns]
    was_training = model.training
    model.eval()
    for a in attns:
        a.backend = "torch"
    try:
        yield model
    finally:
        for a, b in zip(attns, saved):
            a.backend = b
        model.train(was_training)


def export_program(model, example: torch.Tensor, *, merge: bool = True):
    """``torch.export.export`` of the (merged) model for inputs shaped like ``example``."""
    if merge and not model.merged:
        model = merge_adapters(model)
    with export_mode(model, example):
        return torch.export.export(model, (example,))


def export_onnx(model, example: torch.Tensor, out_path: PathLike, *, merge: bool = True,
                opset_version: int = 17, dynamo: Optional[bool] = None) -> str:
    """Export the (merged) model to ONNX (input ``video`` (B, C, T, H, W) -> ``logits``), shapes
    fixed to ``example``'s.

    ``dynamo=None`` uses the dynamo-based exporter when ``onnxscript`` is installed and the
    TorchScript-based one (``dynamo=False``) otherwise; STDHA exports as slices and concatenations
    of K/V heads followed by standard attention ops either way.
    """
    import warnings

    if dynamo is None:
        try:
            import onnxscript  # noqa: F401
            dynamo = True
        except ImportError:
            dynamo = False
    if merge and not model.merged:
        model = merge_adapters(model)
    out_path = os.fspath(out_path)
    with export_mode(model, example), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {} if dynamo else {"opset_version": opset_version}
        torch.onnx.export(model, (example,), out_path, input_names=["video"],
                          output_names=["logits"], dynamo=dynamo, **kw)
    return out_path
