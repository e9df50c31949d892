"""The deep cell classifiers: a crop CNN that learns, seeded training, the frozen U-Net encoder's features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blastq.core.cells.cellcrops import (
    CELL_TYPES,
    CROP_PX,
    CellCrop,
    crops_from_instances,
    crops_to_array,
    normalise_crop,
)
from blastq.core.cells.cellnets import CropCNN, EncoderFeatures
from blastq.core.common.errors import InvalidConfig
from blastq.core.segment.unet import UNet, default_model_path, to_model_input
from blastq.core.synth.field import generate_field
from blastq.trainer.cellnets import balanced_class_weights, encoder_features, fit_cnn, predict_cnn

LYMPHOCYTE, EOSINOPHIL = CELL_TYPES.index("lymphocyte"), CELL_TYPES.index("eosinophil")


def _toy_cells(n: int, seed: int) -> tuple[list[CellCrop], np.ndarray]:
    """Discs of random size and place; dark ones are 'lymphocytes', light ones 'eosinophils'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:CROP_PX, :CROP_PX]
    crops, labels = [], []
    for i in range(n):
        dark = i % 2 == 0
        r, cy, cx = rng.uniform(15, 40), 64 + rng.uniform(-8, 8), 64 + rng.uniform(-8, 8)
        cell = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        level = rng.uniform(60, 110) if dark else rng.uniform(160, 210)
        rgb = np.full((CROP_PX, CROP_PX, 3), 255, np.uint8)
        rgb[cell] = np.clip(level + rng.normal(0, 12, (int(cell.sum()), 3)), 0, 255).astype(np.uint8)
        crops.append(CellCrop(rgb, cell, np.zeros_like(cell), 0.2))
        labels.append(LYMPHOCYTE if dark else EOSINOPHIL)
    return crops, np.asarray(labels)


@pytest.fixture(scope="module")
def unet():
    model, _ = UNet.from_checkpoint(default_model_path())
    return model


@pytest.fixture(scope="module")
def field_crops():
    """A lymphocyte and a neutrophil of one generated field, normalised."""
    field = generate_field(3, 384, 384, mpp=0.2, blast_fraction=0.0, wbc_per_10k_um2=20.0)
    first = {}
    for cell in field.cells:
        first.setdefault(cell.kind, cell.cell_id)
    ids = [first["lymphocyte"], first["neutrophil"]]
    return [
        normalise_crop(c) for c in crops_from_instances(field.image, field.instances, field.nuclei, 0.2, ids)
    ]


def test_cnn_learns_dark_versus_light_cells_and_gives_unseen_classes_little_probability():
    crops, labels = _toy_cells(64, seed=0)
    model = fit_cnn(crops, labels, seed=0, epochs=10)  # 20 steps: short, as batch norm must survive
    test_crops, test_labels = _toy_cells(40, seed=1)
    probs = predict_cnn(model, test_crops)
    assert probs.shape == (40, len(CELL_TYPES)) and np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == test_labels).mean() >= 0.9  # chance is 0.5
    absent = [i for i in range(len(CELL_TYPES)) if i not in (LYMPHOCYTE, EOSINOPHIL)]
    assert probs[:, absent].sum(axis=1).mean() < 0.1  # 4 of 6 classes: 0.67 at the start


def test_same_seed_gives_the_same_model_and_leaves_global_state_alone():
    crops, labels = _toy_cells(24, seed=2)
    x = crops_to_array(crops)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = predict_cnn(fit_cnn(crops, labels, seed=5, epochs=2), x)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's torch generator was not consumed
    assert torch.get_num_threads() == threads
    b = predict_cnn(fit_cnn(x, labels, seed=5, epochs=2), crops)  # array or crop list: same
    c = predict_cnn(fit_cnn(crops, labels, seed=6, epochs=2), crops)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_cnn_rebuilds_from_its_arch_and_shrinks_full_size_crops(field_crops):
    torch.manual_seed(0)
    model = CropCNN(len(CELL_TYPES), width=8).eval()
    copy = CropCNN(len(CELL_TYPES), **model.arch())
    copy.load_state_dict(model.state_dict())
    x = torch.from_numpy(crops_to_array(field_crops))
    with torch.no_grad():
        full = model(x)
        assert torch.allclose(copy.eval()(x), full)
        assert torch.allclose(model(model.shrink(x)), full, atol=1e-6)
    assert model.shrink(x).shape[-2:] == (model.input_px, model.input_px) == (64, 64)


def test_class_weights_balance_present_classes_and_bad_ones_are_refused():
    w = balanced_class_weights(np.array([0, 0, 0, 1]))
    assert np.allclose(w, [4 / 6, 2.0, 0, 0, 0, 0])
    crops, labels = _toy_cells(4, seed=3)
    with pytest.raises(InvalidConfig, match="class_weights"):
        fit_cnn(crops, labels, seed=0, epochs=1, class_weights="inverse")
    with pytest.raises(InvalidConfig, match="class_weights"):
        fit_cnn(crops, labels, seed=0, epochs=1, class_weights=np.ones(3))
    with pytest.raises(InvalidConfig, match="labels"):
        fit_cnn(crops, labels[:3], seed=0, epochs=1)


def test_encoder_features_have_the_documented_size_and_tell_cells_apart(unet, field_crops):
    encoder = EncoderFeatures(unet)
    feats = encoder_features(unet, field_crops)
    assert feats.shape == (2, encoder.dim) and encoder.dim == 16 + 32 + 64 + 128 == 240
    assert np.isfinite(feats).all()
    lymphocyte, neutrophil = feats
    assert np.linalg.norm(lymphocyte - neutrophil) > 0.1 * np.linalg.norm(lymphocyte)
    # Batching does not matter (batch norm runs on the U-Net's statistics).
    assert np.allclose(encoder_features(unet, field_crops, batch_size=1), feats, atol=1e-5)


def test_encoder_features_use_the_unets_input_scaling_and_mask_weighting(unet, field_crops):
    crop = field_crops[1]
    level0 = encoder_features(unet, [crop])[0, :16]
    with torch.no_grad():
        act = unet.encoder.blocks[0](torch.from_numpy(to_model_input(crop.rgb[None])))[0].numpy()
    expected = act[:, crop.cell].mean(axis=1)
    assert np.allclose(level0, expected, atol=1e-4)


def test_encoder_leaves_the_unet_as_it_was_and_gives_zeros_for_an_empty_mask(unet, field_crops):
    empty = CellCrop(
        field_crops[0].rgb, np.zeros_like(field_crops[0].cell), field_crops[0].nucleus & False, 0.2
    )
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.train()
    try:
        feats = encoder_features(unet, [field_crops[0], empty])
        assert unet.training  # its mode is the caller's
    finally:
        unet.eval()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # running stats untouched
    assert np.abs(feats[0]).sum() > 0 and not feats[1].any()
