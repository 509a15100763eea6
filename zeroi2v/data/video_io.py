"""Reading videos (decord, PyAV fallback) and writing small test/demo videos (PyAV)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["VideoDecodeError", "write_video", "read_video_frames", "count_video_frames", "open_video"]

_CODECS = (  # (codec name, encoder options), first one that encodes here wins
    ("libx264", {"preset": "ultrafast", "crf": "12", "bframes": "0"}),
    ("h264", {}),
    ("mpeg4", {"qscale": "2"}),
)
_codec_cache: Optional[tuple[str, dict]] = None


class VideoDecodeError(RuntimeError):
    """A video could not be opened or decoded; ``.path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read video {path!r}: {reason}")
        self.path = path
        self.reason = reason


def _pick_codec() -> tuple[str, dict]:
    global _codec_cache
    if _codec_cache is None:
        import av

        available = av.codecs_available
        for name, opts in _CODECS:
            if name not in available:
                continue
            try:
                av.CodecContext.create(name, "w")
            except Exception:  # pragma: no cover - depends on the FFmpeg build
                continue
            _codec_cache = (name, opts)
            break
        else:  # pragma: no cover
            raise RuntimeError("PyAV has neither an H.264 nor an MPEG-4 encoder")
    return _codec_cache


def write_video(path: str | os.PathLike, frames, fps: int = 8) -> str:
    """Write RGB frames ``(T, H, W, 3)`` uint8 to an mp4 (H.264 if available, else MPEG-4 part 2).

    H and W must be even (yuv420p). B-frames are off so decoders report the exact frame count.
    Returns the codec used.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t < 1 or h % 2 or w % 2:
        raise ValueError(f"need >= 1 frame and even height/width for yuv420p, got T={t}, {h}x{w}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    codec, opts = _pick_codec()
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = dict(opts)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def _have_decord() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:
        return False
    return True


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "decord" if _have_decord() else "pyav"
    if backend not in ("decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    return backend


class _PyAVReader:
    """VideoReader stand-in on PyAV: sequential decoding up to the last requested frame."""

    def __init__(self, path: str, num_frames: Optional[int] = None):
        import av

        self._path = path
        if num_frames is None:
            with av.open(path) as container:
                stream = container.streams.video[0]
                num_frames = int(stream.frames or 0)
                if num_frames <= 0:  # no count in the header: decode to count
                    num_frames = sum(1 for _ in container.decode(stream))
        self._len = int(num_frames)

    def __len__(self) -> int:
        return self._len

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        import av

        wanted = sorted(set(int(i) for i in indices))
        found: dict[int, np.ndarray] = {}
        with av.open(self._path) as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    found[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
        missing = [i for i in wanted if i not in found]
        if missing:
            raise RuntimeError(f"only {len(found) and max(found) + 1} decodable frames, need index {missing[0]}")
        return np.stack([found[int(i)] for i in indices])


class _DecordReader:
    """decord VideoReader; falls back to PyAV for a batch decord fails on.

    (decord 0.6 fails on some frame widths, e.g. 48 px: "DECORDArrayCopyFromTo: The size must exactly
    match", or returns 4 channels.)
    """

    def __init__(self, path: str, num_threads: int = 1):
        import decord

        self._path = path
        self._vr = decord.VideoReader(path, num_threads=num_threads)

    def __len__(self) -> int:
        return len(self._vr)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        try:
            out = self._vr.get_batch(list(indices)).asnumpy()
            if out.ndim == 4 and out.shape[-1] == 3:
                return out
            err: Exception = RuntimeError(f"decord returned frames of shape {out.shape}")
        except Exception as e:
            err = e
        try:
            return _PyAVReader(self._path, len(self)).get_batch(indices)
        except Exception:
            raise err from None


def open_video(path: str | os.PathLike, backend: str = "auto"):
    """Open a video for random frame access; ``len(r)`` frames, ``r.get_batch(idx) -> (N, H, W, 3)``.

    Every failure (missing file, not a video, no frames) raises ``VideoDecodeError`` naming the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found")
    backend = _resolve_backend(backend)
    try:
        reader = _DecordReader(path) if backend == "decord" else _PyAVReader(path)
        n = len(reader)
    except Exception as e:  # decord raises DECORDError (an Exception), PyAV its own errors
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}".strip()) from e
    if n <= 0:
        raise VideoDecodeError(path, "no decodable frames")
    return reader


def count_video_frames(path: str | os.PathLike, backend: str = "auto") -> int:
    return len(open_video(path, backend))


def read_video_frames(path: str | os.PathLike, indices=None, backend: str = "auto", reader=None) -> np.ndarray:
    """Decode frames ``indices`` (any shape of ints, all frames when ``None``) of ``path``.

    Returns uint8 RGB ``indices.shape + (H, W, 3)``. Each distinct frame is decoded once.
    Raises ``VideoDecodeError`` (naming the path) on any failure, including indices out of range.
    """
    path = os.fspath(path)
    if reader is None:
        reader = open_video(path, backend)
    n = len(reader)
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        raise ValueError("no frame indices requested")
    if idx.min() < 0 or idx.max() >= n:
        raise VideoDecodeError(path, f"frame index out of range [0, {n}): min {idx.min()}, max {idx.max()}")
    uniq, inverse = np.unique(idx.ravel(), return_inverse=True)
    try:
        frames = reader.get_batch(uniq.tolist())
    except Exception as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}".strip()) from e
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] != len(uniq) or frames.shape[-1] != 3:
        raise VideoDecodeError(path, f"decoder returned frames of shape {frames.shape}")
    return frames[inverse].reshape(idx.shape + frames.shape[1:])
