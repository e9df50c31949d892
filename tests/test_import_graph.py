"""blastq's import graph: no circles, rooms that follow the flow, and each room's door.

Every import counts, at the top, in a function or under TYPE_CHECKING, since each is an edge a reader must
follow and a circle means neither side can be understood, tested or moved alone. core/ is in rooms
(core/__init__.py lists them): code outside a room imports the names its `__init__` makes public, never a
module inside it, and no module imports another's private names. Tests are exempt from the door: a test of
a module may reach into it."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _rooms() -> dict[str, dict[str, str]]:
    """Each room of core (a package with a room API) and where each of its public names lives."""
    core = Path(importlib.import_module("blastq.core").__file__).parent
    out = {}
    for init in sorted(core.glob("*/__init__.py")):
        room = importlib.import_module(f"blastq.core.{init.parent.name}")
        out[room.__name__] = {name: f"{room.__name__}.{module}" for name, module in room._PUBLIC.items()}
    return out


def _imports(
    path: Path, module: str, known: set[str], doors: dict[str, dict[str, str]] | None = None
) -> set[str]:
    """The blastq modules that `module` (at `path`) imports, anywhere in the file; a name imported from a
    room's door (`doors`) is an edge to the module that defines it."""
    doors = doors or {}
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
            names = [doors.get(base, {}).get(alias.name, f"{base}.{alias.name}") for alias in node.names]
            names.append(base)
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
    # A package counts as the module its __init__ is: a room's imports only room_api from blastq.core; a
    # package like core/adapters/db imports its modules (an edge to each).
    doors = _rooms()
    graph = {m: _imports(p, m, set(modules), doors) for m, p in modules.items()}
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


def test_a_name_taken_from_a_rooms_door_is_an_edge_to_the_module_that_defines_it(tmp_path):
    user = tmp_path / "user.py"
    user.write_text("def f():\n    from blastq.core.cells import LABEL_BLAST, CellMaps\n")
    known = {"blastq.core.cells", "blastq.core.cells.instances", "blastq.worker.user"}
    edges = _imports(user, "blastq.worker.user", known, _rooms())
    assert edges == {"blastq.core.cells", "blastq.core.cells.instances"}


REPO = Path(__file__).resolve().parents[1]
_MODULE_NAMES = frozenset(_modules())


def _code_files() -> dict[Path, str]:
    """blastq's own code outside tests (the packages, benchmarks, docs' scripts), each with its room
    ("" outside core's rooms)."""
    files = {path: "" for path in _modules().values()}
    for folder in ("benchmarks", "docs"):
        files.update({path: "" for path in (REPO / folder).rglob("*.py")})
    core = Path(importlib.import_module("blastq.core").__file__).parent
    for path in files:
        if path.is_relative_to(core) and len(parts := path.relative_to(core).parts) > 1:
            files[path] = f"blastq.core.{parts[0]}"
    return files


def _door_breaches(path: Path, own_room: str, rooms: dict[str, dict[str, str]]) -> list[str]:
    """Where a file reaches past a room's door: a module inside another room, a name the room does not
    make public, or a private name of another module."""
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = set()  # names bound to blastq modules: `from blastq.core.image import slide as slide_io`
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("blastq."):
                    aliases.add(alias.asname or alias.name.split(".")[0])
                room = ".".join(alias.name.split(".")[:3])
                if room in rooms and alias.name != room and room != own_room:
                    out.append(f"{where} imports {alias.name}, inside {room}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blastq."):
            module = node.module
            room = ".".join(module.split(".")[:3])
            for alias in node.names:
                if alias.name.startswith("_"):
                    out.append(f"{where} imports {module}.{alias.name}, a private name")
                if f"{module}.{alias.name}" in _MODULE_NAMES:
                    aliases.add(alias.asname or alias.name)
            if room in rooms and room != own_room:
                if module != room:
                    out.append(f"{where} imports from {module}, inside {room}")
                else:
                    hidden = sorted({a.name for a in node.names} - set(rooms[room]))
                    if hidden:
                        out.append(f"{where} imports {hidden} from {room}, which does not make them public")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            out.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}, a private name")
    return out


def test_code_outside_a_room_uses_only_what_its_door_makes_public():
    rooms = _rooms()
    files = _code_files()
    assert any(room == "blastq.core.cells" for room in files.values())
    breaches = [b for path, room in sorted(files.items()) for b in _door_breaches(path, room, rooms)]
    assert breaches == []


def test_the_door_check_sees_a_module_reached_into_a_hidden_name_and_a_private_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from blastq.core.image.slide import read_slide\n"
        "from blastq.core.image import tiff_mpp\n"
        "from blastq.core.image import slide as slide_io\n"
        "from blastq.trainer.reporting import _nothing\n"
        "slide_io._invert\n"
    )
    breaches = _door_breaches(bad, "", _rooms())
    assert len(breaches) == 5, breaches
    assert "inside blastq.core.image" in breaches[0] or "inside blastq.core.image" in " ".join(breaches)
    # The same imports from inside the room are its own business, except the private names.
    assert len(_door_breaches(bad, "blastq.core.image", _rooms())) == 2


def test_rooms_depend_on_one_another_without_circles():
    rooms = _rooms()
    modules = _modules()
    graph: dict[str, set[str]] = {room: set() for room in rooms}
    for module, path in modules.items():
        room = ".".join(module.split(".")[:3])
        if room not in rooms:
            continue
        for target in _imports(path, module, set(modules), rooms):
            other = ".".join(target.split(".")[:3])
            if other in rooms and other != room:
                graph[room].add(other)
    assert graph["blastq.core.pipeline"] >= {"blastq.core.image", "blastq.core.segment", "blastq.core.cells"}
    assert _cycles(graph) == []
    # And in the order blastq.core's docstring lists them: each room imports only rooms above it.
    doc = importlib.import_module("blastq.core").__doc__
    order = [f"blastq.core.{m}" for m in re.findall(r"^    (\w+)/ ", doc, re.M)]
    assert sorted(order) == sorted(rooms)
    upward = [
        (r, o)
        for r, targets in graph.items()
        for o in targets
        if o != "blastq.core.common" and order.index(o) > order.index(r)
    ]
    assert upward == []


@pytest.mark.parametrize("room", sorted(_rooms()))
def test_a_room_states_its_public_api_and_each_name_is_defined_where_it_says(room):
    package = importlib.import_module(room)
    where = _rooms()[room]
    assert package.__all__ == sorted(where) and dir(package) == package.__all__
    folder = Path(package.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    modules |= {p.parent.name for p in folder.glob("*/__init__.py")}  # a module may be a package (db)
    assert {m.rpartition(".")[2] for m in where.values()} <= modules
    for name in package.__all__:
        assert not name.startswith("_") and name not in modules  # a module would shadow the name
        value = getattr(package, name)
        defined_in = value.__module__ if inspect.isclass(value) or inspect.isfunction(value) else None
        inside = defined_in is None or defined_in == where[name] or defined_in.startswith(f"{where[name]}.")
        assert inside, f"{room}.{name} comes from {defined_in}, not {where[name]}"
        assert getattr(importlib.import_module(where[name]), name) is value
    with pytest.raises(AttributeError, match=f"{room}.*no_such_name"):
        package.no_such_name  # noqa: B018


def test_a_room_rejects_a_name_two_of_its_modules_claim():
    from blastq.core import room_api

    with pytest.raises(ValueError, match="read_slide is named by both slide and wsi"):
        room_api("blastq.core.image", {"slide": ("read_slide",), "wsi": ("read_slide",)})


def test_importing_a_room_loads_none_of_its_modules_and_the_cli_starts_without_torch():
    code = (
        "import sys, blastq.core.cells, blastq.cli.main\n"
        "assert 'torch' not in sys.modules and 'blastq.core.cells.instances' not in sys.modules\n"
        "blastq.core.cells.LABEL_BLAST\n"
        "assert 'blastq.core.cells.instances' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
