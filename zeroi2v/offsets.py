"""STDHA head offsets: the official presets, validation, and the source-frame rule (docs/method.md §2).

A head offset ``d_h`` says which frame head ``h`` takes its keys and values from: frame
``t - d_h`` when that frame exists in the clip, otherwise its own frame ``t`` (the boundary rule
of the official code). ``d_h = 0`` is a plain spatial head; ``+1`` looks at the previous frame.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Optional, Union

import torch

# Offsets in the channel order of the fused qkv projection (docs/method.md §2); zeros fill the
# remaining heads.
PRESETS: dict[str, tuple[int, ...]] = {
    "vit_b": (1, -1) + (0,) * 10,
    "vit_b_long": (1, -1, 2, -2) + (0,) * 8,
    "vit_l": (1, 1, -1, -1) + (0,) * 12,
    "vit_l_32f": (1, 1, -1, -1, 2, 2) + (0,) * 10,
    "vit_l_long": (1, 1, -1, -1, 2, -2, 3) + (0,) * 9,
}

#: Layout names that fit any head count (beside the fixed-size :data:`PRESETS`).
AUTO = "auto"        # the default: see auto_offsets()
SPATIAL = "spatial"  # every head spatial: the image model, frame by frame
LAYOUTS = (AUTO, SPATIAL)

HeadOffsets = Union[str, Sequence[int], torch.Tensor]


def auto_offsets(num_heads: int, num_frames: int) -> tuple[int, ...]:
    """The layout ``head_offsets="auto"`` picks for ``num_heads`` heads and clips of
    ``num_frames`` frames.

    Where the paper has a layout for the head count it is used: 12 heads (ViT-B) ``vit_b``, or
    ``vit_b_long`` for clips of 16 frames or more; 16 heads (ViT-L) ``vit_l``, or ``vit_l_32f``
    for 32 frames or more (the Kinetics layout; SSv2's ``vit_l_long`` is a recipe choice, name it
    explicitly). Any other head count follows the same proportions: about one head in six
    temporal (one in three from 16 frames on), taken in pairs from the first head on, with
    offsets ``+1, -1`` repeating (``+1, -1, +2, -2`` for long clips), and at least one spatial
    head left. Offsets are then clamped to ``|d| < num_frames`` (all zero for one frame).
    """
    h, t = int(num_heads), int(num_frames)
    if h < 1 or t < 1:
        raise ValueError(f"need num_heads >= 1 and num_frames >= 1, got {h} and {t}")
    long = t >= 16
    if h == 12:
        offsets = PRESETS["vit_b_long" if long else "vit_b"]
    elif h == 16:
        offsets = PRESETS["vit_l_32f" if t >= 32 else "vit_l"]
    else:
        k = min(2 * max(1, round(h / (6 if long else 12))), h - 1)
        pattern = (1, -1, 2, -2) if long else (1, -1)
        offsets = tuple(pattern[i % len(pattern)] for i in range(k)) + (0,) * (h - k)
    return clamp_offsets(offsets, t)


def resolve_offsets(head_offsets: HeadOffsets, num_heads: Optional[int] = None,
                    num_frames: Optional[int] = None) -> tuple[int, ...]:
    """Turn a layout name (``"auto"``, ``"spatial"``, a preset), a sequence of ints or a tensor
    into one int per head. Every public function that takes ``head_offsets`` goes through this.

    Checks the count against ``num_heads``; ``num_heads=None`` (a caller that has no heads to
    count, e.g. :func:`source_frames`) takes a preset or the ints as they are, and refuses
    ``"auto"`` and ``"spatial"``, which depend on the head count. ``"auto"`` needs
    ``num_frames``. The range check against the frame count is :func:`check_offsets`, because a
    module may be built before it knows its clip length.
    """
    if head_offsets is None:
        raise ValueError("head_offsets=None is ambiguous: pass 'auto' (the default temporal "
                         "layout), 'spatial' (every head spatial, the image model), a preset "
                         f"name ({', '.join(sorted(PRESETS))}) or one int per head")
    if isinstance(head_offsets, str) and head_offsets in LAYOUTS and num_heads is None:
        raise ValueError(f"head_offsets={head_offsets!r} depends on the head count, which is not "
                         "known here: pass one int per head or a preset name")
    if isinstance(head_offsets, str) and head_offsets == SPATIAL:
        return (0,) * num_heads
    if isinstance(head_offsets, str) and head_offsets == AUTO:
        if num_frames is None:
            raise ValueError("head_offsets='auto' depends on the frame count: give num_frames")
        return auto_offsets(num_heads, num_frames)
    if isinstance(head_offsets, str):
        if head_offsets not in PRESETS:
            raise ValueError(
                f"unknown head-offset preset {head_offsets!r}; known: "
                f"{sorted(PRESETS) + list(LAYOUTS)}"
            )
        offsets = PRESETS[head_offsets]
        if num_heads is not None and len(offsets) != num_heads:
            raise ValueError(
                f"preset {head_offsets!r} is for {len(offsets)} heads but the attention has "
                f"{num_heads} heads; pass an explicit list of {num_heads} offsets instead"
            )
        return offsets
    if isinstance(head_offsets, torch.Tensor):
        if head_offsets.dim() != 1 or head_offsets.is_floating_point():
            raise ValueError(
                f"head_offsets tensor must be 1-D integer, got shape {tuple(head_offsets.shape)} "
                f"and dtype {head_offsets.dtype}"
            )
        head_offsets = head_offsets.tolist()
    offsets = tuple(int(d) for d in head_offsets)
    if any(o != d for o, d in zip(offsets, head_offsets)):
        raise ValueError(f"head_offsets must be integers, got {list(head_offsets)}")
    if num_heads is not None and len(offsets) != num_heads:
        raise ValueError(
            f"head-count mismatch: got {len(offsets)} head offsets for {num_heads} attention heads"
        )
    return offsets


def check_offsets(head_offsets: HeadOffsets, num_frames: int) -> None:
    """Every offset must satisfy ``|d| < num_frames`` (docs/method.md §2)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    offsets = resolve_offsets(head_offsets, None, num_frames)
    bad = [d for d in offsets if abs(d) >= num_frames]
    if bad:
        raise ValueError(
            f"head offsets {bad} are too large for {num_frames} frames: every offset needs "
            f"|d| < num_frames (= {num_frames})"
        )


def clamp_offsets(head_offsets: HeadOffsets, num_frames: int) -> tuple[int, ...]:
    """Shrink offsets to ``|d| <= num_frames - 1`` keeping their sign (used for shorter clips)."""
    lim = max(num_frames - 1, 0)
    return tuple(max(-lim, min(lim, d)) for d in resolve_offsets(head_offsets, None, num_frames))


@lru_cache(maxsize=256)
def _source_table(offsets: tuple[int, ...], num_frames: int) -> tuple[tuple[int, ...], ...]:
    # Cached as plain ints, not tensors: a tensor cached while tracing (torch.export, compile)
    # would be a fake tensor that breaks later eager calls.
    return tuple(
        tuple(t - d if 0 <= t - d < num_frames else t for d in offsets) for t in range(num_frames)
    )


def source_frames(head_offsets: HeadOffsets, num_frames: int, device=None) -> torch.Tensor:
    """``s[t, h]``: the frame whose K/V head ``h`` of frame ``t`` attends to. Shape (T, H), int64.
    Any offset is allowed here (``|d| >= T`` reads the own frame, as the boundary rule says)."""
    table = _source_table(resolve_offsets(head_offsets, None, num_frames), int(num_frames))
    return torch.tensor(table, dtype=torch.long, device=device)
