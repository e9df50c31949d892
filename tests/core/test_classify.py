from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from blastq.core.cells.cellcrops import CELL_TYPES, crops_to_array
from blastq.core.cells.classify import (
    CLASSIFIER_FORMAT,
    REVIEW_BELOW,
    UNTYPED_PROBABILITIES,
    CellClassifier,
    ClassifierInfo,
    load_classifier,
    reconcile,
)
from blastq.core.common.errors import ModelInvalid, ModelNotFound
from blastq.core.segment.unet import default_model_path

BLAST = CELL_TYPES.index("blast")


def probs(**by_type: float) -> np.ndarray:
    p = np.zeros(len(CELL_TYPES))
    for name, value in by_type.items():
        p[CELL_TYPES.index(name)] = value
    return p


def test_a_confident_normal_cell_takes_the_classifiers_type_without_review():
    [t] = reconcile(np.array([probs(neutrophil=0.9, lymphocyte=0.1)]), np.array([False]))
    assert (t.cell_type, t.probability, t.review) == ("neutrophil", 0.9, False)
    assert t.probabilities[CELL_TYPES.index("neutrophil")] == 0.9


def test_the_segmentation_keeps_the_blast_call_and_a_disagreement_is_reviewed():
    # The segmentation says blast, the classifier says lymphocyte: still a blast, marked for review.
    [t] = reconcile(np.array([probs(lymphocyte=0.8, blast=0.2)]), np.array([True]))
    assert (t.cell_type, t.review) == ("blast", True)
    # The classifier says blast but the segmentation does not: the best normal type, marked for review.
    [t] = reconcile(np.array([probs(blast=0.7, monocyte=0.25, lymphocyte=0.05)]), np.array([False]))
    assert t.cell_type == "monocyte" and t.review
    assert t.probability == pytest.approx(0.25 / 0.30, abs=1e-4)  # renormalised without blast


def test_agreeing_blast_calls_are_not_reviewed():
    [t] = reconcile(np.array([probs(blast=0.95, lymphocyte=0.05)]), np.array([True]))
    assert (t.cell_type, t.review) == ("blast", False)


def test_an_unsure_classifier_marks_the_cell_for_review():
    assert REVIEW_BELOW > 0.45
    [t] = reconcile(np.array([probs(neutrophil=0.45, monocyte=0.35, eosinophil=0.2)]), np.array([False]))
    assert t.cell_type == "neutrophil" and t.review


def _payload_file(path, **payload) -> str:
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.write_bytes(buf.getvalue())
    return str(path)


def test_files_that_are_not_classifiers_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelInvalid, match="not a blastq cell classifier"):
        load_classifier(tmp_path / "text.pt")
    with pytest.raises(ModelInvalid, match="not a blastq cell classifier"):
        load_classifier(default_model_path())  # a U-Net checkpoint
    bad_kind = _payload_file(tmp_path / "kind.pt", format=CLASSIFIER_FORMAT, kind="xgboost")
    with pytest.raises(ModelInvalid, match="unknown classifier kind"):
        load_classifier(bad_kind)


def test_a_scikit_learn_model_holding_other_types_is_refused(tmp_path):
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    # A pipeline that would call os.getcwd on load's behalf: skops lists the function as untrusted.
    model = make_pipeline(FunctionTransformer(func=os.getcwd), LogisticRegression())
    path = _payload_file(
        tmp_path / "evil.pt",
        format=CLASSIFIER_FORMAT,
        kind="svm",
        version="x",
        cell_types=list(CELL_TYPES),
        sklearn=sio.dumps(model),
    )
    with pytest.raises(ModelInvalid, match="getcwd"):
        load_classifier(path)


@pytest.fixture(scope="module")
def field_crops():
    from blastq.core.cells.cellcrops import crops_from_instances, normalise_crop
    from blastq.core.synth.field import generate_field

    field = generate_field(5, 384, 384, wbc_per_10k_um2=14.0, blast_fraction=0.4)
    crops = [normalise_crop(c) for c in crops_from_instances(field.image, field.instances, field.nuclei, 0.2)]
    labels = np.array([CELL_TYPES.index(c.kind) for c in field.cells])
    assert len(set(labels)) >= 2
    return crops, labels


def _sklearn_model(x, labels):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=10, random_state=0).fit(x, labels)


@pytest.mark.parametrize("kind", ["random_forest", "cnn", "unet_encoder_linear"])
def test_a_saved_classifier_loads_and_gives_the_same_probabilities(kind, field_crops, tmp_path):
    from blastq.core.cells.cellnets import CropCNN, EncoderFeatures
    from blastq.core.cells.classify import CellClassifier, ClassifierInfo, save_classifier
    from blastq.core.cells.features import features_matrix
    from blastq.core.segment.unet import UNet

    crops, labels = field_crops
    torch.manual_seed(0)
    info = ClassifierInfo(version=f"test-{kind}", kind=kind, trained_on="one field")
    if kind == "random_forest":
        kwargs = {"sklearn_model": _sklearn_model(features_matrix(crops), labels)}
    elif kind == "cnn":
        net = CropCNN(len(CELL_TYPES), width=4).eval()
        kwargs = {"torch_model": net, "torch_arch": net.arch()}
    else:
        unet = UNet(depth=2, width=4)
        encoder = EncoderFeatures(unet)
        x = encoder(torch.from_numpy(crops_to_array(crops)))
        kwargs = {
            "torch_model": encoder,
            "torch_arch": unet.arch(),
            "sklearn_model": _sklearn_model(x.numpy(), labels),
        }
    before = CellClassifier(info, kwargs.get("sklearn_model"), kwargs.get("torch_model")).predict_proba(crops)
    sha = save_classifier(tmp_path / "c.pt", info, **kwargs)
    loaded = load_classifier(tmp_path / "c.pt")
    assert loaded.info.sha256 == sha and loaded.info.version == f"test-{kind}"
    after = loaded.predict_proba(crops)
    assert after.shape == (len(crops), len(CELL_TYPES))
    np.testing.assert_allclose(after, before, atol=1e-5)
    np.testing.assert_allclose(after.sum(axis=1), 1.0, atol=1e-4)
    if kind != "cnn":  # a forest only gives probability to the types it was trained on
        unseen = [i for i in range(len(CELL_TYPES)) if i not in set(labels)]
        assert (after[:, unseen] == 0).all()


def test_the_pipeline_types_every_cell_and_reports_a_differential(field_crops, tmp_path, shipped_engine):
    from blastq.core.cells.classify import ClassifierInfo, save_classifier
    from blastq.core.cells.features import features_matrix
    from blastq.core.image.slide import Slide
    from blastq.core.pipeline.field import process_slide
    from blastq.core.synth.field import generate_field

    crops, labels = field_crops
    path = tmp_path / "rf.pt"
    model = _sklearn_model(features_matrix(crops), labels)
    save_classifier(path, ClassifierInfo(version="rf-1", kind="random_forest"), sklearn_model=model)
    classifier = load_classifier(path)
    field = generate_field(8, 512, 512, wbc_per_10k_um2=12.0, blast_fraction=0.3)
    slide = Slide(name="f.png", rgb=field.image, mpp=0.2, mpp_source="user", sha256="0" * 64)
    engine, info = shipped_engine
    result = process_slide(slide, engine, info, classifier=classifier)
    cells = result.maps.cells
    assert cells and all(c.cell_type in CELL_TYPES for c in cells)
    assert all((c.cell_type == "blast") == (c.label == "blast") for c in cells)
    assert result.classifier_version == "rf-1"
    diff = result.stats.differential
    assert list(diff) == list(CELL_TYPES) and sum(d["count"] for d in diff.values()) == len(cells)
    assert diff["blast"]["percent"] == result.stats.blast_percent
    assert result.stats.review_cells == sum(c.review for c in cells)
    for c in cells:
        p = np.array([getattr(c, f"p_{t}") for t in CELL_TYPES])
        assert p.sum() == pytest.approx(1.0, abs=1e-3)


@pytest.fixture(scope="module")
def small_slide():
    from blastq.core.image.slide import Slide
    from blastq.core.synth.field import generate_field

    field = generate_field(21, 320, 320, wbc_per_10k_um2=14.0, blast_fraction=0.3)
    return Slide(name="f.png", rgb=field.image, mpp=0.2, mpp_source="user", sha256="0" * 64)


def test_a_cell_whose_features_fail_is_reviewed_and_the_slide_goes_on(
    small_slide, shipped_engine, monkeypatch
):
    from blastq.core.cells import features
    from blastq.core.cells.classify import load_cell_classifier
    from blastq.core.pipeline.field import process_slide

    engine, info = shipped_engine
    classifier = load_cell_classifier("default")
    before = process_slide(small_slide, engine, info, classifier=classifier).maps.cells
    assert len(before) >= 3 and not any(c.review_reason for c in before)

    real, seen = features.cell_features, []

    def fails_on_the_second_cell(crop):
        if not any(crop is c for c in seen):
            seen.append(crop)
        if len(seen) > 1 and crop is seen[1]:
            raise ValueError("zero-size array to reduction operation maximum which has no identity")
        return real(crop)

    monkeypatch.setattr(features, "cell_features", fails_on_the_second_cell)
    result = process_slide(small_slide, engine, info, classifier=classifier)
    after = result.maps.cells
    assert len(after) == len(before)
    bad = after[1]
    assert bad.review and bad.review_reason == (
        "features failed: ValueError: zero-size array to reduction operation maximum which has no identity"
    )
    p = np.array([getattr(bad, f"p_{t}") for t in CELL_TYPES])
    np.testing.assert_allclose(p, UNTYPED_PROBABILITIES, atol=1e-4)
    assert bad.cell_type == ("blast" if bad.label == "blast" else "neutrophil")
    for old, new in zip(before[:1] + before[2:], after[:1] + after[2:], strict=True):
        assert (new.cell_type, new.review, new.review_reason) == (old.cell_type, old.review, "")
        assert new.cell_type_probability == pytest.approx(old.cell_type_probability, abs=1e-4)
    # The slide keeps its differential and counts the cell among those to review.
    assert sum(d["count"] for d in result.stats.differential.values()) == len(after)
    assert result.stats.review_cells == sum(c.review for c in after)


def test_a_cell_that_vanishes_at_the_crop_scale_is_reviewed_not_typed_from_an_empty_crop(field_crops):
    from blastq.core.cells.classify import type_cells
    from blastq.core.cells.features import features_matrix
    from blastq.core.cells.instances import CellMaps, CellRecord

    crops, labels = field_crops
    classifier = CellClassifier(
        ClassifierInfo(version="rf", kind="random_forest"), _sklearn_model(features_matrix(crops), labels)
    )
    # Input at 0.05 um/px, typed from a work image at 0.2: a 1-pixel cell falls between the samples.
    instances = np.zeros((400, 400), np.int32)
    yy, xx = np.mgrid[:400, :400]
    instances[(yy - 200) ** 2 + (xx - 200) ** 2 <= 150**2] = 1
    instances[1, 1] = 2
    record = CellRecord(1, "white_cell", 0, 0, 0, 0, 1, 1, 1, 0.04, 0.8, 1.0, 0, 0.0, 0.0, 0, 0, 0, 0.1)
    maps = CellMaps(
        (instances > 0).astype(np.uint8), instances == 1, instances, (record, replace(record, cell_id=2))
    )
    work = np.full((100, 100, 3), 200, np.uint8)
    big, tiny = type_cells(maps, work, 0.2, classifier).cells
    assert tiny.review and tiny.review_reason == "too small to type: no pixels at 0.2 um/px"
    p = np.array([getattr(tiny, f"p_{t}") for t in CELL_TYPES])
    np.testing.assert_allclose(p, UNTYPED_PROBABILITIES, atol=1e-4)
    assert big.review_reason == ""


def test_a_feature_model_of_another_width_is_refused_at_load(field_crops, tmp_path):
    from blastq.core.cells.classify import ClassifierInfo, save_classifier
    from blastq.core.cells.features import features_matrix

    crops, labels = field_crops
    model = _sklearn_model(features_matrix(crops)[:, :10], labels)
    save_classifier(
        tmp_path / "narrow.pt", ClassifierInfo(version="n", kind="random_forest"), sklearn_model=model
    )
    with pytest.raises(ModelInvalid, match="takes 10 features, blastq measures"):
        load_classifier(tmp_path / "narrow.pt")


def test_a_classifier_file_missing_its_parts_is_refused_with_the_reason(tmp_path):
    path = _payload_file(tmp_path / "bare.pt", format=CLASSIFIER_FORMAT, kind="svm", version="x")
    with pytest.raises(ModelInvalid, match=r"no cell_types, sklearn"):
        load_classifier(path)
    path = _payload_file(
        tmp_path / "junk.pt",
        format=CLASSIFIER_FORMAT,
        kind="svm",
        version="x",
        cell_types=[],
        sklearn=b"junk",
    )
    with pytest.raises(ModelInvalid, match="not a skops file"):
        load_classifier(path)


class _Picky(CellClassifier):
    """Types every crop as a lymphocyte, except crops it refuses (all of them when `refuse_all`)."""

    def __init__(self, refuse: object = None, refuse_all: bool = False) -> None:
        super().__init__(ClassifierInfo(version="picky", kind="cnn"))
        self.refuse, self.refuse_all = refuse, refuse_all

    def predict_proba(self, crops):
        if self.refuse_all or any(c is self.refuse for c in crops):
            raise RuntimeError("the model cannot take this input")
        out = np.zeros((len(crops), len(CELL_TYPES)), np.float32)
        out[:, CELL_TYPES.index("lymphocyte")] = 1.0
        return out


def test_a_cell_the_model_refuses_costs_only_itself_but_a_model_refusing_all_fails(field_crops):
    crops, _ = field_crops
    probs, reasons = _Picky(refuse=crops[2]).predict_cells(crops)
    assert reasons[2] == "typing failed: RuntimeError: the model cannot take this input"
    assert [r for i, r in enumerate(reasons) if i != 2] == [""] * (len(crops) - 1)
    assert probs[2].tolist() == pytest.approx(UNTYPED_PROBABILITIES.tolist())
    assert (probs[np.arange(len(crops)) != 2, CELL_TYPES.index("lymphocyte")] == 1).all()
    with pytest.raises(RuntimeError, match="cannot take"):
        _Picky(refuse_all=True).predict_cells(crops)
