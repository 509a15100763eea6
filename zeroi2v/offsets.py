"""STDHA head offsets: the official presets, validation, and the source-frame rule (SPEC §2).

A head offset ``d_h`` says which frame head ``h`` takes its keys and values from: frame
``t - d_h`` when that frame exists in the clip, otherwise its own frame ``t`` (the boundary rule
of the official code). ``d_h = 0`` is a plain spatial head; ``+1`` looks at the previous frame.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Union

import torch

# Offsets in the channel order of the fused qkv projection (SPEC §2); zeros fill the remaining heads.
PRESETS: dict[str, tuple[int, ...]] = {
    "vit_b": (1, -1) + (0,) * 10,
    "vit_b_long": (1, -1, 2, -2) + (0,) * 8,
    "vit_l": (1, 1, -1, -1) + (0,) * 12,
    "vit_l_32f": (1, 1, -1, -1, 2, 2) + (0,) * 10,
    "vit_l_long": (1, 1, -1, -1, 2, -2, 3) + (0,) * 9,
}

#: Layout names that fit any head count (beside the fixed-size :data:`PRESETS`).
SPATIAL = "spatial"  # every head spatial: the image model, frame by frame

HeadOffsets = Union[str, Sequence[int], torch.Tensor, None]


def resolve_offsets(head_offsets: HeadOffsets, num_heads: int) -> tuple[int, ...]:
    """Turn a preset name, a sequence of ints, a tensor or ``None`` (all spatial) into a tuple.

    Checks the count against ``num_heads``; the range check against the frame count is
    :func:`check_offsets`, because a module may be built before it knows its clip length.
    """
    if head_offsets is None or head_offsets == SPATIAL:
        return (0,) * num_heads
    if isinstance(head_offsets, str):
        if head_offsets not in PRESETS:
            raise ValueError(
                f"unknown head-offset preset {head_offsets!r}; known presets: "
                f"{sorted(PRESETS) + [SPATIAL]}"
            )
        offsets = PRESETS[head_offsets]
        if len(offsets) != num_heads:
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
    if len(offsets) != num_heads:
        raise ValueError(
            f"head-count mismatch: got {len(offsets)} head offsets for {num_heads} attention heads"
        )
    return offsets


def check_offsets(offsets: Sequence[int], num_frames: int) -> None:
    """Every offset must satisfy ``|d| < num_frames`` (SPEC §2)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    bad = [d for d in offsets if abs(d) >= num_frames]
    if bad:
        raise ValueError(
            f"head offsets {bad} are too large for {num_frames} frames: every offset needs "
            f"|d| < num_frames (= {num_frames})"
        )


def clamp_offsets(offsets: Sequence[int], num_frames: int) -> tuple[int, ...]:
    """Shrink offsets to ``|d| <= num_frames - 1`` keeping their sign (used for shorter clips)."""
    lim = max(num_frames - 1, 0)
    return tuple(max(-lim, min(lim, int(d))) for d in offsets)


@lru_cache(maxsize=256)
def _source_table(offsets: tuple[int, ...], num_frames: int) -> tuple[tuple[int, ...], ...]:
    # Cached as plain ints, not tensors: a tensor cached while tracing (torch.export, compile)
    # would be a fake tensor that breaks later eager calls.
    return tuple(
        tuple(t - d if 0 <= t - d < num_frames else t for d in offsets) for t in range(num_frames)
    )


def source_frames(offsets: Sequence[int], num_frames: int, device=None) -> torch.Tensor:
    """``s[t, h]``: the frame whose K/V head ``h`` of frame ``t`` attends to. Shape (T, H), int64."""
    table = _source_table(tuple(int(d) for d in offsets), int(num_frames))
    return torch.tensor(table, dtype=torch.long, device=device)
