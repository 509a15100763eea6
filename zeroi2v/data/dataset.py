"""``VideoDataset``: annotation file + root folder -> (normalised clip tensor, label)."""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .annotations import read_annotations
from .sampling import DenseSampler, UniformSampler
from .transforms import VideoTransform
from .video_io import VideoDecodeError, open_video, read_video_frames

__all__ = ["VideoDataset", "build_dataset", "collate_drop_failures", "SSV2_FLIP_LABEL_MAP",
           "symmetric_label_map"]

logger = logging.getLogger("zeroi2v.data")

#: Something-Something V2 left/right classes swapped by a horizontal flip (SPEC §4).
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


class VideoDataset(Dataset):
    """Videos listed in an annotation file (``relative/path.mp4 label``), decoded with decord.

    ``__getitem__(i) -> (video, label)``: ``video`` is ``(C, T, H, W)`` float32 for training and
    ``(V, C, T, H, W)`` (V = clips x crops views) when ``sampler.test_mode``. The VideoReader is
    opened inside ``__getitem__`` (nothing undecodable is pickled), so any DataLoader
    ``num_workers`` works.

    Horizontal flip and label swap: when the transform is in training mode with ``flip=True`` the
    dataset draws the flip itself (probability 0.5), passes ``flip=`` to the transform and, if the
    clip was flipped, replaces the label through ``flip_label_map`` (completed to be symmetric, so
    ``{86: 87}`` also maps 87 to 86).

    Errors: a missing or undecodable video raises ``VideoDecodeError`` naming its path with
    ``on_error="raise"``. With ``on_error="skip"`` (default) it is logged once per process as a
    warning (path and reason) and the sample is *replaced by the next index that loads*
    (``i + 1, i + 2, ...`` modulo ``len``, at most ``max_retries`` tries, then a ``RuntimeError``);
    the replacement keeps its own label. ``len`` never changes, so samplers (including
    ``DistributedSampler``) stay consistent across ranks. With ``on_error="drop"`` the sample is
    ``None``; use ``collate_drop_failures`` as the DataLoader's ``collate_fn`` (batches shrink; for
    evaluation where duplicates would bias the metric).

    Randomness (sampling offsets, flip, augmentation) comes from a per-sample
    ``numpy.random.Generator`` seeded by ``(seed, epoch, index)`` after ``set_epoch(epoch)`` was
    called - reproducible and independent of the number of workers. Without ``set_epoch`` a
    training dataset still varies between epochs: the per-epoch DataLoader worker base seed (or, in
    the main process, a per-instance call counter) replaces the epoch. Test mode is deterministic.
    """

    def __init__(self, ann_file: Union[str, os.PathLike], root: Union[str, os.PathLike], sampler,
                 transform: VideoTransform, flip_label_map: Optional[dict[int, int]] = None,
                 on_error: str = "skip", seed: int = 0, *, num_classes: Optional[int] = None,
                 max_retries: int = 10, backend: str = "auto"):
        if on_error not in ("skip", "raise", "drop"):
            raise ValueError(f"on_error must be 'skip', 'raise' or 'drop', got {on_error!r}")
        self.ann_file = os.fspath(ann_file)
        self.root = os.fspath(root)
        self.samples: list[tuple[str, int]] = [(os.path.join(self.root, rel), label)
                                               for rel, label in read_annotations(self.ann_file)]
        if not self.samples:
            raise ValueError(f"annotation file {self.ann_file} lists no videos")
        max_label = max(label for _, label in self.samples)
        if num_classes is not None and max_label >= num_classes:
            raise ValueError(f"{self.ann_file}: label {max_label} >= num_classes={num_classes}")
        self.num_classes = int(num_classes) if num_classes is not None else max_label + 1
        self.sampler = sampler
        self.transform = transform
        self.flip_label_map = symmetric_label_map(flip_label_map)
        self.on_error = on_error
        self.seed = int(seed)
        self.max_retries = int(max_retries)
        self.backend = backend
        self.epoch: Optional[int] = None
        self._calls = 0
        self._warned: set[str] = set()
        if bool(getattr(sampler, "test_mode", False)) == bool(getattr(transform, "train", False)):
            logger.warning("VideoDataset(%s): sampler.test_mode=%s but transform.train=%s",
                           self.ann_file, sampler.test_mode, transform.train)

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
            salt = (info.seed - info.id) % (2 ** 63)  # DataLoader base seed: new every epoch, same for all workers
        else:
            self._calls += 1
            salt = self._calls
        return np.random.default_rng([self.seed, 2, salt, index])

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Load sample ``index`` or raise ``VideoDecodeError``; no error handling."""
        path, label = self.samples[index]
        rng = self._rng(index)
        reader = open_video(path, self.backend)
        idx = self.sampler(len(reader), rng)                     # (num_clips, clip_len)
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
        return video, int(label)

    def _report(self, exc: VideoDecodeError) -> None:
        if exc.path not in self._warned:
            self._warned.add(exc.path)
            logger.warning("skipping unreadable video %s (%s)", exc.path, exc.reason)

    def __getitem__(self, index: int):
        index = int(index)
        if self.on_error == "raise":
            return self.load(index)
        failed = []
        n = len(self.samples)
        tries = 1 if self.on_error == "drop" else min(self.max_retries, n)
        for k in range(tries):
            j = (index + k) % n
            try:
                return self.load(j)
            except VideoDecodeError as e:
                self._report(e)
                failed.append(e.path)
        if self.on_error == "drop":
            return None
        raise RuntimeError(f"{len(failed)} consecutive unreadable videos from index {index}: {failed}")

    def __repr__(self) -> str:
        return (f"VideoDataset({self.ann_file!r}, {len(self)} videos, {self.num_classes} classes, "
                f"{self.sampler!r}, {self.transform!r}, on_error={self.on_error!r})")


def collate_drop_failures(batch):
    """``default_collate`` after dropping ``None`` samples (``on_error="drop"``); ``None`` if all failed."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


def build_dataset(ann_file, root, *, num_frames: int, sampling: str = "dense", frame_interval: int = 1,
                  num_clips: int = 1, train: bool, size: int = 224, short_side: Optional[int] = 256,
                  num_crops: int = 1, rand_augment: Optional[tuple[int, int]] = (7, 4),
                  random_erasing: float = 0.0, flip: bool = True,
                  flip_label_map: Optional[dict[int, int]] = None, on_error: str = "skip", seed: int = 0,
                  num_classes: Optional[int] = None, backend: str = "auto",
                  test_short_side: Optional[int] = None) -> VideoDataset:
    """Sampler + transform + dataset from recipe-level settings.

    ``sampling="dense"``: ``DenseSampler(num_frames, frame_interval, num_clips)``;
    ``sampling="uniform"``: ``UniformSampler(num_frames, num_clips=num_clips)`` (``frame_interval``
    ignored). ``train=False`` gives test mode (deterministic sampling, ``num_clips x num_crops``
    views, short side resized to ``test_short_side`` or, by default, ``size``; ``short_side``,
    ``rand_augment``, ``random_erasing``, ``flip`` unused). ``seed``, ``num_classes``, ``backend``
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
    return VideoDataset(ann_file, root, sampler, transform, flip_label_map=flip_label_map, on_error=on_error,
                        seed=seed, num_classes=num_classes, backend=backend)
