"""Sharded video datasets: the tar shards ``zeroi2v prepare SRC DST --shards`` writes.

Kinetics-400 is ~240,000 files; opening that many small files every epoch is what starves GPUs
on network storage. Shards hold many videos each (about 1 GB by default), and one index says
where every video lies.

Format (readable by ordinary tar and by WebDataset, whose member naming it follows):

* ``DST/shard-000000.tar``, ``shard-000001.tar`` ...: sample ``i`` (numbered over the whole
  dataset, in the order of the ``annotations.txt`` that ``prepare`` writes) is three members,
  ``<i:08d>.mp4`` (the video file exactly as ``prepare`` produces it), ``<i:08d>.cls`` (the
  label, as text) and ``<i:08d>.json`` (``path``: the prepared name, ``source``: the original
  path under SRC, ``label``, ``class``).
* ``DST/shards.json``, the index: ``{"format": "zeroi2v-shards", "version": 1, "complete",
  "classes", "num_samples", "settings", "digest", "failed", "shards": [{"file", "bytes",
  "next", "samples": [[path, label, offset, size], ...]}]}``; ``offset`` and ``size`` are the
  byte range of the ``.mp4`` member's data in its shard (the original paths are in the shards'
  ``.json`` members only: the index is read by every rank and kept small).

Reading (local paths, including network file systems mounted as folders; no URLs): a sample is
read with one ranged read at its offset (the tar header just before it is checked to name the
sample, so a shard that does not match its index is caught), and handed to the existing decoders
as an in-memory file (``memfd``; a temporary file where there is none). So every decoder, the
pixel and memory limits of :mod:`zeroi2v.limits` and ``data.on_error`` apply exactly as for
files.

* :class:`ShardedVideoDataset`: map-style, sample ``i`` by index; the same clips as
  ``VideoDataset`` over the prepared files for the same seed, epoch and index. Evaluation uses it
  (``ShardSampler``: every video once across ranks, no padding, no drops).
* :class:`ShardStream`: the training epoch as an ``IterableDataset``; see its docstring for the
  rules (exactly once per epoch across ranks and workers, equal length on every rank,
  deterministic for a seed whatever the number of DataLoader workers, epoch-granular resume).
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Optional

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .. import limits
from ..limits import LimitError
from .annotations import check_class_list
from .dataset import VideoDataset
from .decoders import VideoDecodeError, VideoTooLargeError

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "INDEX_NAME", "ShardIndex", "ShardedVideoDataset",
           "ShardStream", "epoch_plan", "buffer_shuffle", "is_shard_index", "sample_key"]

INDEX_FORMAT = "zeroi2v-shards"
INDEX_VERSION = 1
INDEX_NAME = "shards.json"
_TAR_BLOCK = 512
_OPEN_SHARDS = 8  # file descriptors a reader keeps open (least recently used closed first)


def sample_key(i: int) -> str:
    """The tar member stem of sample ``i`` (``00000012``)."""
    return f"{int(i):08d}"


def is_shard_index(path) -> bool:
    """``path`` is a shard index (a JSON object) rather than a ``path label`` annotation file."""
    try:
        with open(path, "rb") as f:
            head = f.read(256).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")


def _bad(path, why: str, fix: str = "") -> ValueError:
    return ValueError(f"{path}: {why}" + (f": {fix}" if fix else ""))


_MAX_INT = 2**62  # larger byte counts, offsets and labels are lies (and overflow int64)


class ShardIndex:
    """A shard index, checked, with every sample's shard, byte range, label and names.

    ``load(path)`` refuses (``ValueError``, one line naming the file and the fix) an index that
    is not one, one from an unfinished ``prepare`` run, and one whose shards are missing or have
    another size than it records. Shards are looked for beside the index.
    """

    def __init__(self, path: str, raw: dict):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.classes: list[str] = [str(c) for c in raw.get("classes") or []]
        shards = raw["shards"]
        self.files = [os.path.join(self.folder, s["file"]) for s in shards]
        self.shard_bytes = np.array([int(s["bytes"]) for s in shards], dtype=np.int64)
        self.shard_sizes = np.array([len(s["samples"]) for s in shards], dtype=np.int64)
        rows = [row for s in shards for row in s["samples"]]
        self.paths = [str(r[0]) for r in rows]
        self.labels = np.array([int(r[1]) for r in rows], dtype=np.int64)
        self.offsets = np.array([int(r[2]) for r in rows], dtype=np.int64)
        self.sizes = np.array([int(r[3]) for r in rows], dtype=np.int64)
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int64), self.shard_sizes)
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()

    # -------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path) -> ShardIndex:
        path = os.fspath(path)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise FileNotFoundError(f"shard index not found: {path} ({e.strerror})") from None
        # the parsed index takes roughly ten times its text (lists of small Python objects)
        limits.check_bytes(10 * size, f"reading the shard index {path} ({limits.fmt_bytes(size)})")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(path, f"not a shard index (not valid JSON: {e})",
                       "give an index written by zeroi2v prepare --shards, or an annotation file") from None
        except RecursionError:
            raise _bad(path, "not a shard index (its JSON nests deeper than an index does)",
                       "give the shards.json written by zeroi2v prepare --shards") from None
        cls._check(path, raw)
        index = cls(path, raw)
        index._check_shards()
        return index

    @staticmethod
    def _check(path: str, raw) -> None:
        if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
            raise _bad(path, f"a JSON file but not a zeroi2v shard index (no \"format\": \"{INDEX_FORMAT}\")",
                       "give the shards.json written by zeroi2v prepare --shards")
        if raw.get("version") != INDEX_VERSION:
            raise _bad(path, f"shard index version {raw.get('version')!r}, this zeroi2v reads "
                             f"{INDEX_VERSION}", "prepare the shards again with this version")
        if not raw.get("complete"):
            raise _bad(path, "the index of an unfinished zeroi2v prepare --shards run",
                       "run the same prepare command again to finish it")
        classes = raw.get("classes")
        if classes is not None and not (isinstance(classes, list)
                                        and all(isinstance(c, str) for c in classes)):
            raise _bad(path, f"its \"classes\" are not a list of names ({str(classes)[:80]})",
                       "prepare the shards again")
        shards = raw.get("shards")
        if not isinstance(shards, list) or not shards:
            raise _bad(path, "the index lists no shards")
        n = 0
        for s in shards:
            rows = s.get("samples") if isinstance(s, dict) else None
            if not isinstance(rows, list) or not isinstance(s.get("file"), str) \
                    or os.path.basename(s["file"]) != s["file"] or not isinstance(s.get("bytes"), int) \
                    or isinstance(s["bytes"], bool) or not 0 <= s["bytes"] < _MAX_INT:
                raise _bad(path, f"a malformed shard entry ({str(s)[:80]})", "prepare the shards again")
            for r in rows:
                ok = (isinstance(r, list) and len(r) == 4 and isinstance(r[0], str)
                      and all(isinstance(x, int) and not isinstance(x, bool) and x < _MAX_INT
                              for x in r[1:]))
                if not ok or not 0 <= r[1] < limits.MAX_CLASSES or r[2] < _TAR_BLOCK \
                        or r[3] < 0 or r[2] + r[3] > s["bytes"]:
                    raise _bad(path, f"sample {n} of {s['file']} is malformed ({str(r)[:80]})",
                               "prepare the shards again")
                n += 1
        if n != raw.get("num_samples"):
            raise _bad(path, f"lists {n} samples but says num_samples={raw.get('num_samples')}",
                       "prepare the shards again")

    def _check_shards(self) -> None:
        for f, want in zip(self.files, self.shard_bytes.tolist()):
            try:
                got = os.path.getsize(f)
            except OSError as e:
                raise _bad(self.path, f"its shard {f} cannot be read ({e.strerror})",
                           "copy every shard beside the index") from None
            if got != want:
                raise _bad(self.path, f"its shard {f} is {got} bytes where the index says {want}",
                           "the shard was changed or copied incompletely: copy it again, or "
                           "prepare the shards again")

    # -------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.labels)

    def display(self, i: int) -> str:
        """How errors and reports name sample ``i``: ``<shard>:<prepared path>``."""
        return f"{self.files[self.shard_of[i]]}:{self.paths[i]}"

    def __getstate__(self):  # open file descriptors stay with their process
        state = dict(self.__dict__)
        state["_fds"] = collections.OrderedDict()
        return state

    def _fd(self, shard: int) -> int:
        fd = self._fds.pop(shard, None)
        if fd is None:
            fd = os.open(self.files[shard], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            while len(self._fds) >= _OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def read(self, i: int) -> memoryview:
        """The bytes of sample ``i``'s video; ``VideoDecodeError`` (naming the shard and the
        video) when they cannot be read, are over the memory limit or are not where the index
        says."""
        i = int(i)
        name = self.display(i)
        offset, size = int(self.offsets[i]), int(self.sizes[i])
        try:
            limits.check_bytes(size, f"reading {name}", fix="prepare the videos smaller")
        except LimitError as e:
            raise VideoTooLargeError(name, str(e)) from None
        try:
            buf = os.pread(self._fd(int(self.shard_of[i])), size + _TAR_BLOCK, offset - _TAR_BLOCK)
        except OSError as e:
            raise VideoDecodeError(name, f"cannot read its shard ({e.strerror or e})") from None
        if len(buf) < size + _TAR_BLOCK:
            raise VideoDecodeError(name, f"its shard ends before the video does (byte {offset + size}): "
                                         "copied incompletely?")
        member = buf[:100].split(b"\0", 1)[0]
        if member != f"{sample_key(i)}.mp4".encode():
            raise VideoDecodeError(name, f"the shard holds {member[:40]!r} at byte {offset - _TAR_BLOCK}, "
                                         f"not sample {i}: the shard does not match its index")
        return memoryview(buf)[_TAR_BLOCK:]

    @contextlib.contextmanager
    def local_file(self, i: int):
        """A path the decoders can open holding sample ``i``'s video: an in-memory file
        (``memfd``, freed when the block ends, however the process ends) or, where there is
        none, a temporary file removed after the block."""
        data = self.read(i)
        fd = _memfd()
        if fd is not None:
            try:
                with open(fd, "wb", closefd=False) as f:
                    f.write(data)
                del data  # one copy while decoding: the in-memory file's
                yield f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
            return
        with tempfile.NamedTemporaryFile(prefix="zeroi2v-sample-", suffix=".mp4") as f:
            f.write(data)
            f.flush()
            yield f.name


def _memfd() -> Optional[int]:
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.memfd_create("zeroi2v-sample", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:  # e.g. a sandbox without it
        return None


class ShardedVideoDataset(VideoDataset):
    """``VideoDataset`` over a shard index (``ann_file``) instead of an annotation file and a
    root (``root`` is not used). Everything else is ``VideoDataset``'s: sampling, transforms,
    flips, per-sample randomness from ``(seed, epoch, index)`` and ``on_error``; a sample's path
    in errors, reports and skipped lists is ``<shard>:<prepared path>``.
    """

    def _list_samples(self) -> list[tuple[str, int]]:
        self.index = ShardIndex.load(self.ann_file)
        return [(self.index.display(i), int(label)) for i, label in enumerate(self.index.labels.tolist())]

    def _find_class_names(self, max_label: int) -> tuple[Optional[list[str]], Optional[str]]:
        """The index's own class list (``prepare --shards`` records it)."""
        if not self.index.classes:
            return None, None
        return check_class_list(self.index.classes, self.ann_file, max_label, self.ann_file), \
            self.ann_file

    @contextlib.contextmanager
    def _video_file(self, index: int):
        name = self.samples[index][0]
        with self.index.local_file(index) as local:
            try:
                yield local
            except VideoDecodeError as e:
                if e.path != local:
                    raise
                raise type(e)(name, e.reason.replace(local, name)) from None

    def __repr__(self) -> str:
        return "Sharded" + super().__repr__()


# ------------------------------------------------------------------------------ training epochs
def buffer_shuffle(items: Sequence[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """``items`` through a shuffle buffer of ``size``: the buffer is filled, then every new item
    takes the place of a uniformly drawn one, which is emitted; the rest leave in random order.
    An item moves at most about ``size`` places earlier, so reads stay near the stream's order."""
    items = np.asarray(items, dtype=np.int64)
    n, size = len(items), max(1, min(int(size), len(items)))
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    buf = items[:size].tolist()
    picks = rng.integers(0, size, n - size).tolist()
    for k, (x, j) in enumerate(zip(items[size:].tolist(), picks)):
        out[k] = buf[j]
        buf[j] = x
    tail = np.asarray(buf, dtype=np.int64)
    rng.shuffle(tail)
    out[n - size:] = tail
    return out


def epoch_plan(shard_sizes: Sequence[int], seed: int, epoch: int, rank: int, world_size: int,
               shuffle_buffer: int) -> np.ndarray:
    """The sample indices rank ``rank`` of ``world_size`` reads in ``epoch``, in order.

    The shards are put in a random order and their samples laid end to end in a ring, which is
    cut at a random sample (both the same on every rank: drawn from ``(seed, epoch)``); rank
    ``r`` takes the ``r``-th of ``world_size`` equal contiguous parts, ``n // world_size``
    samples each, and shuffles it through a buffer of ``shuffle_buffer`` (drawn from ``(seed,
    epoch, rank)``). The ``n % world_size`` samples at the end (fewer than ``world_size``; any
    videos, others each epoch) are left out of that epoch.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rng = np.random.default_rng([int(seed), 3, int(epoch)])
    order = rng.permutation(len(sizes))
    stream = np.concatenate([np.arange(starts[s], starts[s] + sizes[s]) for s in order] or
                            [np.zeros(0, np.int64)])
    if len(stream):  # start anywhere: what is left out at the end is any video, not a shard's last
        stream = np.roll(stream, -int(rng.integers(len(stream))))
    n = len(stream) // int(world_size)
    mine = stream[int(rank) * n:(int(rank) + 1) * n]
    return buffer_shuffle(mine, shuffle_buffer, np.random.default_rng([int(seed), 4, int(epoch), int(rank)]))


class ShardStream(IterableDataset):
    """One rank's training epochs over a :class:`ShardedVideoDataset`.

    * **Exactly once.** Each epoch's samples are split between the ranks by :func:`epoch_plan`:
      every video is read by one rank, once; when the count is not a multiple of the ranks, the
      ``n % world_size`` (< ``world_size``) at the end of that epoch's stream are left out (others
      each epoch), so that ``len`` is ``n // world_size`` on every rank and DDP's ranks take the
      same number of steps (with the trainer's ``drop_last``, ``len // batch_size``).
    * **Workers.** The rank's samples are cut into batches of ``batch_size`` (the DataLoader's);
      DataLoader worker ``w`` of ``k`` yields batches ``w, w + k, ...`` whole. The DataLoader
      takes one batch from each worker in turn, so the batches, their order and (with the
      per-sample randomness of ``(seed, epoch, index)``) their contents are the same for any
      number of workers. A different loader batch size still reads each sample once, in
      another order.
    * **Shuffling**: shard order per epoch, then a buffer of ``shuffle_buffer`` samples (indices
      only: it costs no memory, and reads stay near each shard's order).
    * **Errors**: ``data.on_error`` of the dataset (a ``skip`` replacement is the next sample by
      index, as for files).
    * **Resume**: call ``set_epoch(epoch)`` before each epoch, as with ``DistributedSampler``
      (without it every pass is epoch 0). An epoch depends on ``(seed, epoch)`` only, so a run
      resumed from an epoch checkpoint continues exactly; there is no mid-epoch position.

    ``rank`` / ``world_size`` default to ``torch.distributed``'s when it is initialised, else 0
    and 1.
    """

    def __init__(self, videos: ShardedVideoDataset, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None, shuffle_buffer: int = 1000, batch_size: int = 1,
                 seed: Optional[int] = None):
        if not isinstance(videos, ShardedVideoDataset):
            raise TypeError(f"ShardStream reads a ShardedVideoDataset, got {type(videos).__name__}")
        if rank is None or world_size is None:
            import torch.distributed as dist

            on = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if on else 0) if rank is None else rank
            world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        if int(shuffle_buffer) < 1 or int(batch_size) < 1:
            raise ValueError(f"shuffle_buffer and batch_size must be >= 1, got {shuffle_buffer}, "
                             f"{batch_size}")
        if len(videos) < int(world_size):
            raise ValueError(f"{videos.ann_file}: {len(videos)} videos cannot be shared by "
                             f"{world_size} processes: use fewer processes or more data")
        self.videos = videos
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle_buffer, self.batch_size = int(shuffle_buffer), int(batch_size)
        self.seed = videos.seed if seed is None else int(seed)
        self.epoch: Optional[int] = None

    def __len__(self) -> int:
        return len(self.videos) // self.world_size

    @property
    def num_videos(self) -> int:
        """Videos in the shards (``len`` is this rank's share of an epoch)."""
        return len(self.videos)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.videos.set_epoch(epoch)

    def plan(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's sample indices for ``epoch`` (default: the one set), in reading order."""
        epoch = (self.epoch or 0) if epoch is None else int(epoch)
        return epoch_plan(self.videos.index.shard_sizes, self.seed, epoch, self.rank,
                          self.world_size, self.shuffle_buffer)

    def worker_indices(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The sample indices DataLoader worker ``worker`` of ``num_workers`` yields, in order."""
        order, b = self.plan().tolist(), self.batch_size
        return [i for start in range(worker * b, len(order), num_workers * b)
                for i in order[start:start + b]]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.worker_indices(worker, workers):
            yield self.videos[i]

    # what the trainer, its summary and its checks read of a training dataset
    @property
    def num_classes(self) -> int:
        return self.videos.num_classes

    @property
    def labels(self) -> list[int]:
        return self.videos.labels

    @property
    def samples(self) -> list[tuple[str, int]]:
        return self.videos.samples

    @property
    def ann_file(self) -> str:
        return self.videos.ann_file

    @property
    def class_names(self) -> Optional[list[str]]:
        return self.videos.class_names

    @property
    def class_names_file(self) -> Optional[str]:
        return self.videos.class_names_file

    def __repr__(self) -> str:
        return (f"ShardStream({self.videos!r}, rank {self.rank} of {self.world_size}, "
                f"shuffle_buffer={self.shuffle_buffer}, batch_size={self.batch_size}, seed={self.seed})")
