"""How long work shows it is going on: a progress bar on a terminal, plain lines in a file or a
pipe, durations and tables that read well in both. For every layer (training and ``prepare``)."""
from __future__ import annotations

import sys
import time


def on_terminal(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


class _Lines(_NoBar):
    """Progress as plain lines (no ``\\r``): one every ``every`` updates, each with the count,
    the total, the time and the latest values, for logs read after the fact."""

    def __init__(self, total: int, desc: str, every: int, initial: int = 0):
        self.total, self.desc, self.every = total, desc, max(1, every)
        self.n, self.t0, self.post = initial, time.perf_counter(), ""

    def update(self, n=1):
        self.n += n
        if self.n % self.every == 0 and self.n < self.total:
            self._print()

    def set_postfix(self, **kw):
        self.post = " ".join(f"{k} {v}" for k, v in kw.items())

    def _print(self):
        dt = time.perf_counter() - self.t0
        print(f"{self.desc}: {self.n}/{self.total} ({seconds(dt)}){' ' + self.post if self.post else ''}",
              flush=True)

    def close(self):
        pass


def seconds(dt: float) -> str:
    """A duration as people read it: ``0.4 s``, ``12 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if round(dt, 1) < 10:
        return f"{dt:.1f} s"
    if round(dt) < 60:
        return f"{dt:.0f} s"
    m, s = divmod(int(round(dt)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def console():
    """A rich console; tables written to a file or a pipe (nohup, Slurm) get 160 columns instead
    of rich's 80, so they are not wrapped cell by cell."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=160)


def progress_bar(total: int, desc: str, enabled: bool, every: int = 0, initial: int = 0,
                 unit: str = "it", leave: bool = False):
    """A tqdm bar on a terminal; plain lines every ``every`` steps (0: none) elsewhere (a file,
    a pipe: nohup, Slurm), never tqdm's ``\\r`` frames there; nothing when ``enabled`` is false.
    The bar is only told how far the loop is (it never sees the iterable), so it cannot change
    what the loop does."""
    if not enabled:
        return _NoBar()
    if not on_terminal():
        return _Lines(total, desc, every, initial) if every else _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                leave=leave)
