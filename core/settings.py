"""The one configuration object: BLASTQ_* environment variables over an optional TOML file over defaults.

Built once at the edge (CLI, worker) and passed in; nothing else reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from blastq.core.errors import InvalidConfig
from blastq.core.slide import DEFAULT_MAX_PIXELS
from blastq.core.stats import DEFAULT_BLAST_THRESHOLD_PERCENT


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "blastq"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str = ""  # default: sqlite:///<data_dir>/blastq.db
    store_url: str = ""  # default: file://<data_dir>/store
    model: str = ""  # checkpoint path; default: the model shipped in the package
    engine: str = "auto"
    device: str = "cpu"
    max_pixels: int = DEFAULT_MAX_PIXELS
    blast_threshold_percent: float = DEFAULT_BLAST_THRESHOLD_PERCENT
    tile_px: int = 256
    overlap_px: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'blastq.db'}")
        if not self.store_url:
            object.__setattr__(self, "store_url", f"file://{self.data_dir / 'store'}")
        if self.max_pixels < 1:
            raise InvalidConfig(f"max_pixels must be positive, got {self.max_pixels}")
        if not 0 < self.blast_threshold_percent <= 100:
            raise InvalidConfig(
                f"blast_threshold_percent must be in (0, 100], got {self.blast_threshold_percent}"
            )

    def describe(self) -> dict[str, str]:
        """Settings as printable strings, passwords masked."""
        return {f.name: mask_secret(str(getattr(self, f.name))) for f in fields(self)}


def mask_secret(url: str) -> str:
    """Hide the password in a URL such as postgresql://user:pw@host/db."""
    return re.sub(r"(//[^:/@]+:)[^@/]+@", r"\1***@", url)


def _coerce(name: str, raw: Any, kind: type) -> Any:
    try:
        if kind is Path:
            return Path(str(raw)).expanduser()
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidConfig(f"setting {name}: cannot read {raw!r} as {kind.__name__}") from exc


_TYPES = {
    "data_dir": Path,
    "max_pixels": int,
    "blast_threshold_percent": float,
    "tile_px": int,
    "overlap_px": int,
    "batch_size": int,
}


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from a TOML file (BLASTQ_CONFIG), then BLASTQ_<NAME> variables, then explicit overrides."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    names = {f.name for f in fields(Settings)}
    if cfg := env.get("BLASTQ_CONFIG"):
        path = Path(cfg).expanduser()
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise InvalidConfig(f"BLASTQ_CONFIG file not found: {path}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidConfig(f"BLASTQ_CONFIG is not valid TOML: {path}: {exc}") from exc
        unknown = set(data) - names
        if unknown:
            raise InvalidConfig(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        values.update(data)
    for name in names:
        if (raw := env.get(f"BLASTQ_{name.upper()}")) is not None:
            values[name] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    values = {k: _coerce(k, v, _TYPES.get(k, str)) for k, v in values.items()}
    data_dir = values.pop("data_dir", None) or _default_data_dir()
    return replace(Settings(data_dir=data_dir), **values) if values else Settings(data_dir=data_dir)
