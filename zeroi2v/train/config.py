"""Run configuration: one typed schema for every section and key, YAML files and ``key.sub=value``.

A config has four sections (see ``configs/*.yaml`` for the recipes):

* ``model``  — the video model: :class:`~zeroi2v.ZeroI2VConfig`'s fields (``name`` is its
  ``model_name``; the defaults are its defaults) plus where the image weights come from and
  whether the backbone trains
* ``data``   — annotation files, sampling, augmentation, loader settings
* ``train``  — optimiser, schedule, precision, checkpointing, logging
* ``eval``   — test-time views

The schema below (pydantic models) is the one place that lists every key with its type, range
and default, and what :func:`load_config` returns is an instance of it (:class:`RunConfig`):
training, evaluation, prediction and the builders read its attributes, never a dict, so a key
that validates is a key something reads (``tests/test_config_wired.py`` changes every key and
looks for its effect on what is built). A YAML file and ``--set`` overrides go through it alike:
an unknown key anywhere is an error naming the key and the closest valid one (or the key a
common alias stands for: ``learning_rate`` -> ``train.lr``), a wrong type or an out-of-range
value is an error naming the key, and nothing is converted silently (``batch_size: 2.5`` is
refused, not truncated).

Values given on the command line with ``--set a.b=c`` are parsed as YAML scalars/flow values
(``--set train.lr=1e-3``, ``--set model.head_offsets=[1,-1,0,0]``, ``--set data.rand_augment=null``).

Resuming (``zeroi2v train --resume``) continues the run its checkpoint saved; a config or
``--set`` given with it may change only the keys in :data:`RESUME_SAFE` (see :func:`resume_diff`).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..errors import closest
from ..limits import MAX_CLASSES, MAX_FRAMES
from ..models.config import ZeroI2VConfig as _M
from ..models.hub import check_pretrained
from ..models.timm_args import check_model_name, check_timm_kwargs
from ..safe_io import load_yaml, plain, read_text, short_repr

#: Counts a config may hold: positive (or zero) and far from where int64 arithmetic overflows.
Count = Annotated[int, Field(ge=1, le=10**9)]
Count0 = Annotated[int, Field(ge=0, le=10**9)]
Frames = Annotated[int, Field(ge=1, le=MAX_FRAMES)]
Classes = Annotated[int, Field(ge=1, le=MAX_CLASSES)]
Pixels = Annotated[int, Field(ge=1, le=8192)]


def _as_key_error(check, value, source: str):
    """Run a check whose ValueError names the key itself; pydantic passes its message on whole
    (see _first_error) instead of prefixing the section and repeating the value."""
    try:
        return check(value, source)
    except ValueError as e:
        raise PydanticCustomError("zeroi2v", str(e)) from None


def default_num_workers() -> int:
    """DataLoader workers by default: what the machine has, at most 4 (more than the cores
    only makes torch warn and the processes compete)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSection(_Section):
    """A ZeroI2VConfig (same defaults) plus where the image weights come from."""

    name: str = "vit_base_patch16_clip_quickgelu_224"  # ZeroI2VConfig.model_name
    # image weights: true (timm's for the tagged name, via the Hugging Face cache), a local file,
    # hf-hub:ORG/NAME[@REV]:FILE, or false/null (none); see zeroi2v/models/hub.py
    pretrained: Union[bool, str, None] = None
    timm_kwargs: dict[str, Any] = {}            # timm.create_model kwargs (img_size, depth ...)
    num_frames: Frames = 8
    head_offsets: Union[str, list[int]] = _M.head_offsets  # preset name or one int per head
    adapter_ratio: PositiveFloat = _M.adapter_ratio
    adapter_scale: float = _M.adapter_scale
    adapter_dropout: float = Field(_M.adapter_dropout, ge=0.0, lt=1.0)
    head_dropout: float = Field(_M.head_dropout, ge=0.0, lt=1.0)
    train_backbone: bool = False                # fine-tune the whole ViT (no pretrained weights)
    num_classes: Optional[Classes] = None       # inferred from the annotations when null

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _as_key_error(check_model_name, v, "model.name")

    @field_validator("timm_kwargs")
    @classmethod
    def _timm_kwargs(cls, v):
        return _as_key_error(check_timm_kwargs, v, "model")

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, v):
        return _as_key_error(check_pretrained, v, "model.pretrained")


class DataSection(_Section):
    root: Optional[str] = None                  # video folder; annotation paths are relative to it
    train_ann: Optional[str] = None             # annotation file, or a shard index (shards.json)
    val_ann: Optional[str] = None
    test_ann: Optional[str] = None              # `zeroi2v eval` default, then val_ann
    val_root: Optional[str] = None              # defaults to root
    class_names: Optional[str] = None           # text file, one class name per line
    sampling: Literal["dense", "uniform"] = "dense"  # clip_len x frame_interval | TSN segments
    frame_interval: Count = 16                  # dense sampling only
    train_clips: Count = 1                      # clips per training video (each one a sample)
    size: Pixels = 224                          # crop size (the model's image size)
    short_side: Pixels = 256                    # training resize before RandomResizedCrop
    rand_augment: Optional[tuple[Count0, Count]] = (7, 4)  # [magnitude, layers]
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)
    flip: bool = True
    flip_label_map: Optional[dict[int, int]] = None  # {left_class: right_class} swapped on flip
    # unreadable video: skip (training: replaced by the next readable one, counted; evaluation:
    # left out and listed), drop (left out everywhere), raise (the run fails)
    on_error: Literal["skip", "raise", "drop"] = "skip"
    decoder: Literal["auto", "torchcodec", "decord", "pyav"] = "auto"  # auto: first that reads it
    num_workers: int = Field(default_factory=default_num_workers, ge=0, le=256)
    pin_memory: bool = True
    # sharded data (an annotation key naming a shards.json of `zeroi2v prepare --shards`):
    # training samples per rank go through a shuffle buffer this long (indices only, no memory)
    shuffle_buffer: Count = 1000


class EvalSection(_Section):
    num_clips: Count = 3
    num_crops: Literal[1, 3] = 1
    short_side: Optional[Pixels] = None         # test resize before the crops (>= data.size;
    #                                             null: data.size, i.e. no margin)
    batch_size: Optional[Count] = None          # videos per batch (default: train.batch_size)
    interval: Count0 = 1                # evaluate every N epochs (0: only at the end)


class TrainSection(_Section):
    epochs: Count = 40
    batch_size: Count = 8                 # per process
    lr: PositiveFloat = 3e-4                    # at ref_batch_size when scale_lr
    ref_batch_size: Count = 64            # lr *= global batch / ref_batch_size
    scale_lr: bool = True
    weight_decay: NonNegativeFloat = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup_epochs: NonNegativeFloat = 2.5
    warmup_start_factor: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: NonNegativeFloat = 0.0
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    accum_steps: Count = 1
    clip_grad: Optional[PositiveFloat] = None   # max gradient norm
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    deterministic: bool = False
    log_interval: Count = 20              # optimiser steps between log records
    out_dir: str = "work_dirs/run"
    save_full: Union[Literal["auto"], bool] = "auto"  # all weights (auto: no pretrained file)
    stop_after_epoch: Optional[Count] = None  # end this process after that epoch
    progress: bool = True                       # progress bars (on a terminal only)
    tensorboard: bool = False                   # TensorBoard event files in OUT/tensorboard

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class RunConfig(_Section):
    """A whole run's settings (what :func:`load_config` returns)."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    eval: EvalSection = EvalSection()
    train: TrainSection = TrainSection()

    @model_validator(mode="after")
    def _fits(self):
        if self.eval.short_side is not None and self.eval.short_side < self.data.size:
            raise PydanticCustomError(
                "zeroi2v", f"eval.short_side is {self.eval.short_side}, smaller than the "
                f"{self.data.size}-pixel crop (data.size): set eval.short_side to at least "
                f"{self.data.size} (256 for the usual resize-256, crop-224 protocol)")
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (YAML- and JSON-able)."""
        return plain(self.model_dump(mode="python"))


SECTIONS = {"model": ModelSection, "data": DataSection, "eval": EvalSection, "train": TrainSection}

#: Keys a config or ``--set`` given with ``--resume`` may change: how long the run goes on, how
#: it is watched and where the data lives, none of which changes the numbers it computes.
RESUME_SAFE = frozenset({
    "train.epochs", "train.stop_after_epoch", "train.progress", "train.log_interval",
    "train.tensorboard", "train.out_dir", "data.num_workers", "data.pin_memory", "data.root",
    "data.val_root", "eval.batch_size",
})

#: Names people reach for, and the key they mean (for "did you mean").
ALIASES = {
    "learning_rate": "train.lr", "lr": "train.lr", "bs": "train.batch_size",
    "batch": "train.batch_size", "batchsize": "train.batch_size",
    "batch_size": "train.batch_size", "num_epochs": "train.epochs", "epochs": "train.epochs",
    "max_epochs": "train.epochs", "wd": "train.weight_decay", "weight_decay": "train.weight_decay",
    "warmup": "train.warmup_epochs", "grad_clip": "train.clip_grad",
    "max_grad_norm": "train.clip_grad", "workers": "data.num_workers",
    "num_workers": "data.num_workers", "frames": "model.num_frames", "clip_len": "model.num_frames",
    "num_frames": "model.num_frames", "img_size": "data.size", "image_size": "data.size",
    "crop_size": "data.size", "arch": "model.name", "model_name": "model.name",
    "backbone": "model.name", "offsets": "model.head_offsets", "classes": "model.num_classes",
    "work_dir": "train.out_dir", "output_dir": "train.out_dir", "fp16": "train.amp",
    "mixed_precision": "train.amp", "test_short_side": "eval.short_side",
    "resize": "eval.short_side", "views": "eval.num_clips",
}


def all_keys() -> list[str]:
    """Every dotted key of the schema (``train.lr`` ...)."""
    return [f"{sec}.{k}" for sec, cls in SECTIONS.items() for k in cls.model_fields]


def defaults() -> RunConfig:
    return RunConfig()


# ----------------------------------------------------------------------------- validation


def validate(cfg: Union[Mapping, RunConfig], source: str = "config") -> RunConfig:
    """``cfg`` checked against the schema, defaults filled in. Errors are one ``ValueError``
    line naming the key (``source``: the file, for the message)."""
    if isinstance(cfg, RunConfig):
        cfg = cfg.to_dict()
    try:
        return RunConfig.model_validate(cfg)
    except ValidationError as e:
        raise ValueError(f"{source}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    errs = e.errors(include_url=False)
    err = errs[0]
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    if err["type"] == "zeroi2v":  # a check that names its key (_as_key_error, _fits)
        return err["msg"] + more
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _keys_at(loc[:-1])
        prefix = "".join(f"{x}." for x in loc[:-1])
        alias = ALIASES.get(loc[-1].lower())
        hint = (f" (did you mean {alias!r}?)" if alias and alias != key else
                closest(key, [prefix + v for v in valid] + all_keys()) if valid or loc[:-1]
                else "")
        where = f"in section {'.'.join(loc[:-1])!r}" if len(loc) > 1 else "at the top level"
        known = f"; known: {sorted(valid)}" if valid and not hint else ""
        return f"unknown key {key!r} {where}{hint or known}{more}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {short_repr(got)})"
    return f"{key}: {_message(err)}{shown}{more}"


def _message(err: dict) -> str:
    msg = err["msg"]
    if err["type"].startswith("literal_error"):
        msg = msg.replace("Input should be", "must be")
    return msg[0].lower() + msg[1:] if msg else msg


def _keys_at(loc: list) -> list[str]:
    if not loc:
        return list(SECTIONS)
    sec = SECTIONS.get(loc[0]) if len(loc) == 1 else None
    return list(sec.model_fields) if sec is not None else []


# ----------------------------------------------------------------------------- files, overrides


def parse_value(text: str) -> Any:
    """A command-line value as YAML: numbers, booleans, null, lists and dicts; else the string."""
    try:
        value = load_yaml(text, "--set")
    except ValueError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _set_dotted(cfg: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"override {item!r}: bad key {key!r}")
    if len(parts) == 1:
        alias = ALIASES.get(parts[0].lower())
        hint = f" (did you mean {alias!r}?)" if alias else closest(key, all_keys())
        raise ValueError(f"override {item!r}: keys are section.key{hint}")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:  # a new mapping (model.timm_kwargs.depth=2); unknown keys fail validation
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def overrides_dict(overrides: Optional[Iterable[str]]) -> dict:
    """``["a.b=1", "c.d=[1,2]"]`` as a nested dict (not validated)."""
    out: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        _set_dotted(out, key.strip(), parse_value(text), item)
    return out


def apply_overrides(cfg: RunConfig, overrides: Optional[Iterable[str]]) -> RunConfig:
    """A new config: ``cfg`` with ``["a.b=1", "c.d=[1,2]"]`` applied, validated by the same
    rules as a file (unknown keys and wrong types are errors naming the key)."""
    items = list(overrides or ())
    if not items:
        return cfg
    return validate(deep_update(cfg.to_dict(), overrides_dict(items)), "--set")


def set_values(cfg: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """A new config with ``{"train.out_dir": path, ...}`` set as given (no YAML parsing: a path
    such as ``exp #3`` stays whole), validated."""
    if not values:
        return cfg
    nested: dict = {}
    for key, value in values.items():
        _set_dotted(nested, key, value, key)
    return validate(deep_update(cfg.to_dict(), nested), "the command line")


def read_yaml(path: Union[str, Path]) -> dict:
    """A config file: UTF-8 YAML without aliases, at most a few MB, a mapping of sections."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        text = read_text(p, "config")
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e}") from None
    data = load_yaml(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: Union[str, Path, None] = None, overrides: Optional[Iterable[str]] = None,
                base: Optional[Mapping] = None) -> RunConfig:
    """Defaults ← ``base`` ← YAML file at ``path`` ← ``overrides``, validated at each step."""
    cfg = RunConfig().to_dict()
    if base:
        cfg = validate(deep_update(cfg, base), "config").to_dict()
    if path is not None:
        cfg = validate(deep_update(cfg, read_yaml(path)), str(path)).to_dict()
    return apply_overrides(validate(cfg, "config"), overrides)


def deep_update(base: dict, other: Mapping) -> dict:
    """Recursively merge ``other`` into ``base`` (in place) and return it; ``timm_kwargs`` and
    ``flip_label_map`` are values, replaced whole."""
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict) and k not in _VALUE_DICTS:
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


_VALUE_DICTS = ("timm_kwargs", "flip_label_map")


def dump_config(cfg: Union[RunConfig, Mapping]) -> str:
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else plain(cfg)
    return yaml.safe_dump(d, sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}`` for every key."""
    d = cfg.to_dict()
    return {f"{sec}.{k}": v for sec, kv in d.items() for k, v in kv.items()}


def differences(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(key, a's value, b's value)`` for every key where the two differ."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa[k], fb[k]) for k in fa if fa[k] != fb[k]]


def resume_diff(saved: RunConfig, given: RunConfig) -> list[tuple[str, Any, Any]]:
    """The changes ``given`` makes to a run saved as ``saved``: those of :data:`RESUME_SAFE`
    are returned (to apply and report); any other is a ``ValueError`` listing every changed key
    with both values, since it would silently make the resumed run another run."""
    changes = differences(saved, given)
    unsafe = [c for c in changes if c[0] not in RESUME_SAFE]
    if unsafe:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in unsafe)
        raise ValueError(
            f"--resume continues the run as it was started, and these settings differ from it: "
            f"{listed}. Drop them (zeroi2v train --resume --out DIR needs no config), or start a "
            f"new run in another folder; only {', '.join(sorted(RESUME_SAFE))} may change on "
            "resume")
    return changes


#: The defaults as a plain dict (for docs and ``zeroi2v config``).
DEFAULTS: dict[str, Any] = RunConfig().to_dict()
