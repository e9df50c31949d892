"""End-to-end: the commands a lab user types."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from blastq.cli.main import main
from blastq.core.outputs.artifacts import ARTIFACT_NAMES


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "data"))
    for var in ("BLASTQ_DATABASE_URL", "BLASTQ_STORE_URL", "BLASTQ_CONFIG", "BLASTQ_MODEL"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smears")
    result = CliRunner().invoke(
        main, ["synth", "--count", "2", "--size", "512", "--out", str(out), "--seed", "40"]
    )
    assert result.exit_code == 0, result.output
    return out


def test_synth_writes_images_and_keeps_their_truth_in_a_sub_folder(smears):
    assert sorted(p.name for p in smears.iterdir()) == ["synth_00040.png", "synth_00041.png", "truth"]
    assert sorted(p.name for p in (smears / "truth").iterdir())[:3] == [
        "synth_00040.instances.tif",
        "synth_00040.mask.png",
        "synth_00040.nuclei.png",
    ]
    assert len(list((smears / "truth").iterdir())) == 6


def test_synth_writes_wide_fields_in_a_stain_family(cli, tmp_path):
    from blastq.core.synth.field import generate_field, read_field_masks

    result = cli("synth", "--count", "1", "--size", "256", "--seed", "3", "--out", tmp_path, "--variety", "wide",
                 "--stain-family", "leishman")  # fmt: skip
    assert result.exit_code == 0, result.output
    field = generate_field(3, 256, 256, variety="wide", stain_family="leishman")
    image = cv2.cvtColor(cv2.imread(str(tmp_path / "synth_00003.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(image, field.image)
    assert np.array_equal(read_field_masks(tmp_path / "synth_00003.png")[0], field.classes)
    bad = cli("synth", "--count", "1", "--out", tmp_path, "--stain-family", "gram")
    assert bad.exit_code == 2 and "gram" in bad.output


def test_run_takes_folders_and_globs_as_submit_does_smears_only(cli, smears, tmp_path):
    old = tmp_path / "old"  # a folder of an older `blastq synth`: truth beside the image
    old.mkdir()
    shutil.copy(smears / "synth_00040.png", old / "field.png")
    for suffix in (".mask.png", ".nuclei.png"):
        shutil.copy(smears / "truth" / f"synth_00040{suffix}", old / f"field{suffix}")
    result = cli("run", smears, str(old / "*.png"), "--mpp", "0.2", "--no-record")
    assert result.exit_code == 0, result.output
    scored = [line.split(":")[0] for line in result.output.splitlines() if "white cells" in line]
    assert scored == [
        str(smears / "synth_00040.png"),
        str(smears / "synth_00041.png"),
        str(old / "field.png"),
    ]
    assert "skipped 2 synthetic truth file(s) (field.mask.png, field.nuclei.png): not smears" in result.output


def test_a_result_folder_given_back_to_run_is_skipped_and_said(cli, smears, tmp_path):
    out = tmp_path / "r"
    assert cli("run", smears / "synth_00040.png", "--out", out, "--mpp", "0.2", "--no-record").exit_code == 0
    result = cli("run", out / "synth_00040", "--mpp", "0.2", "--no-record")
    assert result.exit_code == 1
    assert "blastq output file(s)" in result.output and "no images in this folder" in result.output
    assert "white cells" not in result.output


def test_output_folders_stay_inside_out_whatever_the_image_name(cli, smears, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(smears / "synth_00040.png", images / "...png")
    out = tmp_path / "nested" / "out"
    result = cli("run", images / "...png", "--out", out, "--mpp", "0.2", "--no-record")
    assert result.exit_code == 0, result.output
    assert (out / "image" / "summary.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # nothing written beside OUT


def test_a_folder_with_a_pipe_and_a_device_link_fails_those_lines_and_runs_the_rest(cli, smears, tmp_path):
    import os

    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(smears / "synth_00040.png", folder / "a.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    result = cli("run", folder, "--mpp", "0.2", "--no-record")
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and any("named pipe" in f for f in failed) and any("outside" in f for f in failed)
    assert "a.png: " in result.output and "2 of 3 image(s) failed" in result.output


def test_what_can_be_checked_fails_before_the_model_loads(cli, smears, tmp_path, monkeypatch):
    from blastq.core.pipeline.runner import LocalRunner

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(LocalRunner, "from_settings", no_model)
    image = smears / "synth_00040.png"
    result = cli("run", image, "--mpp", "-1")
    assert result.exit_code == 2 and "mpp=-1.0 is not a plausible pixel size" in result.output
    (tmp_path / "file").write_text("not a folder")
    result = cli("run", image, "--out", tmp_path / "file" / "out")
    assert result.exit_code == 2
    assert f"the output folder (--out) {tmp_path}/file/out is not writable" in result.output
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "file" / "data"))
    result = cli("run", image, "--mpp", "0.2")
    assert result.exit_code == 2 and "the database folder" in result.output
    assert "file/data is not writable" in result.output and "not reachable" not in result.output
    assert "Traceback" not in result.output


def test_a_worker_names_an_unwritable_data_dir_before_it_starts(cli, tmp_path, monkeypatch):
    import blastq.worker.celery_app as celery_app

    def no_worker(*_args, **_kwargs):
        raise AssertionError("the worker started on a data directory it cannot write")

    monkeypatch.setattr(celery_app, "run_worker", no_worker)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "file" / "data"))
    result = cli("worker")
    assert result.exit_code == 2
    assert "file/data is not writable" in result.output and "not reachable" not in result.output


@pytest.mark.parametrize("command", ["worker", "submit"])
def test_a_broker_url_that_does_not_parse_is_one_line_without_its_password(cli, smears, command, monkeypatch):
    monkeypatch.setenv("BLASTQ_BROKER_URL", "redis://:se/cr@t@127.0.0.1:6390/0")
    args = ["worker"] if command == "worker" else ["submit", smears / "synth_00040.png"]
    result = cli(*args)
    assert result.exit_code == 2
    assert "BLASTQ_BROKER_URL does not parse as a URL: redis://:***@127.0.0.1:6390/0" in result.output
    assert "%2F" in result.output and "se/" not in result.output and "Traceback" not in result.output
    assert cli("status").output.startswith("jobs: 0 queued, 0 running")  # submit wrote no job row


def test_config_never_shows_a_password_whatever_its_characters(cli, monkeypatch):
    monkeypatch.setenv("BLASTQ_DATABASE_URL", "postgresql://lab:se/cr@t@db/blastq?sslpassword=k3y")
    monkeypatch.setenv("BLASTQ_BROKER_URL", "redis://:hu/nt@er2@q:6379/0")
    shown = cli("config").output
    for secret in ("se/cr@t", "cr@t", "k3y", "hu/nt@er2", "er2"):
        assert secret not in shown
    assert "postgresql://lab:***@db/blastq?sslpassword=***" in shown and "redis://:***@q:6379/0" in shown


def test_a_module_of_a_missing_extra_is_one_line_naming_the_extra(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if `blastq[service]` were not installed
    monkeypatch.setenv("BLASTQ_DATABASE_URL", "postgresql+psycopg://lab@127.0.0.1/blastq")
    result = cli("status")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "blastq: error: this needs psycopg, which is not installed: pip install 'blastq[service]'"
    )


def test_run_writes_the_output_contract_and_records_the_result(cli, smears, tmp_path):
    out = tmp_path / "results"
    result = cli("run", smears / "synth_00040.png", smears / "synth_00041.png", "--out", out, "--mpp", "0.2")
    assert result.exit_code == 0, result.output
    assert "white cells" in result.output and "blasts" in result.output
    for stem in ("synth_00040", "synth_00041"):
        files = {p.name for p in (out / stem).iterdir()}
        assert files == set(ARTIFACT_NAMES)
        assert {
            "mask.png",
            "nuclei.png",
            "instances.tif",
            "overlay.png",
            "cells.csv",
            "cells.geojson",
        } < files
    summary = json.loads((out / "synth_00040" / "summary.json").read_text())
    assert summary["mpp_source"] == "user" and summary["mpp"] == 0.2
    # The shipped classifier typed every cell: the differential covers them all, and cells.csv names types.
    from blastq.core.cells.classify import default_classifier_path, load_classifier

    shipped = load_classifier(default_classifier_path()).info.version
    assert summary["classifier_version"] == shipped and "differential:" in result.output
    assert sum(d["count"] for d in summary["differential"].values()) == summary["white_cells"]
    rows = (out / "synth_00040" / "cells.csv").read_text().splitlines()
    types = {line.split(",")[rows[0].split(",").index("cell_type")] for line in rows[1:]}
    assert types and types <= set(summary["differential"])
    db = create_engine(f"sqlite:///{tmp_path}/data/blastq.db")
    with db.connect() as c:
        assert c.execute(text("select count(*) from results")).scalar() == 2
        n_cells = c.execute(text("select count(*) from cells")).scalar()
    assert n_cells == sum(
        json.loads((out / s / "summary.json").read_text())["white_cells"]
        for s in ("synth_00040", "synth_00041")
    )
    stored = list((tmp_path / "data" / "store" / "slides").rglob("summary.json"))
    assert len(stored) == 2


def test_running_a_slide_again_does_not_duplicate_its_result(cli, smears, tmp_path):
    for _ in range(2):
        assert cli("run", smears / "synth_00040.png", "--mpp", "0.2").exit_code == 0
    with create_engine(f"sqlite:///{tmp_path}/data/blastq.db").connect() as c:
        assert c.execute(text("select count(*) from results")).scalar() == 1


def test_bad_images_fail_alone_with_one_line_each(cli, smears, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes((smears / "synth_00040.png").read_bytes()[:2000])
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    out = tmp_path / "r"
    result = cli(
        "run",
        bad,
        smears / "synth_00041.png",
        text_file,
        tmp_path / "missing.png",
        "--out",
        out,
        "--mpp",
        "0.2",
    )
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 3
    assert any("broken.png" in line for line in failed) and any("missing.png" in line for line in failed)
    assert (out / "synth_00041" / "summary.json").is_file()
    assert "Traceback" not in result.output


def test_two_images_with_one_name_get_two_folders(cli, smears, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(smears / "synth_00041.png", other / "synth_00040.png")
    out = tmp_path / "r"
    assert (
        cli(
            "run", smears / "synth_00040.png", other / "synth_00040.png", "--out", out, "--mpp", "0.2"
        ).exit_code
        == 0
    )
    assert (out / "synth_00040").is_dir() and (out / "synth_00040-2").is_dir()


def test_mpp_is_estimated_from_red_cells_when_not_given(cli, smears, tmp_path):
    out = tmp_path / "r"
    assert cli("run", smears / "synth_00040.png", "--out", out, "--no-record").exit_code == 0
    summary = json.loads((out / "synth_00040" / "summary.json").read_text())
    assert summary["mpp_source"] == "estimated" and summary["mpp"] == pytest.approx(0.2, rel=0.2)


def test_a_bad_model_path_is_one_clear_line(cli, smears, tmp_path):
    result = cli("run", smears / "synth_00040.png", "--model", tmp_path / "none.pt")
    assert result.exit_code == 2 and "model file not found" in result.output


def test_a_bad_classifier_setting_is_one_clear_line_and_none_turns_typing_off(
    cli, smears, tmp_path, monkeypatch
):
    from blastq.core.segment.unet import default_model_path

    monkeypatch.setenv("BLASTQ_CLASSIFIER", str(default_model_path()))  # a U-Net, not a classifier
    result = cli("run", smears / "synth_00040.png", "--mpp", "0.2", "--no-record")
    assert result.exit_code == 2 and "not a blastq cell classifier" in result.output
    monkeypatch.setenv("BLASTQ_CLASSIFIER", "none")
    result = cli("run", smears / "synth_00040.png", "--mpp", "0.2", "--out", tmp_path / "r", "--no-record")
    assert result.exit_code == 0 and "differential" not in result.output
    summary = json.loads((tmp_path / "r" / "synth_00040" / "summary.json").read_text())
    assert summary["differential"] == {} and summary["classifier_version"] == ""


def test_evaluate_reports_metrics_on_a_synth_folder(cli, smears):
    result = cli("evaluate", smears, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{") :])
    assert figures["synthetic"]["fields"] == 2 and 0 <= figures["synthetic"]["blast_dice"] <= 1


def test_evaluate_takes_a_registered_version_and_names_an_unknown_one(cli, smears, tmp_path):
    from dataclasses import replace

    import torch

    from blastq.core.segment.unet import UNet, default_model_path, save_checkpoint

    _, shipped = UNet.from_checkpoint(default_model_path())
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, UNet(depth=2, width=4), replace(shipped, version="tiny-1", sha256=""))
    assert cli("models", "register", path).exit_code == 0
    path.unlink()  # evaluation must use the registry's copy, fetched from the store

    result = cli("evaluate", smears, "--model", "tiny-1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :])["model_version"] == "tiny-1"

    result = cli("evaluate", smears, "--model", "no-such-version")
    assert result.exit_code == 2 and "no-such-version" in result.output


def test_evaluate_refuses_a_folder_without_pairs(cli, tmp_path):
    result = cli("evaluate", tmp_path)
    assert result.exit_code == 2 and "neither" in result.output


def test_the_console_script_is_installed_and_teaches():
    exe = Path(sys.executable).with_name("blastq")
    out = subprocess.run([str(exe), "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--mpp" in out and "--out" in out


def test_python_m_blastq_and_version_work():
    for command in (
        [sys.executable, "-m", "blastq", "--version"],
        [str(Path(sys.executable).with_name("blastq")), "--version"],
    ):
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd="/").stdout
        assert out.startswith("blastq, version ")
    out = subprocess.run(
        [sys.executable, "-m", "blastq", "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--mpp" in out and "Usage: blastq run" in out


def test_png_overlay_is_a_viewable_image(cli, smears, tmp_path):
    out = tmp_path / "r"
    cli("run", smears / "synth_00040.png", "--out", out, "--mpp", "0.2", "--no-record")
    img = cv2.imread(str(out / "synth_00040" / "overlay.png"))
    assert img is not None and img.shape[:2] == (512, 512) and np.ptp(img) > 0


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_writes_a_model_file_that_loads(cli, tmp_path, fmt):
    from blastq.core.segment.unet import default_model_path

    out = tmp_path / f"model.{fmt}"
    result = cli("export", default_model_path(), "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    if fmt == "onnx":
        import onnx

        onnx.checker.check_model(onnx.load(str(out)))
    else:
        import torch

        assert torch.jit.load(str(out))(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_train_submit_queues_a_run_for_the_trainer_service(cli, tmp_path):
    result = cli(
        "train",
        "--submit",
        "--out",
        tmp_path / "m.pt",
        "--synth-fields",
        "2",
        "--epochs",
        "1",
        "--steps",
        "1",
    )
    assert result.exit_code == 0, result.output
    run_id = result.output.split("training run ")[1].split()[0]
    status = cli("trainer", "status", run_id)
    assert status.exit_code == 0 and "queued" in status.output


def test_a_whole_slide_runs_chunk_by_chunk_and_is_recorded(cli, tmp_path):
    """`blastq synth-slide` writes an Aperio SVS (read through OpenSlide); `blastq run` processes it by
    region, writes pyramidal TIFF masks and records the result and every cell."""
    from blastq.core.outputs.tiffout import read_tiff_level, tiff_levels

    slide = tmp_path / "mosaic.svs"
    made = cli("synth-slide", slide, "--width", "1400", "--height", "1200", "--format", "svs", "--seed", "3")
    assert made.exit_code == 0, made.output
    out = tmp_path / "results"
    result = cli("run", slide, "--out", out)
    assert result.exit_code == 0, result.output
    assert "0.200 um/px metadata" in result.output  # the SVS's MPP, read by OpenSlide
    files = {p.name for p in (out / "mosaic").iterdir()}
    assert {"mask.tif", "nuclei.tif", "instances.tif", "overlay.png", "cells.csv", "summary.json"} <= files
    summary = json.loads((out / "mosaic" / "summary.json").read_text())
    inst = read_tiff_level(out / "mosaic" / "instances.tif")
    assert inst.shape == (1200, 1400) and tiff_levels(out / "mosaic" / "instances.tif")[1] == (600, 700)
    assert int(inst.max()) == summary["white_cells"] > 20
    with create_engine(f"sqlite:///{tmp_path}/data/blastq.db").connect() as c:
        assert c.execute(text("select white_cells from results")).scalar() == summary["white_cells"]
        assert c.execute(text("select count(*) from cells")).scalar() == summary["white_cells"]
    stored = {p.name for p in (tmp_path / "data" / "store" / "slides").rglob("*") if p.is_file()}
    assert {"mask.tif", "instances.tif", "cells.geojson", "gallery.png", "gallery.json"} <= stored


def test_a_truncated_whole_slide_fails_with_one_line(cli, tmp_path):
    from blastq.core.synth.slide import write_synthetic_slide

    slide = tmp_path / "cut.tif"
    write_synthetic_slide(slide, 1024, 1024, field_px=512, pyramid=False)
    slide.write_bytes(slide.read_bytes()[: slide.stat().st_size // 2])
    result = cli("run", slide, "--no-record")
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "cut.tif" in failed[0]


def test_a_corrupt_tile_fails_the_whole_slide_with_one_line_and_no_files(cli, tmp_path):
    import tifffile

    from blastq.core.synth.slide import write_synthetic_slide

    slide = tmp_path / "bad.tif"
    write_synthetic_slide(slide, 1024, 1024, field_px=512, pyramid=False)
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        offset, size = page.dataoffsets[2], page.databytecounts[2]
    data = bytearray(slide.read_bytes())
    data[offset + 10 : offset + size - 10] = b"\x07" * (size - 20)
    slide.write_bytes(bytes(data))
    out = tmp_path / "results"
    result = cli("run", slide, "--out", out, "--no-record")
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.startswith("FAILED")]
    assert "bad.tif" in line and "cannot decode TIFF tile" in line
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no half-written masks, no scratch


def test_the_run_line_says_how_far_an_estimated_scale_can_be_trusted():
    from types import SimpleNamespace

    from blastq.cli.main import _scale_text

    given = SimpleNamespace(mpp=0.1, mpp_source="user", mpp_confidence=None)
    assert _scale_text(given) == "0.100 um/px user"
    sure = SimpleNamespace(mpp=0.2, mpp_source="estimated", mpp_confidence=0.86)
    assert _scale_text(sure) == "0.200 um/px estimated, confidence 0.86"
    unsure = SimpleNamespace(mpp=0.116, mpp_source="estimated", mpp_confidence=0.04)
    assert _scale_text(unsure).endswith("confidence 0.04 (low: few red cells to measure; pass --mpp)")


def test_a_lab_fits_a_blast_caller_on_its_labelled_cells_and_runs_with_it(cli, smears, tmp_path, monkeypatch):
    import csv

    from blastq.core.synth.field import read_field_masks

    out = tmp_path / "out"
    images = [smears / "synth_00040.png", smears / "synth_00041.png"]
    assert cli("run", *images, "--out", out, "--mpp", "0.2", "--no-record").exit_code == 0
    # The lab's review, here from the generator's truth: each cell.csv gets a truth column.
    labelled = []
    for image in images:
        classes, _, _ = read_field_masks(image)
        table = out / image.stem / "cells.csv"
        rows = list(csv.DictReader(table.open()))
        for row in rows:
            x, y = round(float(row["centroid_x"])), round(float(row["centroid_y"]))
            row["truth"] = {0: "", 1: "other", 2: "blast"}[int(classes[y, x])]
        with (tmp_path / f"{image.stem}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, [*rows[0].keys()])
            writer.writeheader()
            writer.writerows(rows)
        labelled.append(tmp_path / f"{image.stem}.csv")
    caller = tmp_path / "lab.json"
    result = cli("blast-caller", "fit", *labelled, "--out", caller, "--version", "lab-1")
    assert result.exit_code == 0, result.output
    assert "held out: out-of-fold" in result.output and "share rule alone" in result.output
    assert f"BLASTQ_BLAST_CALLER={caller}" in result.output
    first = json.loads((out / "synth_00040" / "summary.json").read_text())
    assert first["blast_call"] == "blast share >= 0.5"
    monkeypatch.setenv("BLASTQ_BLAST_CALLER", str(caller))
    again = tmp_path / "again"
    assert cli("run", images[0], "--out", again, "--mpp", "0.2", "--no-record").exit_code == 0
    second = json.loads((again / "synth_00040" / "summary.json").read_text())
    assert second["blast_call"].startswith("blast caller lab-1: P(blast) >= ")
    assert second["params_key"] != first["params_key"]  # a result of another call is another result
    # A caller file that is not one stops the command before any image is read.
    (tmp_path / "broken.json").write_text("{")
    monkeypatch.setenv("BLASTQ_BLAST_CALLER", str(tmp_path / "broken.json"))
    result = cli("run", images[0], "--mpp", "0.2", "--no-record")
    assert result.exit_code == 2 and "broken.json: not a JSON file" in result.output
    assert "Traceback" not in result.output


def test_blastq_train_shows_the_defaults_a_training_run_uses():
    import dataclasses

    from blastq.trainer.train import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    options = {p.name: p.default for p in main.commands["train"].params}
    fields = {
        "synth_fields": "synth_train", "epochs": "max_epochs", "steps": "steps_per_epoch", "patience": "patience",
        "width": "width", "depth": "depth", "seed": "seed", "model_version": "version",
        "synth_variety": "synth_variety", "lr": "lr",
    }  # fmt: skip
    assert {o: options[o] for o in fields} == {o: defaults[f] for o, f in fields.items()}
    assert tuple(options["synth_families"].split(",")) == defaults["synth_families"]
    assert tuple(options["synth_mpp"]) == (defaults["synth_mpp_min"], defaults["synth_mpp_max"])


@pytest.mark.parametrize(
    ("command", "option", "setting"),
    [
        (["worker"], "concurrency", "worker_concurrency"),
        (["trainer"], "concurrency", "worker_concurrency"),
        (["watch"], "settle_s", "watch_settle_s"),
        (["watch"], "interval_s", "watch_interval_s"),
    ],
)
def test_an_option_that_sets_a_setting_is_also_named_after_it_and_defaults_to_it(
    command, option, setting, tmp_path
):
    cmd = main
    for name in command:
        cmd = cmd.commands[name]
    (param,) = [p for p in cmd.params if p.name == option]
    # BLASTQ_WORKER_CONCURRENCY <-> --worker-concurrency, beside the short name the CLI always had
    assert f"--{setting.replace('_', '-')}" in param.opts
    ctx = cmd.make_context(cmd.name, [str(tmp_path)] if command == ["watch"] else [])
    assert ctx.params[option] is None  # not given: the setting (variable, TOML file or default) decides
