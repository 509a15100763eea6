"""One video reader over three decoders: torchcodec, decord and PyAV.

``VideoReader(path, decoder)`` gives random frame access: ``len(reader)`` frames (presentation
order) and ``reader.get_batch(indices) -> (N, H, W, 3)`` uint8 RGB. Frame ``i`` is the same frame
whichever decoder reads it; pixels differ only by the decoders' colour conversion (tested in
``tests/test_decoders.py``).

``decoder="auto"`` tries the usable decoders in ``AUTO_ORDER`` (see the note there and
``benchmarks/test_bench_data.py``) and keeps the first that opens the file and decodes the
requested frames; a decoder that fails on a file is logged once per process. A named decoder is
used alone: its failure is the video's failure.

Usable means it decoded a tiny probe clip in this process (``decoder_status()`` says why not and
what to install); ``auto`` leaves out the others and says so once per process. Before any
decoder opens a file, PyAV reads the frame size from its stream header and the limits of
:mod:`zeroi2v.limits` are checked (``VideoTooLargeError``).
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from functools import cache
from typing import Optional

import numpy as np

from .. import limits
from ..limits import LimitError

__all__ = ["DECODERS", "AUTO_ORDER", "VideoDecodeError", "VideoTooLargeError", "VideoReader",
           "decoder_status", "available_decoders", "check_decoder"]

logger = logging.getLogger("zeroi2v.data")

DECODERS = ("torchcodec", "decord", "pyav")
#: ``auto``'s preference: torchcodec leads as the one that reads every file of the codec matrix
#: (tests/test_decoders.py), not for speed (README "Data" has the measured loader throughput).
AUTO_ORDER = ("torchcodec", "decord", "pyav")

_PIP_HINT = {
    "torchcodec": "pip install 'torchcodec>=0.15,<0.18' (the releases that load with torch 2.14)",
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
            m = re.match(r"[\w.]*Error: (.*)$", last)  # "zeroi2v.data.decoders.VideoDecodeError: ..."
            msg = m.group(1) if m else str(path)
            super().__init__(msg)
            self.path, self.reason = "", msg
            return
        super().__init__(f"cannot read video {path!r}: {reason}")
        self.path = path
        self.reason = reason


class VideoTooLargeError(VideoDecodeError, LimitError):
    """A video whose frames (or the frames asked of it) are over a limit of :mod:`zeroi2v.limits`.

    A ``VideoDecodeError``, so a dataset treats it as any unreadable video (``data.on_error``), and
    a ``LimitError``, so whoever checks limits sees it as one."""


# ------------------------------------------------------------------------------- what runs here
#: "OSError: libavutil.so.61: cannot open shared object file: ..." (not the source lines that
#: tracebacks quote)
_NOT_FOUND = re.compile(r"^(?:[\w.]*Error: )?(\S+?): cannot open shared object file", re.MULTILINE)


def _missing_libs(text: str) -> str:
    """``"libavutil.so.56/57/58, libfoo.so not found"`` from a library-loading report, or ``""``."""
    versions: dict[str, list[str]] = {}
    for name in _NOT_FOUND.findall("\n".join(ln.strip() for ln in text.splitlines())):
        m = re.fullmatch(r"(.+\.so)\.(\d+)", name)
        base, ver = (m.group(1), m.group(2)) if m else (name, "")
        if ver not in versions.setdefault(base, []):
            versions[base].append(ver)
    if not versions:
        return ""
    return ", ".join(f"{base}.{'/'.join(sorted(v, key=int))}" if all(v) else base
                     for base, v in versions.items()) + " not found"


def _root_errors(text: str) -> list[str]:
    """The ``Type: message`` lines a report's tracebacks end in, other than "not found"."""
    return [ln.strip() for ln in text.splitlines()[1:]
            if re.match(r"^[\w.]*(Error|Exception): ", ln.strip())
            and "Could not load this library" not in ln and not _NOT_FOUND.search(ln.strip())]


def _one_line(e: BaseException) -> str:
    """``Type: message`` on one line. Multi-line messages (torchcodec's loading report: a list of
    "likely causes", then one traceback per FFmpeg version it tried) keep their first sentence and
    what the tracebacks end in: the first error other than a missing library (the FFmpeg that is
    installed but does not load), else the libraries that were not found."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    head = text.splitlines()[0].split("Likely causes:")[0].strip().rstrip(".")
    roots, missing = _root_errors(text), _missing_libs(text)
    if roots:
        head += f" ({roots[0]})"
    elif missing:
        head += f" ({missing})"
    return f"{type(e).__name__}: {head}"


def _os_ids(path: str = "/etc/os-release") -> set[str]:
    """``ID`` and ``ID_LIKE`` of the Linux distribution (``{"debian"}``, ``{"ubuntu", "debian"}``)."""
    ids: set[str] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key in ("ID", "ID_LIKE"):
                    ids.update(value.strip().strip('"\'').lower().split())
    except OSError:
        pass
    return ids


def ffmpeg_install_hint(os_release: str = "/etc/os-release") -> str:
    """The command that installs FFmpeg's shared libraries (which torchcodec loads) here."""
    prefix = os.environ.get("CONDA_PREFIX")
    if prefix and os.path.realpath(prefix) == os.path.realpath(sys.prefix):
        return "conda install -c conda-forge ffmpeg"
    if sys.platform == "darwin":
        return "brew install ffmpeg"
    ids = _os_ids(os_release)
    for family, cmd in (("debian", "apt-get install ffmpeg"), ("ubuntu", "apt-get install ffmpeg"),
                        ("fedora", "dnf install ffmpeg-free"), ("rhel", "dnf install ffmpeg-free (EPEL)"),
                        ("arch", "pacman -S ffmpeg"), ("alpine", "apk add ffmpeg-libs"),
                        ("suse", "zypper install ffmpeg")):
        if family in ids:
            return cmd
    return "install FFmpeg's shared libraries (libavcodec, libavformat ...) with the system's packages"


def _import(name: str) -> None:
    if name == "torchcodec":
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (the libraries load on first use)
    elif name == "decord":
        # decord loads its bundled FFmpeg/libvpx with RTLD_GLOBAL; PyAV loaded after it binds to
        # those and its VP9 encoder fails (EINVAL). PyAV first keeps each library with its own.
        with contextlib.suppress(ImportError):
            import av  # noqa: F401
        import decord  # noqa: F401
    else:
        import av  # noqa: F401


def _decode_probe(name: str) -> None:
    """Decode a tiny clip (written by PyAV, which bundles FFmpeg) with decoder ``name``: importing
    is not enough, torchcodec imports fine and loads FFmpeg's libraries on its first file."""
    from .video_io import write_video

    frames = np.zeros((2, 48, 64, 3), np.uint8)
    frames[1] += 200
    with tempfile.TemporaryDirectory(prefix="zeroi2v-probe-") as d:
        clip = os.path.join(d, "probe.mp4")
        try:
            write_video(clip, frames)
        except Exception:  # no PyAV encoder: nothing to probe with; the import has to do
            return
        backend = _BACKENDS[name](clip)
        got = np.asarray(backend.get_batch([1]))
        if len(backend) != 2 or got.shape != (1, 48, 64, 3) or abs(float(got.mean()) - 200) > 20:
            raise RuntimeError(f"decoded the probe clip wrongly ({len(backend)} frames, {got.shape})")


@cache
def _load_error(name: str) -> Optional[str]:
    """``None`` when decoder ``name`` decodes a probe clip here, else why not and the fix, one line."""
    if name not in DECODERS:
        raise ValueError(f"decoder must be 'auto' or one of {DECODERS}, got {name!r}")
    try:
        _import(name)
    except ImportError as e:
        return f"{name} is not installed ({_one_line(e)}): {_PIP_HINT[name]}"
    except Exception as e:  # e.g. decord's library failing to load
        return f"{name} cannot be imported here ({_one_line(e)}): {_PIP_HINT[name]}"
    try:
        _decode_probe(name)
    except Exception as e:  # each library raises its own error types
        why = _one_line(e)
        if name == "torchcodec" and _missing_libs(str(e)) and not _root_errors(str(e)):
            return (f"torchcodec cannot load FFmpeg's shared libraries here ({_missing_libs(str(e))}): "
                    f"{ffmpeg_install_hint()}")
        if name == "torchcodec":
            import torch

            return (f"torchcodec cannot decode here ({why}): it needs FFmpeg's shared libraries "
                    f"({ffmpeg_install_hint()}) and a release matching torch {torch.__version__} "
                    f"({_PIP_HINT[name]})")
        return f"{name} cannot decode here ({why}): reinstall it ({_PIP_HINT[name]})"
    return None


def decoder_status() -> dict[str, Optional[str]]:
    """``{decoder: None if it decodes here, else why not and the fix}`` for every decoder.

    Each decoder is probed once per process by decoding a tiny clip, so that the libraries it
    loads lazily (torchcodec's FFmpeg) are really loaded."""
    return {name: _load_error(name) for name in DECODERS}


def available_decoders() -> list[str]:
    """Usable decoders in ``auto``'s order."""
    return [name for name in AUTO_ORDER if _load_error(name) is None]


def _auto_candidates() -> list[str]:
    """``auto``'s decoders; each one left out is reported once per process, with the fix."""
    usable = available_decoders()
    for name in AUTO_ORDER:
        if name not in usable and f"unusable:{name}" not in _warned:
            _warned.add(f"unusable:{name}")
            logger.warning("decoder 'auto' reads videos without %s: %s (reported once)", name,
                           _load_error(name))
    return usable


def check_decoder(decoder: str) -> str:
    """Validate a ``data.decoder`` setting: a ``ValueError`` naming the fix unless it can run here."""
    if decoder == "auto":
        if not _auto_candidates():
            raise ValueError("no video decoder is usable here: " + "; ".join(
                f"{n}: {e}" for n, e in decoder_status().items()))
        return decoder
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be 'auto' or one of {DECODERS}, got {decoder!r}")
    err = _load_error(decoder)
    if err is not None:
        raise ValueError(f"decoder {decoder!r} cannot be used here: {err}; or set decoder 'auto' "
                         f"(usable here: {', '.join(available_decoders()) or 'none'})")
    return decoder


# ------------------------------------------------------------------------------- stream header
#: Decoder option that makes PyAV's stream-info probe (``av.open``) parse headers without decoding
#: a frame; without it, opening an 8K video decodes one (~80 MB) before any limit is checked.
#: Given for FFmpeg's default maximum of streams, so it reaches a video stream behind others.
_NO_DECODE = [{"skip_frame": "all"}] * 1000


def stream_frame_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of the first video stream of ``path``, from its headers (nothing is
    decoded); ``VideoDecodeError`` when the file has none."""
    try:
        import av
    except ImportError:
        raise ValueError(f"PyAV reads every video's header before decoding: {_PIP_HINT['pyav']}") from None
    try:
        with av.open(path, stream_options=_NO_DECODE) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            cc = container.streams.video[0].codec_context
            w, h = int(cc.width or 0), int(cc.height or 0)
    except VideoDecodeError:
        raise
    except Exception as e:  # PyAV's errors for files that are not videos
        raise VideoDecodeError(path, f"not a readable video ({_one_line(e)})") from None
    if w <= 0 or h <= 0:
        raise VideoDecodeError(path, "its stream header gives no frame size")
    return w, h


def _frame_size(path: str) -> tuple[int, int]:
    """:func:`stream_frame_size`, checked against ``ZEROI2V_MAX_VIDEO_PIXELS``."""
    w, h = stream_frame_size(path)
    try:
        limits.check_video_pixels(path, w, h)
    except LimitError as e:
        raise VideoTooLargeError(path, str(e).removeprefix(f"{path}: ")) from None
    return w, h


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


class VideoReader:
    """Random frame access to one video through ``decoder`` (``auto`` or one of ``DECODERS``).

    ``len(reader)``: frames in presentation order. ``reader.get_batch(indices)``: any ints in
    ``[0, len)``, repeats allowed, returns ``(len(indices), H, W, 3)`` uint8 RGB.
    ``reader.decoder``: the decoder that delivered the last batch; ``reader.width`` and
    ``reader.height``: the frame size. Every failure (missing file, not a video, no frames, an
    undecodable frame) raises ``VideoDecodeError`` naming the path; a decoder that cannot run here
    raises ``ValueError`` (see ``check_decoder``).

    Limits (:mod:`zeroi2v.limits`), checked before anything is decoded: the frame size, read from
    the stream header, must be within ``ZEROI2V_MAX_VIDEO_PIXELS``, and a batch of decoded frames
    (frames x width x height x 3 bytes) within ``ZEROI2V_MEMORY_LIMIT``; either raises
    ``VideoTooLargeError``.
    """

    def __init__(self, path: str | os.PathLike, decoder: str = "auto"):
        self.path = os.fspath(path)
        check_decoder(decoder)
        if not os.path.isfile(self.path):
            raise VideoDecodeError(self.path, "file not found")
        self.width, self.height = _frame_size(self.path)
        self._candidates = _auto_candidates() if decoder == "auto" else [decoder]
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
                self._fail(name, _one_line(e))
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
        w, h = self.width, self.height
        try:
            limits.check_bytes(idx.size * w * h * 3, f"decoding {idx.size} frames of {w}x{h}",
                               fix="sample fewer frames, or re-encode the videos smaller once "
                                   "(zeroi2v prepare SRC DST --short-side 256)")
        except LimitError as e:
            raise VideoTooLargeError(self.path, str(e)) from None
        uniq, inverse = np.unique(idx, return_inverse=True)
        while True:
            try:
                frames = np.asarray(self._backend.get_batch(uniq.tolist()))
                if frames.ndim != 4 or frames.shape[0] != len(uniq) or frames.shape[-1] != 3 \
                        or frames.dtype != np.uint8:
                    raise RuntimeError(f"returned frames {frames.dtype} {frames.shape}")
                if frames.shape[1] * frames.shape[2] > w * h:  # the header lied about the size
                    raise VideoDecodeError(self.path, f"frames of {frames.shape[2]}x{frames.shape[1]} "
                                                      f"where the stream header says {w}x{h}")
                return frames[inverse]
            except VideoDecodeError:
                raise
            except Exception as e:
                self._fail(self._backend.name, _one_line(e))
                self._open_next(n)  # raises VideoDecodeError when no decoder is left
