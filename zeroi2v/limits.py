"""Resource limits: what a file, a config or a video may ask of this machine, checked before
anything is allocated.

Every loader works out what its input asks for first (parameters from a config, tensor bytes
from a file's header, frames x pixels from a video's stream header) and calls :func:`check_bytes`
or :func:`check_video_pixels`; a request over the limit is a :class:`LimitError` (a
``ValueError``, so the command line reports it as one line, exit code 2) that gives the number,
the limit and the setting that raises it. docs/limits.md lists every check.

Two settings (:mod:`zeroi2v.settings`, read once):

* ``ZEROI2V_MEMORY_LIMIT`` (default ``auto``: half of this machine's memory, or of the
  container's memory limit when that is lower): the most memory one request may need.
* ``ZEROI2V_MAX_VIDEO_PIXELS`` (default 4096 x 2160): the largest frame a video may have, so
  that decoding memory depends on the clip and not on the source resolution (re-encode larger
  sources once with ``zeroi2v prepare``).
"""
from __future__ import annotations

import os
from typing import Optional

from . import settings

__all__ = ["LimitError", "memory_limit", "machine_memory", "check_bytes", "check_video_pixels",
           "fmt_bytes", "MAX_DEPTH", "MAX_CLASSES", "MAX_FRAMES"]

#: Structural ceilings that hold whatever the memory: a deeper model or more classes than this
#: is a typo, and building one would take minutes before the memory check could see it.
MAX_DEPTH = 1024
MAX_CLASSES = 1_000_000
MAX_FRAMES = 1_000_000


class LimitError(ValueError):
    """A request over a resource limit (the message gives the number, the limit, the fix)."""


def machine_memory() -> int:
    """Physical memory in bytes, or the cgroup (container) limit when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        total = 16 * 2**30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return int(total)


def memory_limit() -> int:
    """The memory one request may ask for, in bytes (``ZEROI2V_MEMORY_LIMIT``)."""
    set_ = settings.memory_limit()
    return int(set_) if set_ is not None else machine_memory() // 2


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def _setting_hint() -> str:
    set_ = settings.memory_limit()
    now = "auto (half of this machine's memory)" if set_ is None else fmt_bytes(set_)
    return f"ZEROI2V_MEMORY_LIMIT (now {now}) raises the limit"


def check_bytes(nbytes: float, what: str, fix: str = "", limit: Optional[int] = None) -> None:
    """Refuse ``what`` if it needs more than the memory limit: ``"<what> needs 51.2 GB, over the
    memory limit of 12.0 GB: <fix>; ZEROI2V_MEMORY_LIMIT raises the limit"``."""
    limit = memory_limit() if limit is None else int(limit)
    if nbytes > limit:
        fix = f"{fix}; " if fix else ""
        raise LimitError(f"{what} needs {fmt_bytes(nbytes)}, over the memory limit of "
                         f"{fmt_bytes(limit)}: {fix}{_setting_hint()}")


def check_video_pixels(path: str, width: int, height: int) -> None:
    """Refuse a video whose frames are larger than ``ZEROI2V_MAX_VIDEO_PIXELS``."""
    limit = settings.max_video_pixels()
    if int(width) * int(height) > limit:
        raise LimitError(
            f"{path}: frames of {width}x{height} ({width * height / 1e6:.1f} Mpx) are over the "
            f"{limit / 1e6:.1f} Mpx limit: re-encode the videos smaller once (zeroi2v prepare SRC "
            "DST --short-side 256), or raise ZEROI2V_MAX_VIDEO_PIXELS")
