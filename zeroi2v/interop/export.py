"""Graph exports of a (merged) model: ``torch.export`` programs and ONNX files.

The model file itself (safetensors + JSON) is :meth:`zeroi2v.ZeroI2VViT.save_pretrained`; these
exports are for runtimes that do not run Python (ONNX Runtime, ExecuTorch, TensorRT ...).

ONNX needs the packages ``onnx`` and ``onnxscript``, which come with the ``onnx`` extra
(``pip install "zeroi2v[onnx]"``); ``torch.export`` needs nothing beyond torch.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import MissingDependencyError
from ..models.merge import merge_adapters
from ..safe_io import PathLike

#: Largest weight payload written into the ``.onnx`` file itself. A protobuf message cannot
#: exceed 2 GiB; the margin leaves room for the graph. Larger models keep their weights in
#: ``FILE.onnx.data`` beside it (ONNX's external data), which must travel with the file.
ONNX_ONE_FILE_BYTES = int(0.9 * 2**31)

_ONNX_EXTRA = ("pip install 'zeroi2v[onnx]' (from a checkout: pip install -e '.[onnx]'), or "
               "export to .pt2 (torch.export), which needs no extra package")

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


def _batch_example(example: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    # torch.export specialises a dimension whose example is 0 or 1: trace a batch of two.
    if dynamic_batch and example.shape[0] < 2:
        return example[:1].expand(2, *example.shape[1:]).contiguous()
    return example


def _batch_dim() -> tuple:
    """``dynamic_shapes`` of ``model(video)``: dimension 0 of the video is the batch."""
    return ({0: torch.export.Dim("batch", min=1)},)


def export_program(model, example: torch.Tensor, *, merge: bool = True,
                   dynamic_batch: bool = False):
    """``torch.export.export`` of the (merged) model for inputs shaped like ``example``.

    ``dynamic_batch=True``: any batch size (the other dimensions stay those of ``example``);
    otherwise the batch is ``example``'s too. Save it with ``torch.export.save(ep, "m.pt2")``.
    """
    if merge and not model.merged:
        model = merge_adapters(model)
    example = _batch_example(example, dynamic_batch)
    with export_mode(model, example):
        return torch.export.export(model, (example,),
                                   dynamic_shapes=_batch_dim() if dynamic_batch else None)


def onnx_exporter(dynamo: Optional[bool] = None) -> bool:
    """Whether ONNX export uses the dynamo-based exporter (``dynamo=None``: when ``onnxscript``
    is installed, else the TorchScript-based one). A missing package is a
    :class:`MissingDependencyError` saying how to install it."""
    if importlib.util.find_spec("onnx") is None:
        raise MissingDependencyError(f"ONNX export needs the onnx package: {_ONNX_EXTRA}")
    has_script = importlib.util.find_spec("onnxscript") is not None
    if dynamo and not has_script:
        raise MissingDependencyError("the dynamo-based ONNX exporter needs the onnxscript "
                                     f"package: {_ONNX_EXTRA}")
    return has_script if dynamo is None else bool(dynamo)


def export_onnx(model, example: torch.Tensor, out_path: PathLike, *, merge: bool = True,
                opset_version: int = 17, dynamo: Optional[bool] = None,
                dynamic_batch: bool = False) -> str:
    """Export the (merged) model to ONNX: input ``video`` (B, C, T, H, W) -> ``logits``, shapes
    fixed to ``example``'s, or with any batch size when ``dynamic_batch=True`` (dynamo-based
    exporter only).

    The weights go into the ``.onnx`` file itself up to :data:`ONNX_ONE_FILE_BYTES` (ONNX's
    2 GiB limit with a margin); a larger model's are written beside it as external data
    (:func:`onnx_files` lists what was written). ``dynamo=None`` uses the dynamo-based exporter
    when ``onnxscript`` is installed and the TorchScript-based one (``dynamo=False``) otherwise;
    STDHA exports as slices and concatenations of K/V heads followed by standard attention ops
    either way. Returns ``out_path``.
    """
    import warnings

    if dynamic_batch and dynamo is False:
        raise ValueError("dynamic_batch=True needs the dynamo-based ONNX exporter (dynamo=True or "
                         "None): the TorchScript-based one fixes the batch size in the graph")
    dynamo = onnx_exporter(True if dynamic_batch else dynamo)
    if merge and not model.merged:
        model = merge_adapters(model)
    out_path = os.fspath(out_path)
    example = _batch_example(example, dynamic_batch)
    if dynamo:
        kw = {"external_data": weight_bytes(model) > ONNX_ONE_FILE_BYTES, "verbose": False}
        if dynamic_batch:
            kw["dynamic_shapes"] = _batch_dim()
    else:  # the TorchScript exporter moves weights out of the file itself past 2 GiB
        kw = {"opset_version": opset_version}
    with export_mode(model, example), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), out_path, input_names=["video"],
                          output_names=["logits"], dynamo=dynamo, **kw)
    return out_path


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints its progress and onnxscript's optimizer logs what it leaves
    unfolded ("Skipping constant folding for op Split"): notes about the exporter's own
    passes, not about the model. Errors still raise."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what an export stores)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def onnx_files(path: PathLike) -> list[Path]:
    """The ONNX file and the external-data files it refers to (none for a one-file model),
    read from the file without loading the weights."""
    import onnx

    path = Path(path)
    extra: list[Path] = []
    for tensor in _tensors(onnx.load(str(path), load_external_data=False).graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            loc = path.parent / next(e.value for e in tensor.external_data if e.key == "location")
            if loc not in extra:
                extra.append(loc)
    return [path, *extra]


def _tensors(graph):
    """Every tensor of an ONNX graph: initializers, and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for g in [attr.g] if attr.HasField("g") else []:
                yield from _tensors(g)
            for g in attr.graphs:
                yield from _tensors(g)
