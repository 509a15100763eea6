"""Training checkpoints: a saved-model folder plus the state that resumes the run exactly.

``train`` writes, after every epoch, ``OUT/checkpoints/epoch_NNNN/`` holding

* ``config.json`` + ``model.safetensors``: the model (see :mod:`zeroi2v.models.artefact`; with a
  pretrained image file only the trainable tensors, the frozen rest comes from that file);
* ``run_config.yaml``: the run's full config (what ``eval``/``predict`` read for the data
  pipeline);
* ``training_state.pt``: optimiser, schedule, gradient scaler, every rank's RNG streams, epoch,
  step and best result, in plain tensors, numbers, strings, lists and dicts only, so it is read
  with ``torch.load(weights_only=True)`` and no allow-list at all.

The folder is written under a temporary name and renamed when complete; ``OUT/last`` and
``OUT/best`` are symbolic links replaced in one step, so an interrupted run always leaves a
complete previous checkpoint. ``config.json`` records the SHA-256 of the weights and of the
training state; resuming checks both. Older epoch folders are removed once nothing points at
them, except the one before ``last``, kept to fall back to.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ..limits import LimitError
from ..models.artefact import (
    RUN_CONFIG_FILE,
    RUN_CONFIG_SHA_KEY,
    SHA_KEY,
    TRAINING_STATE_FILE,
    WEIGHTS_FILE,
    Artefact,
    file_digest,
    read_artefact,
    read_run_config,
    save_pretrained,
)
from ..safe_io import (
    PathLike,
    atomic_dir,
    atomic_torch_save,
    check_tensor_memory,
    read_checkpoint,
    replace_symlink,
)

STATE_FORMAT = "zeroi2v-training-state"
STATE_SHA_KEY = "training_state_sha256"
STATE_VERSION = 1
CHECKPOINTS = "checkpoints"


def save_checkpoint(out_dir: PathLike, model: nn.Module, *, epoch: int, run_config: dict,
                    state: dict, weights: str = "full", base_weights: Optional[dict] = None,
                    best: bool = False) -> Path:
    """Write ``OUT/checkpoints/epoch_NNNN`` (model + run config + training state) and point
    ``OUT/last`` (and ``OUT/best`` if ``best``) at it. Returns the folder.

    ``config.json`` records the SHA-256 of both the weights and the training state, so a
    damaged checkpoint is found before it is resumed (:func:`verify_checkpoint`)."""
    out_dir = Path(out_dir)
    folder = out_dir / CHECKPOINTS / f"epoch_{int(epoch):04d}"
    n = 1
    while folder.exists():  # resumed from an earlier epoch: never touch what `last` points at
        n += 1
        folder = out_dir / CHECKPOINTS / f"epoch_{int(epoch):04d}_{n}"
    with atomic_dir(folder) as tmp:
        atomic_torch_save(dict(state, format=STATE_FORMAT, version=STATE_VERSION),
                          tmp / TRAINING_STATE_FILE)
        digest = file_digest(tmp / TRAINING_STATE_FILE)["sha256"]
        save_pretrained(unwrap(model), tmp, weights=weights, base_weights=base_weights,
                        run_config=run_config,
                        extra={"epoch": int(epoch), STATE_SHA_KEY: digest})
    for name in ("last", "best") if best else ("last",):
        link = out_dir / name
        if link.is_dir() and not link.is_symlink():
            # a copy of the run that followed the links (cp -rL, rsync -L): this folder copies
            # a checkpoint that is under checkpoints/ too, and a link cannot replace a folder
            shutil.rmtree(link)
        replace_symlink(link, folder)
    _prune(out_dir)
    return folder


def _prune(out_dir: Path) -> None:
    """Keep ``last``, the checkpoint before it (the one to fall back to should ``last`` ever be
    damaged) and ``best``."""
    keep = {(out_dir / n).resolve() for n in ("last", "best") if (out_dir / n).exists()}
    # only the names save_checkpoint gives: a user's epoch_0003_keep or epoch_0003.bak stays
    folders = sorted((d for d in (out_dir / CHECKPOINTS).glob("epoch_*")
                      if re.fullmatch(r"epoch_\d+(_\d+)?", d.name)), key=_epoch_of)
    last = (out_dir / "last").resolve()
    older = [d for d in folders if d.resolve() != last and _epoch_of(d) <= _epoch_of(last)]
    if older:
        keep.add(older[-1].resolve())
    for d in folders:
        if d.resolve() not in keep:
            shutil.rmtree(d, ignore_errors=True)


def _epoch_of(folder: Path) -> tuple:
    parts = folder.name.split("_")  # epoch_0003 or epoch_0003_2 (a re-run epoch)
    try:
        return (int(parts[1]), int(parts[2]) if len(parts) > 2 else 1)
    except (IndexError, ValueError):
        return (-1, 0)


def checkpoint_folder(path: PathLike) -> Path:
    """A training checkpoint folder: ``path`` itself, or ``path/last`` for a run's output folder."""
    p = Path(path)
    if p.is_dir() and not (p / TRAINING_STATE_FILE).is_file() and (p / "last").exists():
        p = p / "last"
    if not p.exists():
        there = sorted((p.parent.glob("epoch_*")), key=_epoch_of) if p.parent.name == CHECKPOINTS \
            else []
        kept = (f" ({p.parent} keeps {', '.join(q.name for q in there)}: older checkpoints are "
                "removed as a run goes on)") if there else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{kept}")
    return p.resolve()


def run_folder_of(checkpoint: PathLike) -> Optional[Path]:
    """The output folder of the run that saved ``checkpoint`` (``RUN/checkpoints/epoch_N``), or
    None for a checkpoint copied elsewhere."""
    p = Path(checkpoint).resolve()
    if p.parent.name == CHECKPOINTS:
        run = p.parent.parent
    elif p.name in ("last", "best") and (p.parent / CHECKPOINTS).is_dir():
        run = p.parent  # RUN/last as a folder: a copy of the run that followed the links
    else:
        return None
    # a run's folder, not any folder named checkpoints: a run writes these beside them
    return run if any((run / n).exists() for n in ("log.jsonl", "config.yaml", "last")) else None


def holds_checkpoints(out_dir: PathLike) -> bool:
    """Whether ``out_dir`` holds a run's checkpoints (``last``/``best`` or ``checkpoints/epoch_*``)."""
    d = Path(out_dir)
    return any((d / n).exists() or (d / n).is_symlink() for n in ("last", "best")) or \
        any((d / CHECKPOINTS).glob("epoch_*"))


def verify_checkpoint(folder: PathLike) -> Optional[str]:
    """``None`` if the checkpoint folder is complete and its files match the SHA-256 its
    ``config.json`` records, else what is wrong (reads the files, loads nothing)."""
    try:
        art = read_artefact(folder)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    for name, key in ((WEIGHTS_FILE, SHA_KEY), (TRAINING_STATE_FILE, STATE_SHA_KEY),
                      (RUN_CONFIG_FILE, RUN_CONFIG_SHA_KEY)):
        path, want = art.folder / name, art.info.get(key)
        if not path.is_file():
            return f"{path} is missing"
        if want is not None and file_digest(path)["sha256"] != want:
            return f"{path} is damaged (its SHA-256 differs from the one config.json records)"
    return None


def newest_intact_checkpoint(out_dir: PathLike, skip: Optional[Path] = None) -> Optional[Path]:
    """The newest checkpoint of a run's output folder that :func:`verify_checkpoint` passes."""
    folders = sorted((Path(out_dir) / CHECKPOINTS).glob("epoch_*"), key=_epoch_of, reverse=True)
    for d in folders:
        if (skip is None or d.resolve() != Path(skip).resolve()) and verify_checkpoint(d) is None:
            return d
    return None


def saved_run_config(path: PathLike):
    """The :class:`~zeroi2v.train.config.RunConfig` a training checkpoint was written with (its
    ``run_config.yaml``, checked against its recorded SHA-256), validated as any config is."""
    from .config import load_config

    art = read_artefact(checkpoint_folder(path))
    saved = read_run_config(art)
    if saved is None:
        raise ValueError(f"{art.folder} has no run_config.yaml: it is a saved model, not a "
                         "training checkpoint to resume")
    return load_config(None, base=saved)


def read_training_checkpoint(path: PathLike) -> tuple[Artefact, dict]:
    """``(artefact, training state)`` of a checkpoint folder written by :func:`save_checkpoint`.
    The state is read like any file zeroi2v did not write (the restricted reader, sizes checked
    before allocating), then checked to hold only tensors and plain values, with the keys a
    resume reads."""
    art = read_artefact(checkpoint_folder(path))
    state_file = art.training_state_file
    if state_file is None:
        raise ValueError(f"{art.folder} is a saved model, not a training checkpoint (no "
                         f"{TRAINING_STATE_FILE}): it can be evaluated, not resumed")
    want = art.info.get(STATE_SHA_KEY)
    if want is not None and file_digest(state_file)["sha256"] != want:
        raise ValueError(f"{state_file} is damaged (its SHA-256 differs from the one "
                         f"{art.folder / 'config.json'} records): resume from an intact checkpoint")
    try:
        state = read_checkpoint(state_file)
    except LimitError:
        raise
    except ValueError as e:
        raise ValueError(f"{state_file} cannot be read as a training state: {e}") from None
    _check_state(state, state_file)
    if int(state.get("version", 0)) > STATE_VERSION:
        raise ValueError(f"{state_file} has training-state version {state['version']}, newer than "
                         f"this zeroi2v reads ({STATE_VERSION}): upgrade zeroi2v")
    return art, state


_STATE_KEYS = {"optimizer": dict, "scheduler": dict, "epoch": int, "step": int, "rng": list,
               "num_classes": int}


def _check_state(state, path) -> None:
    """Tensors and plain values only (a placeholder for anything else is refused, naming where),
    every tensor owning its bytes, and the keys a resume reads, of their types."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a zeroi2v training state")
    tensors: dict[str, torch.Tensor] = {}
    stack = [("", state)]
    while stack:
        where, x = stack.pop()
        if isinstance(x, torch.Tensor):
            tensors[where or "state"] = x
        elif isinstance(x, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in x.items()
                         if isinstance(k, (str, int)) or _bad(path, where, k))
        elif isinstance(x, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(x))
        elif not (x is None or isinstance(x, (bool, int, float, str, bytes))):
            _bad(path, where, x)
    check_tensor_memory(tensors, path)
    for k, kind in _STATE_KEYS.items():
        if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool):
            raise ValueError(f"{path} cannot be read as a training state: {k!r} is missing or "
                             f"not a {kind.__name__}")


def _bad(path, where: str, x) -> bool:
    raise ValueError(f"{path} cannot be read as a training state (it must hold only tensors and "
                     f"plain values): {where or 'the state'} holds a {type(x).__name__}")


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG stream of this process as plain values (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different machine: restore what lines up
            for i, s in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- model states


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def base_weights_digest(pretrained: Union[bool, str, os.PathLike, None],
                        source: Optional[dict] = None) -> Optional[dict]:
    """``{"path", "size", "sha256"}`` of the image file a run's frozen weights come from:
    ``model.pretrained`` when it is a local file; for weights from the Hub (``true`` or
    ``hf-hub:...``) the cached file that ``source`` (the model's ``pretrained_source``) names,
    plus its repository, file and commit, so that a checkpoint moved to another machine finds
    it again through the Hub's cache."""
    from ..models import hub

    if pretrained is None or pretrained is False:
        return None
    if pretrained is True or hub.is_hub_id(pretrained):
        if not source or not source.get("repo_id"):
            raise ValueError("the model records no Hub source for model.pretrained")
        return dict(file_digest(hub.source_file(source)),
                    **{k: source[k] for k in ("repo_id", "filename", "revision")})
    return file_digest(pretrained)
