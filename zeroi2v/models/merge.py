"""Structural reparameterization: fold every linear adapter into its neighbouring frozen linear.

With the adapter as the affine map ``x -> x M^T + c`` (``M = I + s W2 W1``, ``c = s (W2 b1 + b2)``):

* adapter before a linear ``(W, b)``:  ``W' = W M``,  ``b' = W c + b``
* adapter after a linear ``(W, b)``:   ``W' = M W``,  ``b' = M b + c``

All products are taken in float64 and cast back to the weight's dtype
(:meth:`zeroi2v.nn.AdaptedLinear.to_linear`). An adapter shared by several linears (separate
q/k/v projections, a SwiGLU's two input layers) is folded into each.

Bias-free linears receive a folded bias. For timm's ``VisionTransformer`` the merged config turns
on the keyword that gives such a layer its bias (``qkv_bias`` for ``qkv``; ``proj_bias`` for
``proj``, ``fc1`` and ``fc2``, which timm switches together, with zero biases where nothing was
folded), so the merged backbone loads ``strict=True`` into
``timm.create_model(config.model_name, num_classes=0, **config.timm_kwargs)``. BEiT's attention
takes the folded q/v bias into its own ``q_bias``/``v_bias`` and drops the key part, which
softmax ignores, so merged BEiT models load into timm too.

In Eva-family models a key bias does matter (rotary embeddings turn it into a position-dependent
term), and timm's Eva has no place for one. There the constant of the adapter before the
attention is moved into the block's ``norm1`` instead: ``adapter(x) = M (x + y)`` with
``y = M^-1 c``, so ``norm1.bias += y`` and every input projection (and the gate) gets ``W M``
with its bias unchanged. The merged Eva backbone then loads ``strict=True`` into timm as well. A
block where that is impossible (post-norm blocks; a norm without bias) keeps the folded bias on
the linear and loads into zeroi2v only.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn.adapter import AdaptedLinear
from ..nn.attention import STDHBeitAttention
from .families import adapter_sites
from .video_vit import ZeroI2VViT

# timm keyword that gives a linear (by attribute name) of a VisionTransformer block a bias
BIAS_KWARGS = {"qkv": "qkv_bias", "proj": "proj_bias", "fc1": "proj_bias", "fc1_g": "proj_bias",
               "fc1_x": "proj_bias", "fc2": "proj_bias"}


@torch.no_grad()
def merge_adapters(model: ZeroI2VViT, inplace: bool = False) -> ZeroI2VViT:
    """Return ``model`` with every adapter folded into the frozen linears (docs/method.md §3).

    The result has no adapter modules and its output equals the unmerged model's in eval mode up
    to float rounding. STDHA offsets are kept for every head (unlike the official inference
    backbone, which drops the ±2 heads). The input model is left untouched unless
    ``inplace=True``.
    """
    if not isinstance(model, ZeroI2VViT):
        raise TypeError(f"merge_adapters expects a ZeroI2VViT, got {type(model).__name__}")
    if model.merged:
        return model if inplace else copy.deepcopy(model)
    if not inplace:
        model = copy.deepcopy(model)
    if model.family == "eva":
        for blk in model.backbone.blocks:
            _move_constant_into_norm(blk)
    gained = set()
    for mod in list(model.backbone.modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, AdaptedLinear):
                if child.bias is None:
                    gained.add(attr)
                setattr(mod, attr, child.to_linear())
    beit_gained = False
    for attn in model.attentions():
        if isinstance(attn, STDHBeitAttention):
            beit_gained |= attn.q_bias is None and attn.qkv.bias is not None
            attn.absorb_qkv_bias()
    if model.family == "vit":
        _conform_vit_biases(model, gained)
    if beit_gained and model._spec.timm_kwargs is not None:  # a BEiT built with qkv_bias=False
        model._spec = model._spec.replace(
            timm_kwargs=dict(model._spec.timm_kwargs, qkv_bias=True))
    model._spec = model._spec.replace(merged=True)
    model.freeze()
    return model


def norm_takes_constant(block: nn.Module) -> bool:
    """Whether the constant of the adapter before this block's attention can live in its
    ``norm1`` (a pre-norm block whose LayerNorm has a bias and feeds only the attention)."""
    from timm.models.eva import EvaBlock

    norm = getattr(block, "norm1", None)
    return (type(block) is EvaBlock and isinstance(norm, nn.LayerNorm)
            and norm.bias is not None)


@torch.no_grad()
def _move_constant_into_norm(block: nn.Module) -> None:
    """Eva: fold the attention-input adapter as ``W M`` into every projection and move its
    constant into ``norm1.bias`` (see the module doc); nothing to do without such an adapter."""
    sites, _ = adapter_sites(block)["t_adapter"]
    linears = [(parent, attr, getattr(parent, attr)) for parent, attr in sites]
    if not linears or not isinstance(linears[0][2], AdaptedLinear) \
            or not norm_takes_constant(block):
        return
    m, c = linears[0][2].get_adapter().affine(torch.float64)
    if m.device.type != "meta":  # on meta (an empty model about to be loaded) only the structure
        y = torch.linalg.solve(m, c)
        if (m @ y - c).norm() > 1e-9 * (c.norm() + 1e-30):
            raise ValueError("an adapter before an Eva attention is (nearly) singular: its "
                             "constant cannot be moved into the norm exactly")
        norm = block.norm1
        norm.bias.copy_((norm.bias.double() + y).to(norm.bias.dtype))
    for parent, attr, lin in linears:
        setattr(parent, attr, lin.to_linear(constant=False))


@torch.no_grad()
def _conform_vit_biases(model: ZeroI2VViT, gained: set[str]) -> None:
    """Turn on the timm bias keywords of the layers that gained a bias and give every other layer
    governed by the same keyword a zero bias, so the backbone is exactly what timm builds."""
    spec = model._spec
    flags = {BIAS_KWARGS[n] for n in gained if n in BIAS_KWARGS}
    if spec.timm_kwargs is None or not flags:
        return
    for name, m in model.backbone.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear) and m.bias is None and BIAS_KWARGS.get(leaf) in flags:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype,
                                              device=m.weight.device), requires_grad=False)
    model._spec = spec.replace(timm_kwargs=dict(spec.timm_kwargs, **{f: True for f in flags}))
