"""Reading weights from local files: ``torch.save`` checkpoints, TorchScript archives (OpenAI's
``ViT-B-16.pt``), and safetensors. Every failure to read is a ``ValueError`` naming the path.

Pickled checkpoints are read with ``torch.load(weights_only=True)`` first. Training checkpoints
(mmengine/mmaction2) often carry metadata objects the weights-only loader refuses (numpy scalars,
``HistoryBuffer`` …); for those a restricted unpickler is used that resolves only the globals of
PyTorch's weights-only allowlist and turns every other global into an inert placeholder object, so
no code from the file runs and the tensors still load. ``weights_only=False`` skips all of this and
unpickles normally (only for files you trust).
"""
from __future__ import annotations

import os
import pickle
import types
import zipfile
from typing import Any, Callable, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

# Keys under which training frameworks wrap the model weights, tried in order.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "model_state_dict")


def read_checkpoint(path: PathLike, *, weights_only: bool = True) -> Any:
    """Load the raw object stored in ``path`` (a dict for ordinary checkpoints)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    if _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - any parse failure means "not a checkpoint"
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path} is a damaged zip/checkpoint file: {e}") from e
        if any(n.endswith("constants.pkl") for n in names):
            try:
                return torch.jit.load(path, map_location="cpu").state_dict()
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path} looks like a TorchScript archive but cannot be loaded: {e}") from e
    return _torch_load(path, weights_only)


def check_state_dict(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], path: str, *,
                     what: str = "the model", optional: Callable[[str], bool] = lambda k: False,
                     source: Optional[Mapping[str, str]] = None, hint: str = "") -> None:
    """Raise a ``ValueError`` naming the first key of ``sd`` that cannot load into ``own``: a key
    ``own`` needs (unless ``optional``), a key ``own`` lacks, or a shape. ``source`` maps converted
    keys back to the file's names for the message; ``hint`` is appended to the missing-key error."""
    name = (lambda k: source.get(k, k)) if source else (lambda k: k)
    missing = [k for k in own if k not in sd and not optional(k)]
    if missing:
        raise ValueError(f"{path} does not match {what}: missing key {missing[0]!r} "
                         f"({len(missing)} missing in all){hint}")
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise ValueError(f"{path} does not match {what}: unexpected key {name(unexpected[0])!r} "
                         f"({len(unexpected)} unexpected in all)")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            renamed = f" (for {k!r})" if name(k) != k else ""
            raise ValueError(f"{path} does not match {what}: key {name(k)!r} has shape "
                             f"{tuple(v.shape)} in the file, the model expects "
                             f"{tuple(own[k].shape)}{renamed}")


def read_state_dict(path: PathLike, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Load ``path`` and unwrap it to a flat ``{name: tensor}`` dict (``state_dict``/``model``
    wrappers and a DataParallel ``module.`` prefix are removed)."""
    obj = read_checkpoint(path, weights_only=weights_only)
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: Any, path: PathLike = "<state dict>") -> dict[str, torch.Tensor]:
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            break
        seen += 1
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{os.fspath(path)} does not hold a state dict (found {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{os.fspath(path)} holds no tensors (keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- internals


def _looks_like_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= os.path.getsize(path) - 8


def _torch_load(path: str, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "Weights only load failed" in str(e):
            try:
                return torch.load(path, map_location="cpu", weights_only=False,
                                  pickle_module=_restricted_pickle)
            except Exception as e2:  # noqa: BLE001
                raise ValueError(f"{path} could not be read as a checkpoint: {e2}") from e2
        raise ValueError(f"{path} is not a PyTorch checkpoint: {e}") from e
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError,
            IndexError, TypeError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or another "
                         f"format?): {type(e).__name__}: {e}") from e


class _Placeholder:
    """Stands in for any global the restricted unpickler does not allow; runs no code."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, k, v):  # dict subclasses are rebuilt with SETITEMS
        self.__dict__.setdefault("items", {})[k] = v

    def append(self, v):  # list subclasses: APPENDS
        self.__dict__.setdefault("list", []).append(v)

    def extend(self, vs):
        self.__dict__.setdefault("list", []).extend(vs)

    def __repr__(self):
        return f"<placeholder for {self._qualname}>"


def _allowed_globals() -> dict:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return dict(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - private API; fall back to the essentials
        import collections

        import torch._utils as tu
        out = {"collections.OrderedDict": collections.OrderedDict,
               "torch._utils._rebuild_tensor_v2": tu._rebuild_tensor_v2,
               "torch._utils._rebuild_parameter": tu._rebuild_parameter,
               "torch.Size": torch.Size, "torch.device": torch.device}
        for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"):
            out[f"torch.{name}"] = getattr(torch, name)
        return out


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed: dict = {}

    def find_class(self, module, name):
        if not self._allowed:
            type(self)._allowed = _allowed_globals()
        obj = self._allowed.get(f"{module}.{name}")
        if obj is not None:
            return obj
        return type(name, (_Placeholder,), {"_qualname": f"{module}.{name}"})


_restricted_pickle = types.ModuleType("zeroi2v_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.__name__ = "zeroi2v_restricted_pickle"
