"""blastq's modules import one another without circles: every import counts, at the top, in a function or
under TYPE_CHECKING, since each is an edge a reader must follow and a circle means neither side can be
understood, tested or moved alone."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

TOP_PACKAGES = ("blastq", "blastq.core", "blastq.worker", "blastq.trainer", "blastq.cli", "blastq.migrations")


def _modules() -> dict[str, Path]:
    """Every blastq module name and its file, sub-packages included, found where the installed packages live."""
    out: dict[str, Path] = {}
    for name in TOP_PACKAGES:
        folder = Path(importlib.import_module(name).__file__).parent
        paths = (
            folder.glob("*.py") if name == "blastq" else folder.rglob("*.py")
        )  # blastq/: the others' parent
        for path in paths:
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((name, *parts))] = path
    return out


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The blastq modules that `module` (at `path`) imports, anywhere in the file."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from blastq.trainer import evaluate` imports a module; `from x import name`, the module x.
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_of_blastq_imports_itself_through_others():
    modules = _modules()
    assert "blastq.core.pipeline.field" in modules and "blastq.worker.tasks" in modules
    # Packages are not edges: importing blastq.core.x runs blastq.core/__init__, which imports nothing back.
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    graph = {m: {d for d in _imports(p, m, set(modules)) if d not in packages} for m, p in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("from blastq.core import b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from blastq.core.a import x\n")
    known = {"blastq.core.a", "blastq.core.b"}
    graph = {
        "blastq.core.a": _imports(a, "blastq.core.a", known),
        "blastq.core.b": _imports(b, "blastq.core.b", known),
    }
    assert graph == {"blastq.core.a": {"blastq.core.b"}, "blastq.core.b": {"blastq.core.a"}}
    assert _cycles(graph) == [["blastq.core.a", "blastq.core.b"]]
    assert _cycles({"x": {"y"}, "y": set()}) == []
