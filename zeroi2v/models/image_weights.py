"""Image weights (OpenAI CLIP, open_clip, timm) from a local file into a timm ViT (docs/method.md §6).

The key mapping is timm's own, the one the model's family names (``Family.image_filter_path``).
For ViTs, :func:`timm.models.vision_transformer.checkpoint_filter_fn` recognises OpenAI CLIP
(``visual.*``, via timm's ``_convert_openai_clip``; ``visual.proj`` becomes ``head.weight``),
open_clip models with a timm trunk (``visual.trunk.*``) and plain timm state dicts, and
resamples the position embedding when the image size differs (refused here unless asked).
"""
from __future__ import annotations

import os
import re
from typing import Union

import torch
from torch import nn

from ..safe_io import PathLike, check_state_dict, read_state_dict
from .families import family_of

_HEAD_PREFIXES = ("head.",)
_ADAPTER_KEY = re.compile(r"\.adapter\.")


def load_clip_weights(backbone_or_name: Union[str, nn.Module], path: PathLike, *,
                      resample: bool = False, **timm_kwargs) -> nn.Module:
    """Load CLIP/timm image weights from the local file ``path`` into a timm ViT.

    Args:
        backbone_or_name: a timm ``VisionTransformer``, a :class:`~zeroi2v.ZeroI2VViT` (its
            backbone is loaded, adapters are left as they are), or a timm model name such as
            ``"vit_base_patch16_clip_quickgelu_224"`` (created without a head, ``num_classes=0``,
            unless ``timm_kwargs`` say otherwise).
        path: OpenAI's TorchScript archive (``ViT-B-16.pt``) or state dict, an open_clip
            checkpoint, a timm ``.pth``/``.bin``/``.safetensors`` file.
        resample: allow timm to interpolate the position embedding (and patch kernel) to the
            model's image/patch size; by default a size difference is an error.

    The file is read without running code (:func:`zeroi2v.safe_io.read_checkpoint`).

    The classifier is loaded only when the model has one of the same shape (OpenAI's
    ``visual.proj`` is the head of a timm CLIP model built with ``num_classes=embed dim``);
    otherwise it is ignored. Any other missing key, unexpected key or shape difference is a
    ``ValueError`` naming the key. Returns the model that was loaded (created when a name was
    given).
    """
    if isinstance(backbone_or_name, str):
        import timm

        from .timm_args import check_model_name, check_timm_kwargs

        num_classes = timm_kwargs.pop("num_classes", 0)
        check_model_name(backbone_or_name, "load_clip_weights")
        check_timm_kwargs(timm_kwargs, "load_clip_weights", allow_classes=True)
        model = timm.create_model(backbone_or_name, pretrained=False, num_classes=num_classes,
                                  **timm_kwargs)
        target = model
    elif isinstance(getattr(backbone_or_name, "backbone", None), nn.Module):  # a ZeroI2VViT
        model, target = backbone_or_name, backbone_or_name.backbone
    elif isinstance(backbone_or_name, nn.Module):
        model = target = backbone_or_name
    else:
        raise TypeError("backbone_or_name must be a timm model name or an nn.Module, got "
                        f"{type(backbone_or_name).__name__}")
    load_image_state_dict(target, read_state_dict(path), path,
                          resample=resample)
    return model


def load_image_state_dict(vit: nn.Module, state_dict: dict, path: PathLike = "<state dict>", *,
                          resample: bool = False) -> None:
    """Convert ``state_dict`` with timm's filter for the model's family and load it into ``vit``
    (checked, see above)."""
    checkpoint_filter_fn = family_of(vit).image_filter()
    path = os.fspath(path)
    if not resample:
        _check_sizes(vit, state_dict, path)
    try:
        sd = checkpoint_filter_fn(dict(state_dict), vit)
    except Exception as e:  # noqa: BLE001 - timm's converters assume a well-formed file
        raise ValueError(f"{path}: cannot convert the weights for this model: "
                         f"{type(e).__name__}: {e}") from e
    own = vit.state_dict()
    for k in [k for k in sd if k.startswith(_HEAD_PREFIXES)]:
        if k not in own or own[k].shape != sd[k].shape:
            del sd[k]
    hint = ""
    if not any(k in own for k in sd):
        hint = f" (the file's keys look like {list(state_dict)[:3]}: not an image ViT checkpoint?)"
    check_state_dict(own, sd, path, optional=_optional, hint=hint)
    with torch.no_grad():
        vit.load_state_dict(sd, strict=False)


def _optional(key: str) -> bool:
    # the video model's adapters are not part of an image checkpoint; nor is a classifier
    return key.startswith(_HEAD_PREFIXES) or _ADAPTER_KEY.search(key) is not None


# raw key -> (timm key, how many leading dims the raw tensor lacks)
_POS_KEYS = {"visual.positional_embedding": 1, "module.visual.positional_embedding": 1,
             "pos_embed": 0, "visual.trunk.pos_embed": 0, "module.visual.trunk.pos_embed": 0}
_PATCH_KEYS = ("visual.conv1.weight", "module.visual.conv1.weight", "patch_embed.proj.weight",
               "visual.trunk.patch_embed.proj.weight", "module.visual.trunk.patch_embed.proj.weight")


def _check_sizes(vit: nn.Module, sd: dict, path: str) -> None:
    """timm's filter silently resamples position embeddings and patch kernels; refuse instead."""
    for k, lead in _POS_KEYS.items():
        if k in sd and vit.pos_embed is not None:
            shape = (1,) * lead + tuple(sd[k].shape)
            if shape != tuple(vit.pos_embed.shape):
                raise ValueError(
                    f"{path} does not match the model: key 'pos_embed' ({k!r}) has shape {shape} "
                    f"in the file, the model expects {tuple(vit.pos_embed.shape)} (another image "
                    "or patch size? pass resample=True to interpolate)")
    for k in _PATCH_KEYS:
        if k in sd and sd[k].dim() == 4:
            want = tuple(vit.patch_embed.proj.weight.shape)
            if tuple(sd[k].shape) != want:
                raise ValueError(
                    f"{path} does not match the model: key 'patch_embed.proj.weight' ({k!r}) has "
                    f"shape {tuple(sd[k].shape)} in the file, the model expects {want}")
