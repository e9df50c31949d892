"""What `blastq run` and `blastq submit` take from their arguments, and what they check before any work."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from blastq.core.adapters.settings import check_local_folders, load_settings
from blastq.core.common.errors import InvalidConfig, InvalidSlide, SlideTooLarge
from blastq.core.image.inputs import (
    OUTPUT_NAMES,
    check_image_header,
    check_writable_folder,
    expand_inputs,
    output_folder_name,
)
from blastq.core.image.slide import check_user_mpp
from blastq.core.synth.field import generate_field, write_dataset


def _png(path: Path, size: int = 32) -> Path:
    assert cv2.imwrite(str(path), np.full((size, size, 3), 200, np.uint8))
    return path


def _expand_within(paths, timeout_s: float = 10.0):
    """expand_inputs in a thread: a FIFO or a device read by mistake would block it forever."""
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(inputs=expand_inputs(paths)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "expanding the folder hung"
    return done["inputs"]


def test_a_synth_folder_gives_its_smears_only(tmp_path):
    paths = write_dataset(tmp_path / "smears", 2, height_px=64, width_px=64)
    for arg in (tmp_path / "smears", str(tmp_path / "smears" / "*.png")):
        inputs = expand_inputs([arg])
        assert list(inputs.files) == paths and not inputs.refused


def test_truth_beside_the_image_and_result_folders_are_skipped_and_said(tmp_path):
    old = tmp_path / "old"  # `blastq synth` before truth/: the masks sat beside the images
    old.mkdir()
    _png(old / "synth_00000.png")
    for suffix in (".mask.png", ".nuclei.png", ".instances.tif"):
        (old / f"synth_00000{suffix}").write_bytes(b"truth")
    result = tmp_path / "results" / "synth_00000"  # a `blastq run --out` folder
    result.mkdir(parents=True)
    for name in ("mask.png", "nuclei.png", "overlay.png", "instances.tif", "summary.json"):
        (result / name).write_bytes(b"output")
    inputs = expand_inputs([old, str(result / "*")])
    assert [p.name for p in inputs.files] == ["synth_00000.png"]
    assert len(inputs.skipped) == 3 + 5
    line = inputs.skipped_line()
    assert "3 synthetic truth file(s)" in line and "5 blastq output file(s)" in line and "\n" not in line
    # An image called mask.png in an ordinary folder is an image.
    plain = tmp_path / "plain"
    plain.mkdir()
    assert expand_inputs([_png(plain / "mask.png")]).files == (plain / "mask.png",)
    assert expand_inputs([plain]).files == (plain / "mask.png",)


def test_the_output_names_cover_every_artifact():
    from blastq.core.outputs.artifacts import ARTIFACT_NAMES

    assert set(ARTIFACT_NAMES) <= OUTPUT_NAMES


def test_a_folder_refuses_pipes_devices_and_symlinks_leading_out_without_reading_them(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    good = _png(folder / "a.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "passwd.png").symlink_to("/etc/passwd")
    (folder / "inside.png").symlink_to(good)  # inside the folder: the same file, taken once
    inputs = _expand_within([folder])
    assert inputs.files == (good,)
    reasons = {Path(r.path).name: r.reason for r in inputs.refused}
    assert reasons.keys() == {"pipe.png", "zero.png", "passwd.png"}
    assert reasons["pipe.png"] == "not a regular file (a named pipe)"
    assert "outside the folder" in reasons["zero.png"] and "outside the folder" in reasons["passwd.png"]
    globbed = _expand_within([str(folder / "*.png")])
    assert globbed.files == (good,) and len(globbed.refused) == 3


def test_a_named_pipe_or_device_named_directly_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    inputs = _expand_within([tmp_path / "pipe.png", "/dev/zero", tmp_path / "missing.png"])
    assert not inputs.files
    assert [r.reason for r in inputs.refused] == [
        "not a regular file (a named pipe)",
        "not a regular file (a device)",
        "no such file",
    ]


@pytest.mark.parametrize(
    "file_name,expected",
    [
        ("...png", "image"),
        ("..png", "image"),  # stem "."
        (".png", ".png"),  # Path(".png").stem is ".png": a hidden name, still one part inside OUT
        ("a..b.png", "a..b"),
        ("back\\slash.png", "back_slash"),
        ("  .png", "image"),
        ("slide.png", "slide"),
    ],
)
def test_output_folder_names_are_one_part_inside_out(tmp_path, file_name, expected):
    name = output_folder_name(Path(file_name), set())
    assert name == expected
    out = tmp_path / "out"
    assert (out / name).resolve().parent == out.resolve()


def test_output_folder_names_are_unique():
    used: set[str] = set()
    assert [
        output_folder_name(Path(p), used) for p in ("a/x.png", "b/x.png", "c/X.png", "...png", "..png")
    ] == [
        "x",
        "x-2",
        "X-3",  # a case-insensitive file system would merge x and X
        "image",
        "image-2",
    ]


def test_the_header_check_refuses_what_the_worker_would_refuse(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InvalidSlide, match=r"notes.png: not a PNG, JPEG, BMP or TIFF image"):
        check_image_header(tmp_path / "notes.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidSlide, match="empty.png: empty file"):
        check_image_header(tmp_path / "empty.png")
    big = _png(tmp_path / "big.png", 64)
    with pytest.raises(SlideTooLarge, match="64x64 pixels exceeds the maximum of 1000"):
        check_image_header(big, max_pixels=1000)
    check_image_header(big)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InvalidSlide, match="not a regular file"):
        check_image_header(tmp_path / "pipe.png")


def test_the_header_check_passes_every_format_without_decoding(tmp_path):
    import tifffile

    rgb = generate_field(1, 64, 64).image
    for name in ("a.png", "a.jpg", "a.bmp"):
        assert cv2.imwrite(str(tmp_path / name), rgb)
        check_image_header(tmp_path / name)
    tifffile.imwrite(tmp_path / "a.tif", rgb)
    check_image_header(tmp_path / "a.tif")


@pytest.mark.parametrize("mpp", [-1.0, 0.0, float("nan"), 50.0])
def test_an_implausible_mpp_is_refused(mpp):
    with pytest.raises(InvalidConfig, match="not a plausible pixel size"):
        check_user_mpp(mpp)


def test_an_unwritable_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(InvalidConfig, match=r"the output folder .*file/out is not writable"):
        check_writable_folder(tmp_path / "file" / "out", "the output folder")
    check_writable_folder(tmp_path / "new" / "out", "the output folder")
    assert (tmp_path / "new" / "out").is_dir() and not list((tmp_path / "new" / "out").iterdir())


def test_an_unwritable_data_dir_is_named_before_any_work(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    settings = load_settings({"BLASTQ_DATA_DIR": str(tmp_path / "file" / "data")})
    with pytest.raises(InvalidConfig, match=r"the database folder .*file/data is not writable"):
        check_local_folders(settings)
    with pytest.raises(InvalidConfig, match="the engine cache"):
        check_local_folders(settings, record=False)
    check_local_folders(load_settings({"BLASTQ_DATA_DIR": str(tmp_path / "fine")}), queue=True)
