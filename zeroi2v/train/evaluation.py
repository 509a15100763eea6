"""Evaluation: per-video probabilities over test views, metrics sharded over ranks, and the
report files (results JSON, confusion matrix, per-class tables)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..data import LoadReport, VideoDecodeError, collate_videos
from ..progress import progress_bar
from ..safe_io import atomic_write_text
from . import dist as zdist
from .metrics import (
    average_views,
    classification_metrics,
    plot_confusion_matrix,
    write_per_class_tables,
)
from .runtime import autocast, check_interrupt, json_default, seed_worker


class ShardSampler(Sampler):
    """Rank ``r`` of ``w`` takes indices ``r, r+w, ...`` in order, without padding, so every sample
    is evaluated exactly once across ranks (unlike ``DistributedSampler``)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world = n, rank, world_size

    def indices(self) -> list[int]:
        return list(range(self.rank, self.n, self.world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


def batch_parts(batch):
    """``(video, label, LoadReport)`` from ``collate_videos`` or a plain ``(video, label)`` batch."""
    if len(batch) == 3:
        return batch
    video, label = batch
    return video, label, LoadReport()


@torch.no_grad()
def predict_probs(model: nn.Module, loader: DataLoader, device: torch.device,
                  amp: Optional[torch.dtype] = None, progress: bool = False,
                  desc: str = "eval", with_report: bool = False):
    """Per-video class probabilities (softmax averaged over views) and labels, in loader order.

    Batches are ``(B, C, T, H, W)`` (one view) or ``(B, V, C, T, H, W)`` (views flattened into the
    batch, then the softmax of the ``V`` views of each video is averaged), as ``(video, label)``
    or ``(video, label, LoadReport)`` (``zeroi2v.data.collate_videos``: dropped videos are absent).
    ``with_report=True`` also returns the summed ``LoadReport``.
    """
    was_training = model.training
    model.eval()
    probs, labels = [], []
    bar = progress_bar(len(loader), desc, progress)
    report = LoadReport()
    for batch in loader:
        video, label, rep = batch_parts(batch)
        report.add(rep)
        if video is None:  # every video of the batch was dropped
            bar.update(1)
            continue
        video = video.to(device, non_blocking=True)
        views = 1
        if video.dim() == 6:
            views = video.shape[1]
            video = video.flatten(0, 1)
        elif video.dim() != 5:
            raise ValueError(f"expected (B, C, T, H, W) or (B, V, C, T, H, W), got {tuple(video.shape)}")
        with autocast(device, amp):
            logits = model(video)
        probs.append(average_views(logits, views).cpu())
        labels.append(torch.as_tensor(label).long().cpu())
        bar.update(1)
        check_interrupt()
    bar.close()
    model.train(was_training)
    if not probs:
        out = torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    else:
        out = torch.cat(probs), torch.cat(labels)
    return (*out, report) if with_report else out


def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device,
             num_classes: int, amp: Optional[torch.dtype] = None, num_workers: int = 0,
             progress: bool = False, desc: str = "eval") -> dict:
    """Top-1/top-5/mean-class accuracy of ``model`` on ``dataset``, sharded over ranks.

    Every rank evaluates a disjoint slice; predictions are gathered by sample index so the metrics
    are exactly those of a single process. Unreadable videos (``VideoDataset`` in test mode never
    replaces one video by another) are left out of the metrics and reported: ``num_videos`` listed,
    ``num_samples`` evaluated, ``num_skipped`` and ``skipped`` (``{"path", "reason"}`` each),
    ``num_short`` (videos shorter than the clip, looped or padded). No readable video at all
    raises ``VideoDecodeError``.
    """
    rank = torch.distributed.get_rank() if zdist.is_dist() else 0
    world = torch.distributed.get_world_size() if zdist.is_dist() else 1
    sampler = ShardSampler(len(dataset), rank, world)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                        persistent_workers=False, collate_fn=collate_videos)
    probs, labels, report = predict_probs(model, loader, device, amp, progress and rank == 0, desc,
                                          with_report=True)
    dropped = {s.index for s in report.dropped}
    kept = [i for i in sampler.indices() if i not in dropped]
    if len(kept) != len(probs):
        raise RuntimeError(f"evaluation got {len(probs)} predictions for {len(kept)} readable videos")
    parts = zdist.all_gather_object((kept, probs.numpy(), labels.numpy(), report))
    n = len(dataset)
    all_probs = np.zeros((n, num_classes), dtype=np.float32)
    all_labels = np.full(n, -1, dtype=np.int64)
    skipped = sorted((s for *_, r in parts for s in r.dropped), key=lambda s: s.index)
    for idx, p, lab, _ in parts:
        if len(idx):
            all_probs[idx] = p
            all_labels[idx] = lab
    done = all_labels >= 0
    if int(done.sum()) + len(skipped) != n:
        raise RuntimeError("evaluation lost samples while gathering across ranks")
    if not done.any():
        first = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
        raise VideoDecodeError(f"none of the {n} videos could be read (e.g. {first})")
    metrics = classification_metrics(all_probs[done], all_labels[done], num_classes)
    metrics.update(num_videos=n, num_skipped=len(skipped), num_short=sum(r.short for *_, r in parts),
                   skipped=[{"path": s.path, "reason": s.reason} for s in skipped])
    metrics["probs"] = all_probs[done]
    metrics["labels"] = all_labels[done]
    metrics["indices"] = np.flatnonzero(done)
    return metrics


def write_eval_report(metrics: dict, out_json: os.PathLike,
                      class_names: Optional[Sequence[str]] = None, extra: Optional[dict] = None,
                      title: str = "Confusion matrix") -> dict:
    """Results JSON + ``<stem>_confusion.png`` + ``<stem>_per_class.{csv,md}`` beside it."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    prefix = out_json.with_suffix("")
    png = plot_confusion_matrix(metrics["confusion_matrix"], prefix.with_name(prefix.name + "_confusion.png"),
                                class_names, title=title)
    tables = write_per_class_tables(metrics, prefix, class_names)
    res = {k: v for k, v in metrics.items() if k not in ("probs", "labels", "indices")}
    res.update(extra or {})
    res["files"] = {"confusion_png": str(png), "per_class_csv": str(tables[0]),
                    "per_class_md": str(tables[1])}
    res = _rounded(res)
    atomic_write_text(out_json, json.dumps(res, indent=2, default=json_default))
    return res


def _rounded(x, digits: int = 4):
    """Floats to ``digits`` decimals (percentages to 1e-4 points, seconds to 0.1 ms)."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


def summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("top1", "top5", "mean_class_acc", "num_samples", "num_videos",
                                    "num_skipped") if k in metrics}


def metrics_text(m: dict) -> str:
    top5 = f" top5 {m['top5']:.2f}" if "top5" in m else ""
    return f"top1 {m['top1']:.2f}{top5} mca {m['mean_class_acc']:.2f}"


