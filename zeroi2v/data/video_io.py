"""Reading videos (``VideoReader`` over torchcodec / decord / PyAV) and writing them (PyAV)."""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Optional

import numpy as np

from .decoders import VideoDecodeError, VideoReader

__all__ = ["VideoDecodeError", "write_video", "read_video_frames", "count_video_frames", "open_video",
           "CODECS", "add_video_stream"]

#: ``write_video`` codecs: name -> (FFmpeg encoder, pixel format, encoder options). B-frames are
#: off for H.264 so every container reports the exact frame count.
CODECS = {
    "h264": ("libx264", "yuv420p", {"preset": "ultrafast", "crf": "12", "bframes": "0"}),
    "mpeg4": ("mpeg4", "yuv420p", {"qscale": "2"}),
    "vp9": ("libvpx-vp9", "yuv420p", {"crf": "12", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    "mjpeg": ("mjpeg", "yuvj420p", {"qscale": "2"}),
}
_EVEN_ONLY = {"libx264", "h264"}
_auto_codec: Optional[str] = None


def _encoder_works(name: str) -> bool:
    import av

    try:
        av.CodecContext.create(name, "w")
    except Exception:  # depends on the FFmpeg build
        return False
    return True


def _default_codec() -> str:
    """H.264 where PyAV can encode it, else MPEG-4 part 2."""
    global _auto_codec
    if _auto_codec is None:
        for name in ("h264", "mpeg4"):
            if _encoder_works(CODECS[name][0]):
                _auto_codec = name
                break
        else:  # pragma: no cover
            raise RuntimeError("PyAV has neither an H.264 nor an MPEG-4 encoder")
    return _auto_codec


def add_video_stream(container, codec: str, width: int, height: int, fps, options: Optional[dict] = None):
    """Add a video stream for ``codec`` (a ``CODECS`` key) to an open PyAV output container.

    ``fps`` may be a ``Fraction``; ``options`` update the codec's default encoder options.
    """
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    encoder, pix_fmt, opts = CODECS[codec]
    if encoder in _EVEN_ONLY and (width % 2 or height % 2):
        raise ValueError(f"{codec} (yuv420p) needs an even height and width, got {height}x{width}; "
                         f"pick an even size or codec 'mpeg4', 'vp9' or 'mjpeg'")
    rate = Fraction(fps).limit_denominator(1001)
    stream = container.add_stream(encoder, rate=rate)
    stream.width, stream.height, stream.pix_fmt = int(width), int(height), pix_fmt
    stream.options = {**opts, **(options or {})}
    return stream


def write_video(path: str | os.PathLike, frames, fps: int = 8, codec: Optional[str] = None,
                options: Optional[dict] = None) -> str:
    """Write RGB frames ``(T, H, W, 3)`` uint8 to a video file; the container follows the extension.

    ``codec``: a ``CODECS`` key (``h264``, ``mpeg4``, ``vp9``, ``mjpeg``); ``None`` picks H.264 if
    PyAV can encode it, else MPEG-4 part 2. H.264 needs an even height and width. ``options``
    update the encoder options (e.g. ``{"g": "5", "bframes": "2"}``). Returns the codec.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError("need at least one frame")
    codec = codec or _default_codec()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = add_video_stream(container, codec, w, h, fps, options)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def open_video(path: str | os.PathLike, decoder: str = "auto") -> VideoReader:
    """A ``VideoReader``: ``len(r)`` frames, ``r.get_batch(idx) -> (N, H, W, 3)`` uint8 RGB.

    Every failure (missing file, not a video, no frames) raises ``VideoDecodeError`` naming the path.
    """
    return VideoReader(path, decoder)


def count_video_frames(path: str | os.PathLike, decoder: str = "auto") -> int:
    return len(open_video(path, decoder))


def read_video_frames(path: str | os.PathLike, indices=None, decoder: str = "auto",
                      reader: Optional[VideoReader] = None) -> np.ndarray:
    """Decode frames ``indices`` (any shape of ints, all frames when ``None``) of ``path``.

    Returns uint8 RGB ``indices.shape + (H, W, 3)``. Each distinct frame is decoded once.
    Raises ``VideoDecodeError`` (naming the path) on any failure, including indices out of range.
    """
    if reader is None:
        reader = open_video(path, decoder)
    n = len(reader)
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        raise ValueError("no frame indices requested")
    frames = reader.get_batch(idx.ravel())
    return frames.reshape(idx.shape + frames.shape[1:])
