"""What a result is keyed by: everything that changes it, known before any pixel is decoded.

A result row and its store prefix are named by (content sha256, model version, result key). The key
covers the pipeline's parameters (`PipelineConfig.key`), the model (checkpoint sha256, its scale and
preprocessing), the cell classifier (file sha256) and the scale the image is analysed at. `blastq run`,
the worker (both through `core.pipeline.field.process_slide` or `core.pipeline.wholeslide.process_whole_slide`) and
`blastq submit` (before queueing, to reuse a result) compute it here, so equal inputs give equal keys.

The scale part is the one the pipeline will use: a user mpp, else the file's metadata mpp (read from
the header), else an estimate from red cells. The estimate is a deterministic function of the content,
already in the key as its sha256, so it is keyed by the estimator's identity, not its value: submit
needs no decode.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from blastq.core.image import MppSource

if TYPE_CHECKING:
    from blastq.core.segment import ModelInfo


# What a key needs of the pipeline's and the whole-slide chunking's configs (core.pipeline.field.PipelineConfig,
# core.pipeline.wholeslide.WholeSlideConfig). Protocols, not imports: those modules import this one.
class PipelineConfig(Protocol):
    def key(self) -> str: ...


class WholeSlideConfig(Protocol):
    chunk_px: int
    margin_px: int


# Names `core.image.scale.estimate_scale` (7.5 um red cells: circles, granulometry and round isolated cells).
# Change it when the estimator changes: results with estimated scales are then computed again.
MPP_ESTIMATOR = "red-cells-7.5um-3-measures-1"
# Significant digits of a scale in the key: 0.08 and 0.1 differ, 0.2 and 0.2000001 do not.
MPP_DIGITS = 4
KEY_CHARS = 16  # the params_key columns hold 32


def scale_key(mpp: float | None, source: MppSource) -> str:
    """The scale part of a key: "user:0.1", "metadata:0.25" or "estimated:<estimator>"."""
    if source == "estimated":
        return f"estimated:{MPP_ESTIMATOR}"
    if mpp is None:
        raise ValueError(f"a {source} scale needs its mpp")
    return f"{source}:{float(mpp):.{MPP_DIGITS}g}"


@dataclass(frozen=True)
class ModelIdentity:
    """The parts of a key that come from the model and the classifier, as a worker would load them."""

    version: str
    sha256: str  # of the checkpoint file
    mpp: float  # the model's own scale
    preprocess: dict
    classifier_sha256: str = ""  # "" when no classifier types the cells

    @classmethod
    def of(cls, info: ModelInfo, classifier_sha256: str = "") -> ModelIdentity:
        return cls(info.version, info.sha256, info.mpp, dict(info.preprocess), classifier_sha256)


def result_key(config: PipelineConfig, model: ModelIdentity, scale: str) -> str:
    """The key of one image's result (a whole slide's wraps it: `whole_slide_result_key`)."""
    parts = {
        "pipeline": config.key(),
        "model_sha256": model.sha256,
        "model_mpp": model.mpp,
        "preprocess": model.preprocess,
        "classifier_sha256": model.classifier_sha256,
        "scale": scale,
    }
    return _digest(parts)


def whole_slide_result_key(image_key: str, wsi: WholeSlideConfig) -> str:
    """A whole slide's key: its image key and the chunking (chunks see slightly different context)."""
    return _digest([image_key, wsi.chunk_px, wsi.margin_px])


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def classifier_file_sha256(setting: str) -> str:
    """The sha256 a `classifier` setting's file has ("" for "none"), without loading the classifier.

    The same value `load_classifier` records in ClassifierInfo.sha256 (the file's bytes).
    """
    from blastq.core.cells import default_classifier_path
    from blastq.core.common import ModelNotFound, file_sha256

    if setting == "none":
        return ""
    path = default_classifier_path() if setting in ("", "default") else Path(setting)
    try:
        return file_sha256(path)
    except OSError as exc:
        raise ModelNotFound(f"classifier file not readable: {path} ({exc.strerror or exc})") from exc


def file_scale_key(path: str | Path, user_mpp: float | None) -> str:
    """The scale part of the key for a file, from its header only (what submit can know)."""
    from blastq.core.image import is_whole_slide, metadata_mpp, open_slide_reader, read_file

    if user_mpp is not None:
        return scale_key(user_mpp, "user")
    path = Path(path)
    if is_whole_slide(path):
        with open_slide_reader(path) as reader:
            found = reader.mpp
    else:
        found = metadata_mpp(read_file(path), str(path))
    return scale_key(found, "metadata") if found is not None else scale_key(None, "estimated")


def file_result_key(
    path: str | Path,
    user_mpp: float | None,
    config: PipelineConfig,
    model: ModelIdentity,
    wsi: WholeSlideConfig,
) -> str:
    """The key the worker will give this file's result, from its header: what `blastq submit` looks up."""
    from blastq.core.image import is_whole_slide

    key = result_key(config, model, file_scale_key(path, user_mpp))
    return whole_slide_result_key(key, wsi) if is_whole_slide(path) else key
