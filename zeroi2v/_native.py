"""The one loader of the native extension ``zeroi2v._C`` (sources in ``csrc/``).

``load()`` returns the module, or None; ``why_not()`` says why it is None. Importing the library
registers the ``torch.ops.zeroi2v.*`` operators, so every user of them goes through here.

A library compiled against another torch than the running one may fail to import or, worse, import
and then misbehave (torch's C++ ABI changes between releases). So before importing it the loader
reads the build record that csrc/csrc_build.py writes beside it (``_C_build.json``: the torch it was
compiled against, or why the build failed) and imports the library only when that torch is the
running one. A library that exists but is not loaded, or a build that failed at install, is
reported once per process by a RuntimeWarning naming the cause and the fix; the pure-PyTorch and
Triton paths then run (same results, slower CPU inference). A package installed without the
extension on purpose (``ZEROI2V_NO_EXT=1``) leaves no record and draws no warning.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from functools import cache
from types import ModuleType
from typing import Optional

import torch

NAME = "zeroi2v._C"
RECORD_NAME = "_C_build.json"  # written by csrc/csrc_build.py (its RECORD_NAME)
_FIX = "to build it for this torch, re-run `pip install -e .` in the zeroi2v checkout"


def _read_record(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, RECORD_NAME)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _refusal(spec, record: Optional[dict]) -> tuple[Optional[str], bool]:
    """(why the library must not be imported, whether to warn about it) or (None, False)."""
    if record is not None and not record.get("built", False):
        return f"{NAME} was not built at install ({record.get('reason')}); {_FIX}", True
    if spec is None or spec.origin is None:
        return (f"{NAME} is not installed (installed with ZEROI2V_NO_EXT=1 or without torch at build "
                f"time); {_FIX}"), False
    library = os.path.basename(spec.origin)
    if (record is None or record.get("library") != library
            or record.get("size") != os.path.getsize(spec.origin)):
        return (f"{spec.origin} has no matching build record {RECORD_NAME}, so the torch it was built "
                f"for is unknown: not loaded; {_FIX}"), True
    if record.get("torch") != torch.__version__:
        return (f"{NAME} was built against torch {record.get('torch')} but torch {torch.__version__} "
                f"is running: not loaded; {_FIX}"), True
    return None, False


@cache
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    # Look in this package's own directory only, and import exactly the file that was checked: an
    # editable install's finder on sys.meta_path could otherwise answer with another checkout's library.
    package = sys.modules[__package__]
    spec = importlib.machinery.PathFinder.find_spec(NAME, list(package.__path__))
    record = _read_record(os.path.dirname(spec.origin) if spec and spec.origin else package.__path__[0])
    reason, warn = _refusal(spec, record)
    if reason is None and getattr(sys.modules.get(NAME), "__file__", None) == spec.origin:
        return sys.modules[NAME], None  # imported directly before the first load()
    if reason is None:
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except (ImportError, OSError) as exc:
            reason, warn = f"importing {NAME} failed ({str(exc).splitlines()[0]}); {_FIX}", True
        else:
            sys.modules[NAME] = module
            setattr(package, NAME.rpartition(".")[2], module)
            return module, None
    if warn:
        warnings.warn(f"zeroi2v: {reason}; the pure-PyTorch/Triton paths run instead", RuntimeWarning,
                      stacklevel=3)
    return None, reason


def load() -> Optional[ModuleType]:
    """``zeroi2v._C`` when it is built for the running torch, else None (see :func:`why_not`)."""
    return _load()[0]


def why_not() -> Optional[str]:
    """Why :func:`load` returns None (one line), or None when it returns the module."""
    return _load()[1]


def require(what: str) -> ModuleType:
    """``zeroi2v._C``, or ImportError saying that ``what`` needs it and why it is missing."""
    module = load()
    if module is None:
        raise ImportError(f"{what} needs {NAME}: {why_not()}")
    return module
