"""The saved model: a folder with ``config.json`` and ``model.safetensors``. Nothing in it runs.

::

    model.save_pretrained("my_model")        # my_model/config.json + my_model/model.safetensors
    model = zeroi2v.load_model("my_model")   # also: the .safetensors file alone, or config.json

* ``config.json`` is the model's :class:`~zeroi2v.models.config.ZeroI2VConfig` (timm name and
  constructor kwargs, frames, head offsets, adapters, classes ...) plus an ``"artefact"`` entry
  about the files (which weights they hold, the zeroi2v version that wrote them).
* ``model.safetensors`` holds the tensors under the model's own state-dict names
  (``backbone.*`` are the timm ViT's names, then ``temporal_embedding`` and ``head.*``); its
  metadata repeats ``config.json``, so the file alone is self-describing and a pair from two
  different saves is detected.
* The same folder serves an unmerged model (adapters kept, fine-tunable), a merged one (no
  adapters: its ``backbone.*`` tensors load ``strict=True`` into
  ``timm.create_model(config.model_name, num_classes=0, **config.timm_kwargs)``) and a training
  checkpoint, which adds ``training_state.pt`` (optimiser, schedule, RNG; read with
  ``torch.load(weights_only=True)``) and ``run_config.yaml`` (the run's settings).

A training checkpoint may hold only the trainable tensors (``"weights": "trainable"``): the frozen
backbone then comes from the pretrained image file named in ``config.json`` (checked by size and
SHA-256), or from the file passed as ``pretrained=``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..safe_io import (
    PathLike,
    atomic_path,
    atomic_write_text,
    check_state_dict,
    load_json,
    load_yaml,
    looks_like_safetensors,
    plain,
    read_checkpoint,
    read_safetensors,
    read_text,
    safetensors_header,
    unwrap_state_dict,
)
from . import hub
from .config import FORMAT, FORMAT_VERSION, ZeroI2VConfig
from .video_vit import ZeroI2VViT, load_image_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RUN_CONFIG_FILE = "run_config.yaml"
TRAINING_STATE_FILE = "training_state.pt"
#: The files a saved model (or training checkpoint) folder is made of; nothing else writes them.
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, RUN_CONFIG_FILE, TRAINING_STATE_FILE)
_META_KEY = "zeroi2v_config"
SHA_KEY = "weights_sha256"
RUN_CONFIG_SHA_KEY = "run_config_sha256"


@dataclass(frozen=True)
class Artefact:
    """What a saved model folder says about itself (no tensors read yet)."""

    folder: Path
    config: ZeroI2VConfig
    weights: str                  # "full" or "trainable"
    base_weights: Optional[dict]  # for "trainable": {"path", "size", "sha256"}
    info: dict                    # the whole "artefact" entry of config.json

    @property
    def weights_file(self) -> Path:
        return self.folder / WEIGHTS_FILE

    @property
    def run_config_file(self) -> Optional[Path]:
        p = self.folder / RUN_CONFIG_FILE
        return p if p.is_file() else None

    @property
    def training_state_file(self) -> Optional[Path]:
        p = self.folder / TRAINING_STATE_FILE
        return p if p.is_file() else None


# ----------------------------------------------------------------------------- saving


def file_digest(path: PathLike) -> dict:
    """``{"path", "size", "sha256"}`` of a file (identifies the base weights of a checkpoint)."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": h.hexdigest()}


def save_pretrained(model, path: PathLike, *, weights: str = "full",
                    base_weights: Optional[Union[PathLike, dict]] = None,
                    run_config: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """Write ``model`` (a :class:`~zeroi2v.ZeroI2VViT`) into the folder ``path``.

    ``weights="trainable"`` stores only the trainable tensors and needs ``base_weights``: the
    pretrained image file the frozen rest comes from (or its :func:`file_digest`).
    ``run_config`` (a training config dict) is written beside as ``run_config.yaml``; ``extra``
    is stored in the ``"artefact"`` entry of ``config.json``. The model must be rebuildable from
    its config; that is checked (on the meta device) before anything is written. Each file is
    replaced atomically. Returns the folder.
    """
    from safetensors.torch import save_file

    if not isinstance(model, ZeroI2VViT):
        raise TypeError(f"save_pretrained expects a ZeroI2VViT, got {type(model).__name__}")
    if weights not in ("full", "trainable"):
        raise ValueError(f"weights must be 'full' or 'trainable', got {weights!r}")
    config = model.config
    _check_rebuilds(model, config)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    info: dict[str, Any] = {"weights": weights, "written_by": _version()}
    state = model.state_dict()
    if weights == "trainable":
        if base_weights is None:
            raise ValueError("weights='trainable' needs base_weights= (the pretrained image file "
                             "the frozen backbone comes from)")
        info["base_weights"] = dict(base_weights) if isinstance(base_weights, dict) \
            else file_digest(base_weights)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    if run_config is not None:  # so a copy on the Hub is fetched with it, and only then
        info["run_config"] = True
    info.update(extra or {})
    doc = dict(config.to_dict(), artefact=info)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", _META_KEY: json.dumps(doc)})
        digest = file_digest(tmp)["sha256"]
    # config.json alone records the weights' hash: the metadata copy cannot hold its own
    hashes = {SHA_KEY: digest}
    if run_config is not None:
        import yaml

        if hasattr(run_config, "to_dict"):  # a training RunConfig
            run_config = run_config.to_dict()
        atomic_write_text(folder / RUN_CONFIG_FILE, yaml.safe_dump(plain(run_config), sort_keys=False))
        hashes[RUN_CONFIG_SHA_KEY] = file_digest(folder / RUN_CONFIG_FILE)["sha256"]
    doc["artefact"] = dict(info, **hashes)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
    return folder


def read_run_config(art: Artefact) -> Optional[dict]:
    """The run config saved beside a model (``run_config.yaml``, a plain dict), or None: read
    as untrusted text (no YAML aliases, size-capped) and checked against the SHA-256 that
    ``config.json`` records, so a hand-edited file cannot change a resumed run unseen."""
    path = art.run_config_file
    if path is None:
        return None
    want = art.info.get(RUN_CONFIG_SHA_KEY)
    if want is not None and file_digest(path)["sha256"] != want:
        raise ValueError(f"{path} was changed after it was saved (its SHA-256 differs from the "
                         f"one {art.folder / CONFIG_FILE} records): restore it, or pass the "
                         "changed settings as a config or --set (resume accepts only those safe "
                         "to change)")
    doc = load_yaml(read_text(path, "run config"), str(path))
    if doc is not None and not isinstance(doc, dict):
        raise ValueError(f"{path}: a run config is a mapping of sections, got "
                         f"{type(doc).__name__}")
    return doc


def _check_rebuilds(model, config: ZeroI2VConfig) -> None:
    """The saved config must build a model with exactly these tensor names and shapes."""
    if config.timm_kwargs is None:
        raise ValueError(
            f"cannot save: zeroi2v does not know how this {config.model_name!r} backbone was "
            "built (an instance it could not describe, or timm kwargs that are classes or "
            "functions), so a saved config could not rebuild it; create the model with "
            "create_video_model(name, ..., **timm_kwargs) using JSON values (e.g. "
            "act_layer='gelu')")
    with torch.device("meta"):
        rebuilt = ZeroI2VViT.from_config(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise ValueError(
            f"cannot save: the model's config does not rebuild it (first difference: {diff[0]!r});"
            f" timm.create_model({config.model_name!r}, **{dict(config.timm_kwargs)}) is another "
            "architecture")


def _version() -> str:
    from .._version import __version__

    return f"zeroi2v {__version__}"


# ----------------------------------------------------------------------------- reading


def read_artefact(path: PathLike) -> Artefact:
    """Read ``config.json`` (or the safetensors metadata) of a saved model.

    ``path``: the folder, its ``config.json`` or its ``model.safetensors``, or a model on the
    Hugging Face Hub, ``"hf-hub:ORG/NAME[@REVISION]"`` (its files come through the Hub's cache,
    :func:`zeroi2v.models.hub.model_folder`, and are then read as this folder). Everything that
    is not such a model gets a ``ValueError`` (``FileNotFoundError`` if absent) naming the path
    and what it is instead (a zeroi2v 0.1 pickle, an official checkpoint, ...).
    """
    if hub.is_hub_id(path):  # the Hub only finds the folder; what follows checks it as any
        path = hub.model_folder(path)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    if p.is_dir():
        folder = p
    elif p.name == CONFIG_FILE or looks_like_safetensors(str(p)):
        folder = p.parent
    else:
        raise ValueError(_not_a_model(p))
    weights = folder / WEIGHTS_FILE if p.is_dir() or p.name == CONFIG_FILE else p
    cfg_path = folder / CONFIG_FILE
    doc = None
    if cfg_path.is_file():
        doc = load_json(read_text(cfg_path, "model config"), str(cfg_path))
    meta_doc = _metadata_config(weights) if weights.is_file() else None
    if doc is None and meta_doc is None:
        if p.is_dir():
            raise ValueError(f"{p} holds no zeroi2v model ({CONFIG_FILE} and {WEIGHTS_FILE} "
                             "missing)")
        raise ValueError(f"{weights} is a safetensors file without a zeroi2v config (no "
                         f"{CONFIG_FILE} beside it, none in its metadata)")
    for d, src in ((doc, cfg_path), (meta_doc, weights)):
        v = d.get("format_version") if isinstance(d, dict) else None
        if isinstance(v, int) and v > FORMAT_VERSION:
            raise ValueError(f"{src} has format version {v}, newer than this zeroi2v reads "
                             f"({FORMAT_VERSION}): upgrade zeroi2v")
        if isinstance(v, int) and v < FORMAT_VERSION:
            raise ValueError(f"{src} has format version {v}, written by a pre-release zeroi2v "
                             "that this version does not read: save the model again with the "
                             "version that wrote it, or retrain")
    if doc is None:
        doc = meta_doc
    elif meta_doc is not None and meta_doc != _without_hash(doc):
        raise ValueError(f"{cfg_path} and {weights} belong to different saves (an interrupted "
                         "save, or files from two models): save the model again")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (the weights of {cfg_path})")
    return _artefact_from_doc(doc, folder, str(cfg_path if cfg_path.is_file() else weights))


def _without_hash(doc: Any) -> Any:
    if not isinstance(doc, dict) or not isinstance(doc.get("artefact"), dict):
        return doc
    return dict(doc, artefact={k: v for k, v in doc["artefact"].items()
                               if k not in (SHA_KEY, RUN_CONFIG_SHA_KEY)})


def _artefact_from_doc(doc: Any, folder: Path, source: str) -> Artefact:
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise ValueError(f"{source} is not a zeroi2v model config (format {fmt!r})")
    doc = dict(doc)
    info = doc.pop("artefact", None) or {}
    if not isinstance(info, dict):
        raise ValueError(f"{source}: 'artefact' must be a JSON object")
    config = ZeroI2VConfig.from_dict(doc, source)
    weights = info.get("weights", "full")
    if weights not in ("full", "trainable"):
        raise ValueError(f"{source}: artefact.weights must be 'full' or 'trainable', got {weights!r}")
    base = info.get("base_weights")
    if weights == "trainable" and not isinstance(base, dict):
        raise ValueError(f"{source}: trainable-only weights without artefact.base_weights")
    return Artefact(folder, config, weights, base, info)


def _metadata_config(weights: Path) -> Optional[dict]:
    _, meta = safetensors_header(weights)
    text = meta.get(_META_KEY)
    if text is None:
        return None
    return load_json(text, f"{weights}'s zeroi2v metadata")


def _not_a_model(p: Path) -> str:
    """Say what a file that is not a saved model is, reading it safely."""
    try:
        obj = read_checkpoint(p)
    except ValueError as e:
        return f"{p} is not a zeroi2v model ({e})"
    try:
        keys = list(unwrap_state_dict(obj, p))
    except ValueError:
        keys = []
    if any(k.startswith("backbone.transformer.resblocks.") for k in keys):
        return (f"{p} looks like an official ZeroI2V (mmaction2) checkpoint: import it with "
                f"`zeroi2v import-official {p} --out DIR`")
    if any(k.startswith(("blocks.0.", "visual.", "patch_embed.")) for k in keys):
        return (f"{p} looks like an image-model checkpoint: train from it (model.pretrained / "
                "--pretrained), it is not a video model")
    return (f"{p} is not a zeroi2v model (expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE}"
            ", or that .safetensors file)")


def load_model(path: PathLike, *, pretrained: Optional[PathLike] = None,
               device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None):
    """Rebuild the :class:`~zeroi2v.ZeroI2VViT` saved at ``path`` (eval mode).

    ``path`` is the folder written by :meth:`~zeroi2v.ZeroI2VViT.save_pretrained` (or a training
    checkpoint folder), its ``config.json`` or its ``model.safetensors``, or
    ``"hf-hub:ORG/NAME[@REVISION]"`` (a model pushed with ``push_to_hub``). ``pretrained`` is the
    image file of a checkpoint that holds only its trainable tensors (default: the file it
    names). Errors name the file and the problem; nothing from the files is executed, and the
    weights are checked before use (:func:`read_weights`).
    """
    art = read_artefact(path)
    return model_from_artefact(art, pretrained=pretrained, device=device, dtype=dtype)


def model_from_artefact(art: Artefact, *, pretrained: Optional[PathLike] = None,
                       device: Union[str, torch.device] = "cpu",
                       dtype: Optional[torch.dtype] = None):
    """The model an :class:`Artefact` describes, its weights loaded (see :func:`load_model`)."""
    if art.weights == "full" and pretrained is not None:
        raise ValueError(f"{art.folder} holds all its weights: a pretrained file (--pretrained) "
                         "applies only to checkpoints that store just their trainable tensors")
    if art.weights == "full":
        model = ZeroI2VViT.from_config(art.config, empty=True)
        load_weights_into(model, art)
    else:
        base = _base_weights(art, pretrained)
        model = ZeroI2VViT.from_config(art.config)
        load_image_weights(model.backbone, base)
        load_weights_into(model, art)
    model.freeze()
    model.to(device=device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_weights_into(model, art: Artefact, *, what: Optional[str] = None) -> None:
    """Load ``art``'s weights into ``model`` (built from the same config): all of them, or for
    a trainable-only artefact its trainable tensors (the rest must already be in place). The
    one place a saved model's tensors enter a model: loading, resuming and importing use it."""
    own = model.state_dict()
    if art.weights == "trainable":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        own = {k: v for k, v in own.items() if k in trainable}
    tensors = read_weights(art, own, what=what or (f"its config ({CONFIG_FILE})"
                                                   if art.weights == "full" else
                                                   "the trainable tensors of its config"))
    meta = any(t.device.type == "meta" for t in own.values())
    with torch.no_grad():
        model.load_state_dict(tensors, strict=art.weights == "full", assign=meta)


_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_weights(art: Artefact, own: dict, what: str = "its config") -> dict:
    """The tensors of ``art``'s weights file for a model whose state is ``own``, checked in
    this order, each failure one ``ValueError`` naming the file and the tensor:

    1. the header (before anything is allocated): the same names and shapes as ``own``, and
       dtypes that fit it: one floating dtype for all floating tensors (float32, float16,
       bfloat16 or float64: a model saved in bf16 loads in bf16), the model's own dtype for
       integer buffers;
    2. the file's SHA-256 against the one ``config.json`` records (a flipped byte);
    3. every floating value finite (NaN or inf weights give NaN predictions).
    """
    source = str(art.weights_file)
    header, _ = safetensors_header(art.weights_file)
    shapes = {k: torch.empty(shape, device="meta") for k, (_, shape) in header.items()}
    check_state_dict(own, shapes, source, what=what)
    _check_dtypes(own, {k: _ST_TORCH.get(dt) for k, (dt, _) in header.items()}, source)
    want = art.info.get(SHA_KEY)
    if want is not None and file_digest(art.weights_file)["sha256"] != want:
        raise ValueError(f"{source} is damaged: its SHA-256 differs from the one "
                         f"{art.folder / CONFIG_FILE} records (a changed or corrupted file); "
                         "use an intact copy")
    tensors = read_safetensors(art.weights_file)
    # Fresh allocations: CPU GEMMs on the loader's buffers round differently in the last bit,
    # and a loaded model should compute exactly what the saved one did.
    tensors = {k: tensors.pop(k).clone() for k in list(tensors)}
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{source}: tensor {k!r} holds {bad:,} NaN or infinite values of "
                             f"{t.numel():,}: the model diverged or the file is damaged; use an "
                             "earlier checkpoint")
    return tensors


def _check_dtypes(own: dict, got: dict, source: str) -> None:
    """Floating tensors share the file's most common floating dtype; others are the model's."""
    import collections

    counts = collections.Counter(d for k, d in got.items() if own[k].dtype.is_floating_point)
    common = counts.most_common(1)[0][0] if counts else None
    for k, d in got.items():
        mine = own[k].dtype
        expect = (common if common in _FLOATS else torch.float32) if mine.is_floating_point \
            else mine
        if d != expect:
            found = str(d).replace("torch.", "") if d is not None else "an unsupported dtype"
            raise ValueError(f"{source}: tensor {k!r} is {found}, expected "
                             f"{str(expect).replace('torch.', '')} like the model's other "
                             "weights (the file was not written by save_pretrained, or was "
                             "changed): save the model again")


def _base_weights(art: Artefact, pretrained: Optional[PathLike]) -> str:
    want = art.base_weights or {}
    path = Path(pretrained) if pretrained is not None else Path(want.get("path", ""))
    if pretrained is None and not path.is_file() and want.get("repo_id"):
        # weights from the Hub: the same file, through this machine's Hub cache
        rev = f"@{want['revision']}" if want.get("revision") else ""
        ref = hub.parse_hub_id(f"{hub.HUB_PREFIX}{want['repo_id']}{rev}:{want.get('filename')}",
                               file=True)
        path = hub.hub_file(ref.repo_id, ref.filename, ref.revision)
    if not path.is_file():
        raise FileNotFoundError(
            f"{art.folder} holds only the trainable tensors; the frozen backbone comes from "
            f"{path} which is not found: pass the pretrained image file (--pretrained)")
    got = file_digest(path)
    if (got["size"], got["sha256"]) != (want.get("size"), want.get("sha256")):
        raise ValueError(
            f"{path} is not the pretrained file {art.folder} was trained from (size/SHA-256 "
            f"differ from {want.get('path')}): pass the right file with --pretrained")
    return str(path)
