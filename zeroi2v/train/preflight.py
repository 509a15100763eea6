"""Checks before a run writes anything: the config fits together, the files it names exist and
parse, and what it will ask of the machine fits the memory limit (:mod:`zeroi2v.limits`).

Everything here reads text files and builds models on the meta device only: no weights, no
videos decoded, nothing allocated that scales with the request.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from torch import nn

from ..data.annotations import read_annotations
from ..data.decoders import decoder_status
from ..data.shards import is_shard_index
from ..data.video_io import open_video
from ..limits import check_bytes
from ..models import hub, timm_spec
from ..models.video_vit import parameter_count
from ..offsets import check_offsets, resolve_offsets
from .build import model_config


def preflight(cfg, model: Optional[nn.Module] = None, datasets: Optional[dict] = None) -> None:
    """Cross-field checks before any work starts: the model exists in timm and takes the kwargs,
    the head offsets fit the heads and the frame count, the image size matches the data, the
    annotation files exist and their labels make a model and a batch that fit in memory."""
    mcfg, dcfg = cfg.model, cfg.data
    vit = None
    if model is None:
        vit = timm_spec.create(mcfg.name, dict(mcfg.timm_kwargs), device="meta")
        blocks = getattr(vit, "blocks", None)
        attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
        if attn is not None and hasattr(attn, "num_heads"):
            try:
                offsets = resolve_offsets(mcfg.head_offsets, attn.num_heads, mcfg.num_frames)
                check_offsets(offsets, mcfg.num_frames)
            except ValueError as e:
                raise ValueError(f"model.head_offsets / model.num_frames: {e}") from None
        pe = getattr(vit, "patch_embed", None)
        img = getattr(pe, "img_size", None)
        if img is not None and not (datasets or {}).get("train") and \
                not getattr(vit, "dynamic_img_size", False) and \
                tuple(img) != (dcfg.size, dcfg.size):
            raise ValueError(
                f"data.size is {dcfg.size} but {mcfg.name} takes {img[0]}x{img[1]} images: "
                f"set data.size: {img[0]}, or model.timm_kwargs.img_size: {dcfg.size} (with a "
                "pretrained file, its position embedding must match)")
    if mcfg.pretrained is True or hub.is_hub_id(mcfg.pretrained):
        try:  # fetched into the Hub's cache now (once): no network and no cache fails here
            hub.resolve_pretrained(mcfg.pretrained, mcfg.name)
        except (ValueError, FileNotFoundError) as e:
            kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
            raise kind(f"model.pretrained: {e}") from None
    elif mcfg.pretrained and not Path(mcfg.pretrained).is_file():
        raise FileNotFoundError(f"model.pretrained: image-model file not found: {mcfg.pretrained}")
    largest = None
    if not (datasets or {}).get("train"):
        if not dcfg.train_ann:
            raise ValueError("data.train_ann is not set (the training annotation file)")
        for key in ("train_ann", "val_ann"):
            path = getattr(dcfg, key)
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"data.{key}: annotation file not found: {path}")
        largest = _check_annotations(cfg)
    if dcfg.class_names and not Path(dcfg.class_names).is_file():
        raise FileNotFoundError(f"data.class_names: file not found: {dcfg.class_names}")
    if vit is not None:
        _check_memory(cfg, vit, largest)


def _check_annotations(cfg) -> Optional[tuple[int, str, int]]:
    """Parse every line of the annotation files (a bad line is an error naming file and line),
    check labels against ``model.num_classes`` when set, and stat (never decode) the videos
    they list: none found is an error (``data.root`` is wrong), some missing is said once (they
    are then handled by ``data.on_error``; with ``raise`` it is an error). Returns ``(label,
    file, line)`` of the largest label."""
    d, n_classes = cfg.data, cfg.model.num_classes
    best = None
    for key, root in (("train_ann", d.root), ("val_ann", d.val_root or d.root)):
        path = getattr(d, key)
        if not path:
            continue
        if is_shard_index(path):
            top = _check_shard_index(path, key, n_classes)
            if best is None or top > best[0]:
                best = (top, path)
            continue
        samples = read_annotations(path)
        if not samples:
            raise ValueError(f"data.{key}: {path} lists no videos")
        top = max(label for _, label in samples)
        if n_classes is not None and top >= n_classes:
            raise ValueError(f"data.{key}: {path} line {_line_of_label(path, top)} has label "
                             f"{top}, but model.num_classes is {n_classes} (labels are 0 .. "
                             f"{n_classes - 1}): fix the label or model.num_classes")
        if best is None or top > best[0]:
            best = (top, path)
        missing = [rel for rel, _ in samples if not os.path.isfile(os.path.join(root or "", rel))]
        if len(missing) == len(samples):
            raise FileNotFoundError(
                f"data.{key}: none of the {len(samples)} videos {path} lists exists under "
                f"data.{'root' if key == 'train_ann' else 'val_root'} = {root!r} (first: "
                f"{os.path.join(root or '', missing[0])}): is the root right?")
        if missing and d.on_error == "raise":
            raise FileNotFoundError(f"data.{key}: {len(missing)} of the {len(samples)} videos "
                                    f"{path} lists are missing (first: {missing[0]}) and "
                                    "data.on_error is raise")
        if missing:
            print(f"note: {len(missing)} of the {len(samples)} videos in {path} are missing "
                  f"(first: {missing[0]}); data.on_error={d.on_error} handles them", flush=True)
    _probe_decoder(cfg)
    if best is None:
        return None
    line = 0 if is_shard_index(best[1]) else _line_of_label(best[1], best[0])
    return best[0], best[1], line


def _check_shard_index(path: str, key: str, n_classes: Optional[int]) -> int:
    """A shard index is read and checked whole (its shards present, with the sizes it records);
    returns its largest label."""
    from ..data.shards import ShardIndex

    try:
        index = ShardIndex.load(path)
    except ValueError as e:
        raise ValueError(f"data.{key}: {e}") from None
    top = int(index.labels.max())
    if n_classes is not None and top >= n_classes:
        raise ValueError(f"data.{key}: {path} has label {top}, but model.num_classes is "
                         f"{n_classes} (labels are 0 .. {n_classes - 1}): fix "
                         "model.num_classes")
    return top


def _first_videos(d, limit: int = 50):
    """``(name, path a decoder opens)`` of the first training videos (from the shards when
    ``data.train_ann`` is a shard index)."""
    import os

    from ..data.annotations import read_annotations
    from ..data.shards import ShardIndex, is_shard_index

    if not is_shard_index(d.train_ann):
        for rel, _ in read_annotations(d.train_ann)[:limit]:
            path = os.path.join(d.root or "", rel)
            yield path, (contextlib.nullcontext(path) if os.path.isfile(path) else None)
        return
    index = ShardIndex.load(d.train_ann)
    for i in range(min(limit, len(index))):
        yield index.display(i), index.local_file(i)


def _probe_decoder(cfg) -> None:
    """Decode one frame of a real video of the data with ``data.decoder``, so that a decoder
    that cannot read these files stops the run now, not ten videos into the first epoch. Up to
    three files are tried (one damaged file is the on_error setting's business)."""
    d = cfg.data
    tried = []
    for path, opened in _first_videos(d):
        if opened is None:
            continue
        try:
            with opened as local:
                open_video(local, d.decoder).get_batch([0])
            return
        except Exception as e:  # noqa: BLE001 - a decoder's own error types; reported below
            tried.append(f"{path}: {str(e).strip().splitlines()[0] if str(e).strip() else e}")
        if len(tried) == 3:
            break
    if tried:
        usable = [k for k, v in decoder_status().items() if v is None]
        raise ValueError(f"data.decoder={d.decoder} could not read {len(tried)} of the training "
                         f"videos ({tried[0]}); decoders usable here: {usable}: check the files "
                         "or set data.decoder")


def _line_of_label(path: str, label: int) -> int:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) == 2 and not line.lstrip().startswith("#") and fields[1] == str(label):
                return n
    return 0


def _check_memory(cfg: dict, vit: nn.Module, largest: Optional[tuple[int, str, int]]) -> None:
    """The model (its parameters, plus gradients and AdamW moments of what trains), a lower
    bound of one training batch (the input clips and one activation per block) and of one
    evaluation batch (its views), and the confusion matrix must fit the memory limit. Each is
    refused with the numbers and the setting to change."""
    mcfg, dcfg, tcfg = cfg.model, cfg.data, cfg.train
    num_classes = mcfg.num_classes or (largest[0] + 1 if largest else 1)
    config = model_config(mcfg, num_classes)
    params, trainable = parameter_count(config)
    if largest is not None and not mcfg.num_classes:
        label, path, line = largest
        where = f"on line {line} of {path}" if line else f"in {path}"
        what = f"the model for {num_classes:,} classes (the largest label, {label}, is {where})"
        fix = "check that label, or set model.num_classes"
    else:
        what, fix = f"the model ({params:,} parameters)", "choose a smaller model"
    check_bytes(params * 4, what, fix=fix)
    dim = int(getattr(vit, "embed_dim", 0) or 0)
    depth = len(getattr(vit, "blocks", ()) or ())
    pe = getattr(vit, "patch_embed", None)
    tokens = int(getattr(pe, "num_patches", 0) or 0) + int(getattr(vit, "num_prefix_tokens", 1))
    frames = mcfg.num_frames * dcfg.train_clips
    clips = tcfg.batch_size * frames
    batch = clips * 3 * dcfg.size ** 2 * 4 + clips * tokens * dim * 4 * depth * 2
    trainable = params if mcfg.train_backbone else trainable
    check_bytes(params * 4 + trainable * 12 + batch,
                f"training ({params:,} parameters, and a batch of {tcfg.batch_size} x "
                f"{frames} frames of {dcfg.size}x{dcfg.size}, at least)",
                fix="lower train.batch_size, model.num_frames or data.size")
    e = cfg.eval
    views = e.num_clips * e.num_crops
    eval_clips = (e.batch_size or tcfg.batch_size) * views * mcfg.num_frames
    side = e.short_side or dcfg.size
    eval_batch = eval_clips * 3 * (dcfg.size ** 2 * 4 + side ** 2) + eval_clips * tokens * dim * 8
    check_bytes(params * 4 + eval_batch,
                f"evaluation (a batch of {e.batch_size or tcfg.batch_size} videos x {views} views "
                f"x {mcfg.num_frames} frames of {dcfg.size}x{dcfg.size}, at least)",
                fix="lower eval.batch_size, eval.num_clips or eval.num_crops")
    check_bytes(2 * 8 * num_classes ** 2,
                f"the confusion matrix of {num_classes:,} classes",
                fix="check the class count (model.num_classes, or the largest label)")
