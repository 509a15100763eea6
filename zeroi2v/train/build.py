"""Build models and datasets from a config; rebuild trained/merged models from their files."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..models.merge import merge_adapters
from ..models.video_vit import ZeroI2VViT, create_video_model
from .checkpoint import MERGED_FORMAT, TRAIN_FORMAT, load_file, load_model_state


def build_model(mcfg: dict, num_classes: int, pretrained: Optional[str] = None,
                load_pretrained: bool = True) -> ZeroI2VViT:
    """A :class:`ZeroI2VViT` from the ``model`` section (``pretrained`` overrides its path)."""
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    path = pretrained if pretrained is not None else mcfg.get("pretrained")
    if path is not None and load_pretrained and not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained image-model file not found: {path} (set model.pretrained or --pretrained)"
        )
    model = create_video_model(
        mcfg["name"], int(mcfg["num_frames"]), int(num_classes),
        head_offsets=_offsets(mcfg.get("head_offsets")),
        adapter_ratio=float(mcfg.get("adapter_ratio", 0.25)),
        adapter_scale=float(mcfg.get("adapter_scale", 0.5)),
        adapter_dropout=float(mcfg.get("adapter_dropout", 0.1)),
        head_dropout=float(mcfg.get("head_dropout", 0.5)),
        pretrained_file=path if load_pretrained else None,
        **dict(mcfg.get("timm_kwargs") or {}),
    )
    for i, name in mcfg.get("absent_adapters") or ():  # e.g. official checkpoints without some
        setattr(model.backbone.blocks[int(i)], str(name), None)
    if mcfg.get("train_backbone"):
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def config_from_model(model: ZeroI2VViT) -> dict:
    """A ``model`` config section that rebuilds ``model``'s architecture (used for imported
    models). Raises ``ValueError`` if the model cannot be described this way."""
    from ..models.video_vit import ADAPTER_NAMES

    vit = model.backbone
    name = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError("cannot tell which timm architecture the model was built from")
    blk0 = vit.blocks[0]
    adapters = [a for b in vit.blocks for a in (getattr(b, n) for n in ADAPTER_NAMES) if a is not None]
    ratio = adapters[0].hidden / adapters[0].dim if adapters else 0.25
    scale = adapters[0].scale if adapters else 0.5
    dropout = adapters[0].drop.p if adapters else 0.1
    pe = vit.patch_embed
    kw = {"img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
          "in_chans": pe.proj.in_channels, "embed_dim": vit.embed_dim, "depth": len(vit.blocks),
          "num_heads": blk0.attn.num_heads,
          "mlp_ratio": blk0.mlp.fc1.out_features / vit.embed_dim}
    absent = [[i, n] for i, b in enumerate(vit.blocks) for n in ADAPTER_NAMES if getattr(b, n) is None]
    return {"name": name, "pretrained": None, "timm_kwargs": kw, "num_frames": model.num_frames,
            "head_offsets": list(model.head_offsets), "adapter_ratio": ratio,
            "adapter_scale": scale, "adapter_dropout": dropout,
            "head_dropout": model.head_drop.p, "train_backbone": False,
            "num_classes": model.head.out_features, "absent_adapters": absent}


def _offsets(x: Any):
    if isinstance(x, (list, tuple)):
        return [int(v) for v in x]
    return x


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def image_model_params(mcfg: dict) -> int:
    """Parameter count of the plain timm image ViT (no classifier) that the model is built from."""
    import timm

    m = timm.create_model(mcfg["name"], pretrained=False, num_classes=0,
                          **dict(mcfg.get("timm_kwargs") or {}))
    return count_params(m)


def load_trained_model(path: Union[str, os.PathLike], pretrained: Optional[str] = None,
                       merge: bool = False) -> tuple[ZeroI2VViT, dict]:
    """Rebuild a model from a training checkpoint or a merged model file.

    Returns ``(model, meta)`` with ``meta`` holding ``config``, ``num_classes``, ``class_names``,
    ``format`` and ``merged``. A training checkpoint that stores only the trainable parameters
    needs the pretrained image file named in its config (or ``pretrained``).
    """
    ck = load_file(path, expect=(TRAIN_FORMAT, MERGED_FORMAT))
    cfg = copy.deepcopy(ck["config"])
    mcfg = cfg["model"]
    num_classes = int(ck["num_classes"])
    full = bool(ck.get("model_full", ck["format"] == MERGED_FORMAT))
    model = build_model(mcfg, num_classes, pretrained=pretrained, load_pretrained=not full)
    if ck["format"] == MERGED_FORMAT:
        model = merge_adapters(model, inplace=True)
    load_model_state(model, ck["model"], full=full, source=str(path))
    if merge and not model.merged:
        model = merge_adapters(model, inplace=True)
    model.eval()
    meta = {"config": cfg, "num_classes": num_classes, "class_names": ck.get("class_names"),
            "format": ck["format"], "merged": model.merged, "epoch": ck.get("epoch")}
    return model, meta


def merged_vs_unmerged_error(model, merged, num_videos: int = 2, seed: int = 0) -> float:
    """``max|merged(x) - model(x)| / max|model(x)|`` on random clips, both in eval mode."""
    import torch

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


def save_merged(merged, meta: dict, path, source: Optional[str] = None) -> Path:
    from .checkpoint import MERGED_FORMAT, atomic_save

    if not merged.merged:
        raise ValueError("save_merged needs a merged model (call merge_adapters first)")
    return atomic_save({"format": MERGED_FORMAT, "version": 1, "config": meta["config"],
                        "num_classes": meta["num_classes"], "class_names": meta.get("class_names"),
                        "model": {k: v.detach().cpu() for k, v in merged.state_dict().items()},
                        "merged_from": source}, path)


def read_class_names(path: Optional[Union[str, os.PathLike]]) -> Optional[list[str]]:
    """One class name per line; ``"<id> <name>"`` or ``"<id>,<name>"`` lines are also accepted."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class-name file not found: {p}")
    names = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        for sep in (",", "\t", " "):
            head, _, tail = line.partition(sep)
            if tail and head.isdigit():
                line = tail.strip()
                break
        names.append(line)
    return names


# ----------------------------------------------------------------------------- data


def _ra(x) -> Optional[tuple]:
    if x is None or x is False:
        return None
    return tuple(int(v) for v in x)


def _flip_map(x) -> Optional[dict]:
    if not x:
        return None
    m = {int(k): int(v) for k, v in dict(x).items()}
    for k, v in list(m.items()):  # the swap is symmetric
        m.setdefault(v, k)
    return m


def build_train_dataset(cfg: dict):
    from ..data import build_dataset

    d, m = cfg["data"], cfg["model"]
    if not d.get("train_ann"):
        raise ValueError("data.train_ann is not set (the training annotation file)")
    return build_dataset(
        d["train_ann"], d.get("root") or "", num_frames=int(m["num_frames"]),
        sampling=d.get("sampling", "dense"), frame_interval=int(d.get("frame_interval", 1)),
        num_clips=int(d.get("train_clips", 1)), train=True, size=int(d.get("size", 224)),
        short_side=int(d.get("short_side", 256)), num_crops=1,
        rand_augment=_ra(d.get("rand_augment")), random_erasing=float(d.get("random_erasing", 0)),
        flip=bool(d.get("flip", True)), flip_label_map=_flip_map(d.get("flip_label_map")),
        on_error=d.get("on_error", "skip"), **_extra(cfg),
    )


def _extra(cfg: dict) -> dict:
    kw = {"seed": int(cfg["train"].get("seed", 0)), "decoder": cfg["data"].get("decoder", "auto")}
    if cfg["model"].get("num_classes"):
        kw["num_classes"] = int(cfg["model"]["num_classes"])
    return kw


def build_test_dataset(cfg: dict, ann_file: str, root: Optional[str] = None):
    from ..data import build_dataset

    d, m, e = cfg["data"], cfg["model"], cfg["eval"]
    root = root if root is not None else (d.get("val_root") or d.get("root") or "")
    return build_dataset(
        ann_file, root, num_frames=int(m["num_frames"]),
        sampling=d.get("sampling", "dense"), frame_interval=int(d.get("frame_interval", 1)),
        num_clips=int(e.get("num_clips", 1)), train=False, size=int(d.get("size", 224)),
        short_side=int(e.get("short_side", d.get("size", 224))), num_crops=int(e.get("num_crops", 1)),
        rand_augment=None, random_erasing=0.0, flip=False, on_error=d.get("on_error", "skip"),
        **_extra(cfg),
    )


def dataset_num_classes(ds) -> Optional[int]:
    n = getattr(ds, "num_classes", None)
    if n:
        return int(n)
    samples: Sequence = getattr(ds, "samples", None) or []
    return max(int(s[1]) for s in samples) + 1 if samples else None
