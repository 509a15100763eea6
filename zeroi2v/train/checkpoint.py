"""Checkpoints: atomic writes, RNG state capture/restore, trainable-only model states, clear errors."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

TRAIN_FORMAT = "zeroi2v-train"
MERGED_FORMAT = "zeroi2v-merged"


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace`` it into place,
    so a crash never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_file(path: Union[str, os.PathLike], expect: Optional[tuple[str, ...]] = None) -> dict:
    """Load a zeroi2v checkpoint/model file with readable errors (missing, corrupt, wrong kind)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated file, not a torch file, ...
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or "format" not in obj:
        raise ValueError(
            f"{path} is not a zeroi2v checkpoint (no 'format' key); official mmaction2 checkpoints "
            "are converted with `zeroi2v import-official`"
        )
    if expect is not None and obj["format"] not in expect:
        raise ValueError(f"{path} is a {obj['format']!r} file, expected one of {list(expect)}")
    return obj


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def model_state(model: nn.Module, full: bool) -> dict:
    """The full state dict, or only the trainable parameters (the frozen backbone comes from the
    pretrained file when the model is rebuilt)."""
    model = unwrap(model)
    sd = model.state_dict()
    if full:
        return {k: v.detach().cpu().clone() for k, v in sd.items()}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in sd.items() if k in names}


def load_model_state(model: nn.Module, state: dict, full: bool, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` checking names and shapes first (``ValueError`` otherwise)."""
    model = unwrap(model)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(
            f"{source} does not match the model: unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (was it written for another architecture?)"
        )
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source} does not match the model: {k!r} has shape {tuple(v.shape)} in the "
                f"checkpoint but {tuple(own[k].shape)} in the model (different num_classes, "
                "num_frames or backbone?)"
            )
    if full:
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"{source} does not match the model: missing keys {missing[:5]}")
    else:
        need = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(need - set(state))
        if missing:
            raise ValueError(f"{source} lacks trainable parameters {missing[:5]}")
    model.load_state_dict(state, strict=full)
