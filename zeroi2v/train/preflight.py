"""Checks before a run writes anything: the config fits together, the files it names exist and
parse, and what it will ask of the machine fits the memory limit (:mod:`zeroi2v.limits`).

Everything here reads text files and builds models on the meta device only: no weights, no
videos decoded, nothing allocated that scales with the request.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from ..limits import check_bytes


def preflight(cfg: dict, model: Optional[nn.Module] = None, datasets: Optional[dict] = None) -> None:
    """Cross-field checks before any work starts: the model exists in timm and takes the kwargs,
    the head offsets fit the heads and the frame count, the image size matches the data, the
    annotation files exist and their labels make a model and a batch that fit in memory."""
    from ..models import timm_spec
    from ..offsets import check_offsets, resolve_offsets

    mcfg, dcfg = cfg["model"], cfg["data"]
    vit = None
    if model is None:
        vit = timm_spec.create(mcfg["name"], dict(mcfg["timm_kwargs"]), device="meta")
        blocks = getattr(vit, "blocks", None)
        attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
        if attn is not None and hasattr(attn, "num_heads"):
            try:
                offsets = resolve_offsets(mcfg["head_offsets"], attn.num_heads,
                                          int(mcfg["num_frames"]))
                check_offsets(offsets, int(mcfg["num_frames"]))
            except ValueError as e:
                raise ValueError(f"model.head_offsets / model.num_frames: {e}") from None
        pe = getattr(vit, "patch_embed", None)
        img = getattr(pe, "img_size", None)
        if img is not None and not (datasets or {}).get("train") and \
                not getattr(vit, "dynamic_img_size", False) and \
                tuple(img) != (dcfg["size"], dcfg["size"]):
            raise ValueError(
                f"data.size is {dcfg['size']} but {mcfg['name']} takes {img[0]}x{img[1]} images: "
                f"set data.size: {img[0]}, or model.timm_kwargs.img_size: {dcfg['size']} (with a "
                "pretrained file, its position embedding must match)")
    largest = None
    if not (datasets or {}).get("train"):
        if not dcfg.get("train_ann"):
            raise ValueError("data.train_ann is not set (the training annotation file)")
        for key in ("train_ann", "val_ann"):
            if dcfg.get(key) and not Path(dcfg[key]).is_file():
                raise FileNotFoundError(f"data.{key}: annotation file not found: {dcfg[key]}")
        largest = _largest_label(dcfg)
    if mcfg.get("pretrained") and not Path(mcfg["pretrained"]).is_file():
        raise FileNotFoundError(f"model.pretrained: image-model file not found: "
                                f"{mcfg['pretrained']}")
    if dcfg.get("class_names") and not Path(dcfg["class_names"]).is_file():
        raise FileNotFoundError(f"data.class_names: file not found: {dcfg['class_names']}")
    if vit is not None:
        _check_memory(cfg, vit, largest)


def _largest_label(dcfg: dict) -> Optional[tuple[int, str, int]]:
    """``(label, file, line)`` of the largest label in the annotation files (each line parsed;
    a bad line is an error naming the file and line)."""
    from ..data.annotations import read_annotations

    best = None
    for key in ("train_ann", "val_ann"):
        if not dcfg.get(key):
            continue
        labels = [label for _, label in read_annotations(dcfg[key])]
        if labels and (best is None or max(labels) > best[0]):
            best = (max(labels), dcfg[key])
    if best is None:
        return None
    return best[0], best[1], _line_of_label(best[1], best[0])


def _line_of_label(path: str, label: int) -> int:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) == 2 and not line.lstrip().startswith("#") and fields[1] == str(label):
                return n
    return 0


def _check_memory(cfg: dict, vit: nn.Module, largest: Optional[tuple[int, str, int]]) -> None:
    """The model (its parameters, plus gradients and AdamW moments of what trains) and a
    lower bound of one training batch (the input clips and one activation per block) must fit
    the memory limit. Both are refused with the numbers and the setting to change."""
    from ..models.video_vit import parameter_count
    from .build import model_config

    mcfg, dcfg, tcfg = cfg["model"], cfg["data"], cfg["train"]
    num_classes = mcfg.get("num_classes") or (largest[0] + 1 if largest else 1)
    config = model_config(mcfg, num_classes)
    params, trainable = parameter_count(config)
    if largest is not None and not mcfg.get("num_classes"):
        label, path, line = largest
        what = (f"the model for {num_classes:,} classes (the largest label, {label}, is on line "
                f"{line} of {path})")
        fix = "check that label, or set model.num_classes"
    else:
        what, fix = f"the model ({params:,} parameters)", "choose a smaller model"
    check_bytes(params * 4, what, fix=fix)
    dim = int(getattr(vit, "embed_dim", 0) or 0)
    depth = len(getattr(vit, "blocks", ()) or ())
    pe = getattr(vit, "patch_embed", None)
    tokens = int(getattr(pe, "num_patches", 0) or 0) + int(getattr(vit, "num_prefix_tokens", 1))
    frames = int(mcfg["num_frames"]) * int(dcfg["train_clips"])
    clips = int(tcfg["batch_size"]) * frames
    batch = clips * 3 * int(dcfg["size"]) ** 2 * 4 + clips * tokens * dim * 4 * depth * 2
    trainable = params if mcfg.get("train_backbone") else trainable
    check_bytes(params * 4 + trainable * 12 + batch,
                f"training ({params:,} parameters, and a batch of {tcfg['batch_size']} x "
                f"{frames} frames of {dcfg['size']}x{dcfg['size']}, at least)",
                fix="lower train.batch_size, model.num_frames or data.size")
