"""Reading weights without running code, writing files atomically, and the one state-dict checker.

Everything zeroi2v reads from disk goes through :func:`read_checkpoint`:

* safetensors files are parsed by ``safetensors`` (no code, by design);
* pickled ``torch.save`` files are read with ``torch.load(weights_only=True)``; training
  frameworks' checkpoints (mmengine/mmaction2) often carry metadata the weights-only loader
  refuses (numpy scalars, ``HistoryBuffer`` ...), and for those a restricted unpickler takes over:
  it resolves only the globals of PyTorch's weights-only allowlist and turns every other global
  into an inert placeholder, so nothing from the file runs and the tensors still load;
* TorchScript archives (OpenAI's ``ViT-B-16.pt``) are never handed to ``torch.jit.load``, which
  would compile and run the archive's code: their ``data.pkl`` is read with the same restricted
  unpickler and the tensors are collected by attribute path.

There is no switch to unpickle freely. Every failure is a ``ValueError`` (``FileNotFoundError``
for a missing path) whose message names the file.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

# Keys under which training frameworks wrap the model weights, tried in order.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "model_state_dict")


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: PathLike) -> Any:
    """The object stored in ``path`` (a dict of tensors for ordinary checkpoints), read safely."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    if looks_like_safetensors(path):
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
    return sd


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
    return 0 < n <= os.path.getsize(path) - 8


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path} is not a PyTorch checkpoint: {e}") from e
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError,
            IndexError, TypeError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or another "
                         f"format?): {type(e).__name__}: {e}") from e
    # Globals the weights-only loader refuses: read again with every such global made inert.
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} could not be read as a checkpoint: {type(e).__name__}: {e}") from e


def _read_torchscript(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive, by attribute path (``visual.conv1.weight`` ...),
    without compiling or running any of the archive's code."""
    try:
        with zipfile.ZipFile(path) as zf:
            data = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not data:
                raise ValueError("no data.pkl in the archive")
            prefix = data[0][: -len("data.pkl")]

            def load_storage(saved_id):
                kind, storage_type, key, _location, numel = saved_id
                if kind != "storage":
                    raise ValueError(f"unexpected persistent id {kind!r}")
                dtype = getattr(storage_type, "dtype", None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"unsupported storage type {storage_type!r}")
                raw = bytearray(zf.read(f"{prefix}data/{key}"))
                storage = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw \
                    else torch.UntypedStorage(0)
                return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype,
                                                  _internal=True)

            unpickler = _RestrictedUnpickler(_BytesReader(zf.read(data[0])))
            unpickler.persistent_load = load_storage
            root = unpickler.load()
    except ValueError as e:
        raise ValueError(f"{path} looks like a TorchScript archive but cannot be read: {e}") from e
    except Exception as e:  # noqa: BLE001 - malformed archives fail in many ways
        raise ValueError(f"{path} looks like a TorchScript archive but cannot be read: "
                         f"{type(e).__name__}: {e}") from e
    out: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", out, set())
    if not out:
        raise ValueError(f"{path}: the TorchScript archive holds no tensors")
    return out


def _collect_tensors(obj: Any, prefix: str, out: dict, seen: set) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = getattr(obj, "state", None) if isinstance(obj, _Placeholder) else None
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


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` and a ``load``."""

    __name__ = "zeroi2v_restricted_pickle"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(f, **kw):
        return _RestrictedUnpickler(f, **kw).load()


_restricted_pickle = _RestrictedPickleModule()


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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
