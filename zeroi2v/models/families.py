"""The timm model families zeroi2v turns into video models, and what differs between them.

Everything ZeroI2V does happens inside timm's own blocks, whose forward code runs unchanged:

* the attention module is replaced by its STDHA version (:mod:`zeroi2v.nn.attention`);
* each adapter of docs/method.md §3 becomes an :class:`~zeroi2v.nn.AdaptedLinear` at its *sites*, the
  frozen linears it feeds or reads (:func:`adapter_sites`): ``t_adapter`` before the attention's
  input projections (fused ``qkv``, or ``q_proj``/``k_proj``/``v_proj``, and a gate if any),
  ``s_adapter`` after its ``proj``, ``mlp_adapter`` before the MLP's first linear(s) (``fc1``;
  ``fc1_g`` and ``fc1_x`` of a SwiGLU) and ``mlp_adapter_out`` after its ``fc2``. An adapter with
  several sites is one module shared by them, so it computes what the paper's adapter before
  the whole attention / MLP computes.

What a family adds is how frames go through the model (:attr:`Family.forward_tokens`: position
embedding, where the temporal embedding is added, what the blocks are called with) and which
timm classes it accepts. Families: ``vit`` (``VisionTransformer`` and subclasses: ViT, DeiT incl.
distilled, CLIP, DINOv2, SigLIP, AIMv2, hybrids), ``eva`` (``Eva``: EVA-02, EVA-CLIP, DINOv3,
``*_rope_reg1_gap_256``), ``beit`` (BEiT, BEiTv2).
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..nn.attention import stdha_class_for

# slot -> (attribute paths of its sites within a block, position)
_SITES = {
    "t_adapter": (("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.gate"), "before"),
    "s_adapter": (("attn.proj",), "after"),
    "mlp_adapter": (("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x"), "before"),
    "mlp_adapter_out": (("mlp.fc2",), "after"),
}


def adapter_sites(block: nn.Module) -> dict[str, tuple[list[tuple[nn.Module, str]], str]]:
    """``slot -> ([(parent module, attribute)] of the linears, position)`` for one timm block."""
    out = {}
    for slot, (paths, position) in _SITES.items():
        sites = []
        for path in paths:
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            if isinstance(getattr(parent, attr, None), nn.Module):
                sites.append((parent, attr))
        out[slot] = (sites, position)
    return out


def adapter_owner(block: nn.Module, slot: str) -> str:
    """Attribute path, within a block, of the linear whose ``adapter`` submodule holds ``slot``'s
    parameters (the first of its sites), e.g. ``"attn.qkv"``."""
    for path in _SITES[slot][0]:
        parent_name, attr = path.split(".")
        if isinstance(getattr(getattr(block, parent_name), attr, None), nn.Module):
            return path
    raise ValueError(f"the block has no linear for the {slot}")


def adapter_dim(sites: list[tuple[nn.Module, str]], position: str) -> int:
    lin = getattr(*sites[0])
    weight = lin.weight
    return weight.shape[1] if position == "before" else weight.shape[0]


# ----------------------------------------------------------------------------- families


def _classes(*paths: str) -> tuple[type, ...]:
    """Classes by dotted path, imported when first asked for (``import zeroi2v`` loads no timm)."""
    return tuple(getattr(importlib.import_module(p.rsplit(".", 1)[0]), p.rsplit(".", 1)[1])
                 for p in paths)


_MLPS = ("timm.layers.Mlp", "timm.layers.GluMlp", "timm.layers.SwiGLU")


@dataclass(frozen=True)
class Family:
    """Everything zeroi2v knows about one timm model family; adding a family is adding one of
    these to :data:`FAMILIES` (or :func:`register_family`)."""

    name: str
    model_path: str                   # the timm class, by dotted path
    block_paths: tuple[str, ...]      # the block classes it may hold
    forward_tokens: Callable          # (vit, images, add_temporal) -> tokens after the norm
    image_filter_path: str            # timm's key conversion for image checkpoints of the family
    # merge rules (models/merge.py): the timm keyword that gives a linear (by attribute name) the
    # bias the merge folds into it; whether timm switches all layers of one keyword together
    # (then the others get zero biases); whether the attention-input adapter's constant moves
    # into norm1 (Eva: timm's Eva has no key bias, which RoPE would make matter)
    bias_kwargs: Mapping[str, str] = field(default_factory=dict)
    bias_kwarg_governs_all: bool = False
    constant_into_norm: bool = False
    attention_paths: tuple[str, ...] = ()  # the timm attention classes its blocks may hold

    @property
    def model_cls(self) -> type:
        return _classes(self.model_path)[0]

    def image_filter(self) -> Callable:
        """timm's ``checkpoint_filter_fn`` for this family (CLIP, open_clip, timm layouts)."""
        return _classes(self.image_filter_path)[0]

    def check(self, model: nn.Module) -> None:
        """Refuse, naming the class, anything of this family zeroi2v cannot convert."""
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential) and not isinstance(blocks, nn.ModuleList):
            raise UnsupportedModelError(f"{type(model).__name__} has no list of blocks")
        ok_blocks, ok_mlps = _classes(*self.block_paths), _classes(*_MLPS)
        for i, blk in enumerate(blocks):
            if type(blk) not in ok_blocks:
                raise UnsupportedModelError(
                    f"block {i} is a {type(blk).__module__}.{type(blk).__name__}; zeroi2v supports "
                    f"{', '.join(c.__name__ for c in ok_blocks)} in {self.model_cls.__name__} "
                    "models")
            if self.attention_paths and type(blk.attn) not in _classes(*self.attention_paths):
                stdha_class_for(blk.attn)  # names what is unsupported, if zeroi2v has no STDHA
                raise UnsupportedModelError(
                    f"block {i}: {type(blk.attn).__name__} is not an attention of the "
                    f"{self.name} family ({', '.join(self.attention_paths)})")
            stdha_class_for(blk.attn)
            if type(blk.mlp) not in ok_mlps:
                raise UnsupportedModelError(
                    f"unsupported MLP {type(blk.mlp).__name__} in block {i}: zeroi2v supports "
                    f"{', '.join(c.__name__ for c in ok_mlps)}")
            for slot, (sites, _) in adapter_sites(blk).items():
                for parent, attr in sites:
                    if type(getattr(parent, attr)) is not nn.Linear:
                        raise UnsupportedModelError(
                            f"block {i}: {attr} is a {type(getattr(parent, attr)).__name__}, not "
                            f"an nn.Linear: the {slot} cannot be folded into it")
                if not sites:
                    raise UnsupportedModelError(f"block {i} has no linear for the {slot}")
        if getattr(model, "rope_mixed", False):
            raise UnsupportedModelError("Eva models with depth-mixed RoPE (rope_mixed) are not "
                                        "supported")


def _vit_tokens(vit, x, add_temporal):
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = add_temporal(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    if vit.grad_checkpointing and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq

        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)


def _eva_tokens(vit, x, add_temporal):
    x = vit.patch_embed(x)
    x, rope = vit._pos_embed(x)
    x = add_temporal(x)
    x = vit.norm_pre(x)
    return vit.norm(_run_blocks(vit, x, rope=rope))


def _beit_tokens(vit, x, add_temporal):
    x = vit.patch_embed(x)
    x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if vit.pos_embed is not None:
        x = x + vit.pos_embed
    x = add_temporal(x)
    x = vit.pos_drop(x)
    bias = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
    return vit.norm(_run_blocks(vit, x, shared_rel_pos_bias=bias))


def _run_blocks(vit, x, **kwargs):
    """The blocks in order, each called with ``kwargs`` (timm's gradient checkpointing kept)."""
    from torch.utils.checkpoint import checkpoint

    ckpt = vit.grad_checkpointing and torch.is_grad_enabled()
    for blk in vit.blocks:
        x = checkpoint(blk, x, use_reentrant=False, **kwargs) if ckpt else blk(x, **kwargs)
    return x


FAMILIES: list[Family] = [
    Family("vit", "timm.models.vision_transformer.VisionTransformer",
           ("timm.models.vision_transformer.Block",), _vit_tokens,
           "timm.models.vision_transformer.checkpoint_filter_fn",
           bias_kwargs={"qkv": "qkv_bias", "proj": "proj_bias", "fc1": "proj_bias",
                        "fc1_g": "proj_bias", "fc1_x": "proj_bias", "fc2": "proj_bias"},
           bias_kwarg_governs_all=True, attention_paths=("timm.layers.Attention",)),
    Family("eva", "timm.models.eva.Eva",
           ("timm.models.eva.EvaBlock", "timm.models.eva.EvaBlockPostNorm"), _eva_tokens,
           "timm.models.eva.checkpoint_filter_fn", constant_into_norm=True,
           attention_paths=("timm.models.eva.EvaAttention",)),
    Family("beit", "timm.models.beit.Beit", ("timm.models.beit.Block",), _beit_tokens,
           "timm.models.beit.checkpoint_filter_fn", bias_kwargs={"qkv": "qkv_bias"},
           attention_paths=("timm.models.beit.Attention",)),
]


def register_family(family: Family) -> Family:
    """Add a family (first match wins, so a subclass's family goes before its parent's)."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a family named {family.name!r} exists already")
    FAMILIES.insert(0, family)
    return family


def family_of(model: nn.Module) -> Family:
    """The family of a timm model, or an :class:`UnsupportedModelError` that names its class."""
    for fam in FAMILIES:
        if isinstance(model, fam.model_cls):
            return fam
    name = f"{type(model).__module__}.{type(model).__name__}"
    hint = ""
    if type(model).__name__ == "NaFlexVit":
        hint = (" (NaFlexViT packs images of several sizes into one sequence, which does not fit "
                "clips of equal frames; use the fixed-size SigLIP/ViT model of the same weights)")
    raise UnsupportedModelError(
        f"{name} is not a model family zeroi2v supports{hint}: timm VisionTransformer (ViT, DeiT, "
        "CLIP, DINOv2, SigLIP, AIMv2, hybrids), Eva (EVA-02, EVA-CLIP, DINOv3, *_rope_reg1_gap_256) or "
        "Beit (BEiT, BEiTv2)")


def input_channels(model: nn.Module) -> int:
    """Image channels the model takes: the first convolution of its patch embedding (for a
    hybrid, the CNN stem's)."""
    for m in model.patch_embed.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise UnsupportedModelError(f"{type(model.patch_embed).__name__} has no convolution")
