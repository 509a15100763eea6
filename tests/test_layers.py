"""Imports inside ``zeroi2v`` point one way (docs/DESIGN.md, "Layers").

Every ``import`` / ``from ... import`` statement of the package is read from its source (module
level and inside functions alike) and resolved to the package module it loads. A module may
import its own layer and the layers below it, never one above. Kernel modules are the example:
they import ``ops`` to register themselves, and ``ops`` finds them by name (``PLUGINS`` in
``zeroi2v/ops/registry.py``, imported with ``importlib``), so no import statement of ``ops``
names ``kernels``.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "zeroi2v")

#: Layers from the bottom up; a module may import its own layer and those listed before it.
#: ``__init__`` is the package itself (``import zeroi2v``), the public façade over everything.
LAYERS: list[set[str]] = [
    {"_native", "_C", "_version", "settings", "offsets", "limits", "errors", "safe_io", "progress"},
    {"ops"},
    {"kernels"},
    {"nn"},
    {"models"},
    {"data", "interop"},
    {"train"},
    {"cli", "commands", "__main__", "__init__"},
]
#: Layers side by side that must not import each other either.
SIBLINGS = {frozenset({"data", "interop"})}

#: Upward imports tolerated for now, as (importing module, imported module): none.
#: test_known_upward_imports_still_exist fails on an entry whose import is gone.
KNOWN_UPWARD_IMPORTS: set[tuple[str, str]] = set()  # none: keep it that way

RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _is_module(name: str) -> bool:
    base = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def _imports(source: str, name: str, is_package: bool = False):
    """(line, imported module) for every import statement of ``source``, the code of module
    ``name`` (``is_package``: an ``__init__.py``)."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:  # ``from zeroi2v import settings`` loads zeroi2v.settings
                full = f"{base}.{alias.name}"
                yield node.lineno, full if _is_module(full) else base


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _package_imports():
    """(importing module, line, imported module) for every import of a package module."""
    for dirpath, _, files in os.walk(PACKAGE):
        for fname in sorted(files):
            if fname.endswith(".py"):
                path = os.path.join(dirpath, fname)
                src = _module_name(path)
                with open(path) as f:
                    found = list(_imports(f.read(), src, fname == "__init__.py"))
                for line, target in found:
                    if target == "zeroi2v" or target.startswith("zeroi2v."):
                        yield src, line, target


def _upward(src: str, target: str) -> bool:
    a, b = _layer(src), _layer(target)
    if a == b:
        return False
    return RANK[b] > RANK[a] or frozenset({a, b}) in SIBLINGS


def test_every_package_module_has_a_layer():
    missing = {_layer(m) for s, _, t in _package_imports() for m in (s, t)} - set(RANK)
    assert not missing, f"add these to LAYERS: {sorted(missing)}"


def test_imports_point_down_the_layers():
    bad = [f"{src}:{line} imports {target}" for src, line, target in _package_imports()
           if _upward(src, target) and (src, target) not in KNOWN_UPWARD_IMPORTS]
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_known_upward_imports_still_exist():
    """An entry of KNOWN_UPWARD_IMPORTS whose import is gone is to be deleted."""
    live = {(src, target) for src, _, target in _package_imports()}
    assert KNOWN_UPWARD_IMPORTS <= live, sorted(KNOWN_UPWARD_IMPORTS - live)


def test_ops_never_names_kernels():
    """Not even inside a function: ops knows kernel modules by their names only."""
    bad = [f"{src}:{line}" for src, line, target in _package_imports()
           if _layer(src) == "ops" and _layer(target) == "kernels"]
    assert not bad, bad


@pytest.mark.parametrize("source,expected", [
    ("from .. import settings", "zeroi2v.settings"),
    ("from ..ops.registry import register_backend", "zeroi2v.ops.registry"),
    ("from . import registry", "zeroi2v.ops.registry"),
    ("from .stdha import stdha_attention", "zeroi2v.ops.stdha"),
    ("import zeroi2v.kernels.stdha as ks", "zeroi2v.kernels.stdha"),
    ("from .. import __version__", "zeroi2v"),
])
def test_the_walker_resolves_relative_and_function_level_imports(source, expected):
    """Each form resolves to the module it loads, also inside a function (of zeroi2v.ops.adapter)."""
    code = "def f():\n    " + source + "\n"
    assert [t for _, t in _imports(code, "zeroi2v.ops.adapter")] == [expected]
    assert _upward("zeroi2v.ops.adapter", "zeroi2v.kernels.stdha")
    assert not _upward("zeroi2v.kernels.stdha", "zeroi2v.ops.registry")
    assert _upward("zeroi2v.data.dataset", "zeroi2v.interop.export")
