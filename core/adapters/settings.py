"""The one configuration object: BLASTQ_* environment variables over an optional TOML file over defaults.

Built once at the edge (CLI, worker) and passed in; nothing else reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

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


KEYS = frozenset({"secret_key"})  # secrets that are not URLs: never shown, even in part
_CHECKED = {"allow_inf_nan": False}  # NaN passes no comparison: refused like any other bad number


class Settings(BaseSettings):
    """Every setting, with its default: BLASTQ_<NAME> variables over a TOML file (BLASTQ_CONFIG) over these
    defaults, read by `load_settings`. A Settings built directly takes only the values it is given.
    URLs that may carry a password (database, broker) are SecretStr: printed, they show as ****."""

    model_config = SettingsConfigDict(env_prefix="BLASTQ_", frozen=True, extra="forbid")

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: SecretStr = SecretStr("")  # default: sqlite:///<data_dir>/blastq.db
    # default: Kombu's SQLAlchemy transport on SQLite, sqla+sqlite:///<data_dir>/broker.db; or redis://...
    broker_url: SecretStr = SecretStr("")
    store_url: str = ""  # default: file://<data_dir>/store; or s3://bucket/prefix
    s3_endpoint_url: str = (
        ""  # S3-compatible server (MinIO, Ceph...); empty: AWS. Credentials: AWS_* variables
    )
    s3_region: str = ""
    # A checkpoint path; default: the model shipped in the package. REGISTRY_MODEL ("registry"): the
    # registry's promoted version, followed by the workers between slides (the shipped one if none).
    model: str = ""
    # The cell classifier that types cells for the differential: "default" (shipped), "none", a file
    # written by `blastq compare-classifiers --save-best` or `blastq classifier train`, or "registry" (the
    # registry's promoted classifier, read when a worker process starts).
    classifier: str = "default"
    # Which cells are blasts: "" (the share rule, blast_cell_threshold) or a blast caller file fitted by
    # `blastq blast-caller fit` on the lab's labelled cells (core.cells.blastcall).
    blast_caller: str = ""
    engine: str = "auto"  # auto: TensorRT on CUDA if installed, else torch fp16; ONNX Runtime on CPU
    engine_cache_dir: str = ""  # derived engines (ONNX exports, TensorRT builds); default <data_dir>/engines
    device: str = "cpu"
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    blast_threshold_percent: float = Field(DEFAULT_BLAST_THRESHOLD_PERCENT, gt=0, le=100, **_CHECKED)
    # A cell's blast share at which it is called a blast: the screening operating point (model card).
    blast_cell_threshold: float = Field(DEFAULT_BLAST_CELL_THRESHOLD, gt=0, lt=1, **_CHECKED)
    # Fewer white cells than this (in an image, or pooled in a sample) give no verdict: "insufficient cells".
    min_white_cells: int = Field(DEFAULT_MIN_WHITE_CELLS, ge=0)
    # Tiles of up to tile_px (at the model's scale) overlapping by overlap_px: with overlap_px // 2 at least
    # the model's context (58 px for the shipped U-Net) the map is the whole-image answer, and 1024 px tiles
    # compute each output pixel ~1.2 times where 256 px ones did 1.8 (core.segment.tiling). ONNX Runtime on
    # 2 cores runs as many pixels per second at 256 as at 1536 px (benchmarks/bench_efficiency.py).
    tile_px: int = 1024
    overlap_px: int = 128
    # Tiles per engine call: one 1024 px tile is already twice the pixels of the old 8 x 256 px batch
    # (0.6 GB resident on CPU; 2 tiles: 0.9 GB, no faster). On a GPU more help (benchmarks/bench_gpu.py).
    batch_size: int = 1
    # Whole slides: chunk side at the model's scale. Peak memory grows with its square (3072: 1.7 GiB on
    # a 20k slide, benchmarks/bench_wsi_memory.py); smaller chunks repeat more margin tiles.
    wsi_chunk_px: int = 3072
    # Whole slides: the most pixels at the model's scale (a header claiming more is refused up front).
    max_slide_pixels: int = Field(DEFAULT_MAX_SLIDE_PIXELS, ge=1)
    # Deliveries of one job before it is failed (a slide that kills its worker).
    max_attempts: int = Field(3, ge=1)
    # Redis redelivers an unacknowledged job after this: more than the longest slide takes.
    visibility_timeout_s: int = Field(3600, ge=1)
    # A slide still running after this long is stopped and its job failed with the reason (prefork pool;
    # 30 s later its process is killed if it did not stop). 0: no limit. The default is the visibility
    # timeout: a slide longer than that would be delivered twice by Redis anyway.
    slide_time_limit_s: int = Field(3600, ge=0)
    # A slide hit by a transient fault (the database or the store did not answer) is retried, backing off
    # 1, 2, 4... s up to 60 s with full jitter, until this long after its first fault; then it fails marked
    # "transient:" (`blastq requeue --failed-transient` sends such jobs again). An hour rides out a
    # server's restart or a network cut; the former 6 retries gave up after ~31 s on average.
    transient_wait_s: float = Field(3600.0, ge=0, **_CHECKED)
    # At most this many retries of one task (slides: a safety cap under transient_wait_s; training runs:
    # their only bound), the same backoff.
    task_retry_max: int = Field(1000, ge=0)
    worker_concurrency: int = Field(1, ge=1)  # worker processes per `blastq worker`, each with its own engine
    # Each process that takes jobs writes a heartbeat this often; one not heard of for 3 heartbeats and 5 s
    # is dead, and `blastq requeue` sends the jobs it left running again at once.
    heartbeat_s: float = Field(10.0, ge=0.5, le=600, **_CHECKED)
    # `blastq worker`: Prometheus metrics and health on this port (/metrics, /healthz, /readyz); 0: none.
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # the address it listens on; 0.0.0.0 for a Prometheus on another host
    # `blastq watch`: a file unchanged this long is complete (no marker).
    watch_settle_s: float = Field(10.0, ge=0, **_CHECKED)
    watch_interval_s: float = Field(2.0, ge=0.01, **_CHECKED)  # `blastq watch`: seconds between scans
    # `blastq watch`: a file claimed but not submitted this long belongs to a dead watcher and is taken
    # over; keep it above the longest upload of one slide.
    watch_claim_timeout_s: float = Field(300.0, ge=1, **_CHECKED)
    # `blastq serve`: the key its session cookies are signed with; default: a random key kept in
    # <data_dir>/session-key (made on first use, readable by its owner only). Set the same key on every
    # process behind one proxy.
    secret_key: SecretStr = SecretStr("")
    session_hours: float = Field(12.0, gt=0, le=24 * 30, **_CHECKED)  # a review session's lifetime
    # Where `blastq serve` posts a signed-off sample's HL7 v2 ORU^R01 message (HTTP POST); "" posts nothing.
    lis_url: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Given values, then the environment load_settings reads (BLASTQ_*), then its TOML file: highest
        first. Outside load_settings only the given values count: nothing else reads the environment."""
        reading = _READING.get()
        if reading is None:
            return (init_settings,)
        environ, toml = reading
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvironmentSource(settings_cls, environ)]
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @model_validator(mode="before")
    @classmethod
    def _under_the_data_dir(cls, values: Any) -> Any:
        """The embedded services' defaults live under the data dir."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        data_dir = Path(str(values.get("data_dir") or _default_data_dir())).expanduser()
        values["data_dir"] = data_dir
        derived = {
            "database_url": f"sqlite:///{data_dir / 'blastq.db'}",
            # The embedded broker. Kombu's SQLAlchemy transport on SQLite takes each message in one BEGIN
            # IMMEDIATE transaction, so of several worker processes exactly one gets it, and a failed
            # publish raises. The filesystem transport moves message files without a lock and, across
            # file systems, by copy-then-delete, which can hand one message to two workers.
            "broker_url": f"sqla+sqlite:///{data_dir / 'broker.db'}",
            "store_url": f"file://{data_dir / 'store'}",
            "engine_cache_dir": str(data_dir / "engines"),
        }
        for name, default in derived.items():
            value = values.get(name)
            if not _plain(value):
                values[name] = default
        return values

    @model_validator(mode="after")
    def _blast_caller_readable(self) -> Settings:
        if self.blast_caller not in ("", "share"):
            from blastq.core.cells import caller_setting

            caller_setting(self.blast_caller)  # a file that is not a caller stops every command up front
        return self

    @property
    def worker_dead_after_s(self) -> float:
        """Seconds without a heartbeat after which a worker counts as dead (3 heartbeats and 5 s)."""
        return 3 * self.heartbeat_s + 5

    def updated(self, **changes: Any) -> Settings:
        """These settings with `changes`, checked as any others (InvalidConfig naming the setting)."""
        try:
            return type(self)(**{**dict(self), **changes})
        except ValidationError as exc:
            raise InvalidConfig(_one_line(exc)) from None

    def describe(self) -> dict[str, str]:
        """Settings as printable strings, passwords masked; a key (not a URL) shown only as set or not."""
        return {
            name: ("(set)" if value.get_secret_value() else "")
            if name in KEYS
            else mask_secret(str(_plain(value)))
            for name, value in self
        }


def _plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class _EnvironmentSource(EnvSettingsSource):
    """BLASTQ_* variables from a given mapping (the process environment, or a test's)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {key.lower(): value for key, value in environ.items()}  # case-insensitive names


# What load_settings reads: (environment, TOML file or None); None outside it.
_READING: ContextVar[tuple[Mapping[str, str], Path | None] | None] = ContextVar(
    "blastq_settings", default=None
)


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
    return Settings.model_fields[name].get_default(call_default_factory=True)


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


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from a TOML file (BLASTQ_CONFIG), then BLASTQ_<NAME> variables of `env` (default: this
    process's environment), then explicit `overrides` (None: not given). InvalidConfig, naming the
    setting, for a value blastq cannot use."""
    env = dict(os.environ if env is None else env)
    toml = None
    if cfg := env.get("BLASTQ_CONFIG"):
        toml = Path(cfg).expanduser()
        if not toml.is_file():
            raise InvalidConfig(f"BLASTQ_CONFIG file not found: {toml}")
        try:
            unknown = set(tomllib.loads(toml.read_text())) - set(Settings.model_fields)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidConfig(f"BLASTQ_CONFIG is not valid TOML: {toml}: {exc}") from exc
        if unknown:
            raise InvalidConfig(f"unknown setting(s) in {toml}: {', '.join(sorted(unknown))}")
    token = _READING.set((env, toml))
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise InvalidConfig(_one_line(exc)) from None
    finally:
        _READING.reset(token)


def _one_line(exc: ValidationError) -> str:
    """The first problem of a ValidationError as "setting NAME: reason (got VALUE)", the variable named."""
    error = exc.errors(include_url=False)[0]
    name = ".".join(str(part) for part in error["loc"]) or "settings"
    shown = error.get("input")
    if name in Settings.model_fields and Settings.model_fields[name].annotation is SecretStr:
        shown = "***"
    return f"setting {name} (BLASTQ_{name.upper()}): {error['msg']} (got {shown!r})"


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
        database = settings.database_url.get_secret_value()
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
    broker_url = settings.broker_url.get_secret_value()
    if queue and broker_url.startswith("sqla+sqlite:///"):
        broker = Path(broker_url.removeprefix("sqla+sqlite:///")).parent
        folders.append((broker, "the embedded broker's folder (BLASTQ_BROKER_URL)"))
    for folder, what in folders:
        check_writable_folder(folder, what)
