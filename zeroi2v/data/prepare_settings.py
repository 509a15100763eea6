"""The settings ``zeroi2v prepare`` records in its destination, and the one check (and message)
that refuses a rerun with other ones: ``DST/prepare.json`` for one file per video, the index's
``"settings"`` for ``--shards`` (:mod:`zeroi2v.data.shard_writer`).

A rerun keeps the outputs that exist, so without this check a rerun with another
``--short-side``, ``--fps`` or ``--crf`` would mix two encodings in one dataset (and, in shards,
whose samples carry their labels, another ``--classes`` numbering two numberings). Only what
changes the outputs is a setting: ``--workers`` and the progress bar are not, nor, for one file
per video, ``--classes`` (its lists are rewritten whole by every run).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["RECORD", "setting_changes", "refuse_changed_settings", "read_record", "write_record"]

RECORD = "prepare.json"
_FORMAT, _VERSION = "zeroi2v-prepare", 1
# what an unset value means, in the words of the command's defaults
_UNSET = {"fps": "source rate", "classes": "sorted folder names"}


def _show(key: str, value) -> str:
    from ..safe_io import short_repr

    if value is None:
        return _UNSET.get(key, "none")
    if key == "classes" and isinstance(value, list):  # its length, not hundreds of names
        return f"{len(value)} names"
    return str(value) if isinstance(value, (int, float)) else short_repr(value)


def setting_changes(was: dict, now: dict) -> list[str]:
    """``"key was -> now"`` for every setting that differs; a key one side lacks counts as unset
    (so settings added later keep older records valid while they hold their default)."""
    out = []
    for key in list(now) + [k for k in was if k not in now]:
        a, b = was.get(key), now.get(key)
        if a == b:
            continue
        change = f"{key} {_show(key, a)} -> {_show(key, b)}"
        if isinstance(a, list) and isinstance(b, list):  # two class lists: where they part
            from ..safe_io import short_repr

            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if i is not None:
                change += f", name {i + 1} {short_repr(a[i])} -> {short_repr(b[i])}"
        out.append(change)
    return out


def refuse_changed_settings(made: str, was: dict, now: dict, fix: str) -> None:
    """One-line ``ValueError`` ``"<made> with other settings (key was -> now; ...): <fix>"`` when
    ``now`` differs from the recorded ``was``; nothing when they agree."""
    changes = setting_changes(was, now)
    if changes:
        raise ValueError(f"{made} with other settings ({'; '.join(changes)}): {fix}")


def read_record(dst: Path) -> Optional[dict]:
    """The settings recorded in ``dst`` (``None`` when there is no record); a ``ValueError``
    naming the file when it is not a record this zeroi2v reads."""
    from ..safe_io import load_json, read_text

    path = dst / RECORD
    if not path.exists() and not path.is_symlink():
        return None
    fix = (f"remove it if the videos in {dst} were made with this command's settings, or choose "
           "another destination")
    try:
        raw = load_json(read_text(path, "prepare settings record"), str(path))
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e}): {fix}") from None
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT or not isinstance(raw.get("settings"), dict):
        raise ValueError(f"{path} is not the settings record of zeroi2v prepare: {fix}")
    if raw.get("version") != _VERSION or isinstance(raw.get("version"), bool):
        raise ValueError(f"{path} is a settings record of version {_show('', raw.get('version'))}, "
                         f"this zeroi2v writes {_VERSION}: {fix}")
    return raw["settings"]


def write_record(dst: Path, settings: dict) -> None:
    """``dst/prepare.json``, atomically (a reader sees no record or the whole one)."""
    from .annotations import write_text_atomic

    write_text_atomic(dst / RECORD, json.dumps({"format": _FORMAT, "version": _VERSION,
                                                "settings": settings}, indent=1) + "\n")
