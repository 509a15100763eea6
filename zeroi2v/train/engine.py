"""Training and evaluation loops (single process, or DDP under ``torchrun``).

``train(cfg)`` runs the whole recipe: model and data from the config, AdamW with the recipe's
parameter groups, per-iteration warm-up + cosine LR, label smoothing, bf16 autocast on CUDA,
gradient accumulation and clipping, a JSON-lines log, per-epoch atomic checkpoints with every
state needed to resume exactly, and evaluation on ``data.val_ann``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from ..data import LoadReport, VideoDecodeError, collate_videos
from . import dist as zdist
from .build import (build_model, build_test_dataset, build_train_dataset, count_params,
                    dataset_num_classes, read_class_names)
from .checkpoint import (TRAIN_FORMAT, atomic_save, load_file, load_model_state, model_state,
                         rng_state, seed_everything, set_rng_state)
from .config import dump_config
from .metrics import average_views, classification_metrics, plot_confusion_matrix, \
    write_per_class_tables
from .optim import build_optimizer, build_scheduler, scaled_lr


# ----------------------------------------------------------------------------- small helpers


class JsonlLogger:
    """Append one JSON object per line (rank 0 only); every record gets a wall-clock ``time``."""

    def __init__(self, path: Optional[os.PathLike], enabled: bool = True):
        self.path = Path(path) if path is not None and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on CUDA, off elsewhere. ``bf16``/``fp16`` force it (on CUDA), ``off`` disables."""
    mode = str(mode).lower()
    if mode in ("off", "none", "false", "fp32", "no"):
        return None
    if device.type != "cuda":
        return None  # CPU autocast is slow and changes numerics; training on CPU stays in fp32
    if mode in ("auto", "bf16", "bfloat16", "true"):
        return torch.bfloat16
    if mode in ("fp16", "float16", "half"):
        return torch.float16
    raise ValueError(f"unknown amp mode {mode!r} (auto, bf16, fp16, off)")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


def _seed_worker(worker_id: int) -> None:
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------- evaluation


def _unpack(batch):
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
    report = LoadReport()
    for batch in _progress(loader, len(loader), desc, progress):
        video, label, rep = _unpack(batch)
        report.add(rep)
        if video is None:  # every video of the batch was dropped
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
                        pin_memory=device.type == "cuda", worker_init_fn=_seed_worker,
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
    for idx, p, l, _ in parts:
        if len(idx):
            all_probs[idx] = p
            all_labels[idx] = l
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
    out_json.write_text(json.dumps(res, indent=2, default=_json_default))
    return res


def summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("top1", "top5", "mean_class_acc", "num_samples", "num_videos",
                                    "num_skipped") if k in metrics}


# ----------------------------------------------------------------------------- training


def _unique_batch_check(n_batches: int, batch_size: int, accum: int) -> int:
    steps = n_batches // accum
    if steps < 1:
        raise ValueError(
            f"the training set gives {n_batches} full batches of {batch_size} per process, fewer "
            f"than accum_steps={accum}: lower train.batch_size / train.accum_steps or add data"
        )
    return steps


def train(cfg: dict, resume: Optional[str] = None,
          on_epoch_end: Optional[Callable[[int, dict], bool]] = None,
          datasets: Optional[dict] = None, model: Optional[nn.Module] = None) -> dict:
    """Run training from a full config (see :mod:`zeroi2v.train.config`).

    Args:
        resume: a checkpoint path, or ``"auto"`` for ``<out_dir>/last.pth`` if it exists.
        on_epoch_end: called as ``fn(epoch, record)`` after each epoch's checkpoint; returning
            ``True`` stops training (as does ``train.stop_after_epoch``).
        datasets: optional ``{"train": ds, "val": ds}`` to bypass the annotation files.
        model: optional pre-built model (must match ``cfg["model"]``).

    Returns a dict with the last epoch, step, train loss, validation metrics and checkpoint path.
    """
    info = zdist.init_distributed()
    try:
        return _train(cfg, info, resume, on_epoch_end, datasets, model)
    finally:
        zdist.cleanup(info)


def _train(cfg, info, resume, on_epoch_end, datasets, model) -> dict:
    tcfg, dcfg, ecfg, mcfg = cfg["train"], cfg["data"], cfg["eval"], cfg["model"]
    device = info.device
    out_dir = Path(tcfg["out_dir"])
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
    log = JsonlLogger(out_dir / "log.jsonl", enabled=info.is_main)
    show = bool(tcfg.get("progress", True)) and info.is_main
    seed = int(tcfg.get("seed", 0))
    seed_everything(seed + info.rank)
    if tcfg.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    # ---- data
    datasets = datasets or {}
    train_ds = datasets.get("train") or build_train_dataset(cfg)
    val_ds = datasets.get("val")
    if val_ds is None and dcfg.get("val_ann"):
        val_ds = build_test_dataset(cfg, dcfg["val_ann"])
    num_classes = mcfg.get("num_classes") or dataset_num_classes(train_ds)
    if val_ds is not None:
        num_classes = max(int(num_classes), dataset_num_classes(val_ds) or 0)
    num_classes = int(num_classes)
    class_names = read_class_names(dcfg.get("class_names")) if dcfg.get("class_names") else None

    bs, accum = int(tcfg["batch_size"]), max(1, int(tcfg.get("accum_steps", 1)))
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=seed, drop_last=False)
    nw = int(dcfg.get("num_workers", 0))
    loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=nw, drop_last=True,
                        pin_memory=bool(dcfg.get("pin_memory", True)) and device.type == "cuda",
                        worker_init_fn=_seed_worker, persistent_workers=False,
                        collate_fn=collate_videos)
    steps_per_epoch = _unique_batch_check(len(loader), bs, accum)
    epochs = int(tcfg["epochs"])
    global_batch = bs * accum * info.world_size

    # ---- model, optimiser, schedule
    if model is None:
        model = build_model(mcfg, num_classes)
    model.to(device)
    lr = scaled_lr(float(tcfg["lr"]), global_batch, int(tcfg.get("ref_batch_size", global_batch)),
                   bool(tcfg.get("scale_lr", True)))
    optimizer = build_optimizer(model, lr, float(tcfg.get("weight_decay", 0.05)),
                                tcfg.get("betas", (0.9, 0.999)), float(tcfg.get("eps", 1e-8)))
    scheduler = build_scheduler(optimizer, epochs, steps_per_epoch,
                                float(tcfg.get("warmup_epochs", 0)),
                                float(tcfg.get("warmup_start_factor", 0.1)),
                                float(tcfg.get("min_lr", 0.0)))
    amp = amp_dtype(tcfg.get("amp", "auto"), device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    full_save = tcfg.get("save_full", "auto")
    if full_save == "auto":
        full_save = not mcfg.get("pretrained") or bool(mcfg.get("train_backbone"))
    full_save = bool(full_save)

    start_epoch, step, best = 0, 0, None
    ckpt_rng = None
    if resume == "auto":
        resume = str(out_dir / "last.pth") if (out_dir / "last.pth").is_file() else None
    if resume:
        ck = load_file(resume, expect=(TRAIN_FORMAT,))
        if int(ck["num_classes"]) != num_classes:
            raise ValueError(f"checkpoint {resume} has {ck['num_classes']} classes, the data "
                             f"{num_classes}")
        load_model_state(model, ck["model"], full=bool(ck["model_full"]), source=str(resume))
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch, step, best = int(ck["epoch"]), int(ck["step"]), ck.get("best")
        rngs = ck.get("rng") or []
        if rngs:
            # Same world size: every rank continues its own stream. Otherwise the run is no longer
            # bit-identical anyway; reuse the saved states in turn.
            ckpt_rng = rngs[info.rank % len(rngs)]
        log.log({"type": "resume", "from": str(resume), "epoch": start_epoch, "step": step})

    train_model = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=float(tcfg.get("label_smoothing", 0.0)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if info.is_main and start_epoch == 0:
        log.log({"type": "setup", "world_size": info.world_size, "device": str(device),
                 "num_classes": num_classes, "train_samples": len(train_ds),
                 "val_samples": len(val_ds) if val_ds is not None else 0,
                 "global_batch": global_batch, "lr": lr, "steps_per_epoch": steps_per_epoch,
                 "params_total": count_params(model), "params_trainable": count_params(model, True),
                 "amp": str(amp)})
    if ckpt_rng is not None:  # after every constructor that draws random numbers
        set_rng_state(ckpt_rng)

    eval_interval = int(ecfg.get("interval", 1))
    eval_bs = int(ecfg.get("batch_size") or bs)
    log_interval = max(1, int(tcfg.get("log_interval", 20)))
    stop_after = tcfg.get("stop_after_epoch")
    result: dict = {"epoch": start_epoch, "step": step, "val": None, "best": best}
    last_path = out_dir / "last.pth"
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        train_model.train()
        stats = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, samples, optimiser steps
        win = torch.zeros(2, dtype=torch.float64)    # loss sum and samples since the last log
        t_epoch = t_win = time.perf_counter()
        win_clips = 0
        optimizer.zero_grad(set_to_none=True)
        it = _progress(loader, steps_per_epoch * accum, f"epoch {epoch + 1}/{epochs}", show)
        loaded = LoadReport()  # unreadable videos replaced or dropped, short videos, this epoch
        for i, batch in enumerate(it):
            if i >= steps_per_epoch * accum:
                break
            video, label, rep = _unpack(batch)
            loaded.add(rep)
            if video is None:  # on_error=drop and no video of the batch could be read: skip it
                if info.distributed:  # the other ranks would wait for this one's gradients
                    raise RuntimeError(f"rank {info.rank}: no video of a training batch could be "
                                       f"read ({rep.skipped()[:3]}); use data.on_error=skip with "
                                       f"several processes")
                continue
            video = video.to(device, non_blocking=True)
            label = torch.as_tensor(label).to(device, non_blocking=True).long()
            if video.dim() == 6:  # several training clips per video: each is a sample
                label = label.repeat_interleave(video.shape[1])
                video = video.flatten(0, 1)
            boundary = (i + 1) % accum == 0
            sync = contextlib.nullcontext() if boundary or not info.distributed \
                else train_model.no_sync()
            with sync:
                with autocast(device, amp):
                    logits = train_model(video)
                loss = criterion(logits.float(), label)
                scaler.scale(loss / accum).backward()
            n = label.shape[0]
            stats[0] += loss.detach().double().item() * n
            stats[1] += (logits.detach().argmax(-1) == label).sum().item()
            stats[2] += n
            win[0] += loss.detach().double().item() * n
            win[1] += n
            win_clips += n
            if not boundary:
                continue
            if tcfg.get("clip_grad"):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, float(tcfg["clip_grad"]))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            stats[3] += 1
            if step % log_interval == 0:
                w = zdist.all_reduce_sum(win.clone())
                dt = time.perf_counter() - t_win
                rec = {"type": "train", "epoch": epoch + 1, "step": step,
                       "loss": (w[0] / max(w[1], 1)).item(), "lr": optimizer.param_groups[0]["lr"],
                       "clips_per_s": w[1].item() / max(dt, 1e-9)}
                log.log(rec)
                if show and hasattr(it, "set_postfix"):
                    it.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                win.zero_()
                t_win = time.perf_counter()
        stats = zdist.all_reduce_sum(stats)
        dt = time.perf_counter() - t_epoch
        rec = {"type": "epoch", "epoch": epoch + 1, "step": step,
               "train_loss": (stats[0] / max(stats[2], 1)).item(),
               "train_acc": (100.0 * stats[1] / max(stats[2], 1)).item(),
               "lr": optimizer.param_groups[0]["lr"], "clips_per_s": stats[2].item() / max(dt, 1e-9),
               "epoch_time_s": dt, **_load_summary(loaded)}
        val = None
        last_epoch = epoch + 1 == epochs
        if val_ds is not None and ((eval_interval > 0 and (epoch + 1) % eval_interval == 0) or last_epoch):
            val = evaluate(model, val_ds, eval_bs, device, num_classes, amp, nw, show,
                           desc=f"val {epoch + 1}")
            rec["val"] = summary(val)
            if best is None or val["top1"] > best["top1"]:
                best = {"epoch": epoch + 1, **summary(val)}
        log.log(rec)
        if show and (val is not None or val_ds is None):
            msg = f"epoch {epoch + 1}/{epochs}: loss {rec['train_loss']:.4f} acc {rec['train_acc']:.1f}%"
            if rec["skipped_videos"] or rec["short_videos"]:
                msg += (f" | {rec['skipped_videos']} unreadable videos skipped, "
                        f"{rec['short_videos']} short videos")
            if val is not None:
                msg += f" | val top1 {val['top1']:.2f} top5 {val['top5']:.2f} mca {val['mean_class_acc']:.2f}"
                if val.get("num_skipped"):
                    msg += f" ({val['num_samples']} of {val['num_videos']} videos)"
            print(msg, flush=True)

        # ---- checkpoint (all ranks' RNG states, so a resume continues every rank exactly)
        rngs = zdist.all_gather_object(rng_state())
        if info.is_main:
            ck = {"format": TRAIN_FORMAT, "version": 1, "config": cfg, "num_classes": num_classes,
                  "class_names": class_names, "model": model_state(model, full_save),
                  "model_full": full_save, "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                  "rng": rngs, "epoch": epoch + 1, "step": step, "best": best,
                  "world_size": info.world_size, "val": summary(val) if val else None}
            atomic_save(ck, last_path)
            if val is not None and best is not None and best["epoch"] == epoch + 1:
                atomic_save(ck, out_dir / "best.pth")
        zdist.barrier()
        result = {"epoch": epoch + 1, "step": step, "train_loss": rec["train_loss"],
                  "train_acc": rec["train_acc"], "val": val, "best": best,
                  "checkpoint": str(last_path), "num_classes": num_classes}
        if last_epoch and val is not None and info.is_main:
            write_eval_report(val, out_dir / "val_results.json", class_names,
                              extra={"epoch": epoch + 1})
        stop = on_epoch_end(epoch + 1, rec) if on_epoch_end is not None else False
        if stop or (stop_after is not None and epoch + 1 >= int(stop_after)):
            break
    result["model"] = model
    return result


def _load_summary(report, keep: int = 20) -> dict:
    """An epoch's data problems summed over ranks, for the log: counts and the first ``keep``
    unreadable videos."""
    parts = zdist.all_gather_object(report)
    skipped = [s for r in parts for s in r.skipped()]
    return {"skipped_videos": len(skipped), "short_videos": sum(r.short for r in parts),
            "skipped": skipped[:keep]}


def steps_per_epoch_for(n_samples: int, batch_size: int, world: int = 1, accum: int = 1) -> int:
    per_rank = math.ceil(n_samples / world)
    return (per_rank // batch_size) // accum
