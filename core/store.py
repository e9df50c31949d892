"""The object store adapter: where artifacts live. `file://` now; S3 is the scale-out setting.

Keys are '/'-separated (slides/<sha256>/<model version>/<name>). Writes are atomic and idempotent:
writing the same key twice leaves one object with the last content, never a partial file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from blastq.core.errors import InvalidConfig, StoreUnavailable


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad object key: {key!r}")
    return key


class FileStore:
    """Objects as files under a root folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)  # atomic: readers see the old object or the new one, never half
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {key} to {self.url}: {exc.strerror or exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {key} from {self.url}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


def open_store(url: str) -> ObjectStore:
    """A store for a URL: file:///path (s3:// arrives with the slide service)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(unquote(parsed.netloc + parsed.path)))
    raise InvalidConfig(f"unsupported store URL {url!r}: use file:///path")


def slide_prefix(sha256: str, model_version: str, params_key: str) -> str:
    """Where one slide's outputs go; the same inputs always give the same keys."""
    return f"slides/{sha256}/{model_version}/{params_key}"
