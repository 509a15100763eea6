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


@torch.no_grad()
def merge_adapters(model: ZeroI2VViT, inplace: bool = False) -> ZeroI2VViT:
    """Return ``model`` with every adapter folded into the frozen linears (docs/method.md §3).

    The result has no adapter modules and its output equals the unmerged model's in eval mode up
    to float rounding. STDHA offsets are kept for every head (unlike the official inference
    backbone, which drops the ±2 heads). The input model is left untouched unless
    ``inplace=True``. How biases land in timm's layout is the family's rule
    (:class:`~zeroi2v.models.families.Family`: ``bias_kwargs``, ``bias_kwarg_governs_all``,
    ``constant_into_norm``).
    """
    if not isinstance(model, ZeroI2VViT):
        raise TypeError(f"merge_adapters expects a ZeroI2VViT, got {type(model).__name__}")
    if model.merged:
        return model if inplace else copy.deepcopy(model)
    if not inplace:
        model = copy.deepcopy(model)
    rules = model.family_rules
    if rules.constant_into_norm:
        for blk in model.backbone.blocks:
            _move_constant_into_norm(blk)
    gained = set()  # linears (by attribute name) that had no bias of any kind before the fold
    for mod in list(model.backbone.modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, AdaptedLinear):
                if child.bias is None and not _has_split_bias(mod, attr):
                    gained.add(attr)
                setattr(mod, attr, child.to_linear())
    for attn in model.attentions():
        if isinstance(attn, STDHBeitAttention):
            attn.absorb_qkv_bias()
    flags = {rules.bias_kwargs[n] for n in gained if n in rules.bias_kwargs}
    if rules.bias_kwarg_governs_all and model.config.timm_kwargs is not None:
        _zero_biases_governed_by(model, flags, rules.bias_kwargs)
    model.record_merge({f: True for f in sorted(flags)})
    model.freeze()
    return model


def _has_split_bias(parent: nn.Module, attr: str) -> bool:
    """A fused qkv without a bias of its own whose attention keeps q and v biases apart (BEiT,
    Eva): the fold adds to those, so the layer gains no timm keyword."""
    return attr == "qkv" and getattr(parent, "q_bias", None) is not None


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
def _zero_biases_governed_by(model: ZeroI2VViT, flags: set[str], bias_kwargs) -> None:
    """timm switches every layer of one bias keyword together: the layers governed by a keyword
    the merge turns on, and that have no bias, get a zero one, so the backbone is exactly what
    timm builds."""
    for name, m in model.backbone.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear) and m.bias is None and bias_kwargs.get(leaf) in flags:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype,
                                              device=m.weight.device), requires_grad=False)


def merged_vs_unmerged_error(model, merged, num_videos: int = 2, seed: int = 0) -> float:
    """``max|merged(x) - model(x)| / max|model(x)|`` on random clips, both in eval mode."""
    img = model.backbone.patch_embed.img_size
    c = model.backbone.patch_embed.proj.in_channels
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_videos, c, model.num_frames, *img, generator=g).to(p.device, p.dtype)
    model.eval()
    merged.eval()
    with torch.no_grad():
        ref, out = model(x), merged(x)
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
