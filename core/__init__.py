"""blastq.core: the image path, in rooms that follow a slide from file to figures.

    image/      a file -> checked 8-bit RGB pixels at a known pixel size (inputs, slide, wsi, scale,
                preprocessing)
    segment/    pixels -> probability maps: the U-Net, the engines that run it, tiles and their stitching
    cells/      maps -> white cells: instances (touching cells split), crops, features, types, the blast
                call, and the statistics and verdicts of an image or a sample
    outputs/    a result -> files: masks, overlay, cells.csv/geojson, summary, report; pyramid TIFFs
    synth/      synthetic smears and whole slides with exact truth (tests, training)
    adapters/   the world outside: settings, the database, the object store, the model registry
    pipeline/   one field or a whole slide start to end, what a result is keyed by, the local runner
    common/     what every room shares: the error hierarchy, files written whole and their sha256

Each room imports only rooms above it in this list (common from anywhere), and names its
public API in its `__init__` (`__all__`): code outside a room imports from the room, never from one
of its modules, and no module imports another's private (`_`) names. tests/test_import_graph.py holds all
of this. A room's names are imported from their modules on first use, so `import blastq.core.cells`
costs nothing until a name is used: the CLI answers `--help` without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def room_api(
    package: str, modules: dict[str, tuple[str, ...]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]], dict[str, str]]:
    """A room's `__all__`, `__getattr__` and `__dir__`, and where each public name lives.

    `modules` maps each of the room's modules to the public names it defines. A name is looked up in its
    module on first use (PEP 562), so the room's modules load only when something of theirs is needed."""
    where: dict[str, str] = {}
    for module, names in modules.items():
        for name in names:
            if name in where:
                raise ValueError(f"{package}: {name} is named by both {where[name]} and {module}")
            where[name] = module

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return sorted(where), __getattr__, __dir__, where
