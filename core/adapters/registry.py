"""The model registry: model versions in the database, their checkpoints in the object store.

A version is registered as a candidate with its metrics, training config and data split; its
checkpoint goes to the store under `models/<version>/<sha256>.pt`. Promotion makes it the model the
workers load (`BLASTQ_MODEL=registry`); the version promoted before is retired, and `rollback` brings
the most recently retired one back. A candidate is promoted only if it is not worse than the promoted
one on the fixed validation set (its recorded `validation_score`), unless forced.

Cell classifiers (kind "classifier", `blastq classifier train --register`) live beside the U-Nets, one
promoted of each kind (`BLASTQ_CLASSIFIER=registry`). A classifier candidate carries its own verdict: it
was judged against the classifier it started from on the lab's held-out samples and the shipped test cells
(`acceptable`, `base` in its metrics), and is promoted only when that verdict says not worse and the
classifier it was judged against is the one in use (the promoted one, or the shipped one when none is).

Checkpoints are verified by sha256 before they are loaded: the bytes from the store before the local
copy is written, and again as `UNet.from_checkpoint` reads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from blastq.core.adapters.db import (
    ModelVersion,
    add_model,
    get_model_row,
    model_rows,
    promote_model_row,
    promoted_model_row,
)
from blastq.core.adapters.store import ObjectStore
from blastq.core.common import InvalidConfig, ModelInvalid, ModelNotFound, atomic_write, file_sha256
from blastq.core.segment import UNet

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = [
    "DEFAULT_METRIC",
    "ModelVersion",
    "checkpoint_key",
    "fetch_checkpoint",
    "get_model",
    "list_models",
    "promote",
    "promoted",
    "register_model",
    "rollback",
]

DEFAULT_METRIC = "validation_score"  # higher is better; measured on the fixed validation set
# A version names a store folder and a result path (slides/<sha256>/<version>/...).
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def checkpoint_key(version: str, sha256: str) -> str:
    """The store key of a version's checkpoint."""
    return f"models/{version}/{sha256}.pt"


def _identify(path: Path, kind: str):
    """(version, sha256) of a checkpoint of `kind`, loaded the safe way (ModelInvalid if it is not one)."""
    if kind == "unet":
        _, info = UNet.from_checkpoint(path)
        return info.version, info.sha256
    if kind == "classifier":
        from blastq.core.cells import load_cell_classifier

        info = load_cell_classifier(str(path)).info
        return info.version, info.sha256
    raise InvalidConfig(f"unknown model kind {kind!r} (unet or classifier)")


def register_model(
    db: Engine,
    store: ObjectStore,
    checkpoint_path: str | Path,
    *,
    metrics: dict,
    config: dict | None = None,
    split: dict | None = None,
    kind: str = "unet",
) -> ModelVersion:
    """Register a checkpoint as a candidate under the version it records; returns the registry's row.

    The same version with the same bytes again returns the existing row (the upload is redone only if
    the object is missing). The same version with other bytes is refused: versions name results.
    """
    path = Path(checkpoint_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelNotFound(f"model file not found: {path}") from None
    except OSError as exc:
        raise ModelInvalid(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    sha256 = hashlib.sha256(data).hexdigest()
    version, loaded_sha256 = _identify(path, kind)  # a blastq model of that kind, loadable safely
    if loaded_sha256 != sha256:
        raise ModelInvalid(f"{path} changed while it was being registered; try again")
    if not _VERSION.fullmatch(version):
        raise InvalidConfig(
            f"model version {version!r} cannot be registered: use 1-64 characters of "
            "letters, digits and . _ + - (starting with a letter or digit)",
            path=path,
        )
    for name, value in (("metrics", metrics), ("config", config or {}), ("split", split or {})):
        if not isinstance(value, dict):
            raise InvalidConfig(f"model {name} must be a JSON object, got {type(value).__name__}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise InvalidConfig(f"model {name} cannot be stored as JSON: {exc}") from exc

    key = checkpoint_key(version, sha256)
    existing = get_model_row(db, version)
    if existing is None:
        # The object first: a row never names a checkpoint the store does not hold.
        store.put(key, data)
        existing = add_model(
            db,
            version=version,
            sha256=sha256,
            checkpoint_key=key,
            metrics=metrics,
            config=config or {},
            split=split or {},
            kind=kind,
        )
        if existing is None:  # registered by someone else meanwhile
            existing = _get(db, version)
    if existing.kind != kind:
        raise InvalidConfig(
            f"version {version} is registered already as a {existing.kind}: give it another name"
        )
    if existing.sha256 != sha256:
        raise InvalidConfig(
            f"model version {version} is registered already with sha256 {existing.sha256[:12]}, and "
            f"{path} has sha256 {sha256[:12]}: give the new model a version of its own"
        )
    if not store.exists(existing.checkpoint_key):
        store.put(existing.checkpoint_key, data)
    return existing


def list_models(db: Engine, kind: str | None = None) -> list[ModelVersion]:
    """Every registered version (of `kind` when given), oldest first."""
    return model_rows(db, kind=kind)


def get_model(db: Engine, version: str) -> ModelVersion | None:
    """The registered version; None for an unknown one."""
    return get_model_row(db, version)


def promoted(db: Engine, kind: str = "unet") -> ModelVersion | None:
    """The version of `kind` the workers should run; None when none is promoted (the shipped one)."""
    return promoted_model_row(db, kind)


def promote(db: Engine, version: str, *, force: bool = False, metric: str = DEFAULT_METRIC) -> ModelVersion:
    """Promote `version` and retire the promoted one, in one locked transaction.

    Refused when the candidate's `metric` is lower than the promoted version's, or either lacks it,
    unless `force`. Promoting the promoted version changes nothing.
    """

    def check(target: ModelVersion | None, current: ModelVersion | None) -> None:
        if target is None:
            raise InvalidConfig(f"no model version {version} in the registry")
        if target is not None and target.kind == "classifier":
            if not force:
                _check_classifier(target, current)
            return
        if force or current is None or current.version == target.version:
            return
        mine, theirs = _score(target, metric), _score(current, metric)
        if mine is None or theirs is None:
            lacking = target.version if mine is None else current.version
            raise InvalidConfig(
                f"model {lacking} has no numeric {metric} metric to compare; use --force to promote anyway"
            )
        if mine < theirs:
            raise InvalidConfig(
                f"model {target.version} is worse than the promoted {current.version} on {metric} "
                f"({mine:g} < {theirs:g}); use --force to promote anyway"
            )

    return promote_model_row(db, version, check)


def _check_classifier(target: ModelVersion, current: ModelVersion | None) -> None:
    """A classifier's own verdict, against the classifier in use (see the module's docstring)."""
    if current is not None and current.version == target.version:
        return
    if target.metrics.get("acceptable") is not True:
        why = "; ".join(target.metrics.get("reasons", [])) or "it records no verdict"
        raise InvalidConfig(
            f"classifier {target.version} was not found not worse than its base ({why}); use --force to promote anyway"
        )
    if current is not None:
        in_use = current.version
    else:
        from blastq.core.cells import load_cell_classifier

        in_use = load_cell_classifier("default").info.version
    base = target.metrics.get("base")
    if base != in_use:
        raise InvalidConfig(
            f"classifier {target.version} was judged against {base}, but {in_use} is in use: train it again "
            "from the one in use (--base), or use --force"
        )


def rollback(db: Engine, kind: str = "unet") -> ModelVersion:
    """Promote again the most recently retired version of `kind` and retire the promoted one; returns it.

    Two rollbacks in a row swap back: the version rolled back from is then the most recently retired.
    """

    def check(target: ModelVersion | None, current: ModelVersion | None) -> None:
        if target is None:
            what = "model" if kind == "unet" else kind
            raise InvalidConfig(f"no retired {what} version to roll back to")

    return promote_model_row(db, None, check, kind)


def fetch_checkpoint(store: ObjectStore, model: ModelVersion, cache_dir: str | Path) -> Path:
    """The version's checkpoint as a local file under `cache_dir`, named by its sha256, verified.

    A cached file is reused when its sha256 matches. A download is checked before the file is written
    and again by loading it; any mismatch raises ModelNotFound ("checksum mismatch").
    """
    path = Path(cache_dir) / f"{model.sha256}.pt"
    if path.is_file() and file_sha256(path) == model.sha256:
        return path
    try:
        data = store.get(model.checkpoint_key)
    except FileNotFoundError:
        raise ModelNotFound(
            f"model {model.version}: checkpoint {model.checkpoint_key} is missing from {store.url}"
        ) from None
    got = hashlib.sha256(data).hexdigest()
    if got != model.sha256:
        raise ModelInvalid(
            f"model {model.version}: checksum mismatch for {model.checkpoint_key} in {store.url} "
            f"(sha256 {got[:12]}, the registry has {model.sha256[:12]})"
        )
    atomic_write(path, data)
    version, sha256 = _identify(path, model.kind)
    if sha256 != model.sha256 or version != model.version:
        path.unlink(missing_ok=True)
        raise ModelInvalid(
            f"model {model.version}: checksum mismatch for {path} (it holds {version}, sha256 {sha256[:12]})"
        )
    return path


def _get(db: Engine, version: str) -> ModelVersion:
    model = get_model_row(db, version)
    if model is None:
        raise InvalidConfig(f"no model version {version} in the registry")
    return model


def _score(model: ModelVersion, metric: str) -> float | None:
    value = model.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)
