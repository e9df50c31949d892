"""The work a slide asks for is bounded before it is done: pixels at the model's scale, not the file's."""

from __future__ import annotations

import cv2
import pytest

from blastq.core.common.errors import SlideTooLarge
from blastq.core.image.slide import read_slide
from blastq.core.pipeline.field import process_slide
from blastq.core.segment.unet import ModelInfo
from blastq.core.synth.field import generate_field


class NoEngine:
    """An engine that fails the test if the pipeline gets as far as the model."""

    stride = 32

    def infer(self, x):
        raise AssertionError("the model ran on a slide that should have been refused")


def _info() -> ModelInfo:
    from blastq.core.segment.engines import load_engine

    return load_engine()[1]


def test_pixels_after_resampling_count_against_max_pixels_before_any_model_work(tmp_path) -> None:
    image = generate_field(4, 400, 400, mpp=2.0).image
    path = tmp_path / "coarse.png"
    path.write_bytes(cv2.imencode(".png", image[:, :, ::-1])[1].tobytes())
    # 160 000 pixels in the file, within the limit; 4000 x 4000 at the model's 0.2 um/px, over it.
    slide = read_slide(path, mpp=2.0, max_pixels=1_000_000)
    with pytest.raises(
        SlideTooLarge,
        match=r"coarse.png: 400x400 pixels at 2 um/px \(user\) are 4000x4000 at "
        r"the model's 0.2 um/px, over the maximum of 1000000 pixels \(BLASTQ_MAX_PIXELS\)",
    ):
        process_slide(slide, NoEngine(), _info())
