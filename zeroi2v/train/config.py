"""Run configuration: one schema for every section and key, YAML files and ``key.sub=value``.

A config has four sections (see ``configs/*.yaml`` for the recipes):

* ``model``  — the video model (a :class:`~zeroi2v.ZeroI2VConfig` and its image weights)
* ``data``   — annotation files, sampling, augmentation, loader settings
* ``train``  — optimiser, schedule, precision, checkpointing
* ``eval``   — test-time views

The schema below (pydantic models) is the one place that lists every key with its type, range
and default. A YAML file and ``--set`` overrides go through it alike: an unknown key anywhere is
an error naming the key and the closest valid one, a wrong type or an out-of-range value is an
error naming the key, and nothing is converted silently (``batch_size: 2.5`` is refused, not
truncated). After validation the config is a plain nested ``dict``.

Values given on the command line with ``--set a.b=c`` are parsed as YAML scalars/flow values
(``--set train.lr=1e-3``, ``--set model.head_offsets=[1,-1,0,0]``, ``--set data.rand_augment=null``).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from ..errors import closest
from ..models.config import ZeroI2VConfig as _M
from ..models.timm_args import check_model_name, check_timm_kwargs


def _as_key_error(check, value, source: str):
    """Run a check whose ValueError names the key itself; pydantic passes its message on whole
    (see _first_error) instead of prefixing the section and repeating the value."""
    try:
        return check(value, source)
    except ValueError as e:
        raise PydanticCustomError("zeroi2v", str(e)) from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """A ZeroI2VConfig (same defaults) plus where the image weights come from."""

    name: str = "vit_base_patch16_clip_quickgelu_224"
    pretrained: Optional[str] = None            # local image-model checkpoint (no network)
    timm_kwargs: dict[str, Any] = {}            # extra timm.create_model kwargs (img_size, depth ...)
    num_frames: PositiveInt = 8
    head_offsets: Union[str, list[int]] = _M.head_offsets  # preset name or one int per head
    adapter_ratio: PositiveFloat = _M.adapter_ratio
    adapter_scale: float = _M.adapter_scale
    adapter_dropout: float = Field(_M.adapter_dropout, ge=0.0, lt=1.0)
    head_dropout: float = Field(_M.head_dropout, ge=0.0, lt=1.0)
    train_backbone: bool = False                # fine-tune the whole ViT (no pretrained weights)
    num_classes: Optional[PositiveInt] = None   # inferred from the annotations when null

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _as_key_error(check_model_name, v, "model.name")

    @field_validator("timm_kwargs")
    @classmethod
    def _timm_kwargs(cls, v):
        return _as_key_error(check_timm_kwargs, v, "model")


class DataSection(_Section):
    root: Optional[str] = None                  # video folder; annotation paths are relative to it
    train_ann: Optional[str] = None
    val_ann: Optional[str] = None
    test_ann: Optional[str] = None              # `zeroi2v eval` default, then val_ann
    val_root: Optional[str] = None              # defaults to root
    class_names: Optional[str] = None           # text file, one class name per line
    sampling: Literal["dense", "uniform"] = "dense"  # clip_len x frame_interval | TSN segments
    frame_interval: PositiveInt = 16
    train_clips: PositiveInt = 1
    size: PositiveInt = 224
    short_side: PositiveInt = 256               # training resize before RandomResizedCrop
    rand_augment: Optional[tuple[NonNegativeInt, PositiveInt]] = (7, 4)  # [magnitude, layers]
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)
    flip: bool = True
    flip_label_map: Optional[dict[int, int]] = None  # {left_class: right_class} swapped on flip
    # unreadable video: skip (training: replaced by the next readable one, counted; evaluation:
    # left out and listed), drop (left out everywhere), raise (the run fails)
    on_error: Literal["skip", "raise", "drop"] = "skip"
    decoder: Literal["auto", "torchcodec", "decord", "pyav"] = "auto"  # auto: first that reads it
    num_workers: NonNegativeInt = 4
    pin_memory: bool = True


class EvalSection(_Section):
    num_clips: PositiveInt = 3
    num_crops: Literal[1, 3] = 1
    short_side: PositiveInt = 224
    batch_size: Optional[PositiveInt] = None    # videos per batch (default: train.batch_size)
    interval: NonNegativeInt = 1                # evaluate every N epochs (0: only at the end)


class TrainSection(_Section):
    epochs: PositiveInt = 40
    batch_size: PositiveInt = 8                 # per process
    lr: PositiveFloat = 3e-4                    # at ref_batch_size when scale_lr
    ref_batch_size: PositiveInt = 64            # lr *= global batch / ref_batch_size
    scale_lr: bool = True
    weight_decay: NonNegativeFloat = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup_epochs: NonNegativeFloat = 2.5
    warmup_start_factor: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: NonNegativeFloat = 0.0
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    accum_steps: PositiveInt = 1
    clip_grad: Optional[PositiveFloat] = None   # max gradient norm
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    seed: NonNegativeInt = 0
    deterministic: bool = False
    log_interval: PositiveInt = 20
    out_dir: str = "work_dirs/run"
    save_full: Union[Literal["auto"], bool] = "auto"  # all weights (auto: no pretrained file)
    stop_after_epoch: Optional[PositiveInt] = None  # end this process after that epoch
    progress: bool = True

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class RunConfig(_Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    eval: EvalSection = EvalSection()
    train: TrainSection = TrainSection()


SECTIONS = {"model": ModelSection, "data": DataSection, "eval": EvalSection, "train": TrainSection}
DEFAULTS: dict[str, Any] = RunConfig().model_dump(mode="python")


# ----------------------------------------------------------------------------- validation


def validate(cfg: Mapping, source: str = "config") -> dict:
    """``cfg`` checked against the schema, defaults filled in, as a plain dict. Errors are one
    ``ValueError`` line naming the key (``source``: the file, for the message)."""
    try:
        return _plain(RunConfig.model_validate(cfg).model_dump(mode="python"))
    except ValidationError as e:
        raise ValueError(f"{source}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    errs = e.errors(include_url=False)
    err = errs[0]
    if err["type"] == "zeroi2v":  # a check that names its key (_as_key_error)
        return err["msg"] + (f" (and {len(errs) - 1} more)" if len(errs) > 1 else "")
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc)
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    if err["type"] == "extra_forbidden":
        valid = _keys_at(loc[:-1])
        prefix = "".join(f"{x}." for x in loc[:-1])
        hint = closest(key, [prefix + v for v in valid]) if valid else ""
        where = f"in section {'.'.join(loc[:-1])!r}" if len(loc) > 1 else "at the top level"
        known = f"; known: {sorted(valid)}" if valid and not hint else ""
        return f"unknown key {key!r} {where}{hint or known}{more}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) and len(str(got)) > 60 else f" (got {got!r})"
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
        value = yaml.safe_load(text)
    except yaml.YAMLError:
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
    node = cfg
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:  # a new mapping (model.timm_kwargs.depth=2); unknown keys fail validation
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(cfg: dict, overrides: Optional[Iterable[str]]) -> dict:
    """Apply ``["a.b=1", "c.d=[1,2]"]`` in place, then validate the result (same rules as a
    file: unknown keys and wrong types are errors naming the key)."""
    items = list(overrides or ())
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        _set_dotted(cfg, key.strip(), parse_value(text), item)
    if items:
        checked = validate(cfg, "--set")
        cfg.clear()
        cfg.update(checked)
    return cfg


def read_yaml(path: Union[str, Path]) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {p}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: Union[str, Path, None] = None, overrides: Optional[Iterable[str]] = None,
                base: Optional[Mapping] = None) -> dict:
    """Defaults ← ``base`` ← YAML file at ``path`` ← ``overrides``, validated at each step."""
    cfg = copy.deepcopy(DEFAULTS)
    if base:
        cfg = validate(deep_update(cfg, base), "config")
    if path is not None:
        cfg = validate(deep_update(cfg, read_yaml(path)), str(path))
    return apply_overrides(cfg, overrides)


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


def dump_config(cfg: Mapping) -> str:
    return yaml.safe_dump(_plain(cfg), sort_keys=False)


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {(k if isinstance(k, int) else str(k)): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
