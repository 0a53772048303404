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


def test_every_data_file_is_in_the_wheel():
    """Files a package reads at run time (the chat page of qora serve) must match its package-data globs."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    static = ROOT / "qora" / "api" / "static"
    files = [p.relative_to(static.parent).as_posix() for p in static.iterdir() if p.is_file()]
    assert files, "the chat page is missing"
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in data.get("qora.api", []))]
    assert not missing, f"not in [tool.setuptools.package-data] qora.api: {missing}"
    from qora.api.app import STATIC

    assert set(STATIC) == {Path(f).name for f in files}  # served is exactly what ships
