"""Files written whole or not at all, and their sha256: the one place blastq does either.

Readers of a model cache, an engine cache, the file store or a checkpoint may run in other processes at the
same moment as the writer; they must see the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PART_SUFFIX = ".part"  # a file being written: `.<name>.<random>.part` beside its target; listings skip them


def is_part_file(name: str) -> bool:
    """Whether a file name is one of atomic_path's temporary files (a write in progress or a killed one)."""
    return name.startswith(".") and name.endswith(PART_SUFFIX)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; when the block ends without error the file is
    flushed to disk and renamed onto `path` in one step, otherwise it is removed. The folder is created.

    The file is readable by all (0644), as an ordinary new file would be: a cache is shared between users."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)
        os.close(fd)
        yield tmp
        with tmp.open("rb+") as fh:  # what the block wrote is on disk before the name points at it
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to `path` whole or not at all (atomic_path); return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a regular file, streamed (hashlib.file_digest): memory stays bounded for any size.

    OSError for a missing file, a folder, or a file that is not regular (a device or pipe would never end
    or would block), and for a file whose size changed while it was read (its digest describes no file)."""
    path = Path(path)
    mode = path.stat().st_mode  # before opening: opening a pipe with no writer blocks
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest = hashlib.file_digest(fh, "sha256")
        if fh.tell() != size:
            raise OSError(errno.EIO, f"file changed size while being read (was {size} bytes)", str(path))
    return digest.hexdigest()
