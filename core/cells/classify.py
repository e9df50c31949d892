"""Cell classifiers: which white-cell type each segmented cell is, with probabilities.

A classifier file is a torch checkpoint read with `weights_only=True` that holds plain data only:
  format, kind, version, cell_types, metrics, trained_on; a torch state dict for the deep parts; the
  scikit-learn parts as skops bytes (skops builds only the types it trusts by default and those named in
  `ALLOWED_SKLEARN_TYPES`; a file naming any other type is refused before anything is built).
Kinds: `svm` and `random_forest` (scikit-learn on `core.cells.features`), `cnn` (`core.cells.cellnets.CropCNN` on
crops), `unet_encoder_linear` (the frozen U-Net encoder's features, a scikit-learn linear head).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from blastq.core.cells.cellcrops import (
    CELL_TYPES,
    CellCrop,
    crops_from_instances,
    crops_to_array,
    normalised_views,
)
from blastq.core.cells.instances import LABEL_BLAST, CellMaps, failure_reason, joined_reasons
from blastq.core.common import ModelInvalid, ModelNotFound, atomic_write, timed
from blastq.core.image import resample_to_shape
from blastq.core.segment import load_plain

CLASSIFIER_FORMAT = "blastq-cell-classifier-1"
KINDS = ("svm", "random_forest", "cnn", "unet_encoder_linear")
SKLEARN_KINDS = ("svm", "random_forest", "unet_encoder_linear")
TORCH_KINDS = ("cnn", "unet_encoder_linear")
# Below this top probability a cell is marked for review: with six classes, 0.6 means the runner-up
# has at most 0.4 - the classifier prefers one type clearly, not by a coin toss.
REVIEW_BELOW = 0.6
# The types beyond skops' own defaults that blastq's classifiers hold, by exact name. Derived with
# skops.io.get_untrusted_types (skops 0.16, scikit-learn 1.9) on the shipped classifier (an SVM pipeline:
# none) and on every model trainer/compare.py saves (StandardScaler + SVC, StandardScaler +
# LogisticRegression: none; RandomForestClassifier: its trees). A rule by package prefix is not enough:
# a crafted file can name any function of an allowed package (numpy's test helpers call exec) and skops
# calls it while loading. Add a name here only with the model that needs it, and a test that saves it.
ALLOWED_SKLEARN_TYPES: frozenset[str] = frozenset(
    {
        "sklearn.tree._tree.Tree",  # skops leaves it untrusted because its node indices are unchecked:
        # _check_tree checks them after loading, before any prediction walks them
    }
)
# A cell the classifier could not see (its crop or features failed, or it has no pixels at the crop scale)
# gets the same probability for every type: the classifier said nothing about it, and its p_* columns
# still sum to 1 like every other cell's. reconcile then keeps the segmentation's blast call (the count the
# verdict rests on) and names a normal cell by the first normal type (neutrophil, also the commonest white
# cell in blood) at a probability of 1/5: a placeholder under review, never a confident answer, so the
# differential stays complete and review_reason says why the cell was not typed.
UNTYPED_PROBABILITIES = np.full(len(CELL_TYPES), 1.0 / len(CELL_TYPES), np.float32)
FEATURE_KINDS = ("svm", "random_forest")  # scikit-learn on core.cells.features
_BATCH = 64


@dataclass(frozen=True)
class ClassifierInfo:
    """What a classifier file says about itself."""

    version: str
    kind: str
    cell_types: tuple[str, ...] = CELL_TYPES
    trained_on: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of the file; filled on load


class CellClassifier:
    """A loaded classifier: `predict_proba(normalised crops) -> (N, len(CELL_TYPES))` float32."""

    def __init__(self, info: ClassifierInfo, sklearn_model: Any = None, torch_model: Any = None):
        if info.kind not in KINDS:
            raise ValueError(f"unknown classifier kind {info.kind!r} (one of {', '.join(KINDS)})")
        self.info = info
        self.sklearn_model = sklearn_model
        self.torch_model = torch_model

    def predict_proba(self, crops: Sequence[CellCrop]) -> np.ndarray:
        """Probabilities over CELL_TYPES per crop; columns the model never saw are 0."""
        out = np.zeros((len(crops), len(CELL_TYPES)), np.float32)
        if not crops:
            return out
        if self.info.kind == "cnn":
            return self._torch_probabilities(crops)
        if self.info.kind == "unet_encoder_linear":
            x = self._torch_outputs(crops)
        else:
            from blastq.core.cells.features import features_matrix

            x = features_matrix(crops)
        probs = self.sklearn_model.predict_proba(x)
        # The estimator's classes are indices into the file's cell_types; map them onto CELL_TYPES.
        for column, cls in enumerate(self.sklearn_model.classes_):
            out[:, CELL_TYPES.index(self.info.cell_types[int(cls)])] = probs[:, column]
        return out

    def predict_cells(self, crops: Sequence[CellCrop]) -> tuple[np.ndarray, tuple[str, ...]]:
        """predict_proba, where a cell that cannot be measured or typed costs only itself.

        Returns the probabilities and, per crop, "" or why it has none (its row is then
        UNTYPED_PROBABILITIES). Raises only when the model itself fails on every cell it was given.
        """
        n = len(crops)
        try:
            return self.predict_proba(crops), ("",) * n
        except MemoryError:
            raise
        except Exception as exc:
            batch_error = exc
        # One crop that cannot be measured or typed must not cost the others their type: one at a time.
        out = np.tile(UNTYPED_PROBABILITIES, (n, 1))
        reasons = [""] * n
        for i, crop in enumerate(crops):
            try:
                out[i] = self.predict_proba([crop])[0]
            except MemoryError:
                raise
            except Exception as exc:
                reasons[i] = failure_reason(self._failed_stage(crop), exc)
        if all(r.startswith("typing failed") for r in reasons):
            raise batch_error  # every cell measured, none typed: the model is at fault, not a cell
        return out, tuple(reasons)

    def _failed_stage(self, crop: CellCrop) -> str:
        """Which step failed on a crop predict_proba refused: "features" (the hand-made ones) or "typing"."""
        if self.info.kind in FEATURE_KINDS:
            from blastq.core.cells import features

            try:
                features.cell_features(crop)
            except Exception:
                return "features"
        return "typing"

    def _torch_outputs(self, crops: Sequence[CellCrop]) -> np.ndarray:
        import torch

        outputs = []
        with torch.inference_mode():
            for start in range(0, len(crops), _BATCH):
                x = torch.from_numpy(crops_to_array(crops[start : start + _BATCH]))
                outputs.append(self.torch_model(x).float().numpy())
        return np.concatenate(outputs)

    def _torch_probabilities(self, crops: Sequence[CellCrop]) -> np.ndarray:
        logits = self._torch_outputs(crops)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        out = np.zeros((len(crops), len(CELL_TYPES)), np.float32)
        for column, name in enumerate(self.info.cell_types):
            out[:, CELL_TYPES.index(name)] = probs[:, column]
        return out


def save_classifier(
    path: Path,
    info: ClassifierInfo,
    *,
    sklearn_model: Any = None,
    torch_model: Any = None,
    torch_arch: dict[str, Any] | None = None,
) -> str:
    """Write a classifier file; return its sha256.

    torch_arch: the constructor arguments that rebuild `torch_model` (CropCNN's, or the U-Net's `arch()`
    for `unet_encoder_linear`).
    """
    import skops.io as sio
    import torch

    if info.kind not in KINDS:
        raise ValueError(f"unknown classifier kind {info.kind!r} (one of {', '.join(KINDS)})")
    if (info.kind in SKLEARN_KINDS) != (sklearn_model is not None):
        raise ValueError(
            f"a {info.kind} classifier {'needs' if info.kind in SKLEARN_KINDS else 'has no'} "
            "scikit-learn model"
        )
    if (info.kind in TORCH_KINDS) != (torch_model is not None):
        raise ValueError(
            f"a {info.kind} classifier {'needs' if info.kind in TORCH_KINDS else 'has no'} torch model"
        )
    payload: dict[str, Any] = {
        "format": CLASSIFIER_FORMAT,
        "kind": info.kind,
        "version": info.version,
        "cell_types": list(info.cell_types),
        "trained_on": info.trained_on,
        "metrics": info.metrics,
    }
    if sklearn_model is not None:
        payload["sklearn"] = sio.dumps(sklearn_model)
    if torch_model is not None:
        state = (
            torch_model.unet.state_dict() if info.kind == "unet_encoder_linear" else torch_model.state_dict()
        )
        payload["state_dict"] = {k: v.detach().cpu() for k, v in state.items()}
        payload["arch"] = dict(torch_arch or {})
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def load_classifier(path: Path) -> CellClassifier:
    """Read and check a classifier file: ModelNotFound when there is none, ModelInvalid with the reason
    when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound("classifier file not found", path=path)
    data = path.read_bytes()
    payload = load_plain(data, "blastq cell classifier", path)
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        raise ModelInvalid(f"not a blastq cell classifier (format {CLASSIFIER_FORMAT} expected)", path=path)
    kind = payload.get("kind")
    if kind not in KINDS:
        raise ModelInvalid(f"unknown classifier kind {kind!r}", path=path)
    needed = ("cell_types", "version") + (("sklearn",) if kind in SKLEARN_KINDS else ())
    missing = [key for key in needed if key not in payload]
    if missing:
        raise ModelInvalid(f"not a blastq cell classifier (no {', '.join(missing)})", path=path)
    cell_types = tuple(payload["cell_types"])
    unknown = set(cell_types) - set(CELL_TYPES)
    if unknown:
        raise ModelInvalid(f"unknown cell types {sorted(unknown)}", path=path)
    info = ClassifierInfo(
        version=str(payload["version"]),
        kind=kind,
        cell_types=cell_types,
        trained_on=str(payload.get("trained_on", "")),
        metrics=dict(payload.get("metrics", {})),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    sklearn_model = (
        _load_sklearn(path, payload["sklearn"], kind, len(cell_types)) if kind in SKLEARN_KINDS else None
    )
    torch_model = _load_torch(path, kind, payload, len(cell_types)) if kind in TORCH_KINDS else None
    return CellClassifier(info, sklearn_model, torch_model)


def _load_sklearn(path: Path, data: Any, kind: str, n_types: int) -> Any:
    """The scikit-learn model of a classifier file, built only from allowed types and checked."""
    import skops.io as sio

    if not isinstance(data, bytes):
        raise ModelInvalid("the scikit-learn part is not skops bytes", path=path)
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # not a zip, no schema, a schema skops cannot read
        raise ModelInvalid(
            f"the scikit-learn part is not a skops file ({type(exc).__name__})", path=path
        ) from None
    # Checked before loading: skops constructs (calls) the types a file names while it loads.
    refused = sorted(set(untrusted) - ALLOWED_SKLEARN_TYPES)
    if refused:
        raise ModelInvalid(
            f"the classifier holds types blastq does not load: {', '.join(refused)}", path=path
        )
    try:
        model = sio.loads(data, trusted=list(untrusted))
    except Exception as exc:
        raise ModelInvalid(
            f"the scikit-learn part does not load ({type(exc).__name__}: {' '.join(str(exc).split())})",
            path=path,
        ) from None
    _check_sklearn_model(path, model, kind, n_types)
    return model


def _check_sklearn_model(path: Path, model: Any, kind: str, n_types: int) -> None:
    """Refuse a model that would fail, or read out of bounds, on the first cell rather than at load."""
    if not callable(getattr(model, "predict_proba", None)):
        raise ModelInvalid("the scikit-learn model gives no probabilities (no predict_proba)", path=path)
    classes = np.asarray(getattr(model, "classes_", []))
    if classes.size == 0 or classes.dtype.kind not in "iu" or classes.min() < 0 or classes.max() >= n_types:
        raise ModelInvalid(
            f"the model's classes {classes.tolist()} are not indices of its {n_types} cell types", path=path
        )
    if kind in FEATURE_KINDS:
        from blastq.core.cells.features import FEATURE_NAMES

        n_in = getattr(model, "n_features_in_", None)
        if n_in != len(FEATURE_NAMES):
            raise ModelInvalid(
                f"the model takes {n_in} features, blastq measures {len(FEATURE_NAMES)}", path=path
            )
    # Prediction checks the width of its input against the model's, not against each tree's.
    n_columns = int(getattr(model, "n_features_in_", 0) or 0)
    for tree in _trees(model):
        _check_tree(path, tree, min(int(tree.n_features), n_columns) if n_columns else int(tree.n_features))


def _trees(model: Any) -> list[Any]:
    """The sklearn.tree._tree.Tree objects inside a model (a pipeline's steps, a forest's estimators)."""
    found = []
    for step in getattr(model, "steps", ()):
        found += _trees(step[1])
    for estimator in getattr(model, "estimators_", ()):
        found += _trees(estimator)
    if getattr(model, "tree_", None) is not None:
        found.append(model.tree_)
    return found


def _check_tree(path: Path, tree: Any, n_features: int) -> None:
    # scikit-learn follows a tree's child and feature indices without bounds checks: a crafted file could
    # send prediction outside its arrays. Its builder numbers children after their parent (so a walk ends).
    n = int(tree.node_count)
    node = np.arange(n)
    left, right, feature = (
        np.asarray(a, np.int64) for a in (tree.children_left, tree.children_right, tree.feature)
    )
    leaf = (left == -1) & (right == -1)
    inner_ok = (
        (left > node) & (left < n) & (right > node) & (right < n) & (feature >= 0) & (feature < n_features)
    )
    if not (len(left) == len(right) == len(feature) == n and np.all(leaf | inner_ok)):
        raise ModelInvalid("a decision tree of the classifier has out-of-range node indices", path=path)


def _load_torch(path: Path, kind: str, payload: dict[str, Any], n_classes: int) -> Any:
    from blastq.core.cells.cellnets import CropCNN, EncoderFeatures
    from blastq.core.segment import UNet

    arch = dict(payload.get("arch", {}))
    try:
        if kind == "cnn":
            model = CropCNN(n_classes, **arch)
            model.load_state_dict(payload["state_dict"])
        else:
            unet = UNet(**arch)
            unet.load_state_dict(payload["state_dict"])
            model = EncoderFeatures(unet)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise ModelInvalid(f"weights do not fit the {kind} architecture ({exc})", path=path) from None
    return model.eval()


# --- the pipeline's use -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellTyping:
    """The classifier's answer for one cell, reconciled with the segmentation's blast call."""

    cell_type: str
    probability: float  # of cell_type
    review: bool
    probabilities: tuple[float, ...]  # over CELL_TYPES


def reconcile(
    probs: np.ndarray, is_blast: np.ndarray, review_below: float = REVIEW_BELOW
) -> list[CellTyping]:
    """Types for cells whose blast call the segmentation already made.

    The blast count stays the segmentation's (it is what blastq validates and flags on); the classifier
    names the type of every other cell among the normal types (its probabilities renormalised without
    blast). A cell is marked for review when the classifier is unsure (top probability below
    `review_below`) or disagrees with the segmentation about whether it is a blast.
    """
    blast = CELL_TYPES.index("blast")
    out = []
    for p, seg_blast in zip(probs, is_blast, strict=True):
        p = np.asarray(p, np.float64)
        says_blast = int(np.argmax(p)) == blast
        if seg_blast:
            cell_type, probability = "blast", float(p[blast])
            unsure = False  # the segmentation's call; disagreement is caught below
        else:
            normal = p.copy()
            normal[blast] = 0.0
            total = normal.sum()
            normal = normal / total if total > 0 else np.full_like(normal, 1.0 / (len(CELL_TYPES) - 1))
            normal[blast] = 0.0
            top = int(np.argmax(normal))
            cell_type, probability = CELL_TYPES[top], float(normal[top])
            unsure = probability < review_below
        review = unsure or says_blast != bool(seg_blast) or float(p.max()) < review_below
        out.append(
            CellTyping(cell_type, round(probability, 4), bool(review), tuple(round(float(v), 4) for v in p))
        )
    return out


def default_classifier_path() -> Path:
    """The classifier shipped in the package (trained by `blastq compare-classifiers --save-best`)."""
    return Path(__file__).parents[1] / "weights" / "blastq-cells-default.pt"


@timed("typing")
def type_cells(
    maps: CellMaps,
    work: np.ndarray,
    work_mpp: float,
    classifier: CellClassifier,
    on_crop: Callable[[int, CellCrop | None], None] | None = None,
) -> CellMaps:
    """`maps` with every cell typed from `work` (the preprocessed image at `work_mpp`).

    A cell that cannot be cropped, measured or typed is marked for review with the reason, given
    UNTYPED_PROBABILITIES, and the other cells are typed as if it were not there. `on_crop(cell_id, crop)`
    gets each cell's crop with its neighbours (None where cropping failed), cut in the same pass: the
    gallery (core.cells.gallery) is filled without cropping every cell again.
    """
    if not maps.cells:
        return maps
    h, w = work.shape[:2]
    instances = resample_to_shape(maps.instances, h, w, labels=True)
    nuclei = resample_to_shape(maps.nuclei, h, w, labels=True)
    ids = [c.cell_id for c in maps.cells]
    crops, reasons = [], []
    for cell_id, raw in zip(ids, crops_from_instances(work, instances, nuclei, work_mpp, ids), strict=True):
        try:
            crop, shown = normalised_views(raw)
        except MemoryError:
            raise
        except Exception as exc:
            crops.append(raw)
            reasons.append(failure_reason("crop", exc))
            if on_crop is not None:
                on_crop(cell_id, None)
            continue
        if on_crop is not None:
            on_crop(cell_id, shown)
        crops.append(crop)
        # A cell a few pixels across at a coarse input scale can vanish when resampled to the crop scale.
        reasons.append("" if crop.cell.any() else f"too small to type: no pixels at {crop.mpp} um/px")
    probs = np.tile(UNTYPED_PROBABILITIES, (len(crops), 1))
    cropped = [i for i, reason in enumerate(reasons) if not reason]
    if cropped:
        typed, why = classifier.predict_cells([crops[i] for i in cropped])
        probs[cropped] = typed
        for i, reason in zip(cropped, why, strict=True):
            reasons[i] = reason
    typings = reconcile(probs, np.array([c.label == LABEL_BLAST for c in maps.cells]))
    cells = []
    for cell, t, reason in zip(maps.cells, typings, reasons, strict=True):
        review_reason = joined_reasons(cell.review_reason, reason)
        cells.append(
            replace(
                cell,
                cell_type=t.cell_type,
                cell_type_probability=t.probability,
                review=t.review or bool(review_reason),
                review_reason=review_reason,
                **{f"p_{name}": p for name, p in zip(CELL_TYPES, t.probabilities, strict=True)},
            )
        )
    return replace(maps, cells=tuple(cells))


def load_cell_classifier(setting: str) -> CellClassifier | None:
    """The classifier a `classifier` setting names: "default" (shipped), "none", or a file."""
    if setting == "none":
        return None
    return load_classifier(default_classifier_path() if setting in ("", "default") else Path(setting))
