"""Video clip transforms: training augmentation, test views and CLIP normalisation.

Built on ``torchvision.transforms.v2`` operating on ``tv_tensors.Video`` (``(T, C, H, W)``), so every
random parameter (crop box, RandAugment ops and magnitudes, erased box) is drawn once per clip and
applied identically to all its frames. Randomness comes from the ``numpy.random.Generator`` passed
in: torchvision's draws run inside ``torch.random.fork_rng`` seeded from it, so a given generator
state gives the same output and the global torch RNG is left untouched.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["CLIP_MEAN", "CLIP_STD", "VideoTransform", "normalize", "as_generator"]

#: CLIP pixel statistics on the 0-255 scale (R, G, B).
CLIP_MEAN = (122.769, 116.74, 104.04)
CLIP_STD = (68.493, 66.63, 70.321)


def as_generator(rng) -> np.random.Generator:
    """``None`` -> fresh entropy, int / SeedSequence -> seeded, Generator -> itself."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def normalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
              channel_dim: int = -3) -> torch.Tensor:
    """``(x - mean) / std`` per channel on the 0-255 scale; returns float32."""
    x = x.to(torch.float32)
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    m = torch.tensor(mean, dtype=torch.float32).view(shape)
    s = torch.tensor(std, dtype=torch.float32).view(shape)
    return (x - m) / s


def _three_crop(video: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Three ``size x size`` crops of ``(..., H, W)`` along the long side: start, centre, end."""
    h, w = video.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"frame {h}x{w} is smaller than the crop size {size}")
    out = []
    if w >= h:
        top = (h - size) // 2
        for left in (0, (w - size) // 2, w - size):
            out.append(video[..., top:top + size, left:left + size])
    else:
        left = (w - size) // 2
        for top in (0, (h - size) // 2, h - size):
            out.append(video[..., top:top + size, left:left + size])
    return out


class VideoTransform:
    """Turn decoded clips into normalised model input.

    Args:
        train: training augmentation (one random view) vs deterministic test views.
        size: output crop size (square).
        short_side: training only: the short side is resized to this before RandomResizedCrop
            (``None`` skips the resize). At test time the short side is resized to ``size``.
        num_crops: test only: 1 (centre crop) or 3 (left/centre/right crops along the long side).
        rand_augment: ``(magnitude, num_layers)`` on the 0-10 magnitude scale of the reference
            recipes (RandAugment "m7-n4"), or ``None``. Implemented with torchvision's RandAugment
            with 11 magnitude bins, so magnitude 7 means 70 % of each op's maximum.
        random_erasing: probability of erasing one random box (torchvision RandomErasing, default
            scale/ratio) after normalisation; the box is filled with 0, i.e. the mean colour.
        flip: training only: horizontal flip with probability 0.5 when the caller does not decide.
        scale, ratio: RandomResizedCrop area and aspect ranges (defaults as torchvision / mmaction2).
        test_short_side: test only: resize the short side to this (>= ``size``) before cropping;
            ``None`` (default, the recipes) resizes it to ``size``.

    ``__call__(frames, rng=None, *, flip=None)``: ``frames`` is a uint8 tensor or array
    ``(V, T, H, W, C)`` (V clips; ``(T, H, W, C)`` is taken as one clip) with C = 3 (RGB).
    ``flip`` (training only) forces the horizontal flip on/off; ``None`` draws it from ``rng`` with
    probability 0.5 when ``self.flip`` (a caller that must know, e.g. for a label swap, decides itself
    and passes it). All clips of one call share the flip decision; the other augmentations are drawn
    per clip.

    Returns float32, CLIP-normalised:
        train: ``(C, T, size, size)`` for one clip, ``(V, C, T, size, size)`` for V > 1 clips;
        test:  ``(V * num_crops, C, T, size, size)``, clip-major (clip 0 crops 0..num_crops-1, clip 1, ...).
    """

    def __init__(self, train: bool, size: int = 224, short_side: Optional[int] = 256, num_crops: int = 1,
                 rand_augment: Optional[tuple[int, int]] = (7, 4), random_erasing: float = 0.0,
                 flip: bool = True, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, test_short_side: Optional[int] = None):
        if test_short_side is not None and int(test_short_side) < int(size):
            raise ValueError(f"test_short_side={test_short_side} is smaller than size={size}")
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        if not 0.0 <= float(random_erasing) <= 1.0:
            raise ValueError(f"random_erasing is a probability, got {random_erasing}")
        if rand_augment is not None:
            if len(rand_augment) != 2:
                raise ValueError(f"rand_augment must be (magnitude, num_layers), got {rand_augment!r}")
            m, n = int(rand_augment[0]), int(rand_augment[1])
            if not 0 <= m <= 10 or n < 0:
                raise ValueError(f"rand_augment magnitude must be in [0, 10] and num_layers >= 0, "
                                 f"got {rand_augment!r}")
            rand_augment = (m, n)
        self.train = bool(train)
        self.size = int(size)
        self.short_side = None if short_side is None else int(short_side)
        self.num_crops = int(num_crops)
        self.rand_augment = rand_augment
        self.random_erasing = float(random_erasing)
        self.flip = bool(flip)
        self.test_short_side = int(size) if test_short_side is None else int(test_short_side)
        self.mean, self.std = tuple(mean), tuple(std)

        self._crop = v2.RandomResizedCrop(self.size, scale=scale, ratio=ratio, antialias=True)
        self._randaug = (v2.RandAugment(num_ops=rand_augment[1], magnitude=rand_augment[0],
                                        num_magnitude_bins=11)
                         if rand_augment is not None and rand_augment[1] > 0 else None)
        self._erase = v2.RandomErasing(p=self.random_erasing, value=0.0) if self.random_erasing > 0 else None

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _to_clips(frames) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
        if x.dim() == 4:
            x = x.unsqueeze(0)
        if x.dim() != 5 or x.shape[-1] != 3:
            raise ValueError(f"expected frames (V, T, H, W, 3) or (T, H, W, 3), got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames, got {x.dtype}")
        return x.permute(0, 1, 4, 2, 3)  # (V, T, C, H, W)

    def _train_clip(self, clip: torch.Tensor, flip: bool) -> torch.Tensor:
        video = tv_tensors.Video(clip.contiguous())  # (T, C, H, W) uint8
        if self.short_side is not None:
            video = TF.resize(video, self.short_side, antialias=True)
        video = self._crop(video)
        if flip:
            video = TF.horizontal_flip(video)
        if self._randaug is not None:
            video = self._randaug(video)
        x = normalize(video.as_subclass(torch.Tensor), self.mean, self.std)  # (T, C, S, S)
        if self._erase is not None:
            x = self._erase(tv_tensors.Video(x)).as_subclass(torch.Tensor)
        return x.permute(1, 0, 2, 3).contiguous()  # (C, T, S, S)

    def _test_views(self, clip: torch.Tensor) -> list[torch.Tensor]:
        video = TF.resize(clip.contiguous(), self.test_short_side, antialias=True)  # short side -> size
        crops = ([TF.center_crop(video, [self.size, self.size])] if self.num_crops == 1
                 else _three_crop(video, self.size))
        return [normalize(c, self.mean, self.std).permute(1, 0, 2, 3).contiguous() for c in crops]

    # -- call ----------------------------------------------------------------------------------
    def __call__(self, frames, rng=None, *, flip: Optional[bool] = None) -> torch.Tensor:
        clips = self._to_clips(frames)
        if not self.train:
            return torch.stack([view for clip in clips for view in self._test_views(clip)])
        rng = as_generator(rng)
        if flip is None:
            flip = self.flip and bool(rng.random() < 0.5)
        seed = int(rng.integers(0, 2 ** 63 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = [self._train_clip(clip, bool(flip)) for clip in clips]
        return out[0] if len(out) == 1 else torch.stack(out)

    def __repr__(self) -> str:
        if not self.train:
            return (f"VideoTransform(train=False, size={self.size}, test_short_side={self.test_short_side}, "
                    f"num_crops={self.num_crops})")
        return (f"VideoTransform(train=True, size={self.size}, short_side={self.short_side}, "
                f"rand_augment={self.rand_augment}, random_erasing={self.random_erasing}, flip={self.flip})")
