"""The layer picture of ARCHITECTURE.md, checked on the source: no module uses another module's private names.

A private name is one that starts with a single underscore. Private *modules* (``_util``, ``papers/_common``) are
package-internal and may be imported, but only their public names may be used. The check reads the source with
``ast`` (nothing is imported), so it also covers modules whose optional dependencies are missing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lrbs"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (``from ..x import y`` inside ``lrbs.cli.train``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _violations(path: Path) -> list[str]:
    module = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imported_modules: dict[str, str] = {}  # local name -> absolute lrbs module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            if not target.startswith("lrbs"):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                is_module = (SRC.parent / (full.replace(".", "/") + ".py")).exists()
                if _private(alias.name) and not is_module and target != module:
                    out.append(f"{module}:{node.lineno} imports {alias.name} from {target}")
                imported_modules[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lrbs"):
                    imported_modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            target = imported_modules.get(node.value.id)
            if target is not None and target != module:
                out.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr} of {target}")
    return out


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_sources_found():
    names = {_module_name(p) for p in _sources()}
    assert {"lrbs", "lrbs.objective", "lrbs.batches", "lrbs.step", "lrbs.cli"} <= names


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_names_of_other_modules(path):
    assert _violations(path) == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself: a private import and a private attribute of an imported module are both reported."""
    pkg = tmp_path / "lrbs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _hidden():\n    pass\n")
    (pkg / "b.py").write_text("from .a import _hidden\nfrom . import a\nx = a._hidden\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    found = _violations(pkg / "b.py")
    assert any("imports _hidden from lrbs.a" in f for f in found)
    assert any("uses a._hidden of lrbs.a" in f for f in found)


def _readme_layout() -> set[str]:
    text = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    names = set()
    for token in block.replace(",", " ").replace(":", " ").split():
        token = token.strip("()")
        if token.endswith(".py") or (token.endswith("/") and len(token) > 1):
            names.add(token.rstrip("/"))
    return names


def test_readme_layout_matches_the_tree():
    """Every module and subpackage of src/lrbs is in the README's layout, and nothing that is not there."""
    tree = {p.name for p in SRC.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    tree |= {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    listed = _readme_layout() - {"src/lrbs", "lrbs", "templates", "_common.py", "html.py", "figures.py"}
    listed -= {"transformers.py", "lightning.py", "monitor.py", "measure.py"}  # inside integrations/
    assert tree - listed == set(), "modules missing from README's Layout"
    assert listed - tree == set(), "README's Layout names modules that do not exist"
