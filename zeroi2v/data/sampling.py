"""Frame samplers: which frame indices of a video make up the clip(s).

Both samplers are called as ``sampler(num_video_frames, rng)`` with a ``numpy.random.Generator``
and return an ``int64`` array of shape ``(num_clips, clip_len)`` whose entries always lie in
``[0, num_video_frames)``. In test mode the result does not depend on ``rng``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DenseSampler", "UniformSampler"]


def _check_video_len(n: int) -> int:
    n = int(n)
    if n <= 0:
        raise ValueError(f"video has {n} frames; need at least 1")
    return n


class DenseSampler:
    """Dense sampling, e.g. Kinetics "8x16x1": ``clip_len`` frames ``frame_interval`` apart.

    A clip starting at ``o`` reads frames ``o, o + interval, ..., o + (clip_len - 1) * interval``;
    it spans ``span = (clip_len - 1) * frame_interval + 1`` frames, so valid starts are
    ``0 .. max_offset = num_frames - span``.

    * training: the range of valid starts is cut into ``num_clips`` equal parts and each clip starts
      at a uniformly random offset inside its part (one clip: anywhere in ``[0, max_offset]``);
      when there are fewer valid starts than clips, the starts are drawn independently and sorted.
    * test: starts are evenly spaced from the first to the last valid start
      (``round(k * max_offset / (num_clips - 1))``); a single test clip is centred (``max_offset // 2``).
    * videos shorter than ``span`` (``max_offset < 0``): the clip starts at 0 and indices past the
      end wrap around (``index % num_frames``, i.e. the video is looped) when
      ``out_of_bound="loop"`` (default, as mmaction2), or repeat the last frame when
      ``out_of_bound="clamp"``.
    """

    def __init__(self, clip_len: int, frame_interval: int = 1, num_clips: int = 1, test_mode: bool = False,
                 out_of_bound: str = "loop"):
        if int(clip_len) < 1 or int(frame_interval) < 1 or int(num_clips) < 1:
            raise ValueError(f"clip_len, frame_interval and num_clips must be >= 1, got "
                             f"{clip_len}, {frame_interval}, {num_clips}")
        if out_of_bound not in ("loop", "clamp"):
            raise ValueError(f"out_of_bound must be 'loop' or 'clamp', got {out_of_bound!r}")
        self.clip_len = int(clip_len)
        self.frame_interval = int(frame_interval)
        self.num_clips = int(num_clips)
        self.test_mode = bool(test_mode)
        self.out_of_bound = out_of_bound

    @property
    def num_frames(self) -> int:
        return self.clip_len

    @property
    def span(self) -> int:
        return (self.clip_len - 1) * self.frame_interval + 1

    def is_short(self, num_video_frames: int) -> bool:
        """The video has fewer frames than one clip spans (it is looped or clamped)."""
        return int(num_video_frames) < self.span

    def offsets(self, n: int, rng: np.random.Generator | None) -> np.ndarray:
        max_offset = n - self.span
        k = self.num_clips
        if max_offset <= 0:
            return np.zeros(k, dtype=np.int64)
        if self.test_mode:
            if k == 1:
                return np.array([max_offset // 2], dtype=np.int64)
            return np.round(np.arange(k) * (max_offset / (k - 1))).astype(np.int64)
        if rng is None:
            rng = np.random.default_rng()
        part = (max_offset + 1) // k
        if part > 0:
            return np.arange(k, dtype=np.int64) * part + rng.integers(0, part, size=k)
        return np.sort(rng.integers(0, max_offset + 1, size=k)).astype(np.int64)

    def __call__(self, num_video_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
        n = _check_video_len(num_video_frames)
        steps = np.arange(self.clip_len, dtype=np.int64)[None] * self.frame_interval
        idx = self.offsets(n, rng)[:, None] + steps
        if self.out_of_bound == "loop":
            idx = idx % n
        else:
            idx = np.minimum(idx, n - 1)
        return idx.astype(np.int64)

    def __repr__(self) -> str:
        return (f"DenseSampler(clip_len={self.clip_len}, frame_interval={self.frame_interval}, "
                f"num_clips={self.num_clips}, test_mode={self.test_mode}, "
                f"out_of_bound={self.out_of_bound!r})")


class UniformSampler:
    """Segment ("uniform") sampling, e.g. SSv2: one frame from each of ``num_segments`` equal segments.

    Segment ``t`` covers ``[t * n / T, (t + 1) * n / T)`` (``n`` video frames, ``T`` segments).

    * training: a uniformly random position inside each segment, ``floor((t + u_t) * n / T)`` with
      ``u_t ~ U[0, 1)`` drawn independently per segment (and per clip).
    * test: the centre of each segment, ``floor((t + 0.5) * n / T)``; with ``num_clips > 1`` test
      clip ``k`` takes position ``(k + 0.5) / num_clips`` inside every segment instead of the centre.
    * videos with fewer frames than segments: segments are shorter than one frame, so frames repeat
      (indices stay ordered and in range; nothing wraps).
    """

    def __init__(self, num_segments: int, test_mode: bool = False, num_clips: int = 1):
        if int(num_segments) < 1 or int(num_clips) < 1:
            raise ValueError(f"num_segments and num_clips must be >= 1, got {num_segments}, {num_clips}")
        self.num_segments = int(num_segments)
        self.num_clips = int(num_clips)
        self.test_mode = bool(test_mode)

    @property
    def num_frames(self) -> int:
        return self.num_segments

    @property
    def clip_len(self) -> int:
        return self.num_segments

    def is_short(self, num_video_frames: int) -> bool:
        """The video has fewer frames than segments (some frames repeat)."""
        return int(num_video_frames) < self.num_segments

    def __call__(self, num_video_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
        n = _check_video_len(num_video_frames)
        T, k = self.num_segments, self.num_clips
        if self.test_mode:
            pos = (np.arange(k, dtype=np.float64) + 0.5) / k
            u = np.broadcast_to(pos[:, None], (k, T))
        else:
            if rng is None:
                rng = np.random.default_rng()
            u = rng.random((k, T))
        idx = np.floor((np.arange(T, dtype=np.float64)[None] + u) * n / T).astype(np.int64)
        return np.clip(idx, 0, n - 1)

    def __repr__(self) -> str:
        return (f"UniformSampler(num_segments={self.num_segments}, test_mode={self.test_mode}, "
                f"num_clips={self.num_clips})")
