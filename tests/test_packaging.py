"""The wheel lists its packages by hand (pyproject.toml): every package folder under qora/ must be
in that list, or the installed wheel fails to import it (a source checkout would not notice)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "qora").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found == listed, f"in the tree, not in pyproject.toml: {found - listed}; listed but absent: {listed - found}"
