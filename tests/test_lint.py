"""CI's linter: ``ruff check`` (rules in pyproject.toml's ``[tool.ruff]``) over the Python code."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["zeroi2v", "tests", "benchmarks", "setup.py", "conftest.py",
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.py"))]


def test_ruff_check():
    pytest.importorskip("ruff", reason="ruff is in the `test` extra: pip install -e '.[test]'")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *PATHS], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"ruff check found problems:\n{res.stdout}{res.stderr}"
