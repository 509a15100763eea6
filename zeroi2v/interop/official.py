"""Import of official ZeroI2V checkpoints (mmaction2 layout, docs/method.md §6) into :class:`ZeroI2VViT`.

The official backbone is OpenAI's CLIP visual tower with four ``LinearAdapter``s per block
(``T_Adapter_in``, ``S_Adapter``, ``MLP_Adapter``, optionally ``MLP_Adapter_out``; each with
``D_fc1``/``D_fc2``), a ``temporal_embedding`` of shape (1, T, C), and an I3D head
``cls_head.fc_cls``. Its CLIP keys are renamed with timm's own OpenAI-CLIP converter; adapters,
temporal embedding and head map one to one. Checkpoints already reparameterized by the official
``tools/weight_reparam.py`` (no adapter keys) import as a merged model.

Neither the STDHA head offsets nor the adapter scale is stored in a checkpoint; they come from the
official configuration, picked by (model, frame count, class count) -- see :func:`official_config`
-- or from explicit arguments.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Optional

import torch

from ..models.config import ZeroI2VConfig
from ..models.families import adapter_owner
from ..models.video_vit import ZeroI2VViT
from ..offsets import PRESETS, HeadOffsets
from ..safe_io import PathLike, check_state_dict, read_state_dict

_BLOCK = "backbone.transformer.resblocks."
_REQUIRED = (
    "backbone.conv1.weight", "backbone.class_embedding", "backbone.positional_embedding",
    "backbone.ln_pre.weight", "backbone.ln_post.weight",
    _BLOCK + "0.attn.in_proj_weight", _BLOCK + "0.mlp.c_fc.weight", "cls_head.fc_cls.weight",
)
# official adapter module name -> this library's adapter slot (models.families.SLOTS)
_ADAPTERS = {"T_Adapter_in": "t_adapter", "S_Adapter": "s_adapter",
             "MLP_Adapter": "mlp_adapter", "MLP_Adapter_out": "mlp_adapter_out"}
_ADAPTER_RE = re.compile(r"^blocks\.(\d+)\.(T_Adapter_in|S_Adapter|MLP_Adapter|MLP_Adapter_out)"
                         r"\.D_fc([12])\.(weight|bias)$")
SSV2_CLASSES = 174

# The released configurations (docs/method.md §2, §4): (arch, frames, classes) -> (preset, adapter scale).
# Frame count alone does not determine the layout (a ViT-B/16 16-frame Kinetics config shifts only
# heads 0/1), so nothing outside this table is guessed.
RELEASED_CONFIGS: dict[tuple[str, int, int], tuple[str, float]] = {
    ("vit_b16", 8, 400): ("vit_b", 0.5),        # K400 8x16x1
    ("vit_b16", 8, 101): ("vit_b", 0.5),        # UCF101 u8
    ("vit_b16", 8, 51): ("vit_b", 0.5),         # HMDB51 u8
    ("vit_b16", 16, 174): ("vit_b_long", 1.0),  # SSv2 u16
    ("vit_b16", 32, 101): ("vit_b_long", 0.5),  # UCF101 u32
    ("vit_b16", 32, 51): ("vit_b_long", 0.5),   # HMDB51 u32
    ("vit_l14", 8, 400): ("vit_l", 0.5),        # K400 8x16x1
    ("vit_l14", 32, 400): ("vit_l_32f", 0.5),   # K400 32x4x1
    ("vit_l14", 32, 174): ("vit_l_long", 1.0),  # SSv2 u32
}
_ARCH_NAMES = {"vit_b16": "ViT-B/16", "vit_l14": "ViT-L/14"}
_TIMM_NAMES = {"vit_b16": "vit_base_patch16_clip_quickgelu_224",
               "vit_l14": "vit_large_patch14_clip_quickgelu_224"}


def _arch(width: int, layers: int, patch_size: int) -> Optional[str]:
    return {(768, 12, 16): "vit_b16", (1024, 24, 14): "vit_l14"}.get((width, layers, patch_size))


def official_config(width: int, layers: int, patch_size: int, num_frames: int,
                    num_classes: int) -> dict:
    """The released STDHA preset and adapter scale for a checkpoint of this shape.

    Only the nine released (backbone, frames, classes) combinations of :data:`RELEASED_CONFIGS`
    have a known layout; for any other, ``head_offsets`` is ``None`` (the caller must say) and the
    adapter scale is the recipe's (1.0 for 174-class SSv2, 0.5 otherwise, docs/method.md §3).
    """
    arch = _arch(width, layers, patch_size)
    preset, scale = RELEASED_CONFIGS.get((arch, num_frames, num_classes),
                                         (None, 1.0 if num_classes == SSV2_CLASSES else 0.5))
    return {"head_offsets": preset, "adapter_scale": scale, "timm_name": _TIMM_NAMES.get(arch)}


def released_layouts() -> str:
    """The released configurations, one phrase each (for error messages)."""
    return "; ".join(f"{_ARCH_NAMES[a]} {t} frames {k} classes: {p}"
                     for (a, t, k), (p, _) in RELEASED_CONFIGS.items())


def load_official_checkpoint(
    path: PathLike,
    *,
    num_frames: Optional[int] = None,
    head_offsets: HeadOffsets = None,
    adapter_scale: Optional[float] = None,
    num_classes: Optional[int] = None,
    model_name: Optional[str] = None,
    num_heads: Optional[int] = None,
    adapter_dropout: float = ZeroI2VConfig.adapter_dropout,
    head_dropout: float = ZeroI2VConfig.head_dropout,
):
    """Build a :class:`~zeroi2v.ZeroI2VViT` from an official ZeroI2V checkpoint, adapters kept.

    Everything that the checkpoint's shapes determine is inferred: width, depth, patch size,
    image size, MLP and adapter ratios, frame count (``temporal_embedding``), class count
    (``cls_head.fc_cls``), and which adapters exist. Head count: ``num_heads``, else the length of
    ``head_offsets`` (a list or preset name), else ``width // 64`` (CLIP's head width).
    ``head_offsets`` and ``adapter_scale`` default to the released configuration of the
    checkpoint's (backbone, frames, classes) (:data:`RELEASED_CONFIGS`); for any other
    combination ``head_offsets`` must be given (the error lists the released layouts).
    ``num_frames``/``num_classes``, when given, must agree with the checkpoint (use
    :meth:`ZeroI2VViT.set_num_frames` to re-target a model afterwards).
    ``model_name`` picks the timm architecture instead of the CLIP ViT built from the shapes.

    ``path`` may also be a file on the Hugging Face Hub, ``"hf-hub:ORG/REPO[@REV]:path/file.pth"``
    (through the Hub's cache, :func:`zeroi2v.models.hub.file_from_hub`; read like a local file).

    Errors (``ValueError``, naming ``path``): not a checkpoint; not the official layout (names
    the first missing key); a key whose shape differs from the model's (names the key and both
    shapes).
    """
    from ..models.hub import file_from_hub, is_hub_id

    if is_hub_id(path):
        path = file_from_hub(path)[0]
    path = os.fspath(path)
    sd = read_state_dict(path)
    return build_from_official_state_dict(
        sd, path=path, num_frames=num_frames, head_offsets=head_offsets,
        adapter_scale=adapter_scale, num_classes=num_classes, model_name=model_name,
        num_heads=num_heads, adapter_dropout=adapter_dropout, head_dropout=head_dropout)


def build_from_official_state_dict(sd: dict, *, path: str = "<state dict>", num_frames=None,
                                   head_offsets: HeadOffsets = None, adapter_scale=None,
                                   num_classes=None, model_name=None, num_heads=None,
                                   adapter_dropout: float = ZeroI2VConfig.adapter_dropout,
                                   head_dropout: float = ZeroI2VConfig.head_dropout):
    """:func:`load_official_checkpoint` on an already-loaded state dict: the configuration the
    shapes imply (:func:`infer_official_config`), the model it describes, and the checkpoint's
    tensors under this library's names (:func:`official_filter_fn`)."""
    config = infer_official_config(
        sd, path=path, num_frames=num_frames, head_offsets=head_offsets,
        adapter_scale=adapter_scale, num_classes=num_classes, model_name=model_name,
        num_heads=num_heads, adapter_dropout=adapter_dropout, head_dropout=head_dropout)
    # every key and shape is checked on a meta-device model before anything is allocated
    converted, source = official_filter_fn(sd, ZeroI2VViT.from_config(config, device="meta"))
    check_state_dict(ZeroI2VViT.from_config(config, device="meta").state_dict(), converted, path,
                     what="the ZeroI2V architecture", source=source)
    model = ZeroI2VViT.from_config(config)
    converted, source = official_filter_fn(sd, model)
    with torch.no_grad():
        model.load_state_dict(converted, strict=True)
    return model


def infer_official_config(sd: dict, *, path: str = "<state dict>", num_frames=None,
                          head_offsets: HeadOffsets = None, adapter_scale=None,
                          num_classes=None, model_name=None, num_heads=None,
                          adapter_dropout: float = ZeroI2VConfig.adapter_dropout,
                          head_dropout: float = ZeroI2VConfig.head_dropout) -> ZeroI2VConfig:
    """The :class:`ZeroI2VConfig` of an official checkpoint's state dict (arguments as
    :func:`load_official_checkpoint`; what they leave open comes from the shapes and
    :data:`RELEASED_CONFIGS`)."""
    for k in _REQUIRED:
        if k not in sd:
            raise ValueError(
                f"{path} is not an official ZeroI2V checkpoint (mmaction2 layout): missing key "
                f"{k!r}; its keys begin {sorted(sd)[:4]}")

    # ------------------------------------------------------------ shapes -> configuration
    conv = sd["backbone.conv1.weight"]
    if conv.dim() != 4:
        raise ValueError(f"{path}: backbone.conv1.weight should be a 4-D conv kernel, got shape "
                         f"{tuple(conv.shape)}")
    width, in_chans, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    layers = _count_blocks(sd, path)
    tokens = sd["backbone.positional_embedding"].shape[0]
    grid = math.isqrt(max(tokens - 1, 0))
    if grid * grid != tokens - 1:
        raise ValueError(f"{path}: backbone.positional_embedding has {tokens} tokens, not 1 + a "
                         "square grid")
    ckpt_classes = sd["cls_head.fc_cls.weight"].shape[0]
    te = sd.get("backbone.temporal_embedding")
    ckpt_frames = te.shape[1] if te is not None and te.dim() == 3 else None
    num_frames = num_frames if num_frames is not None else ckpt_frames
    if num_frames is None:
        raise ValueError(f"{path} has no backbone.temporal_embedding: pass num_frames=")
    num_classes = num_classes if num_classes is not None else ckpt_classes
    official = official_config(width, layers, patch, ckpt_frames or num_frames, ckpt_classes)
    if head_offsets is None:
        head_offsets = official["head_offsets"]
        if head_offsets is None:
            raise ValueError(
                f"{path}: a width-{width}, {layers}-layer, patch-{patch} model with "
                f"{ckpt_frames or num_frames} frames and {ckpt_classes} classes is not one of the "
                "released configurations, so its head offsets are unknown (they are not stored "
                "in the checkpoint): pass head_offsets= (--head-offsets: a list or one of "
                f"{sorted(PRESETS)}). Released: {released_layouts()}")
    if adapter_scale is None:
        adapter_scale = official["adapter_scale"]
    if num_heads is None:
        if isinstance(head_offsets, str) and head_offsets in PRESETS:
            num_heads = len(PRESETS[head_offsets])
        elif isinstance(head_offsets, (Sequence, torch.Tensor)) and not isinstance(head_offsets, str):
            num_heads = len(head_offsets)
        else:
            num_heads = max(1, width // 64)
    if width % num_heads:
        raise ValueError(f"{path}: width {width} is not divisible by {num_heads} heads")
    mlp_hidden = sd[_BLOCK + "0.mlp.c_fc.weight"].shape[0]
    a1 = sd.get(_BLOCK + "0.T_Adapter_in.D_fc1.weight")
    adapter_ratio = a1.shape[0] / width if a1 is not None else 0.25

    # ------------------------------------------------------------ model
    if model_name is not None:
        name, kwargs = model_name, {"img_size": grid * patch}
    else:
        name = official["timm_name"] or "vit_base_patch16_clip_quickgelu_224"
        kwargs = {"img_size": grid * patch, "patch_size": patch, "in_chans": in_chans,
                  "embed_dim": width, "depth": layers, "num_heads": num_heads,
                  "mlp_ratio": mlp_hidden / width}
    present = {(int(m.group(1)), m.group(2)) for k in sd
               if (m := re.match(re.escape(_BLOCK) + r"(\d+)\.(\w+)\.D_fc1\.weight$", k))}
    adapters = tuple(tuple(ours for off, ours in _ADAPTERS.items() if (i, off) in present)
                     for i in range(layers))
    # no adapter at all: reparameterized by the official tools/weight_reparam.py, a merged model
    merged = not any(adapters)
    return ZeroI2VConfig(
        model_name=name, timm_kwargs=kwargs, num_frames=num_frames, num_classes=num_classes,
        head_offsets=head_offsets, adapter_ratio=adapter_ratio, adapter_scale=adapter_scale,
        adapter_dropout=adapter_dropout, head_dropout=head_dropout, merged=merged,
        adapters=None if merged or all(len(a) == len(_ADAPTERS) for a in adapters) else adapters)


def _count_blocks(sd: dict, path: str) -> int:
    """The number of transformer blocks, once every block 0..L-1 is known to hold the keys of
    block 0 (a stray ``resblocks.99999.*`` key would otherwise ask for 100,000 blocks)."""
    blocks: dict[int, set] = {}
    for k in sd:
        m = re.match(re.escape(_BLOCK) + r"(\d+)\.(.+)$", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
    layers = max(blocks) + 1
    absent = [i for i in range(layers) if i not in blocks]
    if absent:
        stray = next(k for k in sorted(sd) if k.startswith(f"{_BLOCK}{layers - 1}."))
        raise ValueError(f"{path}: block keys run up to {stray!r}, but {len(absent):,} blocks "
                         f"between are missing (first: {_BLOCK}{absent[0]}.*): not a complete "
                         "official checkpoint")
    core = {k for k in blocks[0] if not _ADAPTER_RE.match(f"blocks.0.{k}")}
    for i in range(1, layers):
        lacking = sorted(core - blocks[i])
        if lacking:
            raise ValueError(f"{path}: block {i} lacks {_BLOCK}{i}.{lacking[0]} (block 0 has it):"
                             " not a complete official checkpoint")
    return layers


def official_filter_fn(sd: dict, model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The official checkpoint's tensors under ``model``'s state-dict names, and for each new
    name the official key it came from (for error messages). Preprocessor buffers are dropped."""
    from timm.models.vision_transformer import _convert_openai_clip

    converted: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    vit = model.backbone
    for k, v in sd.items():
        if k.startswith("cls_head.fc_cls."):
            new = "head." + k[len("cls_head.fc_cls."):]
        elif k == "backbone.temporal_embedding":
            new = "temporal_embedding"
        elif k.startswith("backbone."):
            (ck, v), = _convert_openai_clip({k: v}, vit, prefix="backbone.").items()
            m = _ADAPTER_RE.match(ck)
            if m:
                i = int(m.group(1))
                owner = adapter_owner(vit.blocks[i], _ADAPTERS[m.group(2)])
                ck = f"blocks.{i}.{owner}.adapter.fc{m.group(3)}.{m.group(4)}"
            new = "backbone." + ck
        else:
            continue  # data_preprocessor buffers and the like
        converted[new], source[new] = v, k
    return converted, source
