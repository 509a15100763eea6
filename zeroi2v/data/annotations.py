"""Annotation files in the common ``relative/path.mp4 label`` format."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..limits import MAX_CLASSES
from ..safe_io import atomic_path, read_text, short_repr

__all__ = ["read_annotations", "write_annotations", "read_class_names", "check_class_list",
           "same_classes"]

#: The class list ``zeroi2v prepare`` writes beside its annotation file: the labels' order.
CLASSES_FILE = "classes.txt"


def read_annotations(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read ``relative/path.mp4 label`` lines.

    Blank lines and lines starting with ``#`` are ignored. Every other line must hold exactly two
    whitespace-separated fields, a path and a non-negative integer label; anything else raises a
    ``ValueError`` naming the file and the (1-based) line number. Paths are returned as written
    (relative to the dataset root).
    """
    path = os.fspath(path)
    out: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                out.extend(_parse_line(path, lineno, raw))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): an annotation file is "
                         "'relative/path label' lines") from None
    return out


def _parse_line(path: str, lineno: int, raw: str) -> list[tuple[str, int]]:
    line = raw.strip()
    if not line or line.startswith("#"):
        return []
    shown = short_repr(line)
    fields = line.split()
    if len(fields) != 2:
        raise ValueError(f"{path}:{lineno}: expected 'relative/path label' (2 fields), "
                         f"got {len(fields)}: {shown}")
    rel, lab = fields
    if not lab.lstrip("-").isdigit() or len(lab) > 20:
        raise ValueError(f"{path}:{lineno}: label {short_repr(lab)} is not an integer: {shown}")
    label = int(lab)
    if label < 0:
        raise ValueError(f"{path}:{lineno}: label {label} is negative: {shown}")
    if label >= MAX_CLASSES:
        raise ValueError(f"{path}:{lineno}: label {label} is over the {MAX_CLASSES:,} classes "
                         f"zeroi2v takes (a typo?): {shown}")
    return [(rel, label)]


def write_annotations(path: str | os.PathLike, samples) -> None:
    """Write ``(relative_path, label)`` pairs, one ``path label`` line each, atomically (readers
    see the old file or the whole new one; a path the format cannot hold leaves it untouched)."""
    lines = []
    for rel, label in samples:
        rel = str(rel)
        if any(c.isspace() for c in rel) or rel.startswith("#"):
            raise ValueError(f"path {rel!r} contains whitespace or starts with '#'; the annotation "
                             "format cannot hold it (zeroi2v prepare writes safe names)")
        lines.append(f"{rel} {int(label)}\n")
    write_text_atomic(path, "".join(lines))


def write_text_atomic(path, text: str) -> None:
    """``path`` replaced in one step, UTF-8 whatever the locale, with the umask's mode."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _with_id(line: str) -> Optional[tuple[int, str]]:
    """``(id, name)`` of an ``"<id> <name>"`` / ``"<id>,<name>"`` / tab line, else None."""
    for sep in (",", "\t", " "):
        head, _, tail = line.partition(sep)
        if tail.strip() and head.isdigit():
            return int(head), tail.strip()
    return None


def read_class_names(path: Optional[Union[str, os.PathLike]]) -> Optional[list[str]]:
    """One class name per line, label ``i`` on line ``i``. A file whose every line is
    ``"<id> <name>"`` (or ``<id>,<name>``, tab-separated) names each label by its id instead: the
    ids must be 0 .. n-1, each once. A header line above such lines is refused (it would be
    taken for class 0 and shift every label)."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"class-name file not found: {p}")
    lines = [ln.strip() for ln in read_text(p, "class-name file").splitlines() if ln.strip()]
    ids = [_with_id(ln) for ln in lines]
    if len(lines) > 1 and ids[0] is None and all(ids[1:]):
        raise ValueError(f"{p}: line 1 {short_repr(lines[0])} is not '<id> <name>' as the others "
                         "are: remove the header line")
    if not lines or not all(ids):
        return lines  # names only, in label order
    by_id = dict(ids)
    if len(by_id) != len(ids) or sorted(by_id) != list(range(len(ids))):
        got = sorted(i for i, _ in ids)
        shown = ", ".join(map(str, got[:8])) + (", ..." if len(got) > 8 else "")
        raise ValueError(f"{p}: the class ids are {shown}, not 0 .. {len(ids) - 1} each once: "
                         "number the classes from 0 without gaps")
    return [by_id[i] for i in range(len(ids))]


def check_class_list(names: list[str], source, max_label: int, ann_file) -> list[str]:
    """``names`` if they can be the classes ``ann_file``'s labels number (one name per label,
    no name twice), else a ``ValueError`` naming ``source``."""
    if len(names) <= max_label:
        raise ValueError(f"{source} names {len(names)} classes, but {ann_file} uses label "
                         f"{max_label}: it is not this data's class list (correct it, or move it "
                         "away from the annotation file)")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{source} names the class {short_repr(n)} twice: a class list "
                             "names each class once")
        seen.add(n)
    return names


def same_classes(model: Optional[list[str]], data: Optional[list[str]], *, model_source: str,
                 data_source: str) -> None:
    """Refuse data whose labels number the classes in another order than the model does (each
    label ``i`` of the data must be the model's class ``i``). Nothing to check when either side
    has no names."""
    if not model or not data:
        return
    if len(data) > len(model):
        raise ValueError(f"{data_source} names {len(data)} classes, {model_source} has "
                         f"{len(model)}: the data has classes the model cannot predict")
    diff = [i for i, (a, b) in enumerate(zip(model, data)) if a != b]
    if diff:
        i = diff[0]
        raise ValueError(
            f"{data_source} numbers its classes in another order than {model_source}: its label "
            f"{i} is {short_repr(data[i])}, theirs {short_repr(model[i])} ({len(diff)} of "
            f"{len(data)} labels differ), so its labels would not match the model's outputs; "
            "number it in the model's class order (zeroi2v prepare SRC DST --classes "
            "CLASSES.txt)")
