"""What training, evaluation and prediction share at run time: mixed precision, DataLoader
worker seeding, JSON for log records, and Ctrl-C handling."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch


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


def seed_worker(worker_id: int) -> None:
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)



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


def check_interrupt() -> None:
    if _INTERRUPTS["count"]:
        raise KeyboardInterrupt


def interrupt_requested() -> bool:
    """Ctrl-C was pressed inside :func:`interrupt_guard` (the loops stop after this batch)."""
    return bool(_INTERRUPTS["count"])


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: says where the last complete checkpoint is."""

    def __init__(self, out_dir: Path, epoch: int, last_epoch: Optional[int]):
        super().__init__(f"interrupted in epoch {epoch}")
        self.out_dir, self.epoch, self.last_epoch = out_dir, epoch, last_epoch


