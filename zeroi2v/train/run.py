"""Setting up a training run: the output folder (one writer, no leftovers, no previous run
overwritten by accident), everything the loop needs built from the :class:`RunConfig` (a
:class:`TrainingRun`), the resumed state, and the summary printed before the first step."""
from __future__ import annotations

import contextlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from ..data import collate_videos
from ..data.annotations import read_class_names, same_classes
from ..models.artefact import load_weights_into
from ..models.video_vit import count_params, fused_adapters_active
from ..ops.stdha import auto_backend
from ..safe_io import atomic_write_text, folder_lock, remove_stale_temporaries
from . import dist as zdist
from .build import build_model, build_test_dataset, build_train_dataset, dataset_num_classes
from .checkpoint import (
    CHECKPOINTS,
    base_weights_digest,
    checkpoint_folder,
    holds_checkpoints,
    newest_intact_checkpoint,
    read_training_checkpoint,
    run_folder_of,
    saved_run_config,
    seed_everything,
    set_rng_state,
    verify_checkpoint,
)
from .config import RunConfig, dump_config, resume_diff
from .logs import JsonlLogger, TensorBoard
from .optim import build_optimizer, build_scheduler, scaled_lr
from .runtime import amp_dtype, seed_worker


@dataclass
class TrainingRun:
    """Everything one training run holds between its steps, built once from its config."""

    cfg: RunConfig
    info: zdist.DistInfo
    out_dir: Path
    log: JsonlLogger
    board: TensorBoard
    show: bool                      # progress (bars on a terminal, lines elsewhere)
    model: nn.Module
    train_model: nn.Module          # the model, or its DDP wrapper
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
    lr: float
    global_batch: int
    full_save: bool
    base: Optional[dict]
    step: int = 0
    best: Optional[dict] = None
    curves_drawn: float = float("-inf")  # time.monotonic() of the last curves.png

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def epochs(self) -> int:
        return self.cfg.train.epochs

    @property
    def accum(self) -> int:
        return self.cfg.train.accum_steps


# ----------------------------------------------------------------------------- output folder


@contextlib.contextmanager
def sole_writer(out_dir: Path, info):
    """Rank 0 holds the output folder's lock for the whole run (one writer per folder: a second
    run into it is refused, see :func:`zeroi2v.safe_io.folder_lock`) and clears the temporaries a
    killed run left behind."""
    if not info.is_main:
        yield
        return
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


RUN_FILES = ("log.jsonl", "config.yaml", "checkpoints", "last", "best", "val_results.json",
             "curves.png", "tensorboard")


def prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """A new run needs a folder without a previous run's checkpoints in it (nothing is
    overwritten by accident); ``overwrite`` removes the previous run's files, ``resume``
    continues it. The files of a run that ended before its first checkpoint (its log and
    config) hold nothing worth keeping: they are replaced, and that is said."""
    found = [n for n in RUN_FILES if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    has_checkpoint = holds_checkpoints(out_dir)
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
        for p in [*out_dir.glob("val_results_*"), *out_dir.glob("eval_*")]:
            if p.is_file():  # (eval_*: what `zeroi2v eval RUN/best` keeps beside the run)
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def resume_path(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """``resume`` with ``"auto"`` resolved to ``<out_dir>/last`` (which must exist), checked to
    be intact; a damaged one is refused with the newest intact checkpoint to use instead."""
    if resume is None:
        return None
    if resume == "auto":
        if not (out_dir / "last").exists():
            raise FileNotFoundError(f"nothing to resume: {out_dir} has no checkpoint "
                                    f"({out_dir / 'last'} is missing)")
        resume = str(out_dir / "last")
    folder = checkpoint_folder(resume)
    own = run_folder_of(folder)
    if (own is None or own != out_dir.resolve()) and holds_checkpoints(out_dir):
        # continuing run A in run B's folder would interleave two runs' checkpoints and logs
        where = f"its own folder (--out {own})" if own is not None else "an empty --out folder"
        raise ValueError(f"cannot resume {folder} into {out_dir}: that folder holds another "
                         f"run's checkpoints; continue in {where}")
    problem = verify_checkpoint(folder)
    if problem is not None:
        run_dir = own or out_dir
        other = newest_intact_checkpoint(run_dir, skip=folder)
        instead = (f"the newest intact checkpoint is {other}: continue from it with --resume "
                   f"{other}" if other is not None else
                   "no intact checkpoint is left: start again with --overwrite")
        raise ValueError(f"cannot resume from {resume}: {problem}; {instead}")
    return folder


def resumed_config(cfg: Optional[RunConfig], checkpoint: Path) -> tuple[RunConfig, list]:
    """The config a resumed run continues with: the checkpoint's own, with the changes ``cfg``
    (the config file and ``--set`` given now, or None) makes to keys declared safe to change;
    any other change is refused (:func:`zeroi2v.train.config.resume_diff`)."""
    saved = saved_run_config(checkpoint)
    if cfg is None:
        return saved, []
    return cfg, resume_diff(saved, cfg)


# ----------------------------------------------------------------------------- building


def start_run(cfg: RunConfig, info, resume: Optional[Path], datasets: Optional[dict],
              model: Optional[nn.Module], overwrite: bool,
              changes: list) -> tuple[TrainingRun, int]:
    """Output folder, seeding, everything :class:`TrainingRun` holds, and the resumed state:
    returns the run and the epoch to start from. Prints and logs the set-up summary (and the
    settings a resume changed)."""
    out_dir = Path(cfg.train.out_dir)
    if info.is_main:
        prepare_out_dir(out_dir, resume=resume is not None, overwrite=overwrite)
    zdist.barrier()
    seed_everything(cfg.train.seed + info.rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    run = build_run(cfg, info, datasets or {}, model)
    start_epoch, ckpt_rng, notes = 0, None, []
    if resume is not None:
        start_epoch, ckpt_rng, notes = _resume(run, resume)
    if info.is_main:
        atomic_write_text(out_dir / "config.yaml", dump_config(cfg))
        if changes:
            text = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes)
            print(f"resuming with changed settings: {text}", flush=True)
            run.log.log({"type": "resume_changes",
                         "changes": [{"key": k, "was": a, "now": b} for k, a, b in changes]})
        for note in notes:
            print(note, flush=True)
        text, rec = setup_summary(run, resume)
        run.log.log(rec)
        print(text, flush=True)
    if ckpt_rng is not None:  # after every constructor that draws random numbers
        set_rng_state(ckpt_rng)
    return run, start_epoch


def run_class_names(given: Optional[str], train_ds, val_ds) -> Optional[list]:
    """The run's class names: the training data's own class list (``classes.txt`` beside its
    annotation file, or a shard index's), or ``data.class_names``. When both exist, the data's
    list must begin the given one (label ``i`` named alike), and the validation data's list must
    number the classes as the training data's does: a model's class ``i`` is one class
    everywhere."""
    names = getattr(train_ds, "class_names", None)
    where = f"the training data ({getattr(train_ds, 'class_names_file', None) or 'its class list'})"
    if given:
        listed = read_class_names(given)
        if names and listed[:len(names)] != names:  # (it may name classes the data lacks)
            i = next((i for i, (a, b) in enumerate(zip(listed, names)) if a != b),
                     min(len(listed), len(names)))
            shown = lambda xs: repr(xs[i]) if i < len(xs) else "nothing"  # noqa: E731
            raise ValueError(
                f"data.class_names ({given}) and {where} name label {i} differently ({shown(listed)}"
                f" and {shown(names)}): the model's names must be the data's classes; unset "
                "data.class_names (the data's list is used) or make the two files agree")
        names = listed
    if names and val_ds is not None:
        same_classes(names, getattr(val_ds, "class_names", None), model_source=where,
                     data_source="the validation data "
                                 f"({getattr(val_ds, 'class_names_file', None) or 'its class list'})")
    return names


def build_run(cfg: RunConfig, info, datasets: dict, model) -> TrainingRun:
    """Every object of the run, from ``cfg`` alone (``datasets``/``model`` replace the ones the
    config would build). What each config key controls is visible on the result (see
    tests/test_config_wired.py)."""
    t, d, m = cfg.train, cfg.data, cfg.model
    device = info.device
    train_ds = datasets.get("train") or build_train_dataset(cfg)
    val_ds = datasets.get("val")
    if val_ds is None and d.val_ann:
        val_ds = build_test_dataset(cfg, d.val_ann)
    class_names = run_class_names(d.class_names, train_ds, val_ds)
    num_classes = m.num_classes or max(dataset_num_classes(train_ds) or 0, len(class_names or ()))
    if val_ds is not None:
        num_classes = max(int(num_classes), dataset_num_classes(val_ds) or 0)
    num_classes = int(num_classes)
    if class_names is not None and len(class_names) != num_classes:
        if d.class_names:
            raise ValueError(f"data.class_names: {d.class_names} names {len(class_names)} "
                             f"classes, the model and data have {num_classes}")
        if info.is_main:  # model.num_classes set above the data's list: it cannot name them all
            src = getattr(train_ds, "class_names_file", None) or "the training data"
            print(f"note: {src} names {len(class_names)} classes, the model has {num_classes} "
                  "(model.num_classes): the model gets no class "
                  "names (set data.class_names to a list of all of them)", flush=True)
        class_names = None

    # sharded data (zeroi2v.data.ShardStream) splits each epoch between the ranks and workers
    # itself and is its own sampler (set_epoch, seed); a DataLoader takes no sampler for it
    streamed = isinstance(train_ds, IterableDataset)
    sampler = train_ds if streamed else DistributedSampler(
        train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=t.seed,
        drop_last=False)
    loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=None if streamed else sampler,
                        num_workers=d.num_workers, drop_last=True,
                        pin_memory=pin_memory_for(d.pin_memory, device),
                        worker_init_fn=seed_worker, persistent_workers=False,
                        collate_fn=collate_videos)
    steps = steps_per_epoch(len(loader), t.batch_size, t.accum_steps)
    global_batch = t.batch_size * t.accum_steps * info.world_size

    if model is None:
        model = build_model(m, num_classes)
    if class_names is not None:
        model.class_names = class_names
    model.to(device)
    lr = scaled_lr(t.lr, global_batch, t.ref_batch_size, t.scale_lr)
    optimizer = build_optimizer(model, lr, t.weight_decay, t.betas, t.eps)
    scheduler = build_scheduler(optimizer, t.epochs, steps, t.warmup_epochs,
                                t.warmup_start_factor, t.min_lr)
    amp = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    full_save = t.save_full
    if full_save == "auto":
        full_save = not m.pretrained or m.train_backbone
    full_save = bool(full_save)
    base = None if full_save else base_weights_digest(m.pretrained,
                                                      model.config.pretrained_source)
    if not full_save and base is None:
        raise ValueError("train.save_full=false needs model.pretrained (the frozen weights of a "
                         "trainable-only checkpoint come from that file)")
    train_model = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    out_dir = Path(t.out_dir)
    return TrainingRun(
        cfg=cfg, info=info, out_dir=out_dir,
        log=JsonlLogger(out_dir / "log.jsonl", enabled=info.is_main),
        board=TensorBoard(out_dir / "tensorboard" if t.tensorboard and info.is_main else None),
        show=t.progress and info.is_main, model=model, train_model=train_model,
        train_ds=train_ds, val_ds=val_ds, loader=loader, sampler=sampler, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, amp=amp,
        criterion=nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
        num_classes=num_classes, class_names=class_names, steps_per_epoch=steps, lr=lr,
        global_batch=global_batch, full_save=full_save, base=base)


def pin_memory_for(requested: bool, device: torch.device) -> bool:
    """``data.pin_memory`` where it means something: page-locked batches only help (and torch
    only allows them without a warning) when the model runs on a GPU."""
    return bool(requested) and device.type == "cuda"


def steps_per_epoch(n_batches: int, batch_size: int, accum: int) -> int:
    """Optimiser steps per epoch: the loader's full batches over the accumulation steps."""
    steps = n_batches // accum
    if steps < 1:
        raise ValueError(
            f"the training set gives {n_batches} full batches of {batch_size} per process, fewer "
            f"than accum_steps={accum}: lower train.batch_size / train.accum_steps or add data"
        )
    return steps


def setup_summary(run: TrainingRun, resume: Optional[Path]) -> tuple[str, dict]:
    """What the run is about to do, as text for the console and a record for the log."""
    cfg, m = run.cfg, run.model
    t, d = cfg.train, cfg.data
    if t.scale_lr:
        lr_why = (f"train.lr {t.lr:g} x global batch {run.global_batch} / "
                  f"train.ref_batch_size {t.ref_batch_size} (linear scaling; train.scale_lr: "
                  "false keeps lr)")
    else:
        lr_why = "train.lr as given (train.scale_lr: false)"
    attn = m.backbone.blocks[0].attn
    dtype = run.amp or next(m.parameters()).dtype
    backend = attn.backend if attn.backend != "auto" else auto_backend(
        run.device, dtype, attn.head_dim, attn.num_heads, needs_grad=True)
    sampling = (f"dense, {m.num_frames} frames every {d.frame_interval}"
                if d.sampling == "dense" else f"uniform, {m.num_frames} segments")
    n_val = len(run.val_ds) if run.val_ds is not None else 0
    rec = {
        "type": "setup", "world_size": run.info.world_size, "device": str(run.device),
        "model": m.config.summary(), "num_classes": run.num_classes,
        "train_samples": getattr(run.train_ds, "num_videos", len(run.train_ds)),  # all ranks'
        "val_samples": n_val, "frames": m.num_frames,
        "sampling": sampling, "head_offsets": list(m.head_offsets), "lr": run.lr,
        "lr_rule": lr_why, "batch_size": t.batch_size, "accum_steps": run.accum,
        "global_batch": run.global_batch, "steps_per_epoch": run.steps_per_epoch,
        "epochs": run.epochs, "amp": str(run.amp), "dtype": str(dtype).replace("torch.", ""),
        "stdha_backend": backend,
        "fused_adapters": fused_adapters_active(m, run.device, dtype, training=True),
        "params_total": count_params(m), "params_trainable": count_params(m, True),
        "out_dir": str(run.out_dir), "resume": str(resume) if resume else None,
        "num_workers": d.num_workers,
    }
    lines = [
        f"model    {rec['model']}",
        f"data     {rec['train_samples']} training videos, {n_val} validation videos, "
        f"{run.num_classes} classes; {sampling}; {d.num_workers} loader workers",
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


# ----------------------------------------------------------------------------- resuming


def _resume(run: TrainingRun, path: Path) -> tuple[int, Optional[dict], list[str]]:
    """Load the checkpoint's state into ``run``: returns the epoch to start from, this rank's
    random-number state and the notes to print (after the changed settings they follow from)."""
    ck = _resume_into(path, run.model, run.base)
    if int(ck.get("num_classes", run.num_classes)) != run.num_classes:
        raise ValueError(f"cannot resume from {path}: it has {ck['num_classes']} classes, the "
                         f"data {run.num_classes}")
    start = int(ck["epoch"])
    if run.epochs < start:
        raise ValueError(f"train.epochs is {run.epochs}, but {path} has finished {start} epochs: "
                         f"give more than {start} to go on (--set train.epochs=N)")
    notes = []
    if run.epochs == start:
        notes.append(f"note: the run has finished its {start} epochs, nothing to train (go on "
                     "with --set train.epochs=N)")
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    # The cosine ends after the epochs left at this run's steps per epoch. Unchanged settings
    # give the saved end exactly; a longer train.epochs or another number of processes (other
    # steps per epoch) would otherwise end where the old plan did.
    planned = run.scheduler.last_step + (run.epochs - start) * run.steps_per_epoch
    if planned != run.scheduler.total_steps:
        was, lr_was = run.scheduler.total_steps, run.scheduler.get_last_lr()[0]
        run.scheduler.set_total_steps(planned)
        lr_now = run.scheduler.get_last_lr()[0]
        notes.append(f"learning-rate schedule: now ends at step {planned} (was {was}); the "
                     f"learning rate at step {run.scheduler.last_step} goes from {lr_was:.4g} "
                     f"to {lr_now:.4g}")
        run.log.log({"type": "schedule_change", "total_steps": planned, "was": was,
                     "step": run.scheduler.last_step, "lr_was": lr_was, "lr": lr_now})
    if ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    run.step, run.best = int(ck["step"]), ck.get("best")
    own = run_folder_of(path)
    if run.best and own is not None and own != run.out_dir.resolve():
        # a run continued in a new folder: its best so far stays behind; best here starts anew
        notes.append(f"note: the best checkpoint so far (epoch {run.best.get('epoch')}) stays in "
                     f"{own / 'best'}; {run.out_dir / 'best'} will be the best of the epochs "
                     "trained here")
        run.best = None
    rngs = ck.get("rng") or []
    run.log.log({"type": "resume", "from": str(path), "epoch": start, "step": run.step})
    # Same world size: every rank continues its own stream. Otherwise the run is no longer
    # bit-identical anyway; reuse the saved states in turn.
    return start, (rngs[run.info.rank % len(rngs)] if rngs else None), notes


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
