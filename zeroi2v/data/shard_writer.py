"""Writing tar shards: ``zeroi2v prepare SRC DST --shards [--shard-size 1GB]``, and
:func:`pack_shards` for videos that are prepared already. The format is described in
:mod:`zeroi2v.data.shards`.

Each video is transcoded exactly as ``zeroi2v prepare`` does it (into a hidden staging folder
of the run), then appended to the current shard in the order of the sorted output names, whatever
the number of ``--workers`` (the shards' bytes do not depend on it). A shard is written under a
temporary name (``.shard-000003.tar.<pid>-<tag>.zeroi2v-part.tar``) and renamed once it reaches
the shard size; then the index, ``DST/shards.json``, is rewritten atomically to list it, with
``"complete": false`` until the last shard. Resuming (the same command again) keeps the shards
the index lists with their recorded size, removes any other shard file and every temporary,
and continues from the first video after the last kept shard; a rerun with other settings
(``--short-side``, ``--fps``, ``--crf``, ``--classes``: the index's ``"settings"``) is refused
naming each change. ``--classes FILE`` numbers the class folders in that list's order, as
``prepare`` does. Like ``prepare``: one run per ``DST`` (its lock), unreadable inputs listed in
``DST/prepare_failed.txt`` (and in the index), a full disk or a permission error stops the run
in one line naming the path and what was kept.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from .prepare import (
    _TMP_TAG,
    CLASSES,
    FAILED_LIST,
    DestinationError,
    PrepareWriteError,
    _prepare_one,
    _under,
    _write_failed,
    _write_failure,
    class_numbering,
    display_name,
    plan_sources,
    useful_workers,
)
from .prepare_settings import refuse_changed_settings
from .shards import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, sample_key

__all__ = ["prepare_shards", "pack_shards", "parse_shard_size", "DEFAULT_SHARD_SIZE",
           "SHARD_PATTERN"]

DEFAULT_SHARD_SIZE = 10**9
SHARD_PATTERN = re.compile(r"shard-\d{6}\.tar")
_STAGING = ".zeroi2v-staging"


def parse_shard_size(text) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"``, a byte count; a ``ValueError`` naming ``--shard-size``."""
    from ..settings import parse_amount

    n = parse_amount(str(text)) if text is not None else DEFAULT_SHARD_SIZE
    if n is None or n < 1:
        raise ValueError(f"--shard-size must be a size such as 1GB, 500MB or 2GiB, got {text!r}")
    return n


def _digest(plan, settings: dict) -> str:
    """What the samples hold: the videos (output and source names, labels) and the encoding."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for out, rel, label in plan:
        h.update(json.dumps([out, rel, label]).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: the bytes depend on the videos only
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    return info


class _OpenShard:
    """One shard being written under its temporary name."""

    def __init__(self, dst: Path, number: int, tag: str):
        self.name = f"shard-{number:06d}.tar"
        self.final = dst / self.name
        self.tmp = dst / f".{self.name}.{tag}{_TMP_TAG}.tar"
        self.samples: list[list] = []
        self.tar = self._io(tarfile.open, self.tmp, "w", format=tarfile.PAX_FORMAT)

    def _io(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except OSError as e:  # writes into DST failing: a full disk, permissions
            raise DestinationError(e.errno, e.strerror or str(e), str(self.tmp)) from None

    @property
    def bytes(self) -> int:
        return self.tar.offset

    def add(self, number: int, video: str, item: tuple, classes: list) -> None:
        out, rel, label = item
        key = sample_key(number)
        size = os.path.getsize(video)
        with open(video, "rb") as f:
            self._io(self.tar.addfile, _member(f"{key}.mp4", size), f)
        offset = self.tar.offset - (size + 511) // 512 * 512  # the data's first byte
        meta = json.dumps({"path": out, "source": rel, "label": label,
                           "class": classes[label] if label < len(classes) else None}).encode()
        for ext, data in (("cls", str(label).encode()), ("json", meta)):
            self._io(self.tar.addfile, _member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.samples.append([out, label, offset, size])

    def close(self) -> dict:
        from ..safe_io import honour_umask

        def finish():
            self.tar.close()
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            honour_umask(self.tmp)
            os.replace(self.tmp, self.final)

        self._io(finish)
        return {"file": self.name, "bytes": self.final.stat().st_size, "samples": self.samples}

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.tar.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


class _Writer:
    """Appends samples to shards and keeps the index in step with the complete ones."""

    def __init__(self, dst: Path, index: dict, tag: str, shard_size: int):
        self.dst, self.index, self.tag, self.shard_size = dst, index, tag, shard_size
        self.current: Optional[_OpenShard] = None
        self.count = sum(len(s["samples"]) for s in index["shards"])

    def add(self, pos: int, video: str, item: tuple) -> None:
        if self.current is None:
            self.current = _OpenShard(self.dst, len(self.index["shards"]), self.tag)
        self.current.add(self.count, video, item, self.index["classes"])
        self.count += 1
        if self.current.bytes >= self.shard_size:
            self.commit(pos + 1)

    def commit(self, next_pos: int) -> None:
        entry = self.current.close()
        self.current = None
        entry["next"] = next_pos  # the first video (by position in the plan) not in a shard yet
        self.index["shards"].append(entry)
        self.save()

    def finish(self, end: int) -> None:
        if self.current is not None:
            self.commit(end)
        self.index["complete"] = True
        self.save()

    def save(self) -> None:
        from ..safe_io import atomic_write_text

        self.index["num_samples"] = self.count
        path = self.dst / INDEX_NAME
        try:
            atomic_write_text(path, json.dumps(self.index, separators=(",", ":")))
        except OSError as e:
            raise DestinationError(e.errno, e.strerror or str(e), str(path)) from None

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None


def _remove_stale(dst: Path) -> int:
    """The temporaries and staging folders of runs that died; only while holding the lock."""
    n = 0
    for p in dst.glob(f".shard-*{_TMP_TAG}.tar"):
        p.unlink()
        n += 1
    for p in dst.glob(f".*{_STAGING}"):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


def _resume(dst: Path, digest: str, fresh: dict) -> tuple[dict, list[Path]]:
    """The index to continue: the complete shards an earlier run recorded (those listed with
    their recorded size; the first one that is not ends the list), with the failures before
    them, and the shard files it does not keep (to remove). Refuses, touching nothing, shards of
    other videos or settings."""
    path = dst / INDEX_NAME
    index = dict(fresh, shards=[], failed=[])
    if path.exists():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path} cannot be read ({type(e).__name__}): remove it (and the "
                             "shard-*.tar files) or choose another destination") from None
        if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} is not a shard index: remove it or choose another destination")
        if raw.get("version") != INDEX_VERSION:
            raise ValueError(f"{path} and its shards are of shard format version {raw.get('version')!r}, "
                             f"this zeroi2v writes {INDEX_VERSION}: remove them or choose another "
                             "destination")
        if raw.get("digest") != digest:
            fix = (f"rerun the command that made them, or choose another destination, or remove "
                   f"{path} and the shard-*.tar files")
            if isinstance(raw.get("settings"), dict):  # name the settings that changed, if any
                refuse_changed_settings(f"the shards in {dst} were written", raw["settings"],
                                        fresh["settings"], fix)
            raise ValueError(f"{dst} holds shards of other videos (another SRC, or videos added, "
                             f"removed or renamed since): {fix}")
        listed = raw.get("shards") or []
        if not isinstance(listed, list) or not all(_shard_entry_ok(x) for x in listed):
            raise ValueError(f"{path} lists a shard entry this zeroi2v did not write (a file "
                             "outside the folder, or malformed sizes): remove it and the "
                             "shard-*.tar files, or choose another destination (nothing was "
                             "touched)")
        for s in listed:
            f = dst / s["file"]
            if not f.is_file() or f.stat().st_size != s["bytes"]:
                break
            index["shards"].append(s)
        done = index["shards"][-1]["next"] if index["shards"] else 0
        index["failed"] = [f for f in raw.get("failed") or [] if isinstance(f, list)
                           and len(f) >= 3 and isinstance(f[2], int) and f[2] < done]
        index["complete"] = bool(raw.get("complete")) and len(index["shards"]) == len(raw["shards"])
    kept = {s["file"] for s in index["shards"]}
    return index, [p for p in dst.iterdir() if SHARD_PATTERN.fullmatch(p.name) and p.name not in kept]


def _shard_entry_ok(entry) -> bool:
    """An index entry as this writer writes it: a shard name of the folder's own pattern, and
    sizes and sample rows that are plain, bounded integers."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
            or not SHARD_PATTERN.fullmatch(entry["file"]):
        return False
    ints = [entry.get("bytes"), entry.get("next")]
    rows = entry.get("samples")
    if not isinstance(rows, list):
        return False
    ints += [x for r in rows if isinstance(r, list) for x in r[1:]]
    return all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62 for x in ints) \
        and all(isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) for r in rows)


def _results(todo: list, produce: Callable, workers: int):
    """``(pos, file, reason, scaled up)`` for each ``(pos, args)`` of ``todo``, in order; ``produce(*args)``
    runs in ``workers`` processes, at most two per worker ahead of the one written next."""
    workers = useful_workers(workers, len(todo))
    if workers == 1:
        for pos, args in todo:
            yield (pos, *produce(*args))
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        it = iter(todo)
        try:
            for pos, args in it:
                pending.append((pos, pool.submit(produce, *args)))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                pos, fut = pending.popleft()
                res = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.submit(produce, *nxt[1])))
                yield (pos, *res)
        finally:  # stopped early: the ones under way finish, nothing new starts
            for _, fut in pending:
                fut.cancel()


def _transcode_staged(src: str, out: str, tag: str, short_side: int, fps, crf: int):
    frames, reason, upscaled = _prepare_one(src, out, tag, short_side, fps, crf)
    return (None, reason, False) if reason else (out, "", upscaled)


def _existing(path: str):
    if not os.path.isfile(path):
        return None, "file not found", False
    return path, "", False


class _State:
    def __init__(self):
        self.converted = self.existing = self.upscaled = 0
        self.failed: list[tuple[str, str]] = []
        self.lists_error: Optional[str] = None


def _write_shards(dst: Path, plan: list, classes: list, settings: dict, jobs: Callable,
                  produce: Callable, *, staged: bool, shard_size: int, workers: int,
                  progress: bool, command: str, skipped=()) -> dict:
    """The loop both entry points share: ``plan`` is ``[(output name, source, label)]`` in sample
    order, ``jobs(pos, staging_folder, tag)`` the arguments of ``produce``, which returns ``(file,
    "")`` or ``(None, reason)``; ``staged``: the files are this run's to remove once written."""
    from ..progress import progress_bar
    from ..safe_io import folder_lock, remove_stale_temporaries

    digest = _digest(plan, settings)
    fresh = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "complete": False, "classes": classes,
             "num_samples": 0, "settings": settings, "digest": digest}
    state = _State()
    try:
        with folder_lock(dst, command) as stale:
            index, incomplete = _resume(dst, digest, fresh)
            removed = _remove_stale(dst) + len(remove_stale_temporaries(dst))
            for p in incomplete:
                p.unlink()
            dropped = len(incomplete)
            state.existing = sum(len(s["samples"]) for s in index["shards"])
            start = index["shards"][-1]["next"] if index["shards"] else 0
            state.failed = [(rel, why) for rel, why, _ in index["failed"]]
            tag = f"{os.getpid()}-{secrets.token_hex(4)}"
            staging = dst / f".{tag}{_STAGING}"
            writer = _Writer(dst, index, tag, shard_size)
            try:
                if not index["complete"]:
                    if staged:
                        staging.mkdir()
                    todo = [(pos, jobs(pos, staging, tag)) for pos in range(start, len(plan))]
                    bar = progress_bar(len(plan), "prepare", progress,
                                       every=max(1, len(plan) // 20), initial=start,
                                       unit="video", leave=True)
                    with contextlib.closing(_results(todo, produce, workers)) as results, bar:
                        for pos, file, reason, upscaled in results:
                            if reason:
                                index["failed"].append([plan[pos][1], reason, pos])
                                state.failed.append((plan[pos][1], reason))
                            else:
                                writer.add(pos, file, plan[pos])
                                state.converted += 1
                                state.upscaled += upscaled
                                if staged:
                                    os.remove(file)
                            bar.update(1)
                    if writer.count == 0:
                        raise ValueError(f"none of the {len(plan)} videos could be read (reasons in "
                                         f"{dst / FAILED_LIST})")
                    writer.finish(len(plan))
            except BaseException:
                writer.abort()
                try:
                    _write_failed(dst / FAILED_LIST, state.failed + list(skipped))
                except OSError as e:
                    state.lists_error = e.strerror or str(e)
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            state.failed.sort()
            _write_failed(dst / FAILED_LIST, state.failed + list(skipped))
            if classes:
                from .annotations import write_text_atomic

                try:
                    write_text_atomic(dst / CLASSES, "\n".join(classes) + "\n")
                except OSError as e:
                    raise DestinationError(e.errno, e.strerror or str(e), str(dst / CLASSES)) from None
    except OSError as e:
        if not isinstance(e, DestinationError) and not _under(e.filename, dst):
            raise
        kept = sum(len(s["samples"]) for s in _listed_shards(dst))
        raise PrepareWriteError(_write_failure(e, state, dst, kept).replace(
            "complete videos", "videos in complete shards")) from None
    return {"converted": state.converted, "existing": state.existing, "failed": state.failed,
            "skipped": list(skipped), "index": str(dst / INDEX_NAME), "shards": len(index["shards"]),
            "num_samples": writer.count, "bytes": sum(s["bytes"] for s in index["shards"]),
            "classes": str(dst / CLASSES) if classes else None, "took_over": stale,
            "removed": removed, "dropped_shards": dropped, "upscaled": state.upscaled}


def _listed_shards(dst: Path) -> list:
    try:
        return json.loads((dst / INDEX_NAME).read_text(encoding="utf-8")).get("shards") or []
    except (OSError, ValueError, AttributeError):
        return []


def prepare_shards(src, dst, short_side: int = 256, fps: Optional[float] = None, workers: int = 1,
                   crf: int = 23, shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True,
                   classes=None) -> dict:
    """``zeroi2v prepare SRC DST --shards``: every video under ``src`` (in class folders, whose
    sorted names number the labels) transcoded as :func:`~zeroi2v.data.prepare_videos` does it,
    written into shards of about ``shard_size`` bytes with the index ``dst/shards.json``.
    ``classes`` (a class-name file or a list of names) numbers the labels in its order instead,
    and becomes the index's ``"classes"`` and ``classes.txt`` whole
    (:func:`~zeroi2v.data.prepare.class_numbering`); the index's ``"settings"`` records it.

    Returns ``dict(converted, existing, failed, skipped, index, shards, num_samples, bytes,
    classes, took_over, removed, dropped_shards)``: ``existing`` counts the videos in the complete
    shards a previous run left, ``dropped_shards`` the shard files it left that were not complete
    (redone), ``removed`` the temporaries of dead runs; the rest as in ``prepare_videos``.
    """
    src, dst = Path(src), Path(dst)
    shard_size = int(shard_size)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least one byte, got {shard_size}")
    outputs, _, skipped = plan_sources(src, dst, short_side, fps, workers, crf)
    loose = [rel for out, rel in sorted(outputs.items()) if "/" not in out]
    if loose:
        raise ValueError(f"--shards takes the labels from class folders (SRC/<class>/<video>), and "
                         f"{len(loose)} videos are not in one (e.g. {display_name(str(src / loose[0]))}): "
                         "move them into class folders")
    names = sorted({out.split("/", 1)[0] for out in outputs})
    label = {c: i for i, c in enumerate(names)}
    default = names
    if classes is not None:
        names, label = class_numbering(outputs, classes, src)
    plan = [(out, rel, label[out.split("/", 1)[0]]) for out, rel in sorted(outputs.items())]
    # fps as a float, as the command line gives it: fps=6 from Python is the same setting
    settings = {"short_side": int(short_side), "fps": float(fps) if fps is not None else None,
                "crf": int(crf)}
    # the labels are inside the shards: a numbering other than the sorted folders' is a setting
    # (recorded only then, so the digests of indexes written before --classes still hold)
    if names != default:
        settings["classes"] = names

    def jobs(pos, staging, tag):
        return (str(src / plan[pos][1]), str(staging / f"{sample_key(pos)}.mp4"), tag, int(short_side),
                fps, int(crf))

    return _write_shards(dst, plan, names, settings, jobs, _transcode_staged, staged=True,
                         shard_size=shard_size, workers=int(workers), progress=progress,
                         command=f"zeroi2v prepare {src} {dst} --shards", skipped=skipped)


def pack_shards(ann_file, root, dst, shard_size: int = DEFAULT_SHARD_SIZE,
                classes: Optional[list[str]] = None, progress: bool = False) -> dict:
    """Shards of videos that are ready (``zeroi2v prepare`` outputs, say): the files an
    annotation file lists under ``root``, copied byte for byte in its order (sample ``i`` is line
    ``i``). ``classes``: class names by label, for the index. Missing files are listed as
    failures. Resumable and locked as :func:`prepare_shards`; returns the same dict."""
    from .annotations import read_annotations

    dst, root = Path(dst), Path(root)
    plan = [(rel, rel, label) for rel, label in read_annotations(ann_file)]
    if not plan:
        raise ValueError(f"annotation file {ann_file} lists no videos")
    settings = {"packed": True}

    def jobs(pos, staging, tag):
        return (str(root / plan[pos][0]),)

    return _write_shards(dst, plan, list(classes or []), settings, jobs, _existing, staged=False,
                         shard_size=int(shard_size), workers=1, progress=progress,
                         command=f"zeroi2v pack_shards {ann_file} {dst}")
