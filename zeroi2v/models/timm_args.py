"""The timm constructor arguments a zeroi2v model may record: architecture data, never a door.

``timm.create_model(name, **kwargs)`` forwards its keyword arguments to the model class, and
some of them make timm read files, the network or the hub (``checkpoint_path``,
``pretrained_cfg_overlay``, ``cache_dir`` ...) or resolve names to code. A ``config.json`` or a
YAML file is data, so its ``timm_kwargs`` are checked against :data:`ALLOWED`: sizes and counts
(with ranges), rates, booleans and layer names from a fixed vocabulary. Anything else is refused
with one line naming the key, before timm is called.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import closest
from ..limits import MAX_DEPTH
from ..safe_io import short_repr

#: Activation and normalisation layers by the names timm resolves (``act_layer: gelu``).
ACT_LAYERS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "relu6", "leaky_relu", "elu", "celu",
              "selu", "silu", "swish", "mish", "sigmoid", "tanh", "hard_sigmoid", "hard_swish",
              "hard_mish", "identity", "prelu")
NORM_LAYERS = ("layernorm", "layernorm2d", "layernormfp32", "rmsnorm", "rmsnorm2d",
               "rmsnormfp32", "simplenorm", "groupnorm", "groupnorm1", "batchnorm",
               "batchnorm2d")

# (kind, details): "int" (lo, hi), "size" (lo, hi) an int or a list of two, "float" (lo, hi)
# closed, "rate" [0, 1), "bool", "choice" (values,), "ints" (length, lo, hi). "?" after the
# kind: None is allowed too.
_ALLOWED_SPEC: dict[str, tuple] = {
    # shapes
    "img_size": ("size", 1, 8192), "patch_size": ("size", 1, 1024), "in_chans": ("int", 1, 64),
    "embed_dim": ("int", 1, 16384), "depth": ("int", 1, MAX_DEPTH), "num_heads": ("int", 1, 1024),
    "num_kv_heads": ("int?", 1, 1024), "mlp_ratio": ("float", 1e-3, 64.0),
    "reg_tokens": ("int", 0, 1024), "num_reg_tokens": ("int", 0, 1024),
    "swiglu_align_to": ("int", 0, 1024), "ref_feat_shape": ("ints?", 2, 1, 1024),
    "attn_pool_num_heads": ("int?", 1, 1024), "attn_pool_mlp_ratio": ("float?", 1e-3, 64.0),
    # switches
    **{k: ("bool", ) for k in (
        "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "class_token",
        "no_embed_class", "pre_norm", "final_norm", "pool_include_prefix", "dynamic_img_size",
        "dynamic_img_pad", "fix_init", "qkv_fused", "swiglu_mlp", "scale_mlp",
        "scale_attn_inner", "attn_only_layer_scale", "use_abs_pos_emb", "use_rot_pos_emb",
        "rope_rotate_half", "use_post_norm", "use_pre_transformer_norm", "use_rel_pos_bias",
        "use_shared_rel_pos_bias")},
    **{k: ("bool?", ) for k in ("fc_norm", "use_fc_norm", "use_post_transformer_norm")},
    # rates and scales
    **{k: ("rate", ) for k in ("drop_rate", "pos_drop_rate", "patch_drop_rate",
                               "proj_drop_rate", "attn_drop_rate", "drop_path_rate")},
    "init_values": ("float?", 0.0, 10.0), "head_init_scale": ("float", 0.0, 10.0),
    "rope_temperature": ("float", 1e-3, 1e9), "rope_grid_offset": ("float", -1e3, 1e3),
    # names from fixed vocabularies
    "global_pool": ("choice", ("", "token", "avg", "max", "avgmax", "map")),
    "pos_embed": ("choice", ("learn", "none", "")),
    "weight_init": ("choice", ("", "jax", "jax_nlhb", "moco", "skip")),
    "act_layer": ("choice?", ACT_LAYERS), "norm_layer": ("choice?", NORM_LAYERS),
    "embed_norm_layer": ("choice?", NORM_LAYERS),
    "attn_type": ("choice", ("eva", "rope")), "rope_type": ("choice", ("cat", "mixed", "dinov3")),
    "rope_grid_indexing": ("choice", ("ij", "xy")),
}
ALLOWED = tuple(sorted(_ALLOWED_SPEC))

#: Keys refused with a reason of their own (everything not in ALLOWED is refused anyway).
_DOORS = {
    "checkpoint_path": "it makes timm load that file",
    "pretrained": "image weights come from model.pretrained (true, a local file or hf-hub:...)",
    "pretrained_cfg": "it makes timm fetch weights or configs",
    "pretrained_cfg_overlay": "it makes timm fetch weights or configs",
    "pretrained_strict": "it concerns timm loading weights, which zeroi2v does itself",
    "cache_dir": "it makes timm read and write a download cache",
    "num_classes": "the video head has its own num_classes",
    "features_only": "zeroi2v needs the whole transformer",
    "device": "zeroi2v places the model itself", "dtype": "zeroi2v sets dtypes itself",
}


def _fail(source: str, key: str, msg: str) -> None:
    # source "model" is a run config's section: its key reads model.timm_kwargs.X
    where = "model.timm_kwargs" if source == "model" else f"{source}: timm_kwargs"
    raise ValueError(f"{where}.{key}: {msg}")


def _check_number(source, key, v, lo, hi, integer: bool) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        _fail(source, key, f"must be {'an integer' if integer else 'a number'}, got {short_repr(v)}")
    if not math.isfinite(v) or not lo <= v <= hi:
        _fail(source, key, f"must be in [{lo}, {hi}], got {short_repr(v)}")
    return v


def check_timm_kwargs(kwargs: Mapping[str, Any], source: str = "model config", *,
                      allow_classes: bool = False) -> dict:
    """``kwargs`` if every key is an allowed architecture argument with a value of its kind and
    range, else a ``ValueError`` naming the key (and what to do instead). ``source`` starts the
    message (the file, or ``"model"`` for a run config's section). ``allow_classes``: arguments
    named ``*_layer`` / ``*_fn`` may also be classes or functions (Python callers passing their
    own code; such a model cannot be saved)."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{source}: timm_kwargs must be a mapping, got {type(kwargs).__name__}")
    out = {}
    for key, v in kwargs.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: timm_kwargs keys must be strings, got {short_repr(key)}")
        if key in _DOORS or key.startswith("pretrained"):
            _fail(source, key, f"not allowed ({_DOORS.get(key, _DOORS['pretrained_cfg'])})")
        if allow_classes and key.endswith(("_layer", "_fn")) and callable(v):
            out[key] = v  # a class from the caller's own code (block_fn=ResPostBlock ...)
            continue
        spec = _ALLOWED_SPEC.get(key)
        if spec is None:
            _fail(source, key, "not an architecture argument zeroi2v accepts"
                  f"{closest(key, ALLOWED)}; allowed: {', '.join(ALLOWED)}")
        kind, *detail = spec
        if kind.endswith("?"):
            kind = kind[:-1]
            if v is None:
                out[key] = None
                continue
        if kind == "bool":
            if not isinstance(v, bool):
                _fail(source, key, f"must be true or false, got {short_repr(v)}")
        elif kind in ("int", "float"):
            _check_number(source, key, v, *detail, integer=kind == "int")
        elif kind == "rate":
            _check_number(source, key, v, 0.0, 1.0, integer=False)
            if v >= 1.0:
                _fail(source, key, f"must be in [0, 1), got {short_repr(v)}")
        elif kind == "size":
            items = list(v) if isinstance(v, (list, tuple)) else [v]
            if len(items) not in (1, 2) or (isinstance(v, (list, tuple)) and len(items) != 2):
                _fail(source, key, f"must be an integer or a list of two, got {short_repr(v)}")
            for x in items:
                _check_number(source, key, x, *detail, integer=True)
            v = list(v) if isinstance(v, (list, tuple)) else v
        elif kind == "ints":
            n, lo, hi = detail
            if not isinstance(v, (list, tuple)) or len(v) != n:
                _fail(source, key, f"must be a list of {n} integers, got {short_repr(v)}")
            for x in v:
                _check_number(source, key, x, lo, hi, integer=True)
            v = list(v)
        elif kind == "choice":
            (values,) = detail
            if not isinstance(v, str) or v.lower() not in values:
                hint = closest(str(v), values) if isinstance(v, str) else ""
                named = " (layers are named, not imported)" if isinstance(v, str) and \
                    re.search(r"[.:/]", v) else ""
                _fail(source, key, f"{short_repr(v)} is not one of {list(values)}{named}{hint}")
            v = v.lower()
        out[key] = v
    return out


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9][A-Za-z0-9_\-]*)?")


def check_model_name(name: Any, source: str = "model config") -> str:
    """A timm architecture name, optionally with a pretrained tag (``vit_base_patch16_224`` or
    ``vit_base_patch16_224.augreg_in21k``): no hub (``hf-hub:``), folder or URL prefixes."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{source}: {short_repr(name)} must be a timm architecture name "
                         "(letters, digits, '_' and an optional '.tag'); hub ids, folders and "
                         "URLs are not model names")
    return name
