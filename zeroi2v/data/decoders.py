"""One video reader over three decoders: torchcodec, decord and PyAV.

``VideoReader(path, decoder)`` gives random frame access: ``len(reader)`` frames (presentation
order) and ``reader.get_batch(indices) -> (N, H, W, 3)`` uint8 RGB. Frame ``i`` is the same frame
whichever decoder reads it; pixels differ only by the decoders' colour conversion (tested in
``tests/test_decoders.py``).

``decoder="auto"`` tries the installed decoders in ``AUTO_ORDER`` (see the note there and
``benchmarks/test_bench_data.py``) and keeps the first that opens the file and decodes the
requested frames; a decoder that fails on a file is logged once per process. A named decoder is
used alone: its failure is the video's failure.
"""
from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from functools import cache
from typing import Optional

import numpy as np

__all__ = ["DECODERS", "AUTO_ORDER", "VideoDecodeError", "VideoReader", "decoder_status",
           "available_decoders", "check_decoder"]

logger = logging.getLogger("zeroi2v.data")

DECODERS = ("torchcodec", "decord", "pyav")
#: ``auto``'s preference. benchmarks/results/cpu/data_run_a.json (a loaded VM) did not separate the
#: three on speed; torchcodec leads as the one that reads every file of the codec matrix.
AUTO_ORDER = ("torchcodec", "decord", "pyav")

_INSTALL_HINT = {
    "torchcodec": "pip install 'torchcodec>=0.15,<0.18' (for torch 2.14) and FFmpeg's shared libraries "
                  "(Debian/Ubuntu: apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 "
                  "libswresample4 libavfilter8 libavdevice59)",
    "decord": "pip install decord (wheels for Python <= 3.11 on x86-64 only)",
    "pyav": "pip install av",
}


class VideoDecodeError(RuntimeError):
    """A video could not be opened or decoded; ``.path`` names it, ``.reason`` says why.

    Also constructible from one message (how a DataLoader worker re-raises it in the main process).
    """

    def __init__(self, path: str, reason: Optional[str] = None):
        if reason is None:  # a message only, e.g. re-raised from a DataLoader worker with its traceback
            lines = [ln for ln in str(path).strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else ""
            msg = last.split("VideoDecodeError: ", 1)[1] if "VideoDecodeError: " in last else str(path)
            super().__init__(msg)
            self.path, self.reason = "", msg
            return
        super().__init__(f"cannot read video {path!r}: {reason}")
        self.path = path
        self.reason = reason


@cache
def _load_error(name: str) -> Optional[str]:
    """``None`` when decoder ``name`` imports and loads here, else the error, one line."""
    try:
        if name == "torchcodec":
            from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads the FFmpeg libraries)
        elif name == "decord":
            # decord loads its bundled FFmpeg/libvpx with RTLD_GLOBAL; PyAV loaded after it binds to
            # those and its VP9 encoder fails (EINVAL). PyAV first keeps each library with its own.
            try:
                import av  # noqa: F401
            except ImportError:
                pass
            import decord  # noqa: F401
        elif name == "pyav":
            import av  # noqa: F401
        else:
            raise ValueError(f"decoder must be 'auto' or one of {DECODERS}, got {name!r}")
    except ValueError:
        raise
    except Exception as e:  # ImportError, or torchcodec's RuntimeError when FFmpeg/torch do not match
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"
    return None


def decoder_status() -> dict[str, Optional[str]]:
    """``{decoder: None if usable here else the reason}`` for every decoder."""
    return {name: _load_error(name) for name in DECODERS}


def available_decoders() -> list[str]:
    """Usable decoders in ``auto``'s order."""
    return [name for name in AUTO_ORDER if _load_error(name) is None]


def check_decoder(decoder: str) -> str:
    """Validate a ``data.decoder`` setting: a ``ValueError`` naming the fix unless it can run here."""
    if decoder == "auto":
        if not available_decoders():
            raise ValueError("no video decoder is usable: " + "; ".join(
                f"{n}: {e} ({_INSTALL_HINT[n]})" for n, e in decoder_status().items()))
        return decoder
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be 'auto' or one of {DECODERS}, got {decoder!r}")
    err = _load_error(decoder)
    if err is not None:
        raise ValueError(f"decoder {decoder!r} cannot be used here ({err}); {_INSTALL_HINT[decoder]}, "
                         f"or set decoder 'auto' (usable: {available_decoders()})")
    return decoder


# ----------------------------------------------------------------------------------- backends
class _TorchcodecBackend:
    name = "torchcodec"

    def __init__(self, path: str):
        from torchcodec.decoders import VideoDecoder

        # exact mode scans the file once: frame count and frame positions from the packets
        self._dec = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=1, seek_mode="exact")
        self._len = int(self._dec.metadata.num_frames or 0)

    def __len__(self) -> int:
        return self._len

    def get_batch(self, indices: list[int]) -> np.ndarray:
        return self._dec.get_frames_at(indices).data.numpy()


class _DecordBackend:
    name = "decord"

    def __init__(self, path: str):
        import decord

        self._vr = decord.VideoReader(path, num_threads=1)

    def __len__(self) -> int:
        return len(self._vr)

    def get_batch(self, indices: list[int]) -> np.ndarray:
        out = self._vr.get_batch(indices).asnumpy()
        # decord 0.6 returns 4 channels or fails ("DECORDArrayCopyFromTo: The size must exactly
        # match") on some frame widths, e.g. 48 px
        if out.ndim != 4 or out.shape[-1] != 3:
            raise RuntimeError(f"decord returned frames of shape {out.shape}")
        return out


class _PyAVBackend:
    """PyAV with a packet index: frame ``i`` is the ``i``-th smallest packet timestamp.

    Opening demuxes (does not decode) the stream once. Reading seeks to the keyframe before each
    run of wanted frames and decodes forward. Streams without usable timestamps are decoded
    sequentially from the start, frames counted in output order.
    """

    name = "pyav"

    def __init__(self, path: str):
        import av

        self._path = path
        with av.open(path) as container:
            stream = container.streams.video[0]
            pts, keys = [], []
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                pts.append(packet.pts)
                keys.append(bool(packet.is_keyframe))
        if pts and None not in pts and len(set(pts)) == len(pts):
            order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
            self._pts = [int(pts[i]) for i in order]
            self._key_pos = sorted(int(np.searchsorted(self._pts, pts[i])) for i, k in enumerate(keys) if k)
            self._len = len(self._pts)
        else:
            self._pts = None
            self._key_pos = []
            self._len = self._count_decoded()

    def _count_decoded(self) -> int:
        import av

        with av.open(self._path) as container:
            stream = container.streams.video[0]
            return sum(1 for _ in container.decode(stream))

    def __len__(self) -> int:
        return self._len

    def get_batch(self, indices: list[int]) -> np.ndarray:
        import av

        wanted = sorted(set(indices))
        found: dict[int, np.ndarray] = {}
        with av.open(self._path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            if self._pts is None or not self._key_pos or self._key_pos[0] != 0:
                self._sequential(container, stream, wanted, found)
            else:
                self._seeking(container, stream, wanted, found)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise RuntimeError(f"frame {missing[0]} of {self._len} could not be decoded")
        return np.stack([found[i] for i in indices])

    @staticmethod
    def _sequential(container, stream, wanted, found) -> None:
        want, last = set(wanted), wanted[-1]
        for i, frame in enumerate(container.decode(stream)):
            if i in want:
                found[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break

    def _seeking(self, container, stream, wanted, found) -> None:
        index_of = {p: i for i, p in enumerate(self._pts)}
        k = 0
        while k < len(wanted):
            # keyframe at or before the next wanted frame; decode forward from it until the
            # wanted frames that follow are passed or the next one is better reached by a seek
            key = self._key_pos[bisect.bisect_right(self._key_pos, wanted[k]) - 1]
            container.seek(self._pts[key], stream=stream, backward=True, any_frame=False)
            progressed = False
            for frame in container.decode(stream):
                i = index_of.get(frame.pts)
                if i is None:
                    continue
                if i == wanted[k]:
                    found[i] = frame.to_ndarray(format="rgb24")
                    k += 1
                    progressed = True
                    if k == len(wanted):
                        break
                if i >= wanted[k] or self._key_pos[bisect.bisect_right(self._key_pos, wanted[k]) - 1] > i + 1:
                    break
            if not progressed:  # the seek landed past the frame: give up on seeking
                rest = wanted[k:]
                container.seek(0, stream=stream, backward=True, any_frame=False)
                self._sequential(container, stream, rest, found)
                return


_BACKENDS = {"torchcodec": _TorchcodecBackend, "decord": _DecordBackend, "pyav": _PyAVBackend}
_warned: set[str] = set()


def _note_fallback(name: str, path: str, reason: str) -> None:
    if name not in _warned:
        _warned.add(name)
        logger.warning("decoder %s failed on %s (%s); decoder 'auto' uses the next decoder for such "
                       "videos (reported once)", name, path, reason)


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


class VideoReader:
    """Random frame access to one video through ``decoder`` (``auto`` or one of ``DECODERS``).

    ``len(reader)``: frames in presentation order. ``reader.get_batch(indices)``: any ints in
    ``[0, len)``, repeats allowed, returns ``(len(indices), H, W, 3)`` uint8 RGB.
    ``reader.decoder``: the decoder that delivered the last batch. Every failure (missing file,
    not a video, no frames, an undecodable frame) raises ``VideoDecodeError`` naming the path;
    a decoder that cannot run here raises ``ValueError`` (see ``check_decoder``).
    """

    def __init__(self, path: str | os.PathLike, decoder: str = "auto"):
        self.path = os.fspath(path)
        check_decoder(decoder)
        if not os.path.isfile(self.path):
            raise VideoDecodeError(self.path, "file not found")
        self._candidates = available_decoders() if decoder == "auto" else [decoder]
        self._auto = decoder == "auto"
        self._errors: list[str] = []
        self._backend = None
        self._next = 0
        self._open_next(None)

    def _open_next(self, length: Optional[int]) -> None:
        """Open the next candidate decoder that opens the file (with ``length`` frames if given)."""
        while self._next < len(self._candidates):
            name = self._candidates[self._next]
            self._next += 1
            try:
                backend = _BACKENDS[name](self.path)
                n = len(backend)
            except Exception as e:  # each library raises its own error types
                self._fail(name, _why(e))
                continue
            if n <= 0:
                self._fail(name, "no decodable frames")
                continue
            if length is not None and n != length:
                self._fail(name, f"counts {n} frames where {self._backend.name} counted {length}")
                continue
            self._backend = backend
            return
        raise VideoDecodeError(self.path, "; ".join(self._errors) if self._auto else
                               self._errors[-1].split(": ", 1)[1])

    def _fail(self, name: str, reason: str) -> None:
        self._errors.append(f"{name}: {reason}")
        if self._auto and self._next < len(self._candidates):
            _note_fallback(name, self.path, reason)

    @property
    def decoder(self) -> str:
        return self._backend.name

    def __len__(self) -> int:
        return len(self._backend)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).ravel()
        n = len(self)
        if idx.size == 0:
            raise ValueError("no frame indices requested")
        if idx.min() < 0 or idx.max() >= n:
            raise VideoDecodeError(self.path, f"frame index out of range [0, {n}): min {idx.min()}, "
                                              f"max {idx.max()}")
        uniq, inverse = np.unique(idx, return_inverse=True)
        while True:
            try:
                frames = np.asarray(self._backend.get_batch(uniq.tolist()))
                if frames.ndim != 4 or frames.shape[0] != len(uniq) or frames.shape[-1] != 3 \
                        or frames.dtype != np.uint8:
                    raise RuntimeError(f"returned frames {frames.dtype} {frames.shape}")
                return frames[inverse]
            except Exception as e:
                self._fail(self._backend.name, _why(e))
                self._open_next(n)  # raises VideoDecodeError when no decoder is left
