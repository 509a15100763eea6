"""timm models as ``(name, kwargs)``: build one, and recover the pair from an instance.

A :class:`~zeroi2v.models.config.ZeroI2VConfig` rebuilds its backbone as
``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``. For a model that a user
built himself and handed over as an instance, :func:`describe` finds the pair: the architecture
from timm's ``pretrained_cfg`` and kwargs from the instance's structure, *checked* by building the
candidate on the meta device and comparing state-dict shapes and module structure. A candidate that
does not rebuild the same model is never returned.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from .timm_args import check_model_name, check_timm_kwargs


def create(name: str, kwargs: Optional[dict] = None, *, device=None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``; an unknown name, a
    keyword outside :mod:`zeroi2v.models.timm_args`' allow-list or one the architecture does not
    take is a ``ValueError`` that says so. Every timm model zeroi2v builds is built here."""
    import timm

    check_model_name(name, "timm model")
    kwargs = check_timm_kwargs(kwargs or {}, "timm model", allow_classes=True)
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        raise ValueError(f"unknown timm model {name!r}" + (f"; similar names: {near}" if near else ""))
    try:
        if device is None:
            return timm.create_model(name, pretrained=False, num_classes=0, **(kwargs or {}))
        with torch.device(device):
            return timm.create_model(name, pretrained=False, num_classes=0, **(kwargs or {}))
    except (TypeError, AssertionError, OverflowError) as e:
        # a keyword the architecture does not take, or values timm's own asserts refuse
        # (class_token=False with token pooling, a width the heads do not divide)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"timm.create_model({name!r}, **{kwargs}) refuses these arguments: "
                         f"{why}") from None


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block, every new parameter is created on the meta device (no memory, no
    initialisation) while buffers stay real, so buffers computed at construction (position
    indices, rotary tables) keep their values. Load the weights with
    ``load_state_dict(..., assign=True)`` afterwards.

    An operation that meets a meta parameter and a real tensor runs on the meta device
    (:class:`_MetaWins`): timm's hybrid ViTs run their CNN stem on a dummy image while being
    built, only to read the feature map's shape."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        with _MetaWins():
            yield
    finally:
        nn.Module.register_parameter = original


class _MetaWins(TorchFunctionMode):
    """Run an operation that mixes meta and real tensors on the meta device. An in-place
    operation on a real tensor is left alone (it fails as it would without this mode): writing
    into a meta copy would silently drop the write."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors) \
                and not _writes_into_real(func, tensors, kwargs):
            args, kwargs = pytree.tree_map_only(
                torch.Tensor, lambda t: t if t.is_meta else t.to("meta"), (args, kwargs))
        return func(*args, **kwargs)


def _writes_into_real(func, tensors: list, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    inplace = (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") \
        or name == "__setitem__"
    return (inplace and not tensors[0].is_meta) or "out" in kwargs


def signature(model: nn.Module) -> tuple:
    """What must agree for two models to be the same architecture: state-dict names and shapes
    and the module tree (types and their printed settings: norms' eps, dropout rates ...)."""
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return shapes, repr(model)


def _probe(model: nn.Module) -> dict[str, Any]:
    """Structural kwargs read off a timm ``VisionTransformer``, ``Eva`` or ``Beit`` (used only as
    candidates: :func:`describe` keeps them only if they rebuild the same model)."""
    out: dict[str, Any] = {}
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        out["img_size"] = list(pe.img_size)
    if pe is not None and getattr(pe, "patch_size", None) is not None:
        out["patch_size"] = list(pe.patch_size)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        out["in_chans"] = proj.in_channels
    for attr, key in (("embed_dim", "embed_dim"), ("global_pool", "global_pool"),
                      ("dynamic_img_size", "dynamic_img_size"),
                      ("num_reg_tokens", "reg_tokens"), ("no_embed_class", "no_embed_class")):
        v = getattr(model, attr, None)
        if isinstance(v, (int, str, bool)):
            out[key] = v
    if "reg_tokens" not in out and hasattr(model, "reg_token"):  # Eva keeps the tokens only
        reg = model.reg_token
        out["num_reg_tokens"] = 0 if reg is None else int(reg.shape[1])
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        out["depth"] = len(blocks)
        blk = blocks[0]
        attn = getattr(blk, "attn", None)
        if attn is not None and hasattr(attn, "num_heads"):
            out["num_heads"] = int(attn.num_heads)
            bias = _query_bias(attn)
            if bias is not None:
                out["qkv_bias"] = bias
        hidden = _mlp_hidden(getattr(blk, "mlp", None))
        if hidden and out.get("embed_dim"):
            out["mlp_ratio"] = hidden / out["embed_dim"]
        dp = getattr(blocks[-1], "drop_path1", None)
        if hasattr(dp, "drop_prob"):  # timm's rates come from a float32 linspace: 0.1, not 0.10000000149
            out["drop_path_rate"] = float(str(np.float32(dp.drop_prob)))
    return out


def _query_bias(attn: nn.Module) -> Optional[bool]:
    """Whether the attention's input projection has a (query) bias: what ``qkv_bias`` switches
    in all three families (Eva and BEiT keep it as ``q_bias`` beside a bias-free ``qkv``)."""
    if hasattr(attn, "q_bias"):
        return attn.q_bias is not None
    for name in ("qkv", "q_proj"):
        lin = getattr(attn, name, None)
        if isinstance(lin, nn.Linear):
            return lin.bias is not None
    return None


def _mlp_hidden(mlp: Optional[nn.Module]) -> Optional[int]:
    """The MLP's hidden width, ``int(mlp_ratio * embed_dim)`` for most models: a SwiGLU's
    ``fc1_g``, else ``fc1`` (see :func:`describe` for a GluMlp's)."""
    for name in ("fc1_g", "fc1"):
        lin = getattr(mlp, name, None)
        if isinstance(lin, nn.Linear):
            return lin.out_features
    return None


def describe(model: nn.Module) -> tuple[Optional[str], Optional[dict]]:
    """``(name, kwargs)`` such that ``create(name, kwargs)`` builds ``model``'s architecture, or
    ``(name, None)`` / ``(None, None)`` when that cannot be established. ``model`` must have no
    classifier (``reset_classifier(0)``), as the rebuilt one has none."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else getattr(cfg, "architecture", None)
    if not name:
        return None, None
    want = signature(model)
    probed = _probe(model)
    try:
        default = create(name, {}, device="meta")
    except ValueError:
        return name, None
    if signature(default) == want:
        return name, {}
    # keep only what differs from the architecture's defaults
    base = _probe(default)
    kwargs = {k: v for k, v in probed.items() if base.get(k) != v}
    candidates = [kwargs]
    if "mlp_ratio" in kwargs:  # a GluMlp's fc1 (value and gate) is ratio * dim wide in timm's
        # ViT but twice that in Eva: the second reading is tried too, and verified like the first
        candidates.append(dict(kwargs, mlp_ratio=kwargs["mlp_ratio"] / 2))
    for kw in candidates:
        try:
            cand = create(name, kw, device="meta")
        except (ValueError, TypeError, RuntimeError, AssertionError):
            continue
        if signature(cand) == want:
            return name, kw
    return name, None

