"""Build models and datasets from a :class:`RunConfig`; rebuild saved models for evaluation and
prediction."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from ..models.artefact import Artefact, model_from_artefact, read_artefact, read_run_config
from ..models.config import ZeroI2VConfig
from ..models.video_vit import ZeroI2VViT
from .config import ModelSection, RunConfig, deep_update, load_config


def model_config(m: ModelSection, num_classes: int,
                 class_names: Optional[Sequence[str]] = None) -> ZeroI2VConfig:
    """The :class:`ZeroI2VConfig` that a run config's ``model`` section describes."""
    if num_classes is None or isinstance(num_classes, bool) or int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return ZeroI2VConfig(
        model_name=m.name, timm_kwargs=dict(m.timm_kwargs), num_frames=m.num_frames,
        num_classes=int(num_classes), head_offsets=m.head_offsets,
        adapter_ratio=m.adapter_ratio, adapter_scale=m.adapter_scale,
        adapter_dropout=m.adapter_dropout, head_dropout=m.head_dropout,
        class_names=tuple(class_names) if class_names is not None else None)


def build_model(m: ModelSection, num_classes: int, pretrained: Union[bool, str, None] = None,
                load_pretrained: bool = True,
                class_names: Optional[Sequence[str]] = None) -> ZeroI2VViT:
    """A :class:`ZeroI2VViT` from the ``model`` section (``pretrained`` overrides
    ``model.pretrained``: ``True`` for timm's weights of the tagged name from the Hub cache, a
    local file, or ``hf-hub:ORG/NAME:FILE``; see :meth:`ZeroI2VViT.load_pretrained`)."""
    from ..models import hub

    config = model_config(m, num_classes, class_names)
    source = pretrained if pretrained is not None else m.pretrained
    source = None if source is False or not load_pretrained else source
    if isinstance(source, str) and not hub.is_hub_id(source) and not os.path.isfile(source):
        raise FileNotFoundError(
            f"pretrained image-model file not found: {source} (set model.pretrained or "
            "--pretrained)")
    # found (or fetched from the Hub) before the model is built: a missing file fails at once
    found = hub.resolve_pretrained(source, m.name) if source is not None else None
    model = ZeroI2VViT.from_config(config)
    if found is not None:
        model.load_pretrained_file(*found)
    if m.train_backbone:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def run_config_for(art: Artefact) -> RunConfig:
    """The run config of a saved model: its ``run_config.yaml`` when it has one (a training
    checkpoint, or a model merged from one), else the defaults around the model's config. The
    ``model`` section always restates the saved model's config."""
    base = read_run_config(art)
    c = art.config
    restated = {"model": {"name": c.model_name, "timm_kwargs": dict(c.timm_kwargs or {}),
                          "num_frames": c.num_frames, "num_classes": c.num_classes,
                          "head_offsets": list(c.head_offsets), "adapter_ratio": c.adapter_ratio,
                          "adapter_scale": c.adapter_scale, "adapter_dropout": c.adapter_dropout,
                          "head_dropout": c.head_dropout}}
    if base is None:
        img = (c.timm_kwargs or {}).get("img_size")
        if img is not None:
            restated["data"] = {"size": int(img[0] if isinstance(img, (list, tuple)) else img)}
    return load_config(None, base=deep_update(base or {}, restated))


def load_model_and_run_config(path: Union[str, os.PathLike], pretrained: Optional[str] = None,
                       device: Union[str, torch.device] = "cpu"
                       ) -> tuple[ZeroI2VViT, RunConfig, Artefact]:
    """``(model, run config, artefact)`` for any saved model: a folder written by
    ``save_pretrained``/``merge``/``import-official``, a training checkpoint folder (or a run's
    output folder: its ``last`` checkpoint), their ``model.safetensors``/``config.json``, or a
    model on the Hub, ``hf-hub:ORG/NAME[@REVISION]``."""
    from ..models.hub import is_hub_id
    from .checkpoint import checkpoint_folder

    if is_hub_id(path):  # hf-hub:ORG/NAME[@REV]: read_artefact fetches it through the cache
        art = read_artefact(path)
    else:
        p = Path(path)
        art = read_artefact(checkpoint_folder(p) if p.is_dir() else p)
    model = model_from_artefact(art, pretrained=pretrained, device=device)
    return model, run_config_for(art), art


# ----------------------------------------------------------------------------- data


def build_train_dataset(cfg: RunConfig):
    """The training dataset the ``data`` section describes (clips of ``model.num_frames``)."""
    from ..data import build_dataset

    d = cfg.data
    if not d.train_ann:
        raise ValueError("data.train_ann is not set (the training annotation file)")
    ds = build_dataset(
        d.train_ann, d.root or "", num_frames=cfg.model.num_frames, sampling=d.sampling,
        frame_interval=d.frame_interval, num_clips=d.train_clips, train=True, size=d.size,
        short_side=d.short_side, num_crops=1, rand_augment=d.rand_augment,
        random_erasing=d.random_erasing, flip=d.flip, flip_label_map=d.flip_label_map,
        on_error=d.on_error, seed=cfg.train.seed, decoder=d.decoder,
        num_classes=cfg.model.num_classes)
    return _sharded_train_stream(cfg, ds)


def _sharded_train_stream(cfg: RunConfig, ds):
    """Sharded data (``data.train_ann`` is a shard index): this rank's epochs over the shards
    (``zeroi2v.data.ShardStream``: every video once per epoch across ranks and workers, the
    same length on every rank); other datasets are returned as they are."""
    from ..data import ShardedVideoDataset, ShardStream

    if not isinstance(ds, ShardedVideoDataset):
        return ds
    return ShardStream(ds, shuffle_buffer=cfg.data.shuffle_buffer, batch_size=cfg.train.batch_size)


def test_annotations(cfg: RunConfig, ann: Optional[str] = None) -> str:
    """The annotation file ``zeroi2v eval`` evaluates: ``ann`` (``--ann``), else
    ``data.test_ann``, else ``data.val_ann``."""
    ann = ann or cfg.data.test_ann or cfg.data.val_ann
    if not ann:
        raise ValueError("no annotation file to evaluate: pass --ann, or set data.test_ann or "
                         "data.val_ann")
    return ann


def build_test_dataset(cfg: RunConfig, ann_file: str, root: Optional[str] = None):
    """A test-mode dataset over ``ann_file``: ``eval.num_clips`` x ``eval.num_crops`` views,
    short side resized to ``eval.short_side`` (default ``data.size``) before the crops."""
    from ..data import build_dataset

    d, e = cfg.data, cfg.eval
    root = root if root is not None else (d.val_root or d.root or "")
    return build_dataset(
        ann_file, root, num_frames=cfg.model.num_frames, sampling=d.sampling,
        frame_interval=d.frame_interval, num_clips=e.num_clips, train=False, size=d.size,
        short_side=None, num_crops=e.num_crops, rand_augment=None, random_erasing=0.0,
        flip=False, on_error=d.on_error, seed=cfg.train.seed, decoder=d.decoder,
        num_classes=cfg.model.num_classes, test_short_side=e.short_side)


def dataset_num_classes(ds) -> Optional[int]:
    n = getattr(ds, "num_classes", None)
    if n:
        return int(n)
    samples: Sequence = getattr(ds, "samples", None) or []
    return max(int(s[1]) for s in samples) + 1 if samples else None


def video_views(video: Union[str, os.PathLike], cfg: RunConfig) -> torch.Tensor:
    """The test-time views of one video file, ``(views, C, T, H, W)`` float32, exactly as
    evaluation prepares them (``cfg``: the model's run config, e.g. from
    :func:`load_model_and_run_config`): what ``zeroi2v predict`` feeds the model, and what an
    exported model (``zeroi2v export``) takes as its ``video`` input."""
    import tempfile

    from ..data.decoders import VideoDecodeError

    vp = Path(video)
    if not vp.exists():
        raise FileNotFoundError(f"video not found: {vp}")
    if not vp.is_file():  # a FIFO would block the decoder, a device never end
        raise ValueError(f"{vp} is not a video file (a folder, FIFO or device)")
    with tempfile.TemporaryDirectory() as tmp:
        # a link with a plain name: the annotation format cannot hold every file name
        link = Path(tmp) / ("video" + "".join(c for c in vp.suffix if c.isalnum() or c == "."))
        link.symlink_to(vp.resolve())
        ann = Path(tmp) / "one.txt"
        ann.write_text(f"{link.name} 0\n")
        c = cfg.model_copy(deep=True)
        c.data.on_error = "raise"
        try:
            views, _ = build_test_dataset(c, str(ann), tmp)[0]
        except VideoDecodeError as e:  # named as the user named it, not by the link
            raise type(e)(str(vp), e.reason.replace(str(link), str(vp))) from None
    return views if views.dim() == 5 else views.unsqueeze(0)
