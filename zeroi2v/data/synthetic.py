"""A tiny synthetic video dataset whose classes differ only in the temporal order of frames.

Each *group* is one rendered base clip: a textured blob sliding to the right (+x) at constant speed
over a textured static background, on a torus (it wraps around the left/right edges), with random
start position, height, speed, size, colours and textures. Every class is a fixed *permutation of
the frames of the same base clip*:

====================  ===========================================  ======================
class                 frame order (base frame indices, T frames)   motion
====================  ===========================================  ======================
``forward``           0, 1, ..., T-1                               moves right
``backward``          T-1, ..., 1, 0                               moves left
``forward_back``      0, 2, 4, ... then ..., 5, 3, 1               right, then back left
``back_forward``      T-1 - (forward_back)                         left, then back right
``forward_twice``     0, 2, 4, ... then 1, 3, 5, ...               right, jump, right
``backward_twice``    T-1 - (forward_twice)                        left, jump, left
====================  ===========================================  ======================

Every group is written once per class, so the multiset of frames of each class is *identical*
(up to video compression): a model that looks at frames independently and pools them without
order (an image model averaging per-frame predictions) is exactly at chance. The blob position
at any fixed frame index is uniform on the torus, so even per-index frame statistics match. Use
all ``num_frames`` frames when training on it (e.g. uniform sampling with ``num_frames`` segments,
or dense sampling with interval 1): sub-sampling picks different base frames in different classes.

A horizontal mirror turns class ``2k`` into class ``2k+1`` and back (the mirrored base clip moves
left), so horizontal-flip augmentation is valid with the returned ``flip_label_map`` - the same
mechanism as the SSv2 left/right classes. Train/val are split by group (no base clip in both).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .annotations import write_annotations
from .video_io import write_video

__all__ = ["make_synthetic_dataset", "SYNTHETIC_CLASSES", "synthetic_orders", "render_base_clip"]

SYNTHETIC_CLASSES = ("forward", "backward", "forward_back", "back_forward", "forward_twice", "backward_twice")


def synthetic_orders(num_frames: int) -> list[np.ndarray]:
    """Frame permutations of the classes in ``SYNTHETIC_CLASSES`` order."""
    t = int(num_frames)
    fwd = np.arange(t)
    evens, odds = fwd[0::2], fwd[1::2]
    fb = np.concatenate([evens, odds[::-1]])
    ft = np.concatenate([evens, odds])
    orders = [fwd, t - 1 - fwd, fb, t - 1 - fb, ft, t - 1 - ft]
    return [o.astype(np.int64) for o in orders]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Isotropic smooth colour noise in [0, 1], (size, size, channels)."""
    low = torch.from_numpy(rng.random((1, channels, cells, cells), dtype=np.float32))
    up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return up[0].permute(1, 2, 0).clamp(0, 1).numpy()


def render_base_clip(rng: np.random.Generator, num_frames: int = 16, size: int = 64) -> np.ndarray:
    """One base clip ``(T, size, size, 3)`` uint8: a textured blob moving right (+x) on a torus."""
    t = np.arange(num_frames)
    s = size / 64.0
    # background: low-contrast smooth colour noise around a random base colour
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    bg = base + 60.0 * (_smooth_noise(rng, size, int(rng.integers(3, 7))) - 0.5)
    # blob sprite: a disk of radius r with a two-colour blocky texture, contrasting colour
    r = rng.uniform(7.0, 11.0) * s
    fg_a = np.clip(255.0 - base + rng.normal(0, 25, size=3), 0, 255)
    fg_b = np.clip(fg_a + rng.normal(0, 60, size=3), 0, 255)
    block = max(1, int(round(2 * s)))
    n_blk = -(-size // block)
    pattern = rng.random((n_blk, n_blk)) < 0.5
    pattern = np.kron(pattern, np.ones((block, block), dtype=bool))[:size, :size]
    tex = np.where(pattern[..., None], fg_a, fg_b).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    alpha = np.clip(r - np.sqrt((yy - c) ** 2 + (xx - c) ** 2) + 0.5, 0.0, 1.0)[..., None]
    # trajectory: x uniform on the torus, y fixed, constant speed to the right
    y_shift = int(round(rng.uniform(r + 1, size - r - 1) - c))
    x0 = rng.uniform(0, size)
    speed = rng.uniform(1.0, 2.5) * s
    xs = np.round(x0 + speed * t - c).astype(np.int64)
    alpha = np.roll(alpha, y_shift, axis=0)
    tex = np.roll(tex, y_shift, axis=0)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i, dx in enumerate(xs):
        a = np.roll(alpha, int(dx), axis=1)
        fg = np.roll(tex, int(dx), axis=1)
        frames[i] = np.clip(a * fg + (1 - a) * bg, 0, 255).round().astype(np.uint8)
    return frames


def make_synthetic_dataset(out_dir, num_classes: int = 4, videos_per_class: int = 32, num_frames: int = 16,
                           size: int = 64, seed: int = 0, val_fraction: float = 0.25, fps: int = 8) -> dict:
    """Write the synthetic temporal-order dataset (mp4 files + annotation files) under ``out_dir``.

    ``videos_per_class`` base clips (groups) are rendered and each is written once per class, so
    classes are balanced; ``round(val_fraction * videos_per_class)`` groups (at least 1 when
    ``val_fraction > 0``, at most ``videos_per_class - 1``) go to the validation split.

    Returns ``dict(root, train, val, classes, num_frames, flip_label_map, flip)``: ``root`` is the
    folder the annotation paths are relative to; ``train`` / ``val`` the annotation files;
    ``flip_label_map`` pairs mirror-image classes and ``flip`` says whether horizontal flip is a
    valid augmentation (False when ``num_classes`` is odd: the last class's mirror is absent).
    """
    if not 2 <= int(num_classes) <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(SYNTHETIC_CLASSES)}], got {num_classes}")
    if int(num_frames) < 4:
        raise ValueError(f"num_frames must be >= 4, got {num_frames}")
    if int(size) < 16 or int(size) % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    if int(videos_per_class) < 1 or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"need videos_per_class >= 1 and 0 <= val_fraction < 1, got {videos_per_class}, {val_fraction}")
    num_classes, videos_per_class, num_frames, size = int(num_classes), int(videos_per_class), int(num_frames), int(size)
    out_dir = os.path.abspath(os.fspath(out_dir))
    classes = list(SYNTHETIC_CLASSES[:num_classes])
    orders = synthetic_orders(num_frames)[:num_classes]
    rng = np.random.default_rng(seed)

    n_val = 0
    if val_fraction > 0 and videos_per_class > 1:
        n_val = min(max(1, int(round(val_fraction * videos_per_class))), videos_per_class - 1)
    val_groups = set(rng.permutation(videos_per_class)[:n_val].tolist())

    train, val = [], []
    for g in range(videos_per_class):
        base = render_base_clip(rng, num_frames, size)
        for label, (name, order) in enumerate(zip(classes, orders)):
            rel = f"videos/{name}/{g:05d}.mp4"
            write_video(os.path.join(out_dir, rel), base[order], fps=fps)
            (val if g in val_groups else train).append((rel, label))
    train_ann, val_ann = os.path.join(out_dir, "train.txt"), os.path.join(out_dir, "val.txt")
    write_annotations(train_ann, train)
    write_annotations(val_ann, val)
    with open(os.path.join(out_dir, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(classes) + "\n")
    pairs = num_classes - num_classes % 2
    flip_map: Optional[dict[int, int]] = {k: k ^ 1 for k in range(pairs)}
    return dict(root=out_dir, train=train_ann, val=val_ann, classes=classes, num_frames=num_frames,
                flip_label_map=flip_map, flip=num_classes % 2 == 0)
