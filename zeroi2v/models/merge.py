"""Structural reparameterization: fold every linear adapter into its neighbouring frozen linear.

With the adapter as the affine map ``x -> x M^T + c`` (``M = I + s W2 W1``, ``c = s (W2 b1 + b2)``):

* adapter before a linear ``(W, b)``:  ``W' = W M``,  ``b' = W c + b``
* adapter after a linear ``(W, b)``:   ``W' = M W``,  ``b' = M b + c``

All products are taken in float64 and cast back to the weight's dtype. Where a bias-free linear
receives a folded bias, the merged model's config turns on the timm keyword that gives that layer
a bias (``qkv_bias`` for ``qkv``; ``proj_bias`` for ``proj``, ``fc1`` and ``fc2``, which timm
switches together), so the merged backbone still loads ``strict=True`` into
``timm.create_model(config.model_name, **config.timm_kwargs)``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn.adapter import LinearAdapter
from .video_vit import ZeroI2VViT


# timm keyword that gives a linear (by attribute name) of a VisionTransformer block a bias
BIAS_KWARGS = {"qkv": "qkv_bias", "proj": "proj_bias", "fc1": "proj_bias", "fc2": "proj_bias"}


@torch.no_grad()
def _set(linear: nn.Linear, w: torch.Tensor, b: torch.Tensor) -> None:
    linear.weight.copy_(w.to(linear.weight.dtype))
    if linear.bias is None:
        # The folded adapter shift needs a bias; add one (the merged layer then has one more
        # parameter than a bias-free original).
        linear.bias = nn.Parameter(b.to(linear.weight.dtype), requires_grad=False)
    else:
        linear.bias.copy_(b.to(linear.bias.dtype))


def _bias_free(model: ZeroI2VViT) -> set[str]:
    return {name for name, m in model.backbone.named_modules()
            if isinstance(m, nn.Linear) and m.bias is None}


@torch.no_grad()
def _conform_biases(model: ZeroI2VViT, gained: set[str]) -> None:
    """Turn on the timm bias keywords of the layers that gained a bias and give every other layer
    governed by the same keyword a zero bias, so the backbone is exactly what timm builds."""
    spec = model._spec
    if spec.timm_kwargs is None or not gained:
        return
    flags = {BIAS_KWARGS[n] for n in gained if n in BIAS_KWARGS}
    kwargs = dict(spec.timm_kwargs, **{f: True for f in flags})
    for name, m in model.backbone.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear) and m.bias is None and BIAS_KWARGS.get(leaf) in flags:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype,
                                              device=m.weight.device), requires_grad=False)
    model._spec = spec.replace(timm_kwargs=kwargs)


def _bias64(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is None:
        return torch.zeros(linear.out_features, dtype=torch.float64, device=linear.weight.device)
    return linear.bias.double()


@torch.no_grad()
def merge_before(adapter: LinearAdapter, linear: nn.Linear) -> None:
    """Fold an adapter that feeds ``linear`` into it, in place: ``linear(adapter(x))``."""
    m, c = adapter.affine(torch.float64)
    w = linear.weight.double()
    _set(linear, w @ m, w @ c + _bias64(linear))


@torch.no_grad()
def merge_after(linear: nn.Linear, adapter: LinearAdapter) -> None:
    """Fold an adapter that reads ``linear``'s output into it, in place: ``adapter(linear(x))``."""
    m, c = adapter.affine(torch.float64)
    _set(linear, m @ linear.weight.double(), m @ _bias64(linear) + c)


@torch.no_grad()
def merge_adapters(model: ZeroI2VViT, inplace: bool = False) -> ZeroI2VViT:
    """Return ``model`` with every adapter folded into the frozen linears (SPEC §3).

    The result has no adapter modules: its backbone state dict is that of the plain timm ViT, and
    its output equals the unmerged model's in eval mode up to float rounding. STDHA offsets are
    kept for every head (unlike the official inference backbone, which drops the ±2 heads). The
    input model is left untouched unless ``inplace=True``.
    """
    if not isinstance(model, ZeroI2VViT):
        raise TypeError(f"merge_adapters expects a ZeroI2VViT, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    bias_free = _bias_free(model)
    for blk in model.backbone.blocks:
        if blk.t_adapter is not None:
            merge_before(blk.t_adapter, blk.attn.qkv)
        if blk.s_adapter is not None:
            merge_after(blk.attn.proj, blk.s_adapter)
        if blk.mlp_adapter is not None:
            merge_before(blk.mlp_adapter, blk.mlp.fc1)
        if blk.mlp_adapter_out is not None:
            merge_after(blk.mlp.fc2, blk.mlp_adapter_out)
        blk.t_adapter = blk.s_adapter = blk.mlp_adapter = blk.mlp_adapter_out = None
    _conform_biases(model, {n.rsplit(".", 1)[-1] for n in bias_free - _bias_free(model)})
    return model
