from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from blastq.core.cellcrops import CELL_TYPES, crops_to_array
from blastq.core.classify import CLASSIFIER_FORMAT, REVIEW_BELOW, load_classifier, reconcile
from blastq.core.errors import ModelNotFound
from blastq.core.unet import default_model_path

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
    with pytest.raises(ModelNotFound, match="not a blastq cell classifier"):
        load_classifier(tmp_path / "text.pt")
    with pytest.raises(ModelNotFound, match="not a blastq cell classifier"):
        load_classifier(default_model_path())  # a U-Net checkpoint
    bad_kind = _payload_file(tmp_path / "kind.pt", format=CLASSIFIER_FORMAT, kind="xgboost")
    with pytest.raises(ModelNotFound, match="unknown classifier kind"):
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
    with pytest.raises(ModelNotFound, match="getcwd"):
        load_classifier(path)


@pytest.fixture(scope="module")
def field_crops():
    from blastq.core.cellcrops import crops_from_instances, normalise_crop
    from blastq.core.synth import generate_field

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
    from blastq.core.cellnets import CropCNN, EncoderFeatures
    from blastq.core.classify import CellClassifier, ClassifierInfo, save_classifier
    from blastq.core.features import features_matrix
    from blastq.core.unet import UNet

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
    from blastq.core.classify import ClassifierInfo, save_classifier
    from blastq.core.features import features_matrix
    from blastq.core.pipeline import process_slide
    from blastq.core.slide import Slide
    from blastq.core.synth import generate_field

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
