"""Reading weights without running code, writing files atomically, and the one state-dict checker.

Everything zeroi2v reads from disk goes through :func:`read_checkpoint`:

* safetensors files are parsed by ``safetensors`` (no code, by design);
* pickled ``torch.save`` files are read by a restricted unpickler: it resolves only what
  rebuilding tensors needs (a narrower list than PyTorch's weights-only loader, which also calls
  ``bytearray`` with the file's argument), turns every other global into an inert placeholder
  (training frameworks' metadata: numpy scalars, ``HistoryBuffer`` ...), and changes no object
  it did not create, so nothing from the file runs or alters the process, and the tensors load;
* TorchScript archives (OpenAI's ``ViT-B-16.pt``) are never handed to ``torch.jit.load``, which
  would compile and run the archive's code: their ``data.pkl`` is read with the same restricted
  unpickler and the tensors are collected by attribute path.

Before anything is allocated, what a file asks for is checked: the safetensors header by hand,
zip records by their declared sizes, every tensor against the bytes it really holds (a stride-0
view is refused), all against the memory limit (:mod:`zeroi2v.limits`). There is no switch to
unpickle freely. Every failure is a ``ValueError`` (``FileNotFoundError`` for a missing path)
whose message names the file.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import pickle
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from struct import error as struct_error
from typing import Any, Callable, Optional, Union

import torch

from .limits import LimitError, check_bytes, fmt_bytes

PathLike = Union[str, os.PathLike]

# Keys under which training frameworks wrap the model weights, tried in order.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "model_state_dict")


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: PathLike) -> Any:
    """The object stored in ``path`` (a dict of tensors for ordinary checkpoints), read safely.

    Before anything is allocated, the bytes the file asks for (safetensors header, zip record
    sizes) are checked against the memory limit (:mod:`zeroi2v.limits`)."""
    try:
        return _read_checkpoint(os.fspath(path))
    except RecursionError:
        raise ValueError(f"{os.fspath(path)}: nested deeper than any checkpoint is") from None


def _read_checkpoint(path: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    if looks_like_safetensors(path):
        return read_safetensors(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ValueError(f"{path} is a damaged zip/checkpoint file: {e}") from e
        _check_zip_records(path, infos)
        if any(i.filename.endswith("constants.pkl") for i in infos):
            return _read_torchscript(path)
    return _torch_load(path)


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Load ``path`` and unwrap it to a flat ``{name: tensor}`` dict (``state_dict``/``model``
    wrappers and a DataParallel ``module.`` prefix are removed)."""
    return unwrap_state_dict(read_checkpoint(path), path)


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
    check_tensor_memory(sd, path)
    return sd


def check_tensor_memory(sd: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Every tensor must own the bytes its shape claims (a stride-0 or overlapping view of a
    small storage is a few bytes on disk and gigabytes once copied), and all of them together
    must fit the memory limit."""
    total = 0
    for k, t in sd.items():
        if t.layout != torch.strided or t.device.type == "meta":
            raise ValueError(f"{os.fspath(path)}: tensor {k!r} is not a plain tensor "
                             f"({t.layout}, {t.device.type})")
        need = t.numel() * t.element_size()
        if need and (t.untyped_storage().nbytes() < need or 0 in t.stride()
                     and t.numel() > 1):
            raise ValueError(
                f"{os.fspath(path)}: tensor {k!r} of shape {tuple(t.shape)} claims "
                f"{fmt_bytes(need)} but its data is {fmt_bytes(t.untyped_storage().nbytes())} "
                "(a stride-0 or overlapping view): not a checkpoint zeroi2v loads")
        total += need
    check_bytes(total, f"{os.fspath(path)} ({len(sd)} tensors)")


def looks_like_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return path.endswith(".safetensors")
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= os.path.getsize(path) - 8 or path.endswith(".safetensors")


# safetensors dtype names -> bytes per element
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_MAX_HEADER = 100 * 2**20  # the format's own limit


def safetensors_header(path: PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """``({name: (dtype, shape)}, metadata)`` of a safetensors file, read and checked by hand
    before the library sees the file: the header length fits the file, every entry's dtype is
    known, its byte range lies inside the data and matches its shape, ranges do not overlap, and
    the total fits the memory limit. Any other file is a ``ValueError`` naming it."""
    import json

    path = os.fspath(path)
    size = os.path.getsize(path)

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a readable safetensors file: {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(size - 8, _ST_MAX_HEADER):
            raise bad(f"its header claims {n:,} bytes, the file has {size - 8:,} after the length")
        try:
            doc = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"damaged header ({e})") from None
        except RecursionError:
            raise bad("its header nests deeper than a header does") from None
    if not isinstance(doc, dict):
        raise bad("the header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("its metadata is not a map of strings")
    data_len = size - 8 - n
    entries, ranges, total = {}, [], 0
    for name, e in doc.items():
        ok = isinstance(e, dict) and e.get("dtype") in _ST_DTYPES and \
            isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list) and \
            len(e["data_offsets"]) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62
                for x in e["shape"] + e["data_offsets"])
        if not ok:
            raise bad(f"entry {name!r} is malformed")
        lo, hi = e["data_offsets"]
        numel = 1
        for d in e["shape"]:
            numel *= d
        if any(e["shape"]) and math.prod(d or 1 for d in e["shape"]) >= 2**62:
            raise bad(f"tensor {name!r} has a shape no tensor can have: {e['shape']}")
        if not lo <= hi <= data_len or hi - lo != numel * _ST_DTYPES[e["dtype"]]:
            raise bad(f"tensor {name!r} ({e['dtype']} {e['shape']}) does not fit bytes "
                      f"{lo}..{hi} of {data_len}")
        entries[name] = (e["dtype"], tuple(e["shape"]))
        ranges.append((lo, hi))
        total += hi - lo
    ranges.sort()
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise bad("tensors overlap")
    check_bytes(total, f"{path} ({len(entries)} tensors)")
    return entries, meta


def read_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after :func:`safetensors_header` checked it."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    safetensors_header(path)
    try:
        return load_file(path, device="cpu")
    except BaseException as e:  # noqa: BLE001 - the Rust side may panic (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


#: The largest pickle record (``data.pkl``) read: the tensors are separate records, so a real
#: checkpoint's pickle is metadata, far below this.
MAX_PICKLE_BYTES = 256 * 2**20


def _check_zip_records(path: str, infos: list) -> None:
    """A zip checkpoint's records, by their declared sizes, must fit the memory limit, and its
    pickles :data:`MAX_PICKLE_BYTES` (a compressed record can claim far more than the file
    holds: a 14 MB file whose data.pkl inflates to 3 GB)."""
    check_bytes(sum(i.file_size for i in infos), f"{path} (the records of the archive)")
    for i in infos:
        if i.filename.endswith(".pkl") and i.file_size > MAX_PICKLE_BYTES:
            raise LimitError(f"{path}: its pickle {i.filename} claims {fmt_bytes(i.file_size)}, "
                             f"over the {fmt_bytes(MAX_PICKLE_BYTES)} a checkpoint's metadata "
                             "takes: not a checkpoint zeroi2v reads")


def _torch_load(path: str) -> Any:
    """A pickled checkpoint through the restricted unpickler only: torch's weights-only loader
    also calls allow-listed functions with the file's arguments (``bytearray(10**11)`` fills
    memory), and training frameworks' metadata needs placeholders anyway."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle)
    except _PickleRefused as e:
        raise ValueError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError,
            KeyError, IndexError, TypeError, struct_error) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or another "
                         f"format?): {type(e).__name__}: {e}") from e


def _read_torchscript(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive, by attribute path (``visual.conv1.weight`` ...),
    without compiling or running any of the archive's code. Each storage record is read once,
    and only after the records it names are known to fit the memory limit."""
    try:
        with zipfile.ZipFile(path) as zf:
            data = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not data:
                raise ValueError("no data.pkl in the archive")
            prefix = data[0][: -len("data.pkl")]
            storages: dict[str, Any] = {}
            claimed = [0]

            def load_storage(saved_id):
                kind, storage_type, key, _location, numel = saved_id
                if kind != "storage":
                    raise ValueError(f"unexpected persistent id {kind!r}")
                dtype = getattr(storage_type, "dtype", None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"unsupported storage type {storage_type!r}")
                key = str(key)
                if key not in storages:
                    info = zf.getinfo(f"{prefix}data/{key}")
                    claimed[0] += info.file_size
                    check_bytes(claimed[0], f"{path} (tensor data of the archive)")
                    raw = bytearray(zf.read(info))
                    storages[key] = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) \
                        if raw else torch.UntypedStorage(0)
                return torch.storage.TypedStorage(wrap_storage=storages[key], dtype=dtype,
                                                  _internal=True)

            unpickler = _RestrictedUnpickler(_BytesReader(zf.read(data[0])))
            unpickler.persistent_load = load_storage
            root = unpickler.load()
    except LimitError:
        raise
    except (ValueError, _PickleRefused) as e:
        raise ValueError(f"{path} looks like a TorchScript archive but cannot be read: {e}") from e
    except Exception as e:  # noqa: BLE001 - malformed archives fail in many ways
        raise ValueError(f"{path} looks like a TorchScript archive but cannot be read: "
                         f"{type(e).__name__}: {e}") from e
    out: dict[str, torch.Tensor] = {}
    try:
        _collect_tensors(root, "", out, set())
    except RecursionError:
        raise ValueError(f"{path}: the TorchScript archive nests its modules deeper than any "
                         "model does") from None
    if not out:
        raise ValueError(f"{path}: the TorchScript archive holds no tensors")
    check_tensor_memory(out, path)
    return out


def _collect_tensors(obj: Any, prefix: str, out: dict, seen: set) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = getattr(obj, "state", None) if isinstance(obj, _Placeholder) else obj
    if isinstance(state, Mapping):
        for k, v in state.items():
            if isinstance(k, str):
                _collect_tensors(v, f"{prefix}{k}.", out, seen)


class _BytesReader:
    """File-like view of a bytes object for :class:`pickle.Unpickler`."""

    def __init__(self, data: bytes):
        import io

        self._f = io.BytesIO(data)
        self.read, self.readline = self._f.read, self._f.readline
        self.readinto = self._f.readinto
        self.peek = getattr(self._f, "peek", None)


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


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """What protocol-2 pickles of bytes call ``_codecs.encode`` for: a str to latin-1 bytes. Any
    other codec is refused (``hex`` nested twenty times doubles memory twenty times;
    ``punycode`` is quadratic)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _PickleRefused(f"the pickle calls _codecs.encode with {type(text).__name__} and "
                             f"{str(encoding)[:20]!r}; only latin-1 text is read")
    return text.encode("latin1")


class _StorageTag:
    """Stands for a typed-storage class (``torch.FloatStorage``) in a pickle: it names a dtype for
    the storage records and cannot be called (``torch.FloatStorage(3e9)`` would reserve 12 GB)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"<storage type {self.name}>"


def _allowed_globals() -> dict:
    """What checkpoints need to rebuild tensors, and nothing that allocates from an argument
    (``bytearray``, storage constructors) or builds device tensors. Everything else becomes a
    :class:`_Placeholder`."""
    import collections

    import torch._utils as tu

    out = {"collections.OrderedDict": collections.OrderedDict, "torch.Size": torch.Size,
           "torch.device": torch.device, "torch.nn.parameter.Parameter": torch.nn.Parameter,
           "_codecs.encode": _latin1}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(tu, name):
            out[f"torch._utils.{name}"] = getattr(tu, name)
    import warnings

    for name in dir(torch):  # dtypes, and the typed-storage classes the records name
        with warnings.catch_warnings():  # the legacy storage classes warn when touched
            warnings.simplefilter("ignore")
            obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype):
            out[f"torch.{name}"] = obj
        elif name.endswith("Storage") and isinstance(obj, type):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dtype = torch.uint8 if name == "UntypedStorage" else getattr(obj, "dtype", None)
            if isinstance(dtype, torch.dtype):
                out[f"torch.{name}"] = _StorageTag(name, dtype)
    return out


class _PickleRefused(ValueError):
    """The pickle tried to change an object it did not create (the message says which)."""


class _RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be limited
    """Resolves only :data:`_ALLOWED_FUNCTIONS`, dtypes and storage types; every other global is
    an inert :class:`_Placeholder`. BUILD (set an object's state), SETITEM(S) and APPEND(S)
    apply only to objects of the file's own making (placeholders, tensors, dicts, lists):
    never to a class or function, whose change would outlive the load."""

    _allowed: dict = {}
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if not self._allowed:
            type(self)._allowed = _allowed_globals()
        obj = self._allowed.get(f"{module}.{name}")
        if obj is not None:
            return obj
        return type(name, (_Placeholder,), {"_qualname": f"{module}.{name}"})

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _Placeholder):
            inst.__setstate__(state)
        elif type(inst) is torch.nn.Parameter and isinstance(state, tuple):
            inst.__setstate__(state)
        elif type(inst) is torch.Tensor and isinstance(state, tuple):
            inst.set_(*state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict):
            for k, v in state.items():  # e.g. a state dict's _metadata
                if not isinstance(k, str) or k.startswith("__"):
                    raise _PickleRefused(f"the pickle sets {k!r} on an OrderedDict; refused")
                inst.__dict__[k] = v
        else:
            raise _PickleRefused(f"the pickle tries to change {_what(inst)}, which it did not "
                                 "create; refused (nothing was changed)")

    def _container(self, obj, kinds):
        if not isinstance(obj, kinds) or isinstance(obj, type):
            raise _PickleRefused(f"the pickle tries to add items to {_what(obj)}; refused")
        return obj

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._container(self.stack[-1], (dict, _Placeholder))[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._container(self.stack[-1], (dict, _Placeholder))
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_append(self):
        value = self.stack.pop()
        self._container(self.stack[-1], (list, _Placeholder)).append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._container(self.stack[-1], (list, _Placeholder)).extend(items)

    def load_additems(self):
        items = self.pop_mark()
        target = self._container(self.stack[-1], (set, _Placeholder))
        for item in items:
            if isinstance(target, set):
                target.add(item)

    for _op, _fn in ((pickle.BUILD, load_build), (pickle.SETITEM, load_setitem),
                     (pickle.SETITEMS, load_setitems), (pickle.APPEND, load_append),
                     (pickle.APPENDS, load_appends), (pickle.ADDITEMS, load_additems)):
        dispatch[_op[0]] = _fn
    del _op, _fn


def _what(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj):
        return f"the function {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
    return f"an object of type {type(obj).__name__}"


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` and a ``load``."""

    __name__ = "zeroi2v_restricted_pickle"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(f, **kw):
        return _RestrictedUnpickler(f, **kw).load()


_restricted_pickle = _RestrictedPickleModule()


def plain(x: Any) -> Any:
    """``x`` as plain YAML/JSON data: mappings with string (or int) keys, lists for tuples,
    strings for paths."""
    if isinstance(x, Mapping):
        return {(k if isinstance(k, int) else str(k)): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


# ----------------------------------------------------------------------------- text files

#: The largest JSON or YAML file read (a config, an index): far above any real one, far below
#: what parsing could turn into memory.
MAX_TEXT_BYTES = 64 * 2**20


def read_text(path: PathLike, what: str = "file") -> str:
    """A UTF-8 text file of at most :data:`MAX_TEXT_BYTES` (a leading byte-order mark dropped),
    or a ``ValueError`` naming it. Only a regular file: a FIFO would block, a device never end."""
    path = os.fspath(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) \
            else "device or socket"
        raise ValueError(f"{path} is a {kind}, not a {what}")
    too_big = LimitError(f"{path}: a {what} of over {fmt_bytes(MAX_TEXT_BYTES)}, more than any "
                         "real one takes")
    if st.st_size > MAX_TEXT_BYTES:
        raise too_big
    with open(path, "rb") as f:
        data = f.read(MAX_TEXT_BYTES + 1)  # bounded, should it grow after the stat
    if len(data) > MAX_TEXT_BYTES:
        raise too_big
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): not a {what}") from None


def load_json(text: Union[str, bytes], source: str) -> Any:
    """JSON from a file zeroi2v did not write: a damaged or absurdly nested document is one
    ``ValueError`` naming ``source``."""
    import json

    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{source} nests its JSON deeper than any zeroi2v file does") from None


def load_yaml(text: str, source: str) -> Any:
    """YAML from a file zeroi2v did not write, read without aliases: ``*x`` references to
    ``&x`` anchors let 700 bytes stand for 9**9 values ("billion laughs"), which any walk over
    the result (validation, an error message) would expand."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ValueError(f"{source} (line {mark.line + 1}): YAML aliases (*name) are not "
                                 "read; write the value out")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{source} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise ValueError(f"{source} nests its YAML deeper than any config does") from None


def short_repr(x: Any, limit: int = 80) -> str:
    """``repr(x)`` bounded in depth, length and time (for error messages about untrusted
    values)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxstring, r.maxother, r.maxlong = 3, 6, 6, 60, 60, 40
    text = r.repr(x)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- checking


def check_state_dict(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], path: str, *,
                     what: str = "the model", optional: Callable[[str], bool] = lambda k: False,
                     source: Optional[Mapping[str, str]] = None, hint: str = "") -> None:
    """Raise a ``ValueError`` naming the first key of ``sd`` that cannot load into ``own``: a key
    ``own`` needs (unless ``optional``), a key ``own`` lacks, or a shape (both shapes given).
    ``source`` maps converted keys back to the file's names for the message; ``hint`` is appended
    to the missing-key error."""
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
        if tuple(own[k].shape) != tuple(v.shape):
            renamed = f" (for {k!r})" if name(k) != k else ""
            raise ValueError(f"{path} does not match {what}: key {name(k)!r} has shape "
                             f"{tuple(v.shape)} in the file, the model expects "
                             f"{tuple(own[k].shape)}{renamed}")


# ----------------------------------------------------------------------------- writing


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be
    read by setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def honour_umask(path: PathLike, is_dir: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it: ``mkstemp`` and
    ``mkdtemp`` create private (0600/0700) files, which a serving container or a colleague
    could not read."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed onto
    ``path`` in one step (``os.replace``), so readers see the old file or the new one, never a
    half-written one. A failed block leaves ``path`` untouched and removes the temporary. The
    file gets the mode the user's umask gives new files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        disk = disk_error(e, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if disk is not None:
            raise disk from e
        raise


def disk_error(e: BaseException, path: PathLike) -> Optional[OSError]:
    """``e`` as an ``OSError(ENOSPC)`` naming ``path`` when it is a full disk in disguise:
    torch.save reports one as ``RuntimeError: ... unexpected pos``, safetensors as its own
    error type with "os error 28". ``None`` for anything else (an ``OSError`` already says)."""
    import errno

    if isinstance(e, OSError) or not isinstance(e, Exception):
        return None
    full = "No space left" in str(e) or "os error 28" in str(e)
    if not full:
        try:
            st = os.statvfs(Path(path).parent)
            full = st.f_bavail * st.f_frsize < 1 << 20
        except OSError:
            pass
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path)) if full else None


#: What every temporary of :func:`atomic_path` / :func:`atomic_dir` ends in (hidden names).
TMP_SUFFIX = ".tmp"


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; when the block succeeds it becomes
    ``path``. ``path`` must not exist yet (directories cannot be replaced in one step); a failed
    block removes the temporary directory."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists already")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        honour_umask(tmp, is_dir=True)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the hidden temporaries (``.NAME.XXXX.tmp``, files or folders) that an interrupted
    :func:`atomic_path` / :func:`atomic_dir` left directly in ``folder``. Only call this while
    holding the folder's :func:`folder_lock`: a live writer's temporaries look the same."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.name != LOCK_FILE:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


def replace_symlink(link: PathLike, target: PathLike) -> None:
    """Point ``link`` at ``target`` (relative to the link's folder) in one atomic step."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}{TMP_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


# ----------------------------------------------------------------------------- one writer


LOCK_FILE = ".zeroi2v.lock"


class FolderLockedError(ValueError):
    """Another live process holds the folder's lock (the message says which and what to do)."""


@contextlib.contextmanager
def folder_lock(folder: PathLike, command: str) -> Iterator[Optional[dict]]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the block: one writer per
    output folder.

    The lock is ``folder/.zeroi2v.lock``, locked with ``flock`` (released by the kernel when
    the process dies, however it dies) and holding the owner's pid, host, command and start time
    as JSON. A second process is refused at once with a :class:`FolderLockedError` naming the
    owner. A lock file left by a process that died without releasing it is taken over; the block
    receives that process's record (``None`` otherwise) so the caller can report it. The file
    is kept (emptied) on release: deleting it would let two processes lock two different files
    of the same name.
    """
    import fcntl
    import json
    import socket
    import time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:  # never through a link: it would empty whatever file the link names
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError:
        if os.path.islink(path):
            raise FolderLockedError(f"{path} is a symbolic link, not zeroi2v's lock file: remove "
                                    "it (zeroi2v never writes through it)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FolderLockedError(f"{path} is not a regular file: remove it")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_lock(fd)
            who = (f"pid {owner.get('pid')} on {owner.get('host')}, `{owner.get('command')}`, "
                   f"since {owner.get('started')}") if owner else "another process"
            raise FolderLockedError(
                f"{folder} is in use by another zeroi2v run ({who}): wait for it to finish, stop "
                "it, or choose another output folder") from None
        stale = _read_lock(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield stale
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_lock(fd: int) -> dict:
    import json

    try:
        raw = os.pread(fd, 4096, 0)
        rec = json.loads(raw.decode()) if raw.strip() else {}
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
