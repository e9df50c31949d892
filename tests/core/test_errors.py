"""blastq's errors carry fields (reason, path, value); nothing that reports them parses a message."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from blastq.core.adapters.db import connect, finish_job
from blastq.core.common.errors import InvalidSlide, ModelInvalid, ModelNotFound, NotFound, SlideTooLarge
from blastq.core.image.slide import read_slide
from blastq.core.segment.unet import UNet


def test_an_error_reads_as_one_line_and_keeps_its_fields():
    error = SlideTooLarge("50000x50000 pixels exceeds the maximum", path=Path("/data/a.png"), value=2.5e9)
    assert str(error) == "/data/a.png: 50000x50000 pixels exceeds the maximum"
    assert (error.reason, error.path, error.value) == (
        "50000x50000 pixels exceeds the maximum",
        "/data/a.png",
        2.5e9,
    )
    assert str(InvalidSlide("no pixel has a value")) == "no pixel has a value"
    copy = pickle.loads(pickle.dumps(error))  # across processes (Celery, multiprocessing) the fields survive
    assert type(copy) is SlideTooLarge and (copy.reason, copy.path, copy.value) == (
        error.reason,
        error.path,
        2.5e9,
    )


def test_a_slide_error_names_its_file_in_a_field(tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(InvalidSlide) as caught:
        read_slide(path)
    assert caught.value.path == str(path) and not caught.value.reason.startswith(str(path))


def test_a_missing_model_and_a_damaged_one_are_told_apart(tmp_path):
    with pytest.raises(ModelNotFound) as missing:
        UNet.from_checkpoint(tmp_path / "none.pt")
    assert missing.value.path == str(tmp_path / "none.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelInvalid) as invalid:
        UNet.from_checkpoint(damaged)
    assert not isinstance(invalid.value, ModelNotFound) and invalid.value.path == str(damaged)


def test_a_missing_row_is_a_blastq_error_that_names_its_key(tmp_path):
    db = connect(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with pytest.raises(NotFound) as caught:
        finish_job(db, "no-such-job", 1)
    assert caught.value.value == "no-such-job" and str(caught.value) == "no job no-such-job"
    assert isinstance(caught.value, LookupError)  # callers that caught LookupError still do


def test_the_reason_alone_follows_a_file_already_named_else_the_whole_line():
    about_image = InvalidSlide("truncated PNG", path="/data/a.png")
    assert about_image.reason_for(Path("/data/a.png")) == "truncated PNG"
    assert about_image.reason_for("/elsewhere/a.png", "a.png") == "/data/a.png: truncated PNG"
    about_model = ModelInvalid("not a blastq model checkpoint", path="/models/m.pt")
    assert about_model.reason_for("/data/a.png", "a.png") == "/models/m.pt: not a blastq model checkpoint"
    assert InvalidSlide("no pixel has a value").reason_for("a.png") == "no pixel has a value"
