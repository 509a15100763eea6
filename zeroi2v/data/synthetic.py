"""A tiny synthetic video dataset whose classes differ only in the temporal order of frames.

Each *group* is one rendered base clip: a textured scene lit by a light whose colour turns around
the hue wheel (from a random starting hue, by an irregular 20-100 degrees per frame), with a
textured ball falling down it at an irregular pace (on a vertical torus: it re-enters at the top). Every class
is a fixed *permutation of the frames of the same base clip*:

====================  ===========================================  ===========================
class                 frame order (base frame indices, T frames)   what happens
====================  ===========================================  ===========================
``forward``           0, 1, ..., T-1                               hue turns up, ball falls
``backward``          T-1, ..., 1, 0                               hue turns down, ball rises
``forward_back``      0, 2, 4, ... then ..., 5, 3, 1               up, then back down
``back_forward``      T-1 - (forward_back)                         down, then back up
``forward_twice``     0, 2, 4, ... then 1, 3, 5, ...               up, jump back, up again
``backward_twice``    T-1 - (forward_twice)                        down, jump back, down again
====================  ===========================================  ===========================

Every group is written once per class, so the multiset of frames of each class is *identical*
(up to video compression): a model that looks at frames independently and pools them without
order (an image model averaging per-frame predictions) is exactly at chance. The starting hue and
ball position are uniform on their circles, so even per-frame-index statistics match across
classes, and the irregular steps keep a temporal position embedding from helping either (with
constant rates, a per-frame feature whose phase turns with the frame index would add up coherently
for one direction only). What separates the classes is
how consecutive frames relate - the thing a temporal head of STDHA sees. The colour change is a
whole-frame signal, visible to a head that attends to the next frame at all, so a small model
learns it in a few hundred steps on a CPU; the ball is a local motion cue on top.

Use all ``num_frames`` frames when training on it (e.g. uniform sampling with ``num_frames``
segments, or dense sampling with interval 1): sub-sampling picks different base frames in
different classes. Horizontal flip changes neither cue, so it is a label-preserving augmentation
here (``flip_label_map`` is ``None``). Train/val are split by group (no base clip in both).
"""
from __future__ import annotations

import os

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
    """One base clip ``(T, size, size, 3)`` uint8: a textured scene under a hue-cycling light with a
    textured ball falling (+y) on a vertical torus; both advance by random steps each frame."""
    s = size / 64.0
    # luminance of the scene: smooth noise in [0.35, 0.95]
    scene = 0.35 + 0.6 * _smooth_noise(rng, size, int(rng.integers(3, 7)), channels=1)[..., 0]
    # the ball: a disk of radius r with a two-tone blocky texture, darker or brighter than the scene
    r = rng.uniform(7.0, 11.0) * s
    block = max(1, int(round(2 * s)))
    n_blk = -(-size // block)
    pattern = rng.random((n_blk, n_blk)) < 0.5
    pattern = np.kron(pattern, np.ones((block, block), dtype=bool))[:size, :size]
    lum_a = rng.uniform(0.05, 1.0)
    tex = np.where(pattern, lum_a, np.clip(lum_a + rng.choice([-0.3, 0.3]), 0.0, 1.0))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    alpha = np.clip(r - np.sqrt((yy - c) ** 2 + (xx - c) ** 2) + 0.5, 0.0, 1.0)
    x_shift = int(round(rng.uniform(r + 1, size - r - 1) - c))
    alpha, tex = np.roll(alpha, x_shift, axis=1), np.roll(tex, x_shift, axis=1)
    # Both cues advance by an irregular step every frame: with constant rates, an image model with a
    # temporal embedding could match a feature's phase to the rate and tell the order apart.
    # motion: y uniform on the torus, falling 1.5-5 px (at 64 px) per frame
    steps = np.concatenate([[0.0], np.cumsum(rng.uniform(1.5, 5.0, num_frames - 1) * s)])
    ys = np.round(rng.uniform(0, size) + steps - c).astype(np.int64)
    # light: hue turning up by 20-100 degrees per frame from a uniform start, random saturation
    hues = rng.uniform(0, 2 * np.pi) + np.concatenate(
        [[0.0], np.cumsum(np.deg2rad(rng.uniform(20.0, 100.0, num_frames - 1)))])
    sat = rng.uniform(0.5, 0.9)
    phases = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i in range(num_frames):
        a = np.roll(alpha, int(ys[i]), axis=0)
        lum = a * np.roll(tex, int(ys[i]), axis=0) + (1 - a) * scene
        light = 1 - sat + sat * (0.5 + 0.5 * np.cos(hues[i] - phases))
        frames[i] = np.clip(255.0 * lum[..., None] * light, 0, 255).round().astype(np.uint8)
    return frames


def make_synthetic_dataset(out_dir, num_classes: int = 4, videos_per_class: int = 32, num_frames: int = 16,
                           size: int = 64, seed: int = 0, val_fraction: float = 0.25, fps: int = 8) -> dict:
    """Write the synthetic temporal-order dataset (mp4 files + annotation files) under ``out_dir``.

    ``videos_per_class`` base clips (groups) are rendered and each is written once per class, so
    classes are balanced; ``round(val_fraction * videos_per_class)`` groups (at least 1 when
    ``val_fraction > 0``, at most ``videos_per_class - 1``) go to the validation split.

    Returns ``dict(root, train, val, classes, num_frames, flip_label_map, flip)``: ``root`` is the
    folder the annotation paths are relative to; ``train`` / ``val`` the annotation files;
    ``flip`` says horizontal flip is a valid augmentation and ``flip_label_map`` (``None``: a
    mirrored clip keeps its label) is what to pass along with it.
    """
    if not 2 <= int(num_classes) <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(SYNTHETIC_CLASSES)}], got {num_classes}")
    if int(num_frames) < 4:
        raise ValueError(f"num_frames must be >= 4, got {num_frames}")
    if int(size) < 16 or int(size) % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    if int(videos_per_class) < 1 or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"need videos_per_class >= 1 and 0 <= val_fraction < 1, "
                         f"got {videos_per_class}, {val_fraction}")
    num_classes, videos_per_class = int(num_classes), int(videos_per_class)
    num_frames, size = int(num_frames), int(size)
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
    return dict(root=out_dir, train=train_ann, val=val_ann, classes=classes, num_frames=num_frames,
                flip_label_map=None, flip=True)
