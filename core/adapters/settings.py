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
from urllib.parse import urlsplit

from blastq.core.cells import (
    DEFAULT_BLAST_CELL_THRESHOLD,
    DEFAULT_BLAST_THRESHOLD_PERCENT,
    DEFAULT_MIN_WHITE_CELLS,
)
from blastq.core.common import InvalidConfig
from blastq.core.image import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SLIDE_PIXELS, check_writable_folder

REGISTRY_MODEL = "registry"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "blastq"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str = ""  # default: sqlite:///<data_dir>/blastq.db
    # default: Kombu's SQLAlchemy transport on SQLite, sqla+sqlite:///<data_dir>/broker.db; or redis://...
    broker_url: str = ""
    store_url: str = ""  # default: file://<data_dir>/store; or s3://bucket/prefix
    s3_endpoint_url: str = (
        ""  # S3-compatible server (MinIO, Ceph...); empty: AWS. Credentials: AWS_* variables
    )
    s3_region: str = ""
    # A checkpoint path; default: the model shipped in the package. REGISTRY_MODEL ("registry"): the
    # registry's promoted version, followed by the workers between slides (the shipped one if none).
    model: str = ""
    # The cell classifier that types cells for the differential: "default" (shipped), "none", or a file
    # written by `blastq compare-classifiers --save-best`.
    classifier: str = "default"
    # Which cells are blasts: "" (the share rule, blast_cell_threshold) or a blast caller file fitted by
    # `blastq blast-caller fit` on the lab's labelled cells (core.cells.blastcall).
    blast_caller: str = ""
    engine: str = "auto"  # auto: TensorRT on CUDA if installed, else torch fp16; ONNX Runtime on CPU
    engine_cache_dir: str = ""  # derived engines (ONNX exports, TensorRT builds); default <data_dir>/engines
    device: str = "cpu"
    max_pixels: int = DEFAULT_MAX_PIXELS
    blast_threshold_percent: float = DEFAULT_BLAST_THRESHOLD_PERCENT
    # A cell's blast share at which it is called a blast: the screening operating point (model card).
    blast_cell_threshold: float = DEFAULT_BLAST_CELL_THRESHOLD
    # Fewer white cells than this (in an image, or pooled in a sample) give no verdict: "insufficient cells".
    min_white_cells: int = DEFAULT_MIN_WHITE_CELLS
    tile_px: int = 256
    overlap_px: int = 64
    batch_size: int = 8
    # Whole slides: chunk side at the model's scale. Peak memory grows with its square (3072: 1.7 GiB on
    # a 20k slide, benchmarks/bench_wsi_memory.py); smaller chunks repeat more margin tiles.
    wsi_chunk_px: int = 3072
    # Whole slides: the most pixels at the model's scale (a header claiming more is refused up front).
    max_slide_pixels: int = DEFAULT_MAX_SLIDE_PIXELS
    max_attempts: int = 3  # deliveries of one job before it is failed (a slide that kills its worker)
    visibility_timeout_s: int = 3600  # Redis redelivers an unacknowledged job after this: > longest slide
    # Retries of a job hit by a transient fault (database, store): Celery backs off 1, 2, 4... s with full
    # jitter, so 6 retries wait about 31 s in all on average (the 1+2+4+8+16 s of 5 retries without jitter).
    task_retry_max: int = 6
    worker_concurrency: int = 1  # worker processes per `blastq worker`, each with its own engine
    watch_settle_s: float = 10.0  # `blastq watch`: a file unchanged this long is complete (no marker)
    watch_interval_s: float = 2.0  # `blastq watch`: seconds between scans of the folder
    # `blastq watch`: a file claimed but not submitted this long belongs to a dead watcher and is taken
    # over; keep it above the longest upload of one slide.
    watch_claim_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'blastq.db'}")
        if not self.broker_url:
            # The embedded broker. Kombu's SQLAlchemy transport on SQLite takes each message in one
            # BEGIN IMMEDIATE transaction, so of several worker processes exactly one gets it, and a
            # failed publish raises. The filesystem transport moves message files without a lock and,
            # across file systems, by copy-then-delete, which can hand one message to two workers.
            object.__setattr__(self, "broker_url", f"sqla+sqlite:///{self.data_dir / 'broker.db'}")
        if not self.store_url:
            object.__setattr__(self, "store_url", f"file://{self.data_dir / 'store'}")
        if not self.engine_cache_dir:
            object.__setattr__(self, "engine_cache_dir", str(self.data_dir / "engines"))
        if self.max_pixels < 1:
            raise InvalidConfig(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_slide_pixels < 1:
            raise InvalidConfig(f"max_slide_pixels must be positive, got {self.max_slide_pixels}")
        if not 0 < self.blast_cell_threshold < 1:
            raise InvalidConfig(f"blast_cell_threshold must be in (0, 1), got {self.blast_cell_threshold}")
        if self.blast_caller not in ("", "share"):
            from blastq.core.cells import caller_setting

            caller_setting(self.blast_caller)  # a file that is not a caller stops every command up front
        if not 0 < self.blast_threshold_percent <= 100:
            raise InvalidConfig(
                f"blast_threshold_percent must be in (0, 100], got {self.blast_threshold_percent}"
            )
        for name, least in (
            ("max_attempts", 1),
            ("visibility_timeout_s", 1),
            ("task_retry_max", 0),
            ("worker_concurrency", 1),
            ("min_white_cells", 0),
        ):
            if getattr(self, name) < least:
                raise InvalidConfig(f"{name} must be at least {least}, got {getattr(self, name)}")
        for name, least in (("watch_settle_s", 0), ("watch_interval_s", 0.01), ("watch_claim_timeout_s", 1)):
            if not getattr(self, name) >= least:  # `not >=`: NaN is refused too
                raise InvalidConfig(f"{name} must be at least {least}, got {getattr(self, name)}")

    def describe(self) -> dict[str, str]:
        """Settings as printable strings, passwords masked."""
        return {f.name: mask_secret(str(getattr(self, f.name))) for f in fields(self)}


# scheme://user:PASSWORD@host...: the password runs to the LAST "@" that a host follows, as people
# type passwords with "/", "@" or ":" unencoded. A query holding an "@" makes this mask more than the
# password (the host too): shown too little beats a password shown.
_USERINFO_SECRET = re.compile(
    r"^([a-z][a-z0-9+.\-]*://[^:/@?#;]*:)(.+)@(?=[^@/?#;]*(?:[/?#]|$))", re.I | re.S
)
# ?password=..., &pwd=..., ;sslpassword=..., ?token=...: any parameter naming a secret.
_QUERY_SECRET = re.compile(
    r"([?&;](?:[^=&#;]*(?:password|passwd|pwd|secret|token)[^=&#;]*|pass)=)([^&#;]*)", re.I
)
_NEXT_URL = re.compile(r";(?=[a-z][a-z0-9+.\-]*://)", re.I)  # sentinel://...;sentinel://...


def setting_default(name: str) -> Any:
    """A setting's default: written once, on Settings; the pipeline's and the whole-slide run's config
    objects (core.pipeline) take their defaults from here, so a bare PipelineConfig() is what the
    default settings ask for."""
    return Settings.__dataclass_fields__[name].default


def check_server_url(name: str, url: str) -> None:
    """Refuse a URL whose host part does not parse (a password with an unencoded "/" or "@" moves the
    split), before a client fails on it: Kombu's with a traceback quoting a piece of the password."""
    for part in _NEXT_URL.split(url):
        try:
            _ = urlsplit(part).port  # parsing the port is what fails
        except ValueError:
            raise InvalidConfig(
                f"{name} does not parse as a URL: {mask_secret(part)} (write '/', '@' and ':' in a user name "
                "or password as %2F, %40 and %3A)"
            ) from None


def url_secrets(url: str) -> list[str]:
    """The passwords and secret query values in a URL (or in several, joined by ";"), as written."""
    found = []
    for part in _NEXT_URL.split(url):
        if (m := _USERINFO_SECRET.match(part)) and m.group(2):
            found.append(m.group(2))
        found.extend(m.group(2) for m in _QUERY_SECRET.finditer(part) if m.group(2))
    return found


def hide_secrets(text: str, url: str) -> str:
    """`text` (an error message) with the secrets of `url` masked, whole and in the pieces a parser that
    ends a password at its first "@", "/" or ":" splits off (shown as host, port or database)."""
    secrets = set(url_secrets(url))
    pieces = {piece for s in secrets for piece in re.split(r"[@/:]", s) if piece}
    for secret in sorted(secrets | {p for p in pieces if len(p) >= 3}, key=len, reverse=True):
        text = text.replace(secret, "***")
    for piece in pieces:  # short pieces only where quoted (host 'ss'): elsewhere they are ordinary text
        text = text.replace(f"'{piece}'", "'***'").replace(f'"{piece}"', '"***"')
    return text


def mask_secret(url: str) -> str:
    """The URL with every password shown as ***: user:pw@host (any characters in pw), redis://:pw@host,
    ?password= (or pass, pwd, secret, token) in the query; each URL of a ";"-joined list."""
    parts = []
    for part in _NEXT_URL.split(url):
        part = _USERINFO_SECRET.sub(r"\1***@", part, count=1)
        parts.append(_QUERY_SECRET.sub(lambda m: f"{m.group(1)}***" if m.group(2) else m.group(0), part))
    return ";".join(parts)


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
    "blast_cell_threshold": float,
    "min_white_cells": int,
    "tile_px": int,
    "overlap_px": int,
    "batch_size": int,
    "wsi_chunk_px": int,
    "max_slide_pixels": int,
    "max_attempts": int,
    "visibility_timeout_s": int,
    "task_retry_max": int,
    "worker_concurrency": int,
    "watch_settle_s": float,
    "watch_interval_s": float,
    "watch_claim_timeout_s": float,
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


def check_local_folders(
    settings: Settings, *, record: bool = True, engine: bool = True, queue: bool = False
) -> None:
    """Refuse, before any work, a local folder blastq will write into but cannot: the SQLite database's
    and the file store's (`record`), the engine cache (`engine`), the embedded broker's (`queue`).

    Otherwise a read-only data directory shows up late and as something else: "database not
    reachable", or an engine silently falling back to torch for want of its cached export.
    """
    folders: list[tuple[Path, str]] = []
    if record:
        database = settings.database_url
        if database.startswith("sqlite:///"):
            file = database.removeprefix("sqlite:///").split("?")[0]
            if file and file != ":memory:" and not file.startswith("file:"):
                folders.append(
                    (Path(file).parent, "the database folder (BLASTQ_DATA_DIR, BLASTQ_DATABASE_URL)")
                )
        if settings.store_url.startswith("file://"):
            folders.append(
                (Path(settings.store_url.removeprefix("file://")), "the store folder (BLASTQ_STORE_URL)")
            )
    if engine and settings.engine != "torch":  # the others export or build into the cache
        folders.append((Path(settings.engine_cache_dir), "the engine cache (BLASTQ_ENGINE_CACHE_DIR)"))
    if queue and settings.broker_url.startswith("sqla+sqlite:///"):
        broker = Path(settings.broker_url.removeprefix("sqla+sqlite:///")).parent
        folders.append((broker, "the embedded broker's folder (BLASTQ_BROKER_URL)"))
    for folder, what in folders:
        check_writable_folder(folder, what)
