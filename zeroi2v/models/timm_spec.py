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

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode


def create(name: str, kwargs: Optional[dict] = None, *, device=None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``; an unknown name or
    a keyword the architecture does not take is a ``ValueError`` that says so."""
    import timm

    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        raise ValueError(f"unknown timm model {name!r}" + (f"; similar names: {near}" if near else ""))
    try:
        if device is None:
            return timm.create_model(name, pretrained=False, num_classes=0, **(kwargs or {}))
        with torch.device(device):
            return timm.create_model(name, pretrained=False, num_classes=0, **(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"timm.create_model({name!r}, **{kwargs}) failed: {e}") from None


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
    """Structural kwargs read off a timm VisionTransformer (used only as candidates)."""
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
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks):
        out["depth"] = len(blocks)
        blk = blocks[0]
        attn = getattr(blk, "attn", None)
        if attn is not None and hasattr(attn, "num_heads"):
            out["num_heads"] = int(attn.num_heads)
            qkv = getattr(attn, "qkv", None)
            if isinstance(qkv, nn.Linear):
                out["qkv_bias"] = qkv.bias is not None
        fc1 = getattr(getattr(blk, "mlp", None), "fc1", None)
        if isinstance(fc1, nn.Linear) and out.get("embed_dim"):
            out["mlp_ratio"] = fc1.out_features / out["embed_dim"]
        dp = getattr(blocks[-1], "drop_path1", None)
        if hasattr(dp, "drop_prob"):
            out["drop_path_rate"] = float(dp.drop_prob)
    return out


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
    try:
        cand = create(name, kwargs, device="meta")
    except (ValueError, TypeError, RuntimeError, AssertionError):
        return name, None
    return (name, kwargs) if signature(cand) == want else (name, None)

