"""Result keys: everything that changes a result changes its key; the same inputs give the same key,
whether the submitter computes it from a file's header or the pipeline from the decoded slide."""

from __future__ import annotations

import dataclasses

import cv2
import pytest
import tifffile

from blastq.core.cells.classify import load_cell_classifier
from blastq.core.image.slide import read_slide
from blastq.core.pipeline.field import PipelineConfig, config_for_engine, process_slide
from blastq.core.pipeline.resultkey import (
    ModelIdentity,
    classifier_file_sha256,
    file_result_key,
    result_key,
    scale_key,
)
from blastq.core.pipeline.wholeslide import WholeSlideConfig
from blastq.core.segment.unet import UNet, save_checkpoint
from blastq.core.synth.field import generate_field

MODEL = ModelIdentity("unet-1", "a" * 64, 0.2, {"normalise": True, "clahe_clip": 2.0}, "c" * 64)
BASE = result_key(PipelineConfig(), MODEL, scale_key(0.08, "user"))


def test_the_scale_a_user_gives_is_in_the_key_rounded_to_four_digits():
    # The issue: no --mpp, --mpp 0.08 and --mpp 0.1 had one key, and submit reused the 0.08 result.
    assert result_key(PipelineConfig(), MODEL, scale_key(0.1, "user")) != BASE
    assert result_key(PipelineConfig(), MODEL, scale_key(0.0800001, "user")) == BASE
    assert scale_key(0.08, "user") != scale_key(0.0801, "user")


def test_where_the_scale_came_from_is_in_the_key():
    keys = {scale_key(0.25, "user"), scale_key(0.25, "metadata"), scale_key(None, "estimated")}
    assert len(keys) == 3
    # An estimate is a function of the content (its sha256 is beside the key): keyed by the estimator.
    assert scale_key(0.21, "estimated") == scale_key(0.3, "estimated")


@pytest.mark.parametrize(
    "change",
    [
        {"sha256": "b" * 64},  # another model file
        {"classifier_sha256": "d" * 64},  # another classifier file
        {"classifier_sha256": ""},  # no classifier
        {"preprocess": {"normalise": True, "clahe_clip": 3.0}},  # a preprocessing parameter
        {"mpp": 0.25},  # the model's own scale
    ],
)
def test_each_part_of_the_model_changes_the_key(change):
    assert result_key(PipelineConfig(), dataclasses.replace(MODEL, **change), scale_key(0.08, "user")) != BASE


@pytest.mark.parametrize(
    "change",
    [
        {"tile_px": 512},
        {"overlap_px": 32},
        {"blast_threshold_percent": 10.0},
        {"min_white_cells": 200},
        {"blast_cell_threshold": 0.1},
    ],
)
def test_each_pipeline_parameter_changes_the_key(change):
    assert result_key(PipelineConfig(**change), MODEL, scale_key(0.08, "user")) != BASE


def test_batch_size_and_the_classifier_settings_name_do_not_change_the_key():
    # The file is keyed by its sha256: the same classifier under another path is the same result.
    same = PipelineConfig(batch_size=32, classifier="/mnt/lab/classifier.pt")
    assert result_key(same, MODEL, scale_key(0.08, "user")) == BASE


def test_the_classifier_files_sha256_is_the_loaded_classifiers():
    assert classifier_file_sha256("default") == load_cell_classifier("default").info.sha256
    assert classifier_file_sha256("none") == ""


@pytest.fixture(scope="module")
def field():
    return generate_field(777, 512, 512, mpp=0.2, blast_fraction=0.3)


def _png(path, rgb):
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.mark.parametrize("how", ["user", "metadata", "estimated"])
def test_the_submitters_key_from_the_header_is_the_pipelines_from_the_slide(
    shipped_engine, field, tmp_path, how
):
    engine, info = shipped_engine
    classifier = load_cell_classifier("default")
    user_mpp = 0.2 if how == "user" else None
    if how == "metadata":  # a TIFF whose resolution says 0.2 um/px
        path = tmp_path / "field.tif"
        tifffile.imwrite(path, field.image, resolution=(1e4 / 0.2, 1e4 / 0.2), resolutionunit=3)
    else:
        path = _png(tmp_path / "field.png", field.image)
    config = config_for_engine(PipelineConfig(), engine)  # as the engine runs it (int8 keys apart)
    slide = read_slide(path, mpp=user_mpp)
    assert slide.mpp_source == how
    computed = process_slide(slide, engine, info, config, classifier=classifier).params_key
    submitted = file_result_key(
        path, user_mpp, config, ModelIdentity.of(info, classifier_file_sha256("default")), WholeSlideConfig()
    )
    assert submitted == computed


def test_a_model_file_with_other_preprocessing_is_another_key(shipped_engine, tmp_path, field):
    _, info = shipped_engine
    param = next(iter(info.preprocess))  # any of the preprocessing parameters the model was trained with
    changed = {**info.preprocess, param: _other(info.preprocess[param])}
    path = tmp_path / "other.pt"
    save_checkpoint(path, UNet(), dataclasses.replace(info, preprocess=changed, sha256=""))
    _, loaded = UNet.from_checkpoint(path)
    png = _png(tmp_path / "f.png", field.image)
    keys = [
        file_result_key(png, 0.2, PipelineConfig(), ModelIdentity.of(i), WholeSlideConfig())
        for i in (info, loaded)
    ]
    assert keys[0] != keys[1]


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return f"{value}-other"
