"""Training and evaluation loops (single process, or DDP under ``torchrun``).

``train(cfg)`` runs the whole recipe: model and data from the config, AdamW with the recipe's
parameter groups, per-iteration warm-up + cosine LR, label smoothing, bf16 autocast on CUDA,
gradient accumulation and clipping, a JSON-lines log, per-epoch atomic checkpoints with every
state needed to resume exactly, and evaluation on ``data.val_ann``.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from ..data import LoadReport, VideoDecodeError, collate_videos
from ..files import atomic_write_text, folder_lock, remove_stale_temporaries
from ..models.artefact import load_weights_into
from . import dist as zdist
from .build import (
    build_model,
    build_test_dataset,
    build_train_dataset,
    count_params,
    dataset_num_classes,
    read_class_names,
)
from .checkpoint import (
    CHECKPOINTS,
    base_weights_digest,
    find_checkpoint,
    newest_intact_checkpoint,
    read_training_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    verify_checkpoint,
)
from .config import dump_config
from .metrics import (
    average_views,
    classification_metrics,
    plot_confusion_matrix,
    write_per_class_tables,
)
from .optim import build_optimizer, build_scheduler, scaled_lr
from .preflight import preflight

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
    bar = _bar(len(loader), desc, progress)
    report = LoadReport()
    for batch in loader:
        video, label, rep = _unpack(batch)
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
        _check_interrupt()
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
    atomic_write_text(out_json, json.dumps(res, indent=2, default=_json_default))
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


def _metrics_text(m: dict) -> str:
    top5 = f" top5 {m['top5']:.2f}" if "top5" in m else ""
    return f"top1 {m['top1']:.2f}{top5} mca {m['mean_class_acc']:.2f}"


# ----------------------------------------------------------------------------- training


_INTERRUPTS = {"count": 0}  # Ctrl-C presses seen by the handler of interrupt_guard()


@contextlib.contextmanager
def interrupt_guard():
    """While training, Ctrl-C sets a flag that the loops check after every batch, instead of
    raising wherever the signal lands: a KeyboardInterrupt raised inside a destructor (decord's
    VideoReader.__del__, for one) is swallowed by Python and the run would go on. A second
    Ctrl-C raises at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _INTERRUPTS["count"] += 1
        if _INTERRUPTS["count"] > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    _INTERRUPTS["count"] = 0
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _INTERRUPTS["count"] = 0


def _check_interrupt() -> None:
    if _INTERRUPTS["count"]:
        raise KeyboardInterrupt


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: says where the last complete checkpoint is."""

    def __init__(self, out_dir: Path, epoch: int, last_epoch: Optional[int]):
        super().__init__(f"interrupted in epoch {epoch}")
        self.out_dir, self.epoch, self.last_epoch = out_dir, epoch, last_epoch


@dataclass
class _Run:
    """What one training run holds between its steps."""

    cfg: dict
    info: zdist.DistInfo
    out_dir: Path
    log: JsonlLogger
    show: bool
    model: nn.Module
    train_model: nn.Module
    train_ds: Any
    val_ds: Any
    loader: DataLoader
    sampler: DistributedSampler
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp: Optional[torch.dtype]
    criterion: nn.Module
    num_classes: int
    class_names: Optional[list]
    steps_per_epoch: int
    accum: int
    epochs: int
    lr: float
    global_batch: int
    full_save: bool
    base: Optional[dict]
    step: int = 0
    best: Optional[dict] = None

    @property
    def device(self) -> torch.device:
        return self.info.device


def train(cfg: dict, resume: Optional[str] = None,
          on_epoch_end: Optional[Callable[[int, dict], bool]] = None,
          datasets: Optional[dict] = None, model: Optional[nn.Module] = None,
          overwrite: bool = False) -> dict:
    """Run training from a full config (see :mod:`zeroi2v.train.config`).

    Args:
        resume: a checkpoint folder, or ``"auto"`` for ``<out_dir>/last`` (an error if there is
            none).
        on_epoch_end: called as ``fn(epoch, record)`` after each epoch's checkpoint; returning
            ``True`` stops training (as does ``train.stop_after_epoch``).
        datasets: optional ``{"train": ds, "val": ds}`` to bypass the annotation files.
        model: optional pre-built model (must match ``cfg["model"]``).
        overwrite: replace a previous run in ``train.out_dir``; without it (and without
            ``resume``) a folder holding a run is an error, so nothing is lost.

    Returns a dict with the last epoch, step, train loss, validation metrics and checkpoint path.
    Ctrl-C raises :class:`TrainingInterrupted`.
    """
    info = zdist.init_distributed()
    try:
        preflight(cfg, model, datasets)  # before the output folder is made or locked
        with interrupt_guard(), _sole_writer(Path(cfg["train"]["out_dir"]), info):
            return _train(cfg, info, resume, on_epoch_end, datasets, model, overwrite)
    finally:
        zdist.cleanup(info)


def _train(cfg, info, resume, on_epoch_end, datasets, model, overwrite) -> dict:
    out_dir = Path(cfg["train"]["out_dir"])
    resume = _resume_path(resume, out_dir)
    run, start_epoch = _start_run(cfg, info, out_dir, resume, datasets, model, overwrite)
    result: dict = {"epoch": start_epoch, "step": run.step, "val": None, "best": run.best}
    stop_after = cfg["train"]["stop_after_epoch"]
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, run.epochs):
            rec = train_one_epoch(run, epoch)
            val = _validate_and_save(run, epoch, rec)
            result = _epoch_result(run, epoch, rec, val)
            if epoch + 1 == run.epochs and val is not None and info.is_main:
                write_eval_report(val, out_dir / "val_results.json", run.class_names,
                                  extra={"epoch": epoch + 1})
            stop = on_epoch_end(epoch + 1, rec) if on_epoch_end is not None else False
            if stop or (stop_after is not None and epoch + 1 >= int(stop_after)):
                break
    except (KeyboardInterrupt, RuntimeError) as e:
        # Ctrl-C also reaches DataLoader workers, whose exit the loader reports as a RuntimeError
        if isinstance(e, RuntimeError) and not _INTERRUPTS["count"]:
            raise
        done = result["epoch"] if result["epoch"] > 0 else None
        raise TrainingInterrupted(out_dir, epoch + 1, done) from None
    result["model"] = run.model
    return result


@contextlib.contextmanager
def _sole_writer(out_dir: Path, info):
    """Rank 0 holds the output folder's lock for the whole run (one writer per folder: a second
    run into it is refused, see :func:`zeroi2v.files.folder_lock`) and clears the temporaries a
    killed run left behind."""
    if not info.is_main:
        yield
        return
    import sys

    command = " ".join(["zeroi2v", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "zeroi2v train"
    with folder_lock(out_dir, command) as stale:
        if stale:
            print(f"note: {out_dir} was locked by pid {stale.get('pid')} (`{stale.get('command')}`,"
                  f" since {stale.get('started')}), which ended without releasing it; taken over",
                  flush=True)
        removed = remove_stale_temporaries(out_dir) + \
            remove_stale_temporaries(out_dir / CHECKPOINTS)
        if removed:
            print(f"note: removed {len(removed)} half-written file(s) of an interrupted run: "
                  f"{', '.join(p.name for p in removed[:3])}", flush=True)
        yield


def _resume_path(resume: Optional[str], out_dir: Path) -> Optional[str]:
    """``resume`` with ``"auto"`` resolved to ``<out_dir>/last`` (which must exist), checked to
    be intact; a damaged one is refused with the newest intact checkpoint to use instead."""
    if resume is None:
        return None
    if resume == "auto":
        if not (out_dir / "last").exists():
            raise FileNotFoundError(f"nothing to resume: {out_dir} has no checkpoint "
                                    f"({out_dir / 'last'} is missing)")
        resume = str(out_dir / "last")
    folder = find_checkpoint(resume)
    problem = verify_checkpoint(folder)
    if problem is not None:
        run_dir = folder.parent.parent if folder.parent.name == CHECKPOINTS else out_dir
        other = newest_intact_checkpoint(run_dir, skip=folder)
        instead = (f"the newest intact checkpoint is {other}: continue from it with --resume "
                   f"{other}" if other is not None else
                   "no intact checkpoint is left: start again with --overwrite")
        raise ValueError(f"cannot resume from {resume}: {problem}; {instead}")
    return resume


def _start_run(cfg, info, out_dir: Path, resume: Optional[str], datasets, model,
               overwrite: bool) -> tuple[_Run, int]:
    """Checks, output folder, seeding, everything :class:`_Run` holds, and the resumed state:
    returns the run and the epoch to start from. Prints and logs the set-up summary."""
    tcfg = cfg["train"]
    if info.is_main:
        prepare_out_dir(out_dir, resume=bool(resume), overwrite=overwrite)
    zdist.barrier()
    seed = int(tcfg["seed"])
    seed_everything(seed + info.rank)
    if tcfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    run = _setup(cfg, info, out_dir, datasets or {}, model)
    start_epoch, ckpt_rng = 0, None
    if resume:
        start_epoch, ckpt_rng = _resume(run, resume)
    if info.is_main:
        (out_dir / "config.yaml").write_text(dump_config(cfg))
        text, rec = setup_summary(run, resume)
        run.log.log(rec)
        print(text, flush=True)
    if ckpt_rng is not None:  # after every constructor that draws random numbers
        set_rng_state(ckpt_rng)
    return run, start_epoch


def _validate_and_save(run: _Run, epoch: int, rec: dict) -> Optional[dict]:
    """After an epoch's training: evaluate when ``eval.interval`` (or the last epoch) says so,
    log and print the epoch's record (``rec["val"]`` gets the summary), save the checkpoint.
    Returns the validation metrics, or None."""
    val = None
    interval = int(run.cfg["eval"]["interval"])
    if run.val_ds is not None and ((interval > 0 and (epoch + 1) % interval == 0)
                                   or epoch + 1 == run.epochs):
        val = validate(run, epoch)
        rec["val"] = summary(val)
    run.log.log(rec)
    if run.show:
        print(_epoch_line(run, epoch, rec, val), flush=True)
    _save_epoch(run, epoch, val)
    return val


def _epoch_line(run: _Run, epoch: int, rec: dict, val: Optional[dict]) -> str:
    msg = (f"epoch {epoch + 1}/{run.epochs}: loss {rec['train_loss']:.4f} "
           f"acc {rec['train_acc']:.1f}%")
    if val is not None:
        msg += " | val " + _metrics_text(val)
        if val.get("num_skipped"):
            msg += f" ({val['num_samples']} of {val['num_videos']} videos)"
    if rec["skipped_videos"] or rec["short_videos"]:
        msg += (f" | {rec['skipped_videos']} unreadable videos skipped, "
                f"{rec['short_videos']} short videos")
    return msg


def _epoch_result(run: _Run, epoch: int, rec: dict, val: Optional[dict]) -> dict:
    """What :func:`train` returns when this is the last epoch it runs."""
    return {"epoch": epoch + 1, "step": run.step, "train_loss": rec["train_loss"],
            "train_acc": rec["train_acc"], "val": val, "best": run.best,
            "checkpoint": str(run.out_dir / "last"), "num_classes": run.num_classes}


_RUN_FILES = ("log.jsonl", "config.yaml", "checkpoints", "last", "best", "val_results.json")


def prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """A new run needs a folder without a previous run's checkpoints in it (nothing is
    overwritten by accident); ``overwrite`` removes the previous run's files, ``resume``
    continues it. The files of a run that ended before its first checkpoint (its log and
    config) hold nothing worth keeping: they are replaced, and that is said."""
    import shutil

    found = [n for n in _RUN_FILES if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    has_checkpoint = any(n in found for n in ("last", "best")) or \
        any((out_dir / CHECKPOINTS).glob("epoch_*"))
    if found and not resume:
        if has_checkpoint and not overwrite:
            raise FileExistsError(
                f"{out_dir} holds a previous run ({', '.join(found)}): continue it with "
                "--resume, replace it with --overwrite, or choose another --out")
        if not has_checkpoint:
            print(f"note: {out_dir} holds the files of a run that ended before its first "
                  f"checkpoint ({', '.join(found)}); they are replaced", flush=True)
        for n in found:
            p = out_dir / n
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        for p in out_dir.glob("val_results_*"):
            p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _setup(cfg: dict, info, out_dir: Path, datasets: dict, model) -> _Run:
    tcfg, dcfg, mcfg = cfg["train"], cfg["data"], cfg["model"]
    device = info.device
    train_ds = datasets.get("train") or build_train_dataset(cfg)
    val_ds = datasets.get("val")
    if val_ds is None and dcfg.get("val_ann"):
        val_ds = build_test_dataset(cfg, dcfg["val_ann"])
    num_classes = mcfg.get("num_classes") or dataset_num_classes(train_ds)
    if val_ds is not None:
        num_classes = max(int(num_classes), dataset_num_classes(val_ds) or 0)
    num_classes = int(num_classes)
    class_names = read_class_names(dcfg["class_names"]) if dcfg.get("class_names") else None
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"data.class_names: {dcfg['class_names']} names {len(class_names)} "
                         f"classes, the model and data have {num_classes}")

    bs, accum = int(tcfg["batch_size"]), int(tcfg["accum_steps"])
    seed = int(tcfg["seed"])
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=seed, drop_last=False)
    loader = DataLoader(train_ds, batch_size=bs, sampler=sampler,
                        num_workers=int(dcfg["num_workers"]), drop_last=True,
                        pin_memory=bool(dcfg["pin_memory"]) and device.type == "cuda",
                        worker_init_fn=_seed_worker, persistent_workers=False,
                        collate_fn=collate_videos)
    steps = _unique_batch_check(len(loader), bs, accum)
    global_batch = bs * accum * info.world_size

    if model is None:
        model = build_model(mcfg, num_classes)
    if class_names is not None:
        model.class_names = class_names
    model.to(device)
    lr = scaled_lr(float(tcfg["lr"]), global_batch, int(tcfg["ref_batch_size"]),
                   bool(tcfg["scale_lr"]))
    optimizer = build_optimizer(model, lr, float(tcfg["weight_decay"]), tcfg["betas"],
                                float(tcfg["eps"]))
    scheduler = build_scheduler(optimizer, int(tcfg["epochs"]), steps,
                                float(tcfg["warmup_epochs"]), float(tcfg["warmup_start_factor"]),
                                float(tcfg["min_lr"]))
    amp = amp_dtype(tcfg["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    full_save = tcfg["save_full"]
    if full_save == "auto":
        full_save = not mcfg.get("pretrained") or bool(mcfg.get("train_backbone"))
    full_save = bool(full_save)
    base = None if full_save else base_weights_digest(mcfg.get("pretrained"))
    if not full_save and base is None:
        raise ValueError("train.save_full=false needs model.pretrained (the frozen weights of a "
                         "trainable-only checkpoint come from that file)")
    train_model = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Run(
        cfg=cfg, info=info, out_dir=out_dir,
        log=JsonlLogger(out_dir / "log.jsonl", enabled=info.is_main),
        show=bool(tcfg["progress"]) and info.is_main, model=model, train_model=train_model,
        train_ds=train_ds, val_ds=val_ds, loader=loader, sampler=sampler, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, amp=amp,
        criterion=nn.CrossEntropyLoss(label_smoothing=float(tcfg["label_smoothing"])),
        num_classes=num_classes, class_names=class_names, steps_per_epoch=steps, accum=accum,
        epochs=int(tcfg["epochs"]), lr=lr, global_batch=global_batch, full_save=full_save,
        base=base)


def setup_summary(run: _Run, resume: Optional[str]) -> tuple[str, dict]:
    """What the run is about to do, as text for the console and a record for the log."""
    from ..models.video_vit import fused_adapters_active
    from ..ops.stdha import auto_backend

    cfg, m = run.cfg, run.model
    t, d = cfg["train"], cfg["data"]
    ref = int(t["ref_batch_size"])
    if t["scale_lr"]:
        lr_why = (f"train.lr {t['lr']:g} x global batch {run.global_batch} / "
                  f"train.ref_batch_size {ref} (linear scaling; train.scale_lr: false keeps lr)")
    else:
        lr_why = "train.lr as given (train.scale_lr: false)"
    attn = m.backbone.blocks[0].attn
    dtype = run.amp or next(m.parameters()).dtype
    backend = attn.backend if attn.backend != "auto" else auto_backend(
        run.device, dtype, attn.head_dim, attn.num_heads, needs_grad=True)
    sampling = (f"dense, {m.num_frames} frames every {d['frame_interval']}"
                if d["sampling"] == "dense" else f"uniform, {m.num_frames} segments")
    n_val = len(run.val_ds) if run.val_ds is not None else 0
    rec = {
        "type": "setup", "world_size": run.info.world_size, "device": str(run.device),
        "model": m.config.summary(), "num_classes": run.num_classes,
        "train_samples": len(run.train_ds), "val_samples": n_val, "frames": m.num_frames,
        "sampling": sampling, "head_offsets": list(m.head_offsets), "lr": run.lr,
        "lr_rule": lr_why, "batch_size": int(t["batch_size"]), "accum_steps": run.accum,
        "global_batch": run.global_batch, "steps_per_epoch": run.steps_per_epoch,
        "epochs": run.epochs, "amp": str(run.amp), "dtype": str(dtype).replace("torch.", ""),
        "stdha_backend": backend,
        "fused_adapters": fused_adapters_active(m, run.device, dtype, training=True),
        "params_total": count_params(m), "params_trainable": count_params(m, True),
        "out_dir": str(run.out_dir), "resume": resume,
    }
    lines = [
        f"model    {rec['model']}",
        f"data     {rec['train_samples']} training videos, {n_val} validation videos, "
        f"{run.num_classes} classes; {sampling}",
        f"optim    lr {run.lr:.3g} = {lr_why}",
        f"batch    {rec['batch_size']} per process x {run.accum} accumulation x "
        f"{run.info.world_size} processes = {run.global_batch}; {run.steps_per_epoch} steps per "
        f"epoch, {run.epochs} epochs",
        f"compute  {run.device}, {rec['dtype']}" + (" (autocast)" if run.amp else "")
        + f", STDHA backend {backend}, fused adapters {'on' if rec['fused_adapters'] else 'off'}",
        f"params   {rec['params_trainable']:,} trainable of {rec['params_total']:,}",
        f"output   {run.out_dir}" + (f" (resuming from {resume})" if resume else ""),
    ]
    return "\n".join(lines), rec


def _resume(run: _Run, path) -> tuple[int, Optional[dict]]:
    ck = _resume_into(path, run.model, run.base)
    if int(ck.get("num_classes", run.num_classes)) != run.num_classes:
        raise ValueError(f"cannot resume from {path}: it has {ck['num_classes']} classes, the "
                         f"data {run.num_classes}")
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    if ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    run.step, run.best = int(ck["step"]), ck.get("best")
    start = int(ck["epoch"])
    rngs = ck.get("rng") or []
    run.log.log({"type": "resume", "from": str(path), "epoch": start, "step": run.step})
    # Same world size: every rank continues its own stream. Otherwise the run is no longer
    # bit-identical anyway; reuse the saved states in turn.
    return start, (rngs[run.info.rank % len(rngs)] if rngs else None)


def train_one_epoch(run: _Run, epoch: int) -> dict:
    """One pass over the training data; returns the epoch's log record."""
    info, device, accum = run.info, run.device, run.accum
    run.sampler.set_epoch(epoch)
    if hasattr(run.train_ds, "set_epoch"):
        run.train_ds.set_epoch(epoch)
    run.train_model.train()
    stats = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, samples, optimiser steps
    win = torch.zeros(2, dtype=torch.float64)    # loss sum and samples since the last log
    t_epoch = t_win = time.perf_counter()
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    clip = run.cfg["train"]["clip_grad"]
    log_interval = int(run.cfg["train"]["log_interval"])
    run.optimizer.zero_grad(set_to_none=True)
    n_batches = run.steps_per_epoch * accum
    bar = _bar(n_batches, f"epoch {epoch + 1}/{run.epochs}", run.show)
    loaded = LoadReport()  # unreadable videos replaced or dropped, short videos, this epoch
    for i, batch in enumerate(run.loader):
        if i >= n_batches:
            break
        video, label, rep = _unpack(batch)
        loaded.add(rep)
        if video is None:  # on_error=drop and no video of the batch could be read: skip it
            if info.distributed:  # the other ranks would wait for this one's gradients
                raise RuntimeError(f"rank {info.rank}: no video of a training batch could be "
                                   f"read ({rep.skipped()[:3]}); use data.on_error=skip with "
                                   "several processes")
            bar.update(1)
            continue
        video = video.to(device, non_blocking=True)
        label = torch.as_tensor(label).to(device, non_blocking=True).long()
        if video.dim() == 6:  # several training clips per video: each is a sample
            label = label.repeat_interleave(video.shape[1])
            video = video.flatten(0, 1)
        boundary = (i + 1) % accum == 0
        sync = contextlib.nullcontext() if boundary or not info.distributed \
            else run.train_model.no_sync()
        with sync:
            with autocast(device, run.amp):
                logits = run.train_model(video)
            loss = run.criterion(logits.float(), label)
            run.scaler.scale(loss / accum).backward()
        n = label.shape[0]
        stats[0] += loss.detach().double().item() * n
        stats[1] += (logits.detach().argmax(-1) == label).sum().item()
        stats[2] += n
        win[0] += loss.detach().double().item() * n
        win[1] += n
        bar.update(1)
        _check_interrupt()
        if not boundary:
            continue
        if clip:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, float(clip))
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        run.step += 1
        stats[3] += 1
        if run.step % log_interval == 0:
            w = zdist.all_reduce_sum(win.clone())
            dt = time.perf_counter() - t_win
            rec = {"type": "train", "epoch": epoch + 1, "step": run.step,
                   "loss": (w[0] / max(w[1], 1)).item(),
                   "lr": run.optimizer.param_groups[0]["lr"],
                   "clips_per_s": w[1].item() / max(dt, 1e-9)}
            run.log.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            win.zero_()
            t_win = time.perf_counter()
    bar.close()
    stats = zdist.all_reduce_sum(stats)
    dt = time.perf_counter() - t_epoch
    return {"type": "epoch", "epoch": epoch + 1, "step": run.step,
            "train_loss": (stats[0] / max(stats[2], 1)).item(),
            "train_acc": (100.0 * stats[1] / max(stats[2], 1)).item(),
            "lr": run.optimizer.param_groups[0]["lr"],
            "clips_per_s": stats[2].item() / max(dt, 1e-9), "epoch_time_s": dt,
            **_load_summary(loaded)}


def _load_summary(report, keep: int = 20) -> dict:
    """An epoch's data problems summed over ranks, for the log: counts and the first ``keep``
    unreadable videos."""
    parts = zdist.all_gather_object(report)
    skipped = [s for r in parts for s in r.skipped()]
    return {"skipped_videos": len(skipped), "short_videos": sum(r.short for r in parts),
            "skipped": skipped[:keep]}


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str, enabled: bool):
    """A tqdm bar that is only told how far the loop is (it never sees the iterable)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def validate(run: _Run, epoch: int) -> dict:
    ecfg = run.cfg["eval"]
    val = evaluate(run.model, run.val_ds, int(ecfg["batch_size"] or run.cfg["train"]["batch_size"]),
                   run.device, run.num_classes, run.amp, int(run.cfg["data"]["num_workers"]),
                   run.show, desc=f"val {epoch + 1}")
    if run.best is None or val["top1"] > run.best["top1"]:
        run.best = {"epoch": epoch + 1, **summary(val)}
    return val


def _save_epoch(run: _Run, epoch: int, val: Optional[dict]) -> None:
    """Checkpoint with all ranks' RNG states, so a resume continues every rank exactly."""
    rngs = zdist.all_gather_object(rng_state())
    if run.info.is_main:
        state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict(), "rng": rngs, "epoch": epoch + 1,
                 "step": run.step, "best": run.best, "world_size": run.info.world_size,
                 "num_classes": run.num_classes, "val": summary(val) if val else None}
        try:
            save_checkpoint(run.out_dir, run.model, epoch=epoch + 1, run_config=run.cfg,
                            state=state, weights="full" if run.full_save else "trainable",
                            base_weights=run.base, best=val is not None and
                            run.best is not None and run.best["epoch"] == epoch + 1)
        except OSError as e:  # a full disk: say what is still there to continue from
            last = run.out_dir / "last"
            kept = (f"the last complete checkpoint {last.resolve().name} is intact: continue "
                    "with --resume once there is space" if last.exists() else
                    "no checkpoint of this run was written")
            raise OSError(e.errno, f"{e.strerror} while saving the checkpoint of epoch "
                          f"{epoch + 1} ({kept})", e.filename) from e
    zdist.barrier()


def _unique_batch_check(n_batches: int, batch_size: int, accum: int) -> int:
    steps = n_batches // accum
    if steps < 1:
        raise ValueError(
            f"the training set gives {n_batches} full batches of {batch_size} per process, fewer "
            f"than accum_steps={accum}: lower train.batch_size / train.accum_steps or add data"
        )
    return steps


def _resume_into(path, model: nn.Module, base: Optional[dict]) -> dict:
    """Load a training checkpoint's weights into ``model`` (built from the run config, which must
    describe the same model) and return its training state."""
    art, state = read_training_checkpoint(path)
    have, want = art.config, model.config
    for f in ("model_name", "timm_kwargs", "num_frames", "num_classes", "head_offsets",
              "adapter_ratio", "adapter_scale", "adapters"):
        if getattr(have, f) != getattr(want, f):
            raise ValueError(f"cannot resume from {art.folder}: its model has {f}="
                             f"{getattr(have, f)!r}, the config {getattr(want, f)!r}")
    if art.weights == "trainable" and (
            base is None or (art.base_weights or {}).get("sha256") != base["sha256"]):
        raise ValueError(f"cannot resume from {art.folder}: it holds only the trainable "
                         f"tensors of a model whose frozen weights came from "
                         f"{(art.base_weights or {}).get('path')}, not from this run's "
                         "model.pretrained")
    load_weights_into(model, art, what="the run's model")
    return state
