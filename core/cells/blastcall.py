"""The per-cell blast call: a small logistic model over the U-Net's blast share and the cell's measurements.

The U-Net's mean blast share ranks cells (`CellRecord.blast_probability`); whether a cell is called a
blast is decided here. Without a caller file the rule is the share alone against BLASTQ_BLAST_CELL_THRESHOLD
(`core.cells.instances`). A caller file (BLASTQ_BLAST_CALLER) replaces that rule with a logistic model over
CALLER_FEATURES, all measured in microns so they do not depend on the camera's scale, and its own
threshold, chosen for screening sensitivity when it was fitted.

A lab fits one from its own labelled cells in seconds (`blastq blast-caller fit`: blastq's cells.csv with a
column saying which cells are blasts): its stain, camera, magnification and its blasts, which no public
data set has. The file is JSON holding numbers only: loading it runs nothing, and every value is checked.
Its coefficients are part of the pipeline's parameters, so results computed with another caller are not
reused (`core.pipeline.resultkey`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blastq.core.common import InvalidConfig, atomic_write

CALLER_FORMAT = "blastq-blast-caller-1"
# What the model sees of a cell. The share enters as a logit (clipped at 1e-4): the U-Net's shares pile
# up near 0 and 1, and a logistic model is linear in the logit. Areas enter as logs: cells differ by
# factors, not by microns.
CALLER_FEATURES: tuple[str, ...] = (
    "blast_share_logit",
    "log_area_um2",
    "nc_ratio",
    "circularity",
    "log_nucleus_area_um2",
)
_SHARE_CLIP = 1e-4
_MAX_FILE_BYTES = 1 << 20  # a caller is a few hundred bytes; anything near this is not one


@dataclass(frozen=True)
class BlastCaller:
    """A fitted blast call: P(blast) = sigmoid(intercept + coef . (features - mean) / scale)."""

    version: str
    coef: tuple[float, ...]
    intercept: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    threshold: float  # a cell is a blast when P(blast) reaches this
    trained_on: str = ""
    # Figures the fit measured (held-out where it could hold out); shown, never used to decide.
    metrics: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        n = len(CALLER_FEATURES)
        for name in ("coef", "mean", "scale"):
            values = tuple(getattr(self, name))
            if len(values) != n or not all(_finite(v) for v in values):
                raise InvalidConfig(f"blast caller {name}: expected {n} finite numbers, got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(v <= 0 for v in self.scale):
            raise InvalidConfig(f"blast caller scale: every value must be > 0, got {self.scale}")
        if not _finite(self.intercept):
            raise InvalidConfig(f"blast caller intercept: expected a finite number, got {self.intercept!r}")
        if not (_finite(self.threshold) and 0 < self.threshold < 1):
            raise InvalidConfig(f"blast caller threshold must be in (0, 1), got {self.threshold!r}")
        if not isinstance(self.version, str) or not self.version:
            raise InvalidConfig("blast caller version: expected a non-empty name")

    def probability(self, features: np.ndarray) -> np.ndarray:
        """P(blast) for each row of a (N, len(CALLER_FEATURES)) feature array."""
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        score = self.intercept + z @ np.asarray(self.coef)
        return 1.0 / (1.0 + np.exp(-np.clip(score, -50.0, 50.0)))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CALLER_FORMAT,
            "version": self.version,
            "features": list(CALLER_FEATURES),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "mean": list(self.mean),
            "scale": list(self.scale),
            "threshold": self.threshold,
            "trained_on": self.trained_on,
            "metrics": dict(self.metrics),
        }

    def key(self) -> dict[str, Any]:
        """What decides calls (not the figures or the wording): enters the pipeline's result key."""
        return {
            "coef": [round(v, 9) for v in self.coef],
            "intercept": round(self.intercept, 9),
            "mean": [round(v, 9) for v in self.mean],
            "scale": [round(v, 9) for v in self.scale],
            "threshold": round(self.threshold, 9),
        }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def features_of(
    share: Sequence[float] | np.ndarray,
    area_um2: Sequence[float] | np.ndarray,
    nc_ratio: Sequence[float] | np.ndarray,
    circularity: Sequence[float] | np.ndarray,
    nucleus_area_um2: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """The (N, len(CALLER_FEATURES)) array of cells given by their measurements (CellRecord's columns)."""
    p = np.clip(np.asarray(share, np.float64), _SHARE_CLIP, 1.0 - _SHARE_CLIP)
    return np.stack(
        [
            np.log(p / (1.0 - p)),
            np.log(np.maximum(np.asarray(area_um2, np.float64), 1.0)),
            np.clip(np.asarray(nc_ratio, np.float64), 0.0, 1.0),
            np.clip(np.asarray(circularity, np.float64), 0.0, 1.0),
            np.log(np.maximum(np.asarray(nucleus_area_um2, np.float64), 0.1)),
        ],
        axis=1,
    ).reshape(-1, len(CALLER_FEATURES))


def read_caller(path: Path) -> BlastCaller:
    """A caller file, checked; any problem is one InvalidConfig line naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InvalidConfig(f"blast caller {path}: not a regular file")
        if size > _MAX_FILE_BYTES:
            raise InvalidConfig(f"blast caller {path}: {size} bytes is too large to be a blast caller file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except InvalidConfig:
        raise
    except OSError as exc:
        raise InvalidConfig(f"blast caller {path}: cannot read it ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidConfig(f"blast caller {path}: not a JSON file ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != CALLER_FORMAT:
        raise InvalidConfig(f"blast caller {path}: not a {CALLER_FORMAT} file")
    if data.get("features") != list(CALLER_FEATURES):
        raise InvalidConfig(
            f"blast caller {path}: features {data.get('features')!r} are not this blastq's "
            f"{list(CALLER_FEATURES)}"
        )
    metrics = data.get("metrics", {})
    trained_on = data.get("trained_on", "")
    try:
        return BlastCaller(
            version=data.get("version"),
            coef=tuple(data.get("coef") or ()),
            intercept=data.get("intercept"),
            mean=tuple(data.get("mean") or ()),
            scale=tuple(data.get("scale") or ()),
            threshold=data.get("threshold"),
            trained_on=trained_on if isinstance(trained_on, str) else "",
            metrics=metrics if isinstance(metrics, dict) else {},
        )
    except InvalidConfig as exc:
        raise InvalidConfig(f"{exc}", path=path) from exc
    except TypeError as exc:
        raise InvalidConfig(f"blast caller {path}: {exc}") from exc


def write_caller(caller: BlastCaller, path: Path) -> Path:
    return atomic_write(path, json.dumps(caller.to_json(), indent=1) + "\n")


def caller_setting(setting: str) -> BlastCaller | None:
    """The caller a BLASTQ_BLAST_CALLER setting names: "" or "share" (the share rule: None), or a file."""
    if setting in ("", "share"):
        return None
    return read_caller(Path(setting).expanduser())


def call_rule(threshold: float, caller: BlastCaller | None) -> str:
    """How a result's blasts were called, in words (summary.json `blast_call`)."""
    if caller is None:
        return f"blast share >= {threshold:g}"
    return f"blast caller {caller.version}: P(blast) >= {caller.threshold:g}"
