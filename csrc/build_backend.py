"""PEP 517 build backend of zeroi2v: setuptools' own, plus the one torch the extension must use.

``zeroi2v._C`` has to be compiled against the very torch it will run with (its C++ ABI changes
between releases). pip builds in an isolated environment that hides the target environment's
packages, so a plain ``requires = ["torch"]`` would compile against whatever torch that
environment downloads, which need not be the one already installed. Here:

* target environment already has torch (a re-install, or ``pip install torch`` first): that torch
  is put on the build's ``sys.path`` and nothing is downloaded; the build uses it directly.
* target has no torch (a fresh venv): ``torch`` becomes a build requirement. The same pip, with
  the same indexes and constraints, then resolves the runtime ``torch`` dependency to the same
  release. Where it does not (e.g. a frontend that ignores the constraint inside the build), the
  build record written next to the library lets ``zeroi2v._native`` refuse the mismatch at import
  with one line, and re-running the install builds against the installed torch (first case).

``ZEROI2V_NO_EXT=1`` asks for no torch at all (setup.py then builds no extension).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig

from csrc_build import build_switch  # beside this file (pyproject's backend-path)
from setuptools import build_meta as _setuptools
from setuptools.build_meta import build_sdist, get_requires_for_build_sdist  # noqa: F401


def _target_site_dirs() -> list[str]:
    """site-packages of the environment being installed into. The hooks run under its interpreter
    (pip's isolation only removes these directories from sys.path), so sysconfig still names them."""
    dirs = []
    for key in ("purelib", "platlib"):
        path = sysconfig.get_path(key)
        if path and path not in dirs and os.path.isdir(os.path.join(path, "torch")):
            dirs.append(path)
    return dirs


def _torch_visible() -> bool:
    return importlib.util.find_spec("torch") is not None


def _use_target_torch() -> None:
    """Make the target's torch importable for setup.py. Appended, not prepended: the build
    environment's setuptools and wheel keep precedence over the target's."""
    if build_switch("no_ext") or _torch_visible():
        return
    for path in _target_site_dirs():
        if path not in sys.path:
            sys.path.append(path)


def _extra_requires() -> list[str]:
    if build_switch("no_ext") or _torch_visible() or _target_site_dirs():
        return []
    return ["torch"]


# setup.py declares no setup_requires, so setuptools' own get_requires hooks (which run setup.py
# only to collect them) are not called: that run would happen before torch is available and print
# a misleading "skipping the native extension" line.
def get_requires_for_build_wheel(config_settings=None):
    return _extra_requires()


def get_requires_for_build_editable(config_settings=None):
    return _extra_requires()


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_target_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_target_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
