"""Export of merged models: safetensors + JSON, ``torch.export``, ONNX.

File layout written by :func:`export_merged` (``DIR/model.safetensors`` + ``DIR/config.json``, or
``NAME.safetensors`` + ``NAME.json`` when given a ``.safetensors`` path):

* tensors named exactly as the plain timm ``VisionTransformer``'s state dict (no head), so the
  image backbone loads into timm directly, plus ``zeroi2v.temporal_embedding`` (1, T, C),
  ``zeroi2v.head.weight`` and ``zeroi2v.head.bias`` (the video classifier);
* a JSON config (also stored in the safetensors metadata under ``"zeroi2v"``): the timm
  ``VisionTransformer`` constructor arguments, the timm architecture name it came from (for
  reference), ``num_frames``, ``head_offsets``, ``num_classes``, ``embed_dim``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .checkpoint import PathLike

FORMAT = "zeroi2v-merged"
FORMAT_VERSION = 1
PREFIX = "zeroi2v."


class ExportedFiles(NamedTuple):
    weights: str
    config: str


# ----------------------------------------------------------------------------- safetensors


def export_merged(model, out_path: PathLike) -> ExportedFiles:
    """Write the merged ``model`` (merged first, on a copy, if it still has adapters).

    ``out_path`` is a directory (created; ``model.safetensors`` and ``config.json`` inside) or a
    path ending in ``.safetensors`` (the config goes beside it with ``.json``). Returns the two
    paths. :func:`load_merged` reads them back.
    """
    from safetensors.torch import save_file

    from ..models.merge import merge_adapters
    from ..models.video_vit import ZeroI2VViT

    if not isinstance(model, ZeroI2VViT):
        raise TypeError(f"export_merged expects a ZeroI2VViT, got {type(model).__name__}")
    if not model.merged:
        model = merge_adapters(model)
    weights, config_path = _out_paths(out_path)
    cfg = model_config(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    tensors[PREFIX + "temporal_embedding"] = model.temporal_embedding.detach().cpu().contiguous()
    for k, v in model.head.state_dict().items():
        tensors[PREFIX + "head." + k] = v.detach().cpu().contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(weights)), exist_ok=True)
    text = json.dumps(dict(cfg, weights=os.path.basename(weights)), indent=2)
    save_file(tensors, weights, metadata={"format": "pt", "zeroi2v": json.dumps(cfg)})
    with open(config_path, "w") as f:
        f.write(text + "\n")
    return ExportedFiles(weights, config_path)


def load_merged(path: PathLike, *, map_location: Union[str, torch.device] = "cpu"):
    """Rebuild a merged :class:`~zeroi2v.ZeroI2VViT` from :func:`export_merged` output.

    ``path``: the export directory, its ``.safetensors`` file, or its ``.json`` config.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights, config_path = _in_paths(path)
    cfg = None
    try:
        with safe_open(weights, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(weights, device=str(map_location))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from e
    if config_path is not None and os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path} is not a valid zeroi2v config: {e}") from e
    elif "zeroi2v" in meta:
        cfg = json.loads(meta["zeroi2v"])
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{path} is not a zeroi2v merged export (no config with format {FORMAT!r})")
    model = build_merged(cfg)
    sd = {}
    for k, v in tensors.items():
        sd[k[len(PREFIX):] if k.startswith(PREFIX) else "backbone." + k] = v
    _add_missing_biases(model, sd)
    own = model.state_dict()
    for k in own:
        if k not in sd:
            raise ValueError(f"{weights}: missing tensor for {k!r}")
    for k, v in sd.items():
        if k not in own:
            raise ValueError(f"{weights}: unexpected tensor {k!r}")
        if own[k].shape != v.shape:
            raise ValueError(f"{weights}: tensor {k!r} has shape {tuple(v.shape)}, the model "
                             f"built from the config expects {tuple(own[k].shape)}")
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    return model.to(map_location).eval()


def model_config(model) -> dict:
    """The JSON-able description of a (merged) ``ZeroI2VViT``."""
    vit = model.backbone
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "timm_architecture": (getattr(vit, "pretrained_cfg", None) or {}).get("architecture"),
        "vit_kwargs": vit_kwargs(vit),
        "num_frames": model.num_frames,
        "head_offsets": list(model.head_offsets),
        "num_classes": model.head.out_features,
        "embed_dim": model.embed_dim,
        "num_features": model.head.in_features,
        "head_dropout": model.head_drop.p,
    }


def build_merged(cfg: dict):
    """An empty merged ``ZeroI2VViT`` (no adapters) from a :func:`model_config` dict."""
    from timm.models.vision_transformer import VisionTransformer

    from ..models.video_vit import ADAPTER_NAMES, ZeroI2VViT

    kw = dict(cfg["vit_kwargs"])
    eps = kw.pop("norm_eps")
    norm_cls = _NORMS[kw.pop("norm_layer")]()
    kw["norm_layer"] = functools.partial(norm_cls, eps=eps)
    for k in ("img_size", "patch_size"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    vit = VisionTransformer(num_classes=0, weight_init="skip", **kw)
    model = ZeroI2VViT(vit, cfg["num_frames"], cfg["num_classes"], cfg["head_offsets"],
                       head_dropout=cfg.get("head_dropout", 0.5))
    for blk in model.backbone.blocks:
        for n in ADAPTER_NAMES:
            setattr(blk, n, None)
    model.freeze()
    return model


def vit_kwargs(vit: nn.Module) -> dict:
    """``VisionTransformer`` constructor arguments that rebuild ``vit``'s structure."""
    from timm.layers import LayerScale
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    blk = vit.blocks[0]
    pe = vit.patch_embed
    norm = next((m for m in (vit.norm_pre, blk.norm1, vit.norm) if not isinstance(m, nn.Identity)))
    norm_name = next((n for n, f in _NORMS.items() if type(norm) is f()), None)
    if norm_name is None:
        raise TypeError(f"cannot export a ViT with norm layer {type(norm).__name__}")
    return {
        "img_size": list(pe.img_size) if pe.img_size is not None else None,
        "patch_size": list(pe.patch_size),
        "in_chans": pe.proj.in_channels,
        "global_pool": vit.global_pool,
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": blk.attn.num_heads,
        "mlp_ratio": blk.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": blk.attn.qkv.bias is not None,
        "qk_norm": not isinstance(blk.attn.q_norm, nn.Identity),
        "scale_attn_norm": not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity),
        "scale_mlp_norm": not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity),
        "proj_bias": blk.attn.proj.bias is not None,
        "init_values": 1.0 if isinstance(blk.ls1, LayerScale) else None,
        "class_token": vit.cls_token is not None,
        "pos_embed": "learn" if vit.pos_embed is not None else "none",
        "no_embed_class": bool(vit.no_embed_class),
        "reg_tokens": int(vit.num_reg_tokens),
        "pre_norm": not isinstance(vit.norm_pre, nn.Identity),
        "final_norm": not isinstance(vit.norm, nn.Identity),
        "fc_norm": not isinstance(vit.fc_norm, nn.Identity),
        "dynamic_img_size": bool(vit.dynamic_img_size),
        "dynamic_img_pad": bool(getattr(pe, "dynamic_img_pad", False)),
        "act_layer": _act_name(blk.mlp.act),
        "norm_layer": norm_name,
        "norm_eps": norm.eps,
    }


def _timm_layernorm():
    from timm.layers import LayerNorm
    return LayerNorm


_NORMS = {"layernorm": lambda: nn.LayerNorm, "timm_layernorm": _timm_layernorm}
_ACT_NAMES = ("gelu", "quick_gelu", "gelu_tanh", "silu", "swish", "relu", "tanh", "sigmoid",
              "hard_swish", "mish", "identity")


def _act_name(act: nn.Module) -> str:
    from timm.layers import get_act_layer

    z = torch.linspace(-6, 6, 97, dtype=torch.float64)
    with torch.no_grad():
        want = act(z)
        for name in _ACT_NAMES:  # the first whose timm layer computes the same function
            try:
                cand = get_act_layer(name)()
            except Exception:  # noqa: BLE001
                continue
            if torch.allclose(cand(z), want, rtol=0, atol=1e-12):
                return name
    raise TypeError(f"cannot export a ViT with activation {act!r}")


def _add_missing_biases(model, sd: dict) -> None:
    # Merging adds a bias to bias-free linears; give the rebuilt layer one where the file has it.
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is None and f"{name}.bias" in sd:
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype,
                                                device=mod.weight.device), requires_grad=False)


def _out_paths(out_path: PathLike) -> tuple[str, str]:
    out_path = os.fspath(out_path)
    if out_path.endswith(".safetensors"):
        return out_path, out_path[: -len(".safetensors")] + ".json"
    os.makedirs(out_path, exist_ok=True)
    return os.path.join(out_path, "model.safetensors"), os.path.join(out_path, "config.json")


def _in_paths(path: PathLike) -> tuple[str, Optional[str]]:
    path = os.fspath(path)
    if os.path.isdir(path):
        w, c = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
    elif path.endswith(".json"):
        c = path
        try:
            with open(c) as f:
                name = json.load(f).get("weights")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{c} is not a valid zeroi2v config: {e}") from e
        w = os.path.join(os.path.dirname(c), name) if name else c[: -len(".json")] + ".safetensors"
    else:
        w = path
        c = path[: -len(".safetensors")] + ".json" if path.endswith(".safetensors") else None
    if not os.path.isfile(w):
        raise FileNotFoundError(f"merged weights not found: {w}")
    return w, c


# ----------------------------------------------------------------------------- graph exports


@contextlib.contextmanager
def export_mode(model, example: torch.Tensor):
    """Eval mode and every attention on the pure-PyTorch ``"torch"`` STDHA backend (slices,
    concatenation and SDPA: standard ops)."""
    attns = [blk.attn for blk in model.backbone.blocks]
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
    from ..models.merge import merge_adapters

    if merge and not model.merged:
        model = merge_adapters(model)
    with export_mode(model, example):
        return torch.export.export(model, (example,))


def export_onnx(model, example: torch.Tensor, out_path: PathLike, *, merge: bool = True,
                opset_version: int = 17, dynamo: Optional[bool] = None) -> str:
    """Export the (merged) model to ONNX (input ``video`` (B, C, T, H, W) -> ``logits``), shapes
    fixed to ``example``'s.

    ``dynamo=None`` uses the dynamo-based exporter when ``onnxscript`` is installed and the
    TorchScript-based one (``dynamo=False``) otherwise; STDHA exports as slices and concatenations of K/V heads
    followed by standard attention ops either way.
    """
    import warnings

    from ..models.merge import merge_adapters

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
