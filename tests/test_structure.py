"""The package's shape: no import cycles, the core never imports experiments, and family facts live
only in the registry (``jaxinterp/families.py``) and the families' own folders under ``models/``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import jaxinterp as ji

ROOT = Path(__file__).resolve().parents[1] / "jaxinterp"
# The CLI dispatches to experiments by module name (importlib), never by a static import.
CLI = ROOT / "cli.py"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, function-level imports included (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for imp in _imports(path):
            # an import of a.b.c depends on the most specific jaxinterp module that exists
            while imp and imp not in files:
                imp = imp.rsplit(".", 1)[0] if "." in imp else ""
            if imp and imp != name and not name.startswith(imp + ".") and imp != "jaxinterp":
                deps.add(imp)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 30  # the walk saw the package


def test_core_never_imports_experiments():
    for path in ROOT.rglob("*.py"):
        bad = sorted(i for i in _imports(path) if i.startswith("jaxinterp.experiments"))
        assert not bad, f"{path.relative_to(ROOT.parent)} imports {bad}"


def _code_strings_and_names(path: Path) -> list[tuple[int, str]]:
    """String literals (not docstrings) and identifiers of a file."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
                docstrings.add(id(first.value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
    return out


def test_family_names_appear_only_in_the_registry():
    """Library code learns about families through the registry, never by name."""
    names = sorted(ji.families())
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "families.py":
            continue
        for line, text in _code_strings_and_names(path):
            text_l = re.sub(r"gemma[ _]?scope", "", text.lower())  # a SAE release's name, not the family
            hits = [n for n in names if n in text_l]
            assert not hits, f"{path.relative_to(ROOT.parent)}:{line} names family {hits} in {text!r}"
