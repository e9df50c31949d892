"""Scratch folders for a run's temporary spool files: removed on exit, and a killed run's at the next start.

A whole slide spools rasters and pyramid levels to disk (tens of GB for a large scan, sparse where it is
plasma). A folder is removed when its `with` block ends, normally or by an exception; a process killed
outright (SIGKILL, out of memory) cannot clean up, so every new scratch folder first removes those left
by processes of this host that are no longer running. The folder's name says whose it is:
`blastq-scratch-<host>-<pid>-<random>` under the system's temporary folder (TMPDIR).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "blastq-scratch-"


def _host() -> str:
    # Only characters that keep the name parseable: the pid follows the last "-" of the host part.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: running
    return True


def clean_stale(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders under root left by dead processes of this host; return them."""
    root = Path(root if root is not None else tempfile.gettempdir())
    pattern = re.compile(rf"^{re.escape(PREFIX)}{re.escape(_host())}-(\d+)-")
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def new_scratch_folder(root: str | Path | None = None) -> Path:
    """A new, private scratch folder (after removing those of dead processes); the caller removes it."""
    root = Path(root if root is not None else tempfile.gettempdir())
    clean_stale(root)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{_host()}-{os.getpid()}-", dir=root))


@contextlib.contextmanager
def scratch_folder(root: str | Path | None = None) -> Iterator[Path]:
    """A new, private scratch folder, removed with everything in it when the block ends."""
    path = new_scratch_folder(root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
