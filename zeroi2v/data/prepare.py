"""``zeroi2v prepare SRC DST``: re-encode a video tree for training (short side resized, optional fps).

Decoding full-size videos is what starves a GPU during training; resizing the whole dataset once
(short side 256 for the 224 crops of the recipes) makes every later epoch cheaper. Each video of
``SRC`` becomes ``DST/<same relative path>.mp4`` (H.264, PyAV's bundled FFmpeg, no audio):

* one run per destination: ``DST/.zeroi2v.lock`` (:func:`zeroi2v.safe_io.folder_lock`); a second
  run is refused naming the first, the lock of a killed run is taken over and reported;
* atomic: written to a hidden temporary name (the run's pid and a random tag) beside the output,
  then renamed, so an output that exists is complete; a run removes only its own temporaries, and
  at start-up (lock held) those that dead runs left;
* resumable: outputs that exist are kept;
* safe names: whitespace, control characters and undecodable bytes in a path become ``_`` (and a
  leading ``#``), because ``annotations.txt`` is ``path label`` per line; all names are checked
  before anything is converted (two sources that would get one name are refused);
* unreadable inputs and entries that are not regular files (FIFOs, sockets, devices, broken
  links: opening a FIFO would wait forever) are skipped and listed in ``DST/prepare_failed.txt``;
* with class folders (every video under ``SRC/<class>/...``) it writes ``DST/annotations.txt``
  (``relative/path.mp4 label``, classes numbered in sorted order) and ``DST/classes.txt``;
  ``classes=`` (``--classes FILE``, one name per line) numbers them in that list's order instead,
  e.g. a validation set in the training set's order: every class folder must be listed (matched
  by its output or its source name), and ``classes.txt`` is then the whole list;
* settings checked: ``DST/prepare.json`` records ``short_side``, ``fps`` and ``crf`` before the
  first output; a rerun with other ones is refused (it would mix two encodings in one dataset,
  see :mod:`zeroi2v.data.prepare_settings`); a destination an older zeroi2v filled without a
  record is accepted with a note (``unchecked``). The class numbering is not such a setting
  here: the two lists are rewritten whole by every run, so a rerun with another ``--classes``
  renumbers the dataset without re-encoding it;
* the lists are written atomically and every file gets the user's umask; a full disk or a
  permission error while writing stops the run with one line naming the path and what was kept.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
import unicodedata
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path
from typing import Optional

from .annotations import CLASSES_FILE

__all__ = ["prepare_videos", "find_videos", "scan_sources", "safe_name",
           "VIDEO_EXTENSIONS", "DestinationError", "plan_sources"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ogv", ".ts")
_TMP_TAG = ".zeroi2v-part"
FAILED_LIST, ANNOTATIONS, CLASSES = "prepare_failed.txt", "annotations.txt", CLASSES_FILE


def display_name(rel: str) -> str:
    """``rel`` as printed and listed: quoted when it holds characters a line cannot show."""
    return rel if rel.isprintable() else ascii(rel)


def safe_name(rel: str) -> str:
    """The output path for source path ``rel`` (POSIX, relative): whitespace, control characters
    and undecodable bytes become ``_``, as does a leading ``#`` (a comment in annotation files);
    the extension becomes ``.mp4``."""
    out = "".join("_" if c.isspace() or unicodedata.category(c).startswith("C") else c for c in rel)
    if out.startswith("#"):
        out = "_" + out[1:]
    return Path(out).with_suffix(".mp4").as_posix()


def _not_regular(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as a file (``None`` for a regular file or a link to one)."""
    try:
        mode = os.stat(path).st_mode  # follows symbolic links
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "vanished while listing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a folder" if stat.S_ISDIR(mode) else "not a file")
    return f"not a regular file ({kind})"


def scan_sources(src: str | os.PathLike, exclude: Optional[str | os.PathLike] = None
                 ) -> tuple[list[str], list[tuple[str, str]]]:
    """``(videos, skipped)`` under ``src`` by extension (relative POSIX paths, sorted): regular
    files (or links to them), and ``(path, reason)`` of the entries that are not. ``exclude`` (a
    folder inside ``src``, e.g. the destination) is not searched; hidden names are left out."""
    src = Path(src)
    skip = Path(exclude).resolve() if exclude is not None else None
    videos, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (skip is None or (here / d).resolve() != skip))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS):
                rel = (here / f).relative_to(src).as_posix()
                why = _not_regular(str(here / f))
                if why is None:
                    videos.append(rel)
                else:
                    skipped.append((rel, why))
    return sorted(videos), sorted(skipped)


def find_videos(src: str | os.PathLike, exclude: Optional[str | os.PathLike] = None) -> list[str]:
    """Relative paths (POSIX, sorted) of the video files under ``src`` (see :func:`scan_sources`)."""
    return scan_sources(src, exclude)[0]


def _output_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """Short side -> ``short_side``, aspect kept, long side rounded to an even number (yuv420p)."""
    if w <= h:
        return short_side, max(2, int(round(h * short_side / w / 2)) * 2)
    return max(2, int(round(w * short_side / h / 2)) * 2), short_side


class DestinationError(OSError):
    """Writing into the destination failed (full disk, permissions): not the input's fault, and
    every later output would fail the same way. ``filename`` is the output being written."""


class _Sink:
    """The output container; its OSErrors (writes happen on ``mux`` and ``close``) become
    :class:`DestinationError`, so they are not taken for a broken input."""

    def __init__(self, tmp: str):
        import av

        self.tmp = tmp
        self.container = self._call(av.open, tmp, mode="w", format="mp4")

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except OSError as e:
            raise DestinationError(e.errno or errno.EIO, e.strerror or str(e), self.tmp) from None

    def mux(self, packets) -> None:
        for packet in packets:
            self._call(self.container.mux, packet)

    def close(self) -> None:
        self._call(self.container.close)


def _transcode(src: str, tmp: str, short_side: int, fps: Optional[float],
               crf: int) -> tuple[int, bool]:
    """Decode ``src``, resize, resample to ``fps`` (``None``: keep every frame) and write ``tmp``.
    Returns the number of frames written."""
    import av

    from .. import limits
    from .decoders import stream_frame_size

    # what decoding asks for, before a frame is decoded: FFmpeg's automatic frame threading keeps
    # about one frame per core (at most 16) in flight, plus the one being resized
    w, h = stream_frame_size(src)
    in_flight = min(os.cpu_count() or 1, 16) + 2
    limits.check_bytes(w * h * 3 * in_flight, f"decoding frames of {w}x{h} ({in_flight} in flight)")
    with av.open(src) as inp:
        if not inp.streams.video:
            raise ValueError("no video stream")
        ist = inp.streams.video[0]
        ist.thread_type = "AUTO"
        out = _Sink(tmp)
        try:
            written = _convert(inp, ist, out, short_side, fps, crf)
        except BaseException:
            try:
                out.container.close()
            except Exception:  # the first error is the one to report
                pass
            raise
        out.close()
    return written


def _convert(inp, ist, out: _Sink, short_side: int, fps: Optional[float],
             crf: int) -> tuple[int, bool]:
    """Frames written, and whether the source was smaller than ``short_side`` (scaled up)."""
    import math

    from .video_io import add_video_stream

    in_rate = ist.average_rate or ist.guessed_rate or Fraction(30)
    rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(in_rate)
    ost, size, written, upscaled = None, None, 0, False
    pending, t0, t = None, None, 0.0

    def emit(frame, upto: int) -> None:
        """Write ``frame`` as output frames ``written .. upto - 1``."""
        nonlocal written
        if written >= upto:
            return
        # limited range out; the source's range explicitly (MJPEG's yuvj is full range)
        rng = {"src_color_range": frame.color_range} if frame.color_range in (1, 2) else {}
        small = frame.reformat(width=size[0], height=size[1], format="yuv420p",
                               interpolation="BICUBIC", dst_color_range=1, **rng)
        while written < upto:
            small.pts, small.time_base = written, 1 / rate
            out.mux(ost.encode(small))
            written += 1

    for i, frame in enumerate(inp.decode(ist)):
        if ost is None:
            size = _output_size(frame.width, frame.height, short_side)
            upscaled = min(frame.width, frame.height) < short_side
            ost = add_video_stream(out.container, "h264", size[0], size[1], rate,
                                   {"preset": "veryfast", "crf": str(crf)})
            cc = ost.codec_context
            cc.color_range = 1
            for tag in ("colorspace", "color_primaries", "color_trc"):  # e.g. BT.709 for HD
                if hasattr(frame, tag) and hasattr(cc, tag):  # (older PyAV lacks some)
                    setattr(cc, tag, getattr(frame, tag))
        if not fps:
            emit(frame, written + 1)
            continue
        t = (frame.time if frame.time is not None else i / float(in_rate))
        t0 = t if t0 is None else t0
        t -= t0
        # output frame k shows the source frame on screen at time k / fps
        if pending is not None:
            emit(pending, math.ceil(t * float(rate) - 1e-6))
        pending = frame
    if ost is None:
        raise ValueError("no decodable frames")
    if pending is not None:  # the last source frame lasts one source frame interval
        emit(pending, max(written + (written == 0),
                          math.ceil((t + 1 / float(in_rate)) * float(rate) - 1e-6)))
    out.mux(ost.encode())
    return written, upscaled


def _prepare_one(src: str, dst: str, tag: str, short_side: int, fps: Optional[float],
                 crf: int) -> tuple[int, str, bool]:
    """Transcode one file atomically. Returns ``(frames, "", scaled up)`` or ``(0, reason,
    False)`` for a bad input; raises :class:`DestinationError` (naming ``dst``) when the output
    cannot be written."""
    from .decoders import VideoDecodeError, _one_line

    d, name = os.path.split(dst)
    tmp = os.path.join(d, f".{name}.{tag}{_TMP_TAG}.mp4")
    try:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise DestinationError(e.errno, e.strerror, e.filename or d) from None
        n, upscaled = _transcode(src, tmp, short_side, fps, crf)
        try:
            os.replace(tmp, dst)
        except OSError as e:
            raise DestinationError(e.errno, e.strerror, dst) from None
        return n, "", upscaled
    except DestinationError as e:
        raise DestinationError(e.errno, e.strerror, dst if e.filename == tmp else e.filename) from None
    except VideoDecodeError as e:
        return 0, e.reason, False
    except Exception as e:  # PyAV raises its own error types for unreadable input
        return 0, _one_line(e), False
    finally:
        if os.path.lexists(tmp):  # only this run's temporary: the name holds its tag
            os.remove(tmp)


def _remove_stale_parts(dst: Path) -> int:
    """Remove the temporaries of runs that died; only while holding ``dst``'s lock."""
    n = 0
    for p in dst.rglob(f".*{_TMP_TAG}.mp4"):
        if p.is_file() or p.is_symlink():
            p.unlink()
            n += 1
    return n


def _plan(videos: list[str], src: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``{output: source}`` and the renamed ``(source, output)`` pairs; a ``ValueError`` naming
    both sources when two would get one output name (file or folder)."""
    outputs: dict[str, str] = {}
    folders: dict[str, str] = {}
    renamed = []
    for rel in videos:
        out = safe_name(rel)
        if out in outputs:
            raise ValueError(f"{src / outputs[out]} and {src / rel} would both become {out}; rename one "
                             "(nothing was converted)")
        outputs[out] = rel
        src_parts, out_parts = rel.split("/")[:-1], out.split("/")[:-1]
        for k in range(1, len(out_parts) + 1):
            o, s = "/".join(out_parts[:k]), "/".join(src_parts[:k])
            if folders.setdefault(o, s) != s:
                a, b = display_name(str(src / folders[o])), display_name(str(src / s))
                raise ValueError(f"folders {a} and {b} would both become {o} (names are made safe "
                                 "for annotation files: spaces and control characters become _); "
                                 "rename one (nothing was converted)")
        if Path(rel).with_suffix(".mp4").as_posix() != out:
            renamed.append((rel, out))
    return outputs, renamed


def prepare_videos(src: str | os.PathLike, dst: str | os.PathLike, short_side: int = 256,
                   fps: Optional[float] = None, workers: int = 1, crf: int = 23,
                   progress: bool = True, classes=None) -> dict:
    """Re-encode every video under ``src`` into ``dst`` (see the module docstring).

    ``short_side``: even, the short side of every output. ``fps``: output frame rate (frames are
    repeated or dropped by their timestamps); ``None`` keeps every frame and the source rate.
    ``workers``: parallel processes (1: this process). ``crf``: x264 quality (lower is better).
    ``classes``: a class-name file (one per line) or a list of names that numbers the class
    folders instead of their sorted order (see :func:`class_numbering`).

    Returns ``dict(converted, existing, failed, skipped, renamed, annotations, classes,
    took_over, removed, unchecked)``: ``failed`` lists ``(relative path, reason)`` of unreadable inputs,
    ``skipped`` those of entries that are not regular files; ``renamed`` ``(source, output)``
    pairs whose names were made safe; ``annotations`` / ``classes`` the files written, or
    ``None``; ``took_over`` the record of a dead run's lock (or ``None``); ``removed`` the number
    of temporaries dead runs left; ``unchecked``: ``dst`` held outputs but no settings record
    (an older zeroi2v's), so their settings could not be checked. Raises ``FolderLockedError``
    while another run holds ``dst``, a ``ValueError`` when ``dst`` was prepared with other
    settings, and :class:`PrepareWriteError` when ``dst`` cannot be written.
    """
    src, dst = Path(src), Path(dst)
    outputs, renamed, skipped = plan_sources(src, dst, short_side, fps, workers, crf)
    numbering = class_numbering(outputs, classes, src) if classes is not None else None
    # what the video files depend on; the class numbering lives only in annotations.txt and
    # classes.txt, which every run rewrites whole, so renumbering (--classes) is no mixing
    settings = {"short_side": int(short_side), "fps": float(fps) if fps is not None else None,
                "crf": int(crf)}
    from ..safe_io import folder_lock, remove_stale_temporaries
    from .prepare_settings import RECORD, read_record, refuse_changed_settings, write_record

    state = _RunState()
    try:
        with folder_lock(dst, f"zeroi2v prepare {src} {dst}") as stale:
            recorded = read_record(dst)  # checked before anything in dst changes
            made = next(dst.rglob("*.mp4"), None) is not None if dst.is_dir() else False
            if recorded is not None and not made:
                recorded = None  # nothing made with the recorded settings: nothing to mix
            if recorded is not None:
                recorded.pop("classes", None)  # (recorded by the first version of the record)
                refuse_changed_settings(
                    f"the videos in {dst} were prepared", recorded, settings,
                    "run with the settings they were made with to resume, or choose another "
                    f"destination (or empty {dst})")
            unchecked = recorded is None and made and not (dst / RECORD).exists()
            if recorded is None:
                try:
                    write_record(dst, settings)
                except OSError as e:
                    raise DestinationError(e.errno, e.strerror or str(e), str(dst / RECORD)) from None
            removed = _remove_stale_parts(dst) + len(remove_stale_temporaries(dst))
            todo = [(rel, out) for out, rel in outputs.items() if not (dst / out).is_file()]
            state.existing = len(outputs) - len(todo)
            tag = f"{os.getpid()}-{secrets.token_hex(4)}"  # this run's temporaries, and only those
            args = [(str(src / rel), str(dst / out), tag, int(short_side), fps, int(crf))
                    for rel, out in todo]
            try:
                _run(todo, args, int(workers), progress, state)
            except BaseException:  # keep the list of what failed so far, if it can be written
                try:
                    _write_failed(dst / FAILED_LIST, state.failed + skipped)
                except OSError as e:
                    state.lists_error = e.strerror or str(e)
                raise
            state.failed.sort()
            _write_failed(dst / FAILED_LIST, state.failed + skipped)
            ann, names = _write_annotations(dst, [out for out in outputs if (dst / out).is_file()],
                                            numbering)
    except OSError as e:
        if not isinstance(e, DestinationError) and not _under(e.filename, dst):
            raise
        kept = sum((dst / out).is_file() for out in outputs)
        raise PrepareWriteError(_write_failure(e, state, dst, kept)) from None
    return {"converted": state.converted, "existing": state.existing, "failed": state.failed,
            "skipped": skipped, "renamed": renamed, "annotations": ann, "classes": names,
            "took_over": stale, "removed": removed, "unchecked": unchecked,
            "upscaled": state.upscaled}


def plan_sources(src: Path, dst: Path, short_side: int, fps: Optional[float], workers: int,
                 crf: int = 23
                 ) -> tuple[dict[str, str], list[tuple[str, str]], list[tuple[str, str]]]:
    """The checks every prepare run makes before it touches ``dst``; returns ``({output:
    source}, renamed, skipped)`` (see :func:`_plan` and :func:`scan_sources`)."""
    if not src.is_dir():
        raise ValueError(f"source folder not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError("the destination must differ from the source folder (outputs are .mp4 files "
                         "that would replace the inputs)")
    # checked here, before dst is locked or recorded: a value no encoder takes would otherwise
    # fail every video one by one, and be recorded as the destination's setting
    if not 2 <= int(short_side) <= 8192 or int(short_side) % 2:
        raise ValueError(f"--short-side must be an even number from 2 to 8192 (H.264 yuv420p), "
                         f"got {short_side}")
    if fps is not None and not 0.1 <= float(fps) <= 1000:
        raise ValueError(f"--fps must be from 0.1 to 1000 frames per second, got {fps}")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"--crf must be from 0 to 51 (x264's range; lower is better), got {crf}")
    if int(workers) < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    videos, skipped = scan_sources(src, exclude=dst)
    if not videos:
        extra = (f"; {len(skipped)} entries are not regular files, e.g. {display_name(skipped[0][0])}"
                 if skipped else "")
        raise ValueError(f"no video files under {src} (extensions: {', '.join(VIDEO_EXTENSIONS)}){extra}")
    outputs, renamed = _plan(videos, src)
    return outputs, renamed, skipped


def class_numbering(outputs: dict[str, str], classes, src: Path) -> tuple[list[str], dict[str, int]]:
    """``(names by label, {class folder: label})`` in the order of ``classes``, a class-name
    file (:func:`~zeroi2v.data.annotations.read_class_names`) or a list of names; a folder
    matches by its output name (``classes.txt`` of an earlier prepare) or its source name. Refuses
    (``ValueError``, before anything is written) videos outside class folders and folders the
    list lacks."""
    names, where = _class_list(classes)
    loose = [rel for out, rel in sorted(outputs.items()) if "/" not in out]
    if loose:
        raise ValueError(f"--classes numbers class folders (SRC/<class>/<video>), and {len(loose)} "
                         f"videos are not in one (e.g. {display_name(str(src / loose[0]))}): move "
                         "them into class folders, or leave out --classes")
    folders: dict[str, str] = {}  # output folder name -> source folder name
    for out, rel in sorted(outputs.items()):
        folders.setdefault(out.split("/", 1)[0], rel.split("/", 1)[0])
    pos = {name: i for i, name in enumerate(names)}
    label = {out: pos.get(out, pos.get(s)) for out, s in folders.items()}
    unknown = [display_name(folders[out]) for out, i in label.items() if i is None]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        one = len(unknown) == 1
        raise ValueError(f"class folder{'' if one else 's'} {', '.join(unknown[:3])}{more} of {src} "
                         f"{'is' if one else 'are'} not in {where} ({len(names)} names): add "
                         f"{'it' if one else 'them'} to the list, or move {'it' if one else 'them'} "
                         "out of the source folder (nothing was written)")
    return names, label


def _class_list(classes) -> tuple[list[str], str]:
    """The names of ``classes`` (a file or a list) and how to name it in a message; refuses an
    empty list, duplicates and names a ``classes.txt`` line cannot hold."""
    from ..limits import MAX_CLASSES
    from ..safe_io import short_repr
    from .annotations import read_class_names

    if isinstance(classes, (str, os.PathLike)):
        where = f"--classes {os.fspath(classes)}"
        try:
            names = read_class_names(classes)
        except FileNotFoundError:  # (not UTF-8 is read_text's one-line ValueError)
            raise FileNotFoundError(f"--classes file not found: {os.fspath(classes)}") from None
    else:
        where, names = "the class list", list(classes)
        bad = next((n for n in names if not isinstance(n, str) or not n.strip() or n != n.strip()
                    or "\n" in n), None) if names else None
        if bad is not None:
            raise ValueError(f"{where} holds {short_repr(bad)}, not a class name (a non-empty string "
                             "without surrounding whitespace)")
    if not names:
        raise ValueError(f"{where} lists no class names: give one name per line")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{where} lists {len(names):,} classes, over the {MAX_CLASSES:,} zeroi2v takes")
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise ValueError(f"{where} lists the class {short_repr(name)} twice (names {first[name] + 1} "
                             f"and {i + 1}): list each class once")
        first[name] = i
    return names, where


class PrepareWriteError(ValueError):
    """The destination could not be written (one line: the path, the reason, what was kept)."""


class _RunState:
    def __init__(self):
        self.converted = self.existing = self.upscaled = 0
        self.failed: list[tuple[str, str]] = []
        self.lists_error: Optional[str] = None


def _under(path, folder: Path) -> bool:
    if not path:
        return False
    try:
        return Path(os.fspath(path)).resolve().is_relative_to(folder.resolve())
    except (TypeError, ValueError, OSError):
        return False


def _run(todo, args, workers: int, progress: bool, state: _RunState) -> None:
    from ..progress import progress_bar

    total = len(todo) + state.existing
    bar = progress_bar(total, "prepare", progress, every=max(1, total // 20),
                       initial=state.existing, unit="video", leave=True)

    def done(rel: str, result: tuple) -> None:
        _, reason, upscaled = result
        if reason:
            state.failed.append((rel, reason))
        else:
            state.converted += 1
            state.upscaled += upscaled
        bar.update(1)

    workers = useful_workers(workers, len(todo))
    try:
        if workers == 1:
            for (rel, _), a in zip(todo, args):
                done(rel, _prepare_one(*a))
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_prepare_one, *a): rel for (rel, _), a in zip(todo, args)}
            try:
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
            except BaseException:
                for fut in futures:  # the outputs under way finish or fail; nothing new starts
                    fut.cancel()
                raise
    finally:
        bar.close()


def useful_workers(asked: int, jobs: int) -> int:
    """Processes worth starting: no more than the jobs or the CPUs (transcoding is CPU-bound;
    a typo such as --workers 100000 must not fork that many)."""
    return max(1, min(int(asked), jobs, os.cpu_count() or 1))


def _write_failure(e: OSError, state: _RunState, dst: Path, kept_videos: int) -> str:
    """One line: what could not be written, why, and what is kept."""
    why = e.strerror or str(e)
    kept = f"kept: {kept_videos} complete videos in {dst}" if kept_videos else "no video was written"
    if state.failed and state.lists_error is None and (dst / FAILED_LIST).is_file():
        kept += f", the unreadable inputs listed in {dst / FAILED_LIST}"
    elif state.lists_error is not None:
        kept += f" ({dst / FAILED_LIST} could not be written either: {state.lists_error})"
    fix = ("free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
           else "make it writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
           else "fix that")
    return f"cannot write {e.filename}: {why}; {kept}; {fix}, then run the same command again to resume"


def _write_failed(path: Path, failed) -> None:
    """Write (or remove) the list of inputs that were not converted."""
    from .annotations import write_text_atomic

    try:
        if not failed:
            if path.exists():
                path.unlink()
            return
        write_text_atomic(path, "".join(f"{display_name(rel)}\t{reason}\n" for rel, reason in sorted(failed)))
    except OSError as e:
        raise DestinationError(e.errno, e.strerror or str(e), str(path)) from None


def _write_annotations(dst: Path, outputs: list[str], numbering=None
                       ) -> tuple[Optional[str], Optional[str]]:
    """``annotations.txt`` + ``classes.txt`` when every output lies in a class folder; classes
    numbered by ``numbering`` (:func:`class_numbering`), else in the sorted order of the folders."""
    from .annotations import write_annotations, write_text_atomic

    if not outputs or any("/" not in rel for rel in outputs):
        return None, None
    if numbering is None:
        classes = sorted({rel.split("/", 1)[0] for rel in outputs})
        label = {c: i for i, c in enumerate(classes)}
    else:
        classes, label = numbering
    ann, names = dst / ANNOTATIONS, dst / CLASSES
    for path, write in ((ann, lambda: write_annotations(ann, [(rel, label[rel.split("/", 1)[0]])
                                                              for rel in sorted(outputs)])),
                        (names, lambda: write_text_atomic(names, "\n".join(classes) + "\n"))):
        try:
            write()
        except OSError as e:
            raise DestinationError(e.errno, e.strerror or str(e), str(path)) from None
    return str(ann), str(names)
