"""The training loop (single process, or DDP under ``torchrun``).

``train(cfg)`` runs the whole recipe: model and data from the :class:`RunConfig`
(:mod:`zeroi2v.train.run`), AdamW with the recipe's parameter groups, per-iteration warm-up +
cosine LR, label smoothing, bf16 autocast on CUDA, gradient accumulation and clipping, the logs
of :mod:`zeroi2v.train.logs`, per-epoch atomic checkpoints with every state needed to resume
exactly, and evaluation on ``data.val_ann``.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..data import LoadReport
from ..progress import progress_bar
from . import dist as zdist
from .checkpoint import rng_state, save_checkpoint
from .config import RunConfig
from .evaluation import batch_parts, evaluate, summary, write_eval_report
from .logs import epoch_line, plot_curves, tensorboard_missing
from .preflight import preflight
from .run import TrainingRun, resume_path, resumed_config, sole_writer, start_run
from .runtime import (
    TrainingInterrupted,
    autocast,
    check_interrupt,
    interrupt_guard,
    interrupt_requested,
)

#: The least time between two redraws of curves.png.
CURVES_EVERY_S = 30.0


def train(cfg: RunConfig, resume: Optional[str] = None,
          on_epoch_end: Optional[Callable[[int, dict], bool]] = None,
          datasets: Optional[dict] = None, model: Optional[nn.Module] = None,
          overwrite: bool = False) -> dict:
    """Run training from a full config (see :mod:`zeroi2v.train.config`).

    Args:
        resume: a checkpoint folder, or ``"auto"`` for ``<out_dir>/last`` (an error if there is
            none). The run continues with the checkpoint's own settings; ``cfg`` may differ
            from them only in keys declared safe to change (``train.epochs`` ...), which are
            applied and reported; any other difference is refused.
        on_epoch_end: called as ``fn(epoch, record)`` after each epoch's checkpoint; returning
            ``True`` stops training (as does ``train.stop_after_epoch``).
        datasets: optional ``{"train": ds, "val": ds}`` to bypass the annotation files.
        model: optional pre-built model (must match ``cfg.model``).
        overwrite: replace a previous run in ``train.out_dir``; without it (and without
            ``resume``) a folder holding a run is an error, so nothing is lost.

    Returns a dict with the last epoch, step, train loss, validation metrics and checkpoint path.
    Ctrl-C raises :class:`TrainingInterrupted`.
    """
    info = zdist.init_distributed()
    try:
        out_dir = Path(cfg.train.out_dir)
        ckpt = resume_path(resume, out_dir)
        changes: list = []
        if ckpt is not None:
            cfg, changes = resumed_config(cfg, ckpt)
        if cfg.train.tensorboard and tensorboard_missing():
            raise ValueError(tensorboard_missing())
        preflight(cfg, model, datasets)  # before the output folder is made or locked
        with interrupt_guard(), sole_writer(out_dir, info):
            return _train(cfg, info, ckpt, on_epoch_end, datasets, model, overwrite, changes)
    finally:
        zdist.cleanup(info)


def _train(cfg, info, resume, on_epoch_end, datasets, model, overwrite, changes) -> dict:
    run, start_epoch = start_run(cfg, info, resume, datasets, model, overwrite, changes)
    result: dict = {"epoch": start_epoch, "step": run.step, "val": None, "best": run.best}
    stop_after = cfg.train.stop_after_epoch
    if stop_after is not None and stop_after <= start_epoch < run.epochs:
        # the stop a previous invocation was asked for (it is saved with the run): reached
        if info.is_main:
            print(f"note: train.stop_after_epoch {stop_after} was reached before this resume; the "
                  f"run goes on to epoch {run.epochs} (--set train.stop_after_epoch=N stops it "
                  "earlier)", flush=True)
        stop_after = None
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, run.epochs):
            rec = train_one_epoch(run, epoch)
            val = _validate_and_save(run, epoch, rec)
            result = _epoch_result(run, epoch, rec, val)
            if epoch + 1 == run.epochs and val is not None and info.is_main:
                write_eval_report(val, run.out_dir / "val_results.json", run.class_names,
                                  extra={"epoch": epoch + 1})
            stop = on_epoch_end(epoch + 1, rec) if on_epoch_end is not None else False
            if stop or (stop_after is not None and epoch + 1 >= stop_after):
                break
    except (KeyboardInterrupt, RuntimeError) as e:
        # Ctrl-C also reaches DataLoader workers, whose exit the loader reports as a RuntimeError
        if isinstance(e, RuntimeError) and not interrupt_requested():
            raise
        done = result["epoch"] if result["epoch"] > 0 else None
        raise TrainingInterrupted(run.out_dir, epoch + 1, done) from None
    finally:
        run.board.close()
    result["model"] = run.model
    return result


def _validate_and_save(run: TrainingRun, epoch: int, rec: dict) -> Optional[dict]:
    """After an epoch's training: evaluate when ``eval.interval`` (or the last epoch) says so,
    log and print the epoch's line (``rec["val"]`` gets the summary), redraw the curves, save
    the checkpoint. Returns the validation metrics, or None."""
    val = None
    interval = run.cfg.eval.interval
    if run.val_ds is not None and ((interval > 0 and (epoch + 1) % interval == 0)
                                   or epoch + 1 == run.epochs):
        val = validate(run, epoch)
        rec["val"] = summary(val)
    run.log.log(rec)
    run.board.record(rec)
    if run.info.is_main:
        print(epoch_line(epoch + 1, run.epochs, rec, val), flush=True)
    # curves.png is redrawn every epoch, but at most every CURVES_EVERY_S seconds (a plot costs
    # ~0.2 s, which 30 one-second epochs of the demo would feel) and always after the last one
    _save_epoch(run, epoch, val)  # before the plot: nothing in a figure can cost an epoch
    if run.info.is_main:
        now = time.monotonic()
        if now - run.curves_drawn >= CURVES_EVERY_S or epoch + 1 == run.epochs:
            plot_curves(run.log.records(), run.out_dir / "curves.png")
            run.curves_drawn = now
    return val


def _epoch_result(run: TrainingRun, epoch: int, rec: dict, val: Optional[dict]) -> dict:
    """What :func:`train` returns when this is the last epoch it runs."""
    return {"epoch": epoch + 1, "step": run.step, "train_loss": rec["train_loss"],
            "train_acc": rec["train_acc"], "val": val, "best": run.best,
            "checkpoint": str(run.out_dir / "last"), "num_classes": run.num_classes}


def train_one_epoch(run: TrainingRun, epoch: int) -> dict:
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
    clip = run.cfg.train.clip_grad
    log_interval = run.cfg.train.log_interval
    run.optimizer.zero_grad(set_to_none=True)
    n_batches = run.steps_per_epoch * accum
    bar = progress_bar(n_batches, f"epoch {epoch + 1}/{run.epochs}", run.show,
                       every=log_interval * accum)
    loaded = LoadReport()  # unreadable videos replaced or dropped, short videos, this epoch
    for i, batch in enumerate(run.loader):
        if i >= n_batches:
            break
        video, label, rep = batch_parts(batch)
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
        check_interrupt()
        if not boundary:
            bar.update(1)
            continue
        if clip:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, clip)
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
            run.board.record(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            win.zero_()
            t_win = time.perf_counter()
        bar.update(1)
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


def validate(run: TrainingRun, epoch: int) -> dict:
    e = run.cfg.eval
    val = evaluate(run.model, run.val_ds, e.batch_size or run.cfg.train.batch_size,
                   run.device, run.num_classes, run.amp, run.cfg.data.num_workers,
                   run.show, desc=f"val {epoch + 1}")
    if run.best is None or val["top1"] > run.best["top1"]:
        run.best = {"epoch": epoch + 1, **summary(val)}
    return val


def _save_epoch(run: TrainingRun, epoch: int, val: Optional[dict]) -> None:
    """Checkpoint with all ranks' RNG states, so a resume continues every rank exactly."""
    rngs = zdist.all_gather_object(rng_state())
    if run.info.is_main:
        state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict(), "rng": rngs, "epoch": epoch + 1,
                 "step": run.step, "best": run.best, "world_size": run.info.world_size,
                 "num_classes": run.num_classes, "val": summary(val) if val else None}
        try:
            save_checkpoint(run.out_dir, run.model, epoch=epoch + 1,
                            run_config=run.cfg.to_dict(), state=state,
                            weights="full" if run.full_save else "trainable",
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


__all__ = ["train", "train_one_epoch", "validate", "TrainingInterrupted"]
