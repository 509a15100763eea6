"""``ZeroI2VConfig``: everything that defines a ZeroI2V video model, in one JSON-able object.

A model is the timm image model ``timm.create_model(model_name, num_classes=0, **timm_kwargs)``
with STDHA head offsets, linear adapters (which ones each block has, their bottleneck ratio,
scale and dropout), a temporal embedding for ``num_frames`` frames and a classifier of
``num_classes``. The defaults of every field are the paper's recipe (docs/method.md §3, §4) and live here
only: :func:`zeroi2v.create_video_model`, the training config's ``model:`` section and the
importers all read them from this class.

``config.json`` of a saved model is :meth:`ZeroI2VConfig.to_dict` (plus a few keys about the
files themselves, see :mod:`zeroi2v.models.artefact`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import closest
from ..limits import MAX_CLASSES, MAX_FRAMES
from ..safe_io import short_repr
from .timm_args import check_model_name, check_timm_kwargs

FORMAT = "zeroi2v"
#: Version 1 was zeroi2v 0.1's pickled ``.pth`` files and ``export`` folders; 2 is this layout.
FORMAT_VERSION = 3  # 3: adapters inside the linears they adapt (keys ...attn.qkv.adapter.*)

ADAPTER_NAMES = ("t_adapter", "s_adapter", "mlp_adapter", "mlp_adapter_out")


def _fail(msg: str) -> None:
    raise ValueError(f"model config: {msg}")


#: The keys of ``pretrained_source`` and their types (what a loader records; see the field).
SOURCE_KEYS = {"timm_name": str, "repo_id": str, "filename": str, "revision": str, "file": str,
               "sha256": str, "size": int}


def _check_source(src: Any) -> dict:
    if not isinstance(src, Mapping):
        _fail(f"pretrained_source must be a mapping, got {type(src).__name__}")
    for k, v in src.items():
        if k not in SOURCE_KEYS:
            _fail(f"pretrained_source: unknown key {k!r}{closest(str(k), SOURCE_KEYS)}; known: "
                  f"{list(SOURCE_KEYS)}")
        want = SOURCE_KEYS[k]
        if isinstance(v, bool) or not isinstance(v, want) or (want is str and len(v) > 4096):
            _fail(f"pretrained_source.{k} must be a {want.__name__}, got {v!r}")
    return dict(src)


@dataclass(frozen=True)
class ZeroI2VConfig:
    """The single description of a ZeroI2V model (the spirit of timm's ``PretrainedCfg``).

    Attributes:
        model_name: timm architecture, e.g. ``"vit_base_patch16_clip_quickgelu_224"``.
        num_frames: frames per clip ``T`` (sizes the temporal embedding).
        num_classes: classes of the video head.
        head_offsets: one int per attention head (``0`` spatial, ``+1`` previous frame, ...), or
            a layout name: ``"auto"`` (the default, :func:`zeroi2v.offsets.auto_offsets`),
            ``"spatial"`` (image-only) or a preset such as ``"vit_b"``; a built model's config
            always holds the ints.
        timm_kwargs: the exact keyword arguments of ``timm.create_model`` besides ``num_classes``
            (JSON values only: numbers, strings, lists, dicts). ``None`` when the model was built
            from an instance whose construction could not be recovered.
        adapter_ratio, adapter_scale, adapter_dropout: the linear adapters' bottleneck width
            (fraction of the channel count), scale ``s`` and dropout.
        adapters: for each block, the names of the adapters it has or had before a merge (of
            ``ADAPTER_NAMES``); ``None`` means all four in every block.
        merged: the adapters are folded into the frozen linears (:func:`zeroi2v.merge_adapters`);
            the model is a plain ViT with STDHA.
        head_dropout: dropout before the classifier (training only).
        class_names: optional, one per class.
        pretrained_source: where the image weights the backbone started from came from, as
            recorded when they were loaded (:data:`SOURCE_KEYS`): a timm tag on the Hugging Face
            Hub (``timm_name``, ``repo_id``, ``filename``, ``revision``: the commit) or a local
            ``file`` (its name only), with ``sha256`` and ``size``. Provenance only: nothing is
            fetched from it. ``None`` when unknown (left out of ``config.json``).
        format_version: of the saved layout; files of a newer version are refused.
    """

    model_name: str
    num_frames: int
    num_classes: int
    head_offsets: Union[str, tuple[int, ...]] = "auto"
    timm_kwargs: Optional[Mapping[str, Any]] = field(default_factory=dict)
    adapter_ratio: float = 0.25
    adapter_scale: float = 0.5
    adapter_dropout: float = 0.1
    adapters: Optional[tuple[tuple[str, ...], ...]] = None
    merged: bool = False
    head_dropout: float = 0.5
    class_names: Optional[tuple[str, ...]] = None
    pretrained_source: Optional[Mapping[str, Any]] = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        check_model_name(self.model_name, "model config")
        for k, most in (("num_frames", MAX_FRAMES), ("num_classes", MAX_CLASSES),
                        ("format_version", 1000)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(f"{k} must be a positive integer, got {short_repr(v)}")
            if v > most:
                _fail(f"{k} is {v:,}, over the {most:,} zeroi2v takes")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"model config has format version {self.format_version}, newer than this zeroi2v "
                f"reads ({FORMAT_VERSION}): upgrade zeroi2v")
        if isinstance(self.head_offsets, str):
            if not self.head_offsets:
                _fail("head_offsets must be a preset name or a list of ints")
        else:
            offs = self.head_offsets
            if offs is None:
                _fail("head_offsets=None is ambiguous: pass 'auto' (the default temporal layout), "
                      "'spatial' (an image-only model), a preset name, or one int per head")
            if not isinstance(offs, (list, tuple)) or not offs or any(
                    isinstance(d, bool) or not isinstance(d, int) for d in offs):
                _fail(f"head_offsets must be a preset name or a list of ints, got {offs!r}")
            set_("head_offsets", tuple(int(d) for d in offs))
        for k, lo, hi in (("adapter_ratio", 0.0, math.inf),
                          ("adapter_scale", -math.inf, math.inf),
                          ("adapter_dropout", 0.0, 1.0),
                          ("head_dropout", 0.0, 1.0)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(f"{k} must be a number, got {short_repr(v)}")
            if k == "adapter_ratio" and not lo < v <= 64:
                _fail(f"adapter_ratio must be in (0, 64], got {v}")
            if k.endswith("dropout") and not (lo <= v < hi):
                _fail(f"{k} must be in [0, 1), got {v}")
            set_(k, float(v))
        if self.timm_kwargs is not None:
            if not isinstance(self.timm_kwargs, Mapping):
                _fail(f"timm_kwargs must be a mapping, got {type(self.timm_kwargs).__name__}")
            set_("timm_kwargs", check_timm_kwargs(self.timm_kwargs, "model config"))
        if not isinstance(self.merged, bool):
            _fail(f"merged must be true or false, got {self.merged!r}")
        if self.adapters is not None:
            rows = []
            for i, row in enumerate(self.adapters):
                if isinstance(row, str) or not isinstance(row, (list, tuple)):
                    _fail(f"adapters[{i}] must be a list of adapter names, got {row!r}")
                for n in row:
                    if n not in ADAPTER_NAMES:
                        _fail(f"adapters[{i}]: unknown adapter {n!r}{closest(str(n), ADAPTER_NAMES)};"
                              f" known: {list(ADAPTER_NAMES)}")
                rows.append(tuple(n for n in ADAPTER_NAMES if n in row))
            set_("adapters", tuple(rows))
        if self.class_names is not None:
            names = self.class_names
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                _fail("class_names must be a list of strings")
            if len(names) != self.num_classes:
                _fail(f"{len(names)} class names for {self.num_classes} classes")
            set_("class_names", tuple(names))
        if self.pretrained_source is not None:
            set_("pretrained_source", _check_source(self.pretrained_source))

    # ------------------------------------------------------------------ properties
    def adapters_of(self, block: int) -> tuple[str, ...]:
        return ADAPTER_NAMES if self.adapters is None else self.adapters[block]

    def replace(self, **changes) -> ZeroI2VConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {"format": FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "pretrained_source":
                if v is None:  # files of models without a recorded source stay as they were
                    continue
                v = dict(v)
            if isinstance(v, tuple):
                v = [list(x) if isinstance(x, tuple) else x for x in v]
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model config") -> ZeroI2VConfig:
        """Strict inverse of :meth:`to_dict`: unknown keys and wrong types are errors naming the
        key (``source`` names the file)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"{source}: format {fmt!r} is not a zeroi2v model config")
        names = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in names:
                raise ValueError(f"{source}: unknown key {k!r}{closest(k, names)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise ValueError(f"{source}: missing key {missing[0]!r}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {str(e).removeprefix('model config: ')}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        """One line for logs and the command line."""
        kw = "" if not self.timm_kwargs else " " + json.dumps(self.timm_kwargs, separators=(",", ":"))
        adapters = "merged (adapters folded in)" if self.merged else (
            "4 adapters per block" if self.adapters is None else
            f"{sum(len(r) for r in self.adapters)} adapters")
        offsets = (self.head_offsets if isinstance(self.head_offsets, str)
                   else list(self.head_offsets))
        return (f"{self.model_name}{kw}, {self.num_frames} frames, {self.num_classes} classes, "
                f"head offsets {offsets}, {adapters}")
