"""The whole image path with the shipped model."""

from __future__ import annotations

import numpy as np
import pytest

from blastq.core.errors import InvalidConfig
from blastq.core.pipeline import PipelineConfig, process_slide, segment_probabilities
from blastq.core.slide import Slide


def as_slide(rgb, mpp=0.2):
    return Slide(rgb=rgb, mpp=mpp, mpp_source="user", name="t.png", sha256="0" * 64)


def test_tiled_and_whole_masks_agree_away_from_borders(shipped_engine, smear):
    """Tiles of 128 px with Gaussian blending vs one 768 px tile: the masks agree on >= 99% of pixels."""
    engine, info = shipped_engine
    tiled, n_tiles, _ = segment_probabilities(
        smear.image, 0.2, engine, info, PipelineConfig(tile_px=128, overlap_px=48)
    )
    whole, n_whole, _ = segment_probabilities(
        smear.image, 0.2, engine, info, PipelineConfig(tile_px=768, overlap_px=0)
    )
    assert n_tiles > 30 and n_whole == 1
    inner = (slice(16, -16), slice(16, -16))
    agree = (tiled[:3].argmax(0) == whole[:3].argmax(0))[inner].mean()
    assert agree >= 0.99
    assert np.abs(tiled[:3] - whole[:3])[(slice(None), *inner)].mean() < 0.02


def test_plain_plasma_has_no_cells_and_runs_no_tile(shipped_engine):
    engine, info = shipped_engine
    result = process_slide(as_slide(np.full((600, 600, 3), 240, np.uint8)), engine, info)
    assert result.stats.white_cells == 0 and result.tiles_run == 0 and result.tiles_total > 0
    assert not result.stats.flagged


def test_results_come_back_at_the_input_size_whatever_the_scale(shipped_engine):
    from blastq.core.synth import generate_field

    engine, info = shipped_engine
    field = generate_field(7, 300, 410, mpp=0.1)
    result = process_slide(as_slide(field.image, 0.1), engine, info)
    assert result.maps.classes.shape == (300, 410) == result.maps.instances.shape == result.maps.nuclei.shape


def test_cells_found_match_the_truth_on_a_smear(shipped_engine, smear):
    engine, info = shipped_engine
    result = process_slide(as_slide(smear.image), engine, info)
    n_true = len(smear.cells)
    n_blast = sum(c.is_blast for c in smear.cells)
    assert abs(result.stats.white_cells - n_true) <= max(1, 0.15 * n_true)
    assert abs(result.stats.blasts - n_blast) <= max(1, 0.2 * n_blast)


def test_bad_tiling_is_a_config_error(shipped_engine):
    engine, info = shipped_engine
    with pytest.raises(InvalidConfig, match="multiple"):
        segment_probabilities(
            np.zeros((64, 64, 3), np.uint8), 0.2, engine, info, PipelineConfig(tile_px=100, overlap_px=10)
        )
    with pytest.raises(InvalidConfig):
        PipelineConfig(tile_px=64, overlap_px=64)


def test_params_key_ignores_batch_size_only():
    assert PipelineConfig(batch_size=1).key() == PipelineConfig(batch_size=32).key()
    assert PipelineConfig(tile_px=512).key() != PipelineConfig().key()
