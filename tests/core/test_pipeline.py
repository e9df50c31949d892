"""The whole image path with the shipped model."""

from __future__ import annotations

import numpy as np
import pytest

from blastq.core.common.errors import InvalidConfig
from blastq.core.image.slide import Slide
from blastq.core.pipeline.field import PipelineConfig, process_slide, segment_probabilities


def as_slide(rgb, mpp=0.2):
    return Slide(rgb=rgb, mpp=mpp, mpp_source="user", name="t.png", sha256="0" * 64)


def test_tiled_and_whole_image_maps_are_the_same(shipped_engine, smear):
    """256 px tiles overlapping by twice the model's context vs one 768 px tile: the same map, seams none."""
    engine, info = shipped_engine
    tiled, n_tiles, _ = segment_probabilities(
        smear.image, 0.2, engine, info, PipelineConfig(tile_px=256, overlap_px=128, skip_empty_tiles=False)
    )
    whole, n_whole, _ = segment_probabilities(
        smear.image, 0.2, engine, info, PipelineConfig(tile_px=768, overlap_px=0, skip_empty_tiles=False)
    )
    assert n_tiles == 25 and n_whole == 1
    assert np.abs(tiled - whole).max() < 1e-4  # float summation order only
    default, _, _ = segment_probabilities(smear.image, 0.2, engine, info)  # skipping plasma changes nothing
    assert (default[:3].argmax(0) == whole[:3].argmax(0)).mean() > 0.9999


def test_plain_plasma_has_no_cells_and_runs_no_tile(shipped_engine):
    engine, info = shipped_engine
    result = process_slide(as_slide(np.full((600, 600, 3), 240, np.uint8)), engine, info)
    assert result.stats.white_cells == 0 and result.tiles_run == 0 and result.tiles_total > 0
    assert not result.stats.flagged


def test_results_come_back_at_the_input_size_whatever_the_scale(shipped_engine):
    from blastq.core.synth.field import generate_field

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


# --- the engine overlapped with cutting and stitching ------------------------------------------------


class FakeEngine:
    """Logits computed from the input pixels (deterministic, fast); optionally fails on one batch."""

    name = "fake"
    stride = 32

    def __init__(
        self,
        fail_on_batch: int | None = None,
        bad_shape_on_batch: int | None = None,
        device_type: str = "cuda",  # a GPU engine leaves the cores free: cutting and stitching overlap it
    ):
        self.device_type = device_type
        self.fail_on_batch = fail_on_batch
        self.bad_shape_on_batch = bad_shape_on_batch
        self.calls = 0

    def infer(self, batch):
        from blastq.core.segment.unet import N_OUTPUTS

        self.calls += 1
        if self.calls == self.fail_on_batch:
            raise RuntimeError(f"engine failed on batch {self.calls}")
        mixing = np.linspace(-1.0, 1.0, N_OUTPUTS * 3, dtype=np.float32).reshape(N_OUTPUTS, 3)
        logits = np.einsum("oc,nchw->nohw", mixing, batch).astype(np.float32)
        if self.calls == self.bad_shape_on_batch:
            return logits[:, :, :-1]
        return logits


def sequential_probabilities(work, engine, config):
    """segment_prepared's batches as a plain loop (the reference for the overlapped one)."""
    from blastq.core.segment.stitch import Stitcher, logits_to_probabilities
    from blastq.core.segment.tiling import (
        fit_to_stain,
        iter_batches,
        needed_blocks,
        pad_to_stride,
        plan_tiles,
    )
    from blastq.core.segment.unet import N_OUTPUTS, to_model_input

    wh, ww = work.shape[:2]
    work = pad_to_stride(work, engine.stride)
    tiles = plan_tiles(work.shape[0], work.shape[1], config.tile_px, config.overlap_px, engine.stride)
    needed, margin = needed_blocks(work, config.overlap_px // 2), config.overlap_px // 2
    todo = [t for t in (fit_to_stain(t, needed, margin, engine.stride) for t in tiles) if t is not None]
    stitcher = Stitcher(N_OUTPUTS, work.shape[0], work.shape[1])
    for batch in iter_batches(todo, config.batch_size):
        probs = logits_to_probabilities(
            engine.infer(to_model_input(np.stack([work[t.slices] for t in batch])))
        )
        for t, p in zip(batch, probs, strict=True):
            stitcher.add(t, p)
    return stitcher.result()[:, :wh, :ww]


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
@pytest.mark.parametrize("batch_size", [1, 3, 8, 100])
def test_overlapped_batches_give_the_same_map_bit_for_bit(smear, batch_size, device_type):
    from blastq.core.pipeline.field import segment_prepared

    config = PipelineConfig(tile_px=128, overlap_px=32, batch_size=batch_size)
    ticks = []
    got, n_tiles, n_run = segment_prepared(
        smear.image,
        smear.image.shape[:2],
        FakeEngine(device_type=device_type),
        config,
        lambda d, n: ticks.append((d, n)),
    )
    want = sequential_probabilities(smear.image, FakeEngine(), config)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert n_run > 2 * batch_size or batch_size == 100
    done = [d for d, _ in ticks]
    assert done == sorted(done) and done[-1] == n_tiles and {n for _, n in ticks} == {n_tiles}
    assert len(ticks) == 1 + -(-n_run // batch_size)  # the skipped tiles, then one per batch, in order


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_an_engine_error_on_the_third_batch_reaches_the_caller_after_two_batches(smear, device_type):
    from blastq.core.pipeline.field import segment_prepared

    config = PipelineConfig(tile_px=128, overlap_px=32, batch_size=2)
    engine, ticks = FakeEngine(fail_on_batch=3, device_type=device_type), []
    with pytest.raises(RuntimeError, match="batch 3"):
        segment_prepared(smear.image, smear.image.shape[:2], engine, config, lambda d, n: ticks.append(d))
    assert engine.calls == 3
    # The skipped tiles and batch 1 reported; batch 2 (overlapped: was stitching while batch 3 failed).
    assert len(ticks) in (2, 3) and ticks == sorted(ticks) and ticks[1] - ticks[0] == 2


def test_a_stitching_error_reaches_the_caller_and_stops_the_engine(smear):
    from blastq.core.pipeline.field import segment_prepared

    config = PipelineConfig(tile_px=128, overlap_px=32, batch_size=2)
    engine = FakeEngine(bad_shape_on_batch=2)
    with pytest.raises(ValueError):
        segment_prepared(smear.image, smear.image.shape[:2], engine, config)
    assert engine.calls <= 4  # noticed within two batches, not after the whole slide


def test_a_failing_progress_callback_stops_the_run(smear):
    from blastq.core.pipeline.field import segment_prepared

    class Cancelled(Exception):
        """The user stopped the run."""

    def progress(done, total):
        if done > 0:
            raise Cancelled

    config = PipelineConfig(tile_px=128, overlap_px=32, batch_size=2)
    engine = FakeEngine()
    with pytest.raises(Cancelled):
        segment_prepared(smear.image, smear.image.shape[:2], engine, config, progress)
    assert engine.calls <= 3


def test_cpu_engines_run_batches_in_turn_and_gpu_engines_overlapped(shipped_engine):
    from blastq.core.pipeline.field import _engine_on_gpu

    engine, _ = shipped_engine
    assert not _engine_on_gpu(engine)
    assert _engine_on_gpu(FakeEngine(device_type="cuda")) and not _engine_on_gpu(
        FakeEngine(device_type="cpu")
    )
