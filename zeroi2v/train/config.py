"""Run configuration: nested dicts with defaults, YAML files and ``key.sub=value`` overrides.

A config has four sections (see ``configs/*.yaml`` for the SPEC recipes):

* ``model``  — how to build the video model (:func:`zeroi2v.train.build_model`)
* ``data``   — annotation files, sampling, augmentation, loader settings
* ``train``  — optimiser, schedule, precision, checkpointing
* ``eval``   — test-time views

Values given on the command line with ``--set a.b=c`` are parsed as YAML scalars/flow values
(``--set train.lr=1e-3``, ``--set model.head_offsets=[1,-1,0,0]``, ``--set data.rand_augment=null``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

DEFAULTS: dict[str, Any] = {
    "model": {
        "name": "vit_base_patch16_clip_quickgelu_224",  # timm model name
        "pretrained": None,        # local image-model checkpoint (no network)
        "timm_kwargs": {},         # extra timm.create_model kwargs (img_size, depth, ...)
        "num_frames": 8,
        "head_offsets": "vit_b",   # preset name or list of per-head ints
        "adapter_ratio": 0.25,
        "adapter_scale": 0.5,
        "adapter_dropout": 0.1,
        "head_dropout": 0.5,
        "train_backbone": False,   # True: fine-tune the whole ViT (demo without pretrained weights)
        "num_classes": None,       # inferred from the training annotations when null
        "absent_adapters": [],     # [[block, adapter_name], ...] removed (imported checkpoints)
    },
    "data": {
        "root": None,              # video folder; annotation paths are relative to it
        "train_ann": None,
        "val_ann": None,
        "test_ann": None,          # defaults to val_ann for `zeroi2v eval`
        "val_root": None,          # defaults to root
        "class_names": None,       # optional text file, one class name per line
        "sampling": "dense",       # "dense" (clip_len x frame_interval) | "uniform" (TSN segments)
        "frame_interval": 16,
        "train_clips": 1,
        "size": 224,
        "short_side": 256,         # training resize before RandomResizedCrop
        "rand_augment": [7, 4],    # [magnitude, num_layers] or null
        "random_erasing": 0.0,
        "flip": True,
        "flip_label_map": None,    # {left_class: right_class, ...} swapped on horizontal flip
        "on_error": "skip",        # unreadable video: skip (training: replaced by the next readable
                                   # one; evaluation: dropped), drop (left out), raise (run fails)
        "decoder": "auto",         # auto | torchcodec | decord | pyav (auto: fastest that reads the file)
        "num_workers": 4,
        "pin_memory": True,
    },
    "eval": {
        "num_clips": 3,
        "num_crops": 1,
        "short_side": 224,
        "batch_size": None,        # videos per batch at test time (default: train.batch_size)
        "interval": 1,             # evaluate on data.val_ann every N epochs (0: only at the end)
    },
    "train": {
        "epochs": 40,
        "batch_size": 8,           # per process
        "lr": 3e-4,                # at the reference batch size below
        "ref_batch_size": 64,      # lr is scaled by global_batch / ref_batch_size
        "scale_lr": True,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "warmup_epochs": 2.5,
        "warmup_start_factor": 0.1,
        "min_lr": 0.0,
        "label_smoothing": 0.0,
        "accum_steps": 1,
        "clip_grad": None,         # max gradient norm, null = off
        "amp": "auto",             # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
        "seed": 0,
        "deterministic": False,
        "log_interval": 20,
        "out_dir": "work_dirs/run",
        "save_full": "auto",       # save all weights (auto: only when no pretrained file or full fine-tune)
        "stop_after_epoch": None,  # end this process after that epoch (testing resume)
        "progress": True,
    },
}


def deep_update(base: dict, other: Mapping) -> dict:
    """Recursively merge ``other`` into ``base`` (in place) and return it."""
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


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


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"bad config key {key!r}")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            if p in node and node[p] is not None:
                raise ValueError(f"config key {key!r}: {p!r} is not a section")
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def get_dotted(cfg: Mapping, key: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def apply_overrides(cfg: dict, overrides: Optional[Iterable[str]]) -> dict:
    """Apply ``["a.b=1", "c=[1,2]"]``. Unknown top-level sections are rejected (typo guard)."""
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        key = key.strip()
        top = key.split(".")[0]
        if top not in DEFAULTS:
            raise ValueError(
                f"override {item!r}: unknown section {top!r} (expected one of {sorted(DEFAULTS)})"
            )
        sec = key.split(".")
        if len(sec) == 2 and sec[1] not in DEFAULTS[top]:
            raise ValueError(
                f"override {item!r}: unknown key {sec[1]!r} in section {top!r}; known: "
                f"{sorted(DEFAULTS[top])}"
            )
        set_dotted(cfg, key, parse_value(text))
    return cfg


def load_config(path: Union[str, Path, None] = None, overrides: Optional[Iterable[str]] = None,
                base: Optional[Mapping] = None) -> dict:
    """Defaults ← ``base`` ← YAML file at ``path`` ← ``overrides``."""
    cfg = copy.deepcopy(DEFAULTS)
    if base:
        deep_update(cfg, base)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        with open(p) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config {p} must be a mapping at the top level")
        unknown = set(data) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"config {p}: unknown sections {sorted(unknown)}")
        deep_update(cfg, data)
    apply_overrides(cfg, overrides)
    return cfg


def dump_config(cfg: Mapping) -> str:
    return yaml.safe_dump(_plain(cfg), sort_keys=False)


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
