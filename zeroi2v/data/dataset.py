"""``VideoDataset``: annotation file + root folder -> (normalised clip tensor, label)."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .annotations import CLASSES_FILE, check_class_list, read_annotations, read_class_names
from .decoders import check_decoder
from .sampling import DenseSampler, UniformSampler
from .transforms import VideoTransform
from .video_io import VideoDecodeError, open_video, read_video_frames

__all__ = ["VideoDataset", "build_dataset", "VideoSample", "SkippedVideo", "LoadReport", "collate_videos",
           "SSV2_FLIP_LABEL_MAP", "symmetric_label_map"]

logger = logging.getLogger("zeroi2v.data")

#: Something-Something V2 left/right classes swapped by a horizontal flip (docs/method.md §4).
SSV2_FLIP_LABEL_MAP = {86: 87, 87: 86, 93: 94, 94: 93, 166: 167, 167: 166}


def symmetric_label_map(mapping: Optional[dict]) -> Optional[dict[int, int]]:
    """Complete ``{a: b}`` with ``{b: a}``; a conflicting pair raises ``ValueError``."""
    if not mapping:
        return None
    out: dict[int, int] = {}
    for a, b in mapping.items():
        a, b = int(a), int(b)
        for x, y in ((a, b), (b, a)):
            if out.get(x, y) != y:
                raise ValueError(f"flip_label_map maps {x} to both {out[x]} and {y}")
            out[x] = y
    return out


class VideoSample(tuple):
    """``(video, label)`` plus how it was loaded: ``index`` (the sample that was loaded),
    ``skipped`` (``(path, reason)`` of the unreadable videos it replaced, ``on_error="skip"``
    in training) and ``short`` (the video had fewer frames than the clip spans)."""

    def __new__(cls, video, label, index: int, skipped=(), short: bool = False):
        self = super().__new__(cls, (video, label))
        self.index, self.skipped, self.short = int(index), tuple(skipped), bool(short)
        return self

    def __reduce__(self):
        return VideoSample, (self[0], self[1], self.index, self.skipped, self.short)


@dataclass(frozen=True)
class SkippedVideo:
    """What an unreadable sample returns when it is dropped instead of replaced."""

    index: int
    path: str
    reason: str


@dataclass
class LoadReport:
    """What loading a batch (or, summed, an epoch) took.

    ``dropped``: samples left out (``SkippedVideo``); ``replaced``: ``(path, reason)`` of videos
    that training replaced by the next readable one; ``short``: loaded videos shorter than the
    clip (looped or padded, see the samplers).
    """

    dropped: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    short: int = 0

    @property
    def num_skipped(self) -> int:
        return len(self.dropped) + len(self.replaced)

    def skipped(self) -> list[dict]:
        """Every unreadable video, ``{"path", "reason"}``, in the order met."""
        return ([{"path": s.path, "reason": s.reason} for s in self.dropped]
                + [{"path": p, "reason": r} for p, r in self.replaced])

    def add(self, other: LoadReport) -> LoadReport:
        self.dropped += other.dropped
        self.replaced += other.replaced
        self.short += other.short
        return self


def collate_videos(batch):
    """DataLoader ``collate_fn`` for ``VideoDataset``: ``(video, label, LoadReport)``.

    ``SkippedVideo`` items are left out of the batch (``video`` and ``label`` are ``None`` when
    none is left) and listed in the report. Plain ``(video, label)`` items from other datasets
    are collated as they are.
    """
    report = LoadReport()
    kept = []
    for item in batch:
        if isinstance(item, SkippedVideo):
            report.dropped.append(item)
            continue
        if isinstance(item, VideoSample):
            report.replaced += item.skipped
            report.short += item.short
        kept.append(tuple(item))
    if not kept:
        return None, None, report
    video, label = torch.utils.data.default_collate(kept)
    return video, label, report


class VideoDataset(Dataset):
    """Videos listed in an annotation file (``relative/path.mp4 label``), read by ``VideoReader``.

    ``__getitem__(i) -> (video, label)``: ``video`` is ``(C, T, H, W)`` float32 for training and
    ``(V, C, T, H, W)`` (V = clips x crops views) when ``sampler.test_mode``. The VideoReader is
    opened inside ``__getitem__`` (nothing undecodable is pickled), so any DataLoader
    ``num_workers`` works.

    Horizontal flip and label swap: when the transform is in training mode with ``flip=True`` the
    dataset draws the flip itself (probability 0.5), passes ``flip=`` to the transform and, if the
    clip was flipped, replaces the label through ``flip_label_map`` (completed to be symmetric, so
    ``{86: 87}`` also maps 87 to 86).

    Items are ``VideoSample`` tuples ``(video, label)`` that also say how they were loaded.

    Errors (a missing or undecodable video; each is logged once per process with path and reason):

    * ``on_error="raise"``: ``VideoDecodeError`` naming the path, the run fails.
    * ``on_error="drop"``: the item is a ``SkippedVideo``; ``collate_videos`` leaves it out of the
      batch and lists it (batches shrink).
    * ``on_error="skip"`` (default): in training the sample is *replaced by the next index that
      loads* (``i + 1, i + 2, ...`` modulo ``len``, at most ``max_retries`` tries, then a
      ``RuntimeError``) and the replacement keeps its own label; the ``VideoSample`` lists what it
      replaced, so the skips are counted. In test mode nothing is ever replaced (a duplicated
      video would bias the metric): ``skip`` drops, as ``drop`` does.

    ``len`` never changes, so samplers (including ``DistributedSampler``) stay consistent across
    ranks. ``decoder``: ``auto`` or one of ``zeroi2v.data.DECODERS`` (see ``VideoReader``).

    Short videos (fewer frames than one clip spans, ``sampler.is_short``) are used, not skipped:
    ``DenseSampler`` loops them (``out_of_bound="loop"``, as mmaction2; ``"clamp"`` repeats the
    last frame instead), ``UniformSampler`` repeats frames in order. ``VideoSample.short`` marks
    them, so evaluation and training count them.

    Randomness (sampling offsets, flip, augmentation) comes from a per-sample
    ``numpy.random.Generator`` seeded by ``(seed, epoch, index)`` after ``set_epoch(epoch)`` was
    called - reproducible and independent of the number of workers. Without ``set_epoch`` a
    training dataset still varies between epochs: the per-epoch DataLoader worker base seed (or, in
    the main process, a per-instance call counter) replaces the epoch. Test mode is deterministic.
    """

    def __init__(self, ann_file: Union[str, os.PathLike], root: Union[str, os.PathLike], sampler,
                 transform: VideoTransform, flip_label_map: Optional[dict[int, int]] = None,
                 on_error: str = "skip", seed: int = 0, *, num_classes: Optional[int] = None,
                 max_retries: int = 10, decoder: str = "auto"):
        if on_error not in ("skip", "raise", "drop"):
            raise ValueError(f"on_error must be 'skip', 'raise' or 'drop', got {on_error!r}")
        self.ann_file = os.fspath(ann_file)
        self.root = os.fspath(root)
        self.samples: list[tuple[str, int]] = self._list_samples()
        if not self.samples:
            raise ValueError(f"annotation file {self.ann_file} lists no videos")
        max_label = max(label for _, label in self.samples)
        if num_classes is not None and max_label >= num_classes:
            raise ValueError(f"{self.ann_file}: label {max_label} >= num_classes={num_classes}")
        self.num_classes = int(num_classes) if num_classes is not None else max_label + 1
        #: the names of the classes as this data numbers them, and the file that says so
        self.class_names, self.class_names_file = self._find_class_names(max_label)
        self.sampler = sampler
        self.transform = transform
        self.flip_label_map = symmetric_label_map(flip_label_map)
        self.on_error = on_error
        self.seed = int(seed)
        self.max_retries = int(max_retries)
        self.decoder = check_decoder(decoder)
        self.epoch: Optional[int] = None
        self._calls = 0
        self._warned: set[str] = set()
        if bool(getattr(sampler, "test_mode", False)) == bool(getattr(transform, "train", False)):
            logger.warning("VideoDataset(%s): sampler.test_mode=%s but transform.train=%s",
                           self.ann_file, sampler.test_mode, transform.train)

    def _list_samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` of every sample; the path is how errors and reports name it."""
        return [(os.path.join(self.root, rel), label) for rel, label in read_annotations(self.ann_file)]

    def _find_class_names(self, max_label: int) -> tuple[Optional[list[str]], Optional[str]]:
        """``classes.txt`` beside the annotation file (``zeroi2v prepare`` writes both): the
        class order its labels follow, which evaluation and training check against the model's."""
        path = os.path.join(os.path.dirname(os.path.abspath(self.ann_file)), CLASSES_FILE)
        if not os.path.lexists(path):
            return None, None  # (one that is there but no file is refused by the reader)
        return check_class_list(read_class_names(path), path, max_label, self.ann_file), path

    def _video_file(self, index: int):
        """A context manager giving the file the decoders open for sample ``index`` (the video
        itself here; a sharded dataset hands over the sample's bytes as a file)."""
        return contextlib.nullcontext(self.samples[index][0])

    @property
    def test_mode(self) -> bool:
        return bool(self.sampler.test_mode)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Make training randomness a pure function of ``(seed, epoch, index)``."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.test_mode:
            return np.random.default_rng([self.seed, 0, index])
        if self.epoch is not None:
            return np.random.default_rng([self.seed, 1, self.epoch, index])
        info = get_worker_info()
        if info is not None:
            # DataLoader base seed: new every epoch, same for all workers
            salt = (info.seed - info.id) % (2 ** 63)
        else:
            self._calls += 1
            salt = self._calls
        return np.random.default_rng([self.seed, 2, salt, index])

    def load(self, index: int, skipped=()) -> VideoSample:
        """Load sample ``index`` or raise ``VideoDecodeError``; no error handling."""
        label = self.samples[index][1]
        rng = self._rng(index)
        with self._video_file(index) as path:
            reader = open_video(path, self.decoder)
            n = len(reader)
            idx = self.sampler(n, rng)                               # (num_clips, clip_len)
            frames = read_video_frames(path, idx, reader=reader)     # (num_clips, clip_len, H, W, 3)
            del reader
        frames = torch.from_numpy(frames)
        if self.transform.train:
            flip = self.transform.flip and bool(rng.random() < 0.5)
            video = self.transform(frames, rng, flip=flip)
            if flip and self.flip_label_map:
                label = self.flip_label_map.get(label, label)
        else:
            video = self.transform(frames, rng)
        return VideoSample(video, int(label), index, skipped, self.sampler.is_short(n))

    def _report(self, exc: VideoDecodeError) -> None:
        if exc.path not in self._warned:
            self._warned.add(exc.path)
            logger.warning("unreadable video %s (%s)", exc.path, exc.reason)

    def __getitem__(self, index: int):
        index = int(index)
        if self.on_error == "raise":
            return self.load(index)
        if self.on_error == "drop" or self.test_mode:
            try:
                return self.load(index)
            except VideoDecodeError as e:
                self._report(e)
                return SkippedVideo(index, e.path, e.reason)
        failed: list[tuple[str, str]] = []
        n = len(self.samples)
        for k in range(min(self.max_retries, n)):
            j = (index + k) % n
            try:
                return self.load(j, failed)
            except VideoDecodeError as e:
                self._report(e)
                failed.append((e.path, e.reason))
        raise RuntimeError(f"{len(failed)} consecutive unreadable videos from index {index}: "
                           f"{[p for p, _ in failed]}")

    def __repr__(self) -> str:
        return (f"VideoDataset({self.ann_file!r}, {len(self)} videos, {self.num_classes} classes, "
                f"{self.sampler!r}, {self.transform!r}, on_error={self.on_error!r}, "
                f"decoder={self.decoder!r})")


def build_dataset(ann_file, root, *, num_frames: int, sampling: str = "dense", frame_interval: int = 1,
                  num_clips: int = 1, train: bool, size: int = 224, short_side: Optional[int] = 256,
                  num_crops: int = 1, rand_augment: Optional[tuple[int, int]] = (7, 4),
                  random_erasing: float = 0.0, flip: bool = True,
                  flip_label_map: Optional[dict[int, int]] = None, on_error: str = "skip", seed: int = 0,
                  num_classes: Optional[int] = None, decoder: str = "auto",
                  test_short_side: Optional[int] = None) -> VideoDataset:
    """Sampler + transform + dataset from recipe-level settings.

    ``ann_file`` is an annotation file (videos under ``root``) or a shard index written by
    ``zeroi2v prepare --shards`` (a :class:`~zeroi2v.data.shards.ShardedVideoDataset`; ``root``
    unused).

    ``sampling="dense"``: ``DenseSampler(num_frames, frame_interval, num_clips)``;
    ``sampling="uniform"``: ``UniformSampler(num_frames, num_clips=num_clips)`` (``frame_interval``
    ignored). ``train=False`` gives test mode (deterministic sampling, ``num_clips x num_crops``
    views, short side resized to ``test_short_side`` or, by default, ``size``; ``short_side``,
    ``rand_augment``, ``random_erasing``, ``flip`` unused). ``seed``, ``num_classes``, ``decoder``
    go to ``VideoDataset``.
    """
    test_mode = not train
    if sampling == "dense":
        sampler = DenseSampler(num_frames, frame_interval, num_clips=num_clips, test_mode=test_mode)
    elif sampling == "uniform":
        sampler = UniformSampler(num_frames, test_mode=test_mode, num_clips=num_clips)
    else:
        raise ValueError(f"sampling must be 'dense' or 'uniform', got {sampling!r}")
    transform = VideoTransform(train, size=size, short_side=short_side, num_crops=num_crops,
                               rand_augment=rand_augment, random_erasing=random_erasing, flip=flip,
                               test_short_side=test_short_side)
    from .shards import ShardedVideoDataset, is_shard_index

    cls = ShardedVideoDataset if is_shard_index(ann_file) else VideoDataset
    return cls(ann_file, root, sampler, transform, flip_label_map=flip_label_map, on_error=on_error,
               seed=seed, num_classes=num_classes, decoder=decoder)
