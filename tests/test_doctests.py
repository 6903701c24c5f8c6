"""Every example in the package's docstrings runs and prints what it says (doctest)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "lrbs"
MODULES = sorted(
    ".".join(("lrbs", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
    for p in SRC.rglob("*.py")
    if ">>> " in p.read_text(encoding="utf-8")
)


def test_the_package_has_examples():
    assert "lrbs.curvature" in MODULES and len(MODULES) >= 5


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    res = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert res.attempted > 0 and res.failed == 0, f"{name}: {res.failed} of {res.attempted} examples failed"
