"""``zeroi2v prepare SRC DST``: re-encode a video tree for training (short side resized, optional fps).

Decoding full-size videos is what starves a GPU during training; resizing the whole dataset once
(short side 256 for the 224 crops of the recipes) makes every later epoch cheaper. Each video of
``SRC`` becomes ``DST/<same relative path>.mp4`` (H.264, PyAV's bundled FFmpeg, no audio):

* atomic: written to a hidden temporary name in the destination folder, then renamed, so an
  output that exists is complete;
* resumable: outputs that exist are kept; temporaries left by an interrupted run are removed;
* unreadable inputs are listed in ``DST/prepare_failed.txt`` (path and reason) and skipped;
* with class folders (every video under ``SRC/<class>/...``) it writes ``DST/annotations.txt``
  (``relative/path.mp4 label``, classes numbered in sorted order) and ``DST/classes.txt``.
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path
from typing import Optional

__all__ = ["prepare_videos", "find_videos", "add_prepare_parser", "run_prepare", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ogv", ".ts")
_TMP_TAG = ".zeroi2v-part"
FAILED_LIST, ANNOTATIONS, CLASSES = "prepare_failed.txt", "annotations.txt", "classes.txt"


def find_videos(src: str | os.PathLike, exclude: Optional[str | os.PathLike] = None) -> list[str]:
    """Relative paths (POSIX, sorted) of the video files under ``src``, by extension; ``exclude``
    (a folder inside ``src``, e.g. the destination) is not searched."""
    src = Path(src)
    skip = Path(exclude).resolve() if exclude is not None else None
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (skip is None or (here / d).resolve() != skip))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS):
                out.append((here / f).relative_to(src).as_posix())
    return sorted(out)


def _output_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """Short side -> ``short_side``, aspect kept, long side rounded to an even number (yuv420p)."""
    if w <= h:
        return short_side, max(2, int(round(h * short_side / w / 2)) * 2)
    return max(2, int(round(w * short_side / h / 2)) * 2), short_side


def _transcode(src: str, tmp: str, short_side: int, fps: Optional[float], crf: int) -> int:
    """Decode ``src``, resize, resample to ``fps`` (``None``: keep every frame) and write ``tmp``.
    Returns the number of frames written."""
    import math

    import av

    from .video_io import add_video_stream

    with av.open(src) as inp:
        if not inp.streams.video:
            raise ValueError("no video stream")
        ist = inp.streams.video[0]
        ist.thread_type = "AUTO"
        in_rate = ist.average_rate or ist.guessed_rate or Fraction(30)
        rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(in_rate)
        with av.open(tmp, mode="w", format="mp4") as out:
            ost, size, written = None, None, 0
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
                    for packet in ost.encode(small):
                        out.mux(packet)
                    written += 1

            for i, frame in enumerate(inp.decode(ist)):
                if ost is None:
                    size = _output_size(frame.width, frame.height, short_side)
                    ost = add_video_stream(out, "h264", size[0], size[1], rate,
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
            for packet in ost.encode():
                out.mux(packet)
    return written


def _prepare_one(src: str, dst: str, short_side: int, fps: Optional[float], crf: int) -> tuple[int, str]:
    """Transcode one file atomically. Returns ``(frames, "")`` or ``(0, reason)``; never raises for
    a bad input."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    d, name = os.path.split(dst)
    tmp = os.path.join(d, f".{name}.{os.getpid()}{_TMP_TAG}.mp4")
    try:
        n = _transcode(src, tmp, short_side, fps, crf)
        os.replace(tmp, dst)
        return n, ""
    except Exception as e:  # PyAV raises its own error types for unreadable input
        lines = str(e).strip().splitlines()
        return 0, f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale_parts(dst: Path) -> int:
    n = 0
    for p in dst.rglob(f".*{_TMP_TAG}.mp4"):
        p.unlink()
        n += 1
    return n


def prepare_videos(src: str | os.PathLike, dst: str | os.PathLike, short_side: int = 256,
                   fps: Optional[float] = None, workers: int = 1, crf: int = 23,
                   progress: bool = True) -> dict:
    """Re-encode every video under ``src`` into ``dst`` (see the module docstring).

    ``short_side``: even, the short side of every output. ``fps``: output frame rate (frames are
    repeated or dropped by their timestamps); ``None`` keeps every frame and the source rate.
    ``workers``: parallel processes (1: this process). ``crf``: x264 quality (lower is better).

    Returns ``dict(converted, existing, failed, annotations, classes)``: ``failed`` is a list of
    ``(relative path, reason)``; ``annotations`` / ``classes`` the files written, or ``None``.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"source folder not found: {src}")
    if src.resolve() == dst.resolve():
        raise ValueError("the destination must differ from the source folder (outputs are .mp4 files "
                         "that would replace the inputs)")
    if int(short_side) < 2 or int(short_side) % 2:
        raise ValueError(f"--short-side must be an even number >= 2 (H.264 yuv420p), got {short_side}")
    if fps is not None and not float(fps) > 0:
        raise ValueError(f"--fps must be > 0, got {fps}")
    if int(workers) < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    videos = find_videos(src, exclude=dst)
    if not videos:
        raise ValueError(f"no video files under {src} (extensions: {', '.join(VIDEO_EXTENSIONS)})")
    outputs: dict[str, str] = {}
    for rel in videos:
        out = str(Path(rel).with_suffix(".mp4").as_posix())
        if out in outputs:
            raise ValueError(f"{outputs[out]} and {rel} would both become {out}; rename one")
        outputs[out] = rel
    dst.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(dst)

    todo = [(rel, out) for out, rel in outputs.items() if not (dst / out).is_file()]
    existing = len(outputs) - len(todo)
    failed: list[tuple[str, str]] = []
    args = [(str(src / rel), str(dst / out), int(short_side), fps, int(crf)) for rel, out in todo]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(outputs), initial=existing, desc="prepare", unit="video", disable=not progress,
               dynamic_ncols=True)
    try:
        if int(workers) == 1:
            results = ((rel, _prepare_one(*a)) for (rel, _), a in zip(todo, args))
            for rel, (_, reason) in results:
                if reason:
                    failed.append((rel, reason))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=int(workers)) as pool:
                futures = {pool.submit(_prepare_one, *a): rel for (rel, _), a in zip(todo, args)}
                for fut in as_completed(futures):
                    _, reason = fut.result()
                    if reason:
                        failed.append((futures[fut], reason))
                    bar.update(1)
    finally:
        bar.close()
    failed.sort()
    _write_failed(dst / FAILED_LIST, failed)
    ann, classes = _write_annotations(dst, [out for out in outputs if (dst / out).is_file()])
    return {"converted": len(todo) - len(failed), "existing": existing, "failed": failed,
            "annotations": ann, "classes": classes}


def _write_failed(path: Path, failed) -> None:
    if not failed:
        if path.exists():
            path.unlink()
        return
    with open(path, "w", encoding="utf-8") as f:
        for rel, reason in failed:
            f.write(f"{rel}\t{reason}\n")


def _write_annotations(dst: Path, outputs: list[str]) -> tuple[Optional[str], Optional[str]]:
    """``annotations.txt`` + ``classes.txt`` when every output lies in a class folder."""
    from .annotations import write_annotations

    if not outputs or any("/" not in rel for rel in outputs):
        return None, None
    classes = sorted({rel.split("/", 1)[0] for rel in outputs})
    label = {c: i for i, c in enumerate(classes)}
    ann, names = dst / ANNOTATIONS, dst / CLASSES
    write_annotations(ann, [(rel, label[rel.split("/", 1)[0]]) for rel in sorted(outputs)])
    names.write_text("\n".join(classes) + "\n", encoding="utf-8")
    return str(ann), str(names)


# ----------------------------------------------------------------------------------- command line
def add_prepare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="re-encode a video tree for training (short side, fps)",
                       description="Re-encode every video under SRC into DST/<same path>.mp4 (H.264): "
                                   "short side resized, optional frame rate; resumable, atomic outputs, "
                                   "unreadable inputs listed in DST/prepare_failed.txt; with class folders "
                                   "also DST/annotations.txt and DST/classes.txt.")
    p.add_argument("src", help="folder of videos (class folders: SRC/<class>/<video>)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--short-side", type=int, default=256,
                   help="short side of the outputs (even; default 256)")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: keep every frame)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality, lower is better (default 23)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_prepare(args) -> int:
    res = prepare_videos(args.src, args.dst, short_side=args.short_side, fps=args.fps,
                         workers=args.workers, crf=args.crf, progress=not args.no_progress)
    total = res["converted"] + res["existing"] + len(res["failed"])
    print(f"prepared {res['converted']} videos, {res['existing']} already done, "
          f"{len(res['failed'])} unreadable, of {total} under {args.src}")
    for rel, reason in res["failed"][:10]:
        print(f"  unreadable: {rel} ({reason})")
    if res["failed"]:
        print(f"  full list: {Path(args.dst) / FAILED_LIST}")
    if res["annotations"]:
        print(f"annotation file: {res['annotations']} (classes: {res['classes']})")
    return 0
