"""End-to-end: results keyed by their scale, verdicts on too few cells, samples, `blastq results`.

The service parts run with no servers (SQLite, a file store, the embedded broker) and no worker
process: a job is run by the worker's task in this process, in the order the test chooses.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from blastq.cli.main import main
from blastq.core.cells.stats import verdict
from blastq.core.synth.field import generate_field

MIN_CELLS = 9  # the synthetic fields below have 5 to 8 white cells each


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory) -> Path:
    """One engine cache for the module: the ONNX export is made once, not once per test."""
    return tmp_path_factory.mktemp("engines")


@pytest.fixture
def data_dir(tmp_path, monkeypatch, engine_cache) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(data))
    monkeypatch.setenv("BLASTQ_ENGINE_CACHE_DIR", str(engine_cache))
    for var in (
        "BLASTQ_DATABASE_URL",
        "BLASTQ_STORE_URL",
        "BLASTQ_BROKER_URL",
        "BLASTQ_CONFIG",
        "BLASTQ_MODEL",
    ):
        monkeypatch.delenv(var, raising=False)
    return data


@pytest.fixture
def cli(data_dir):
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """images(seed, size) -> a PNG of a synthetic field at 0.2 um/px (no pixel size in the file)."""
    folder = tmp_path_factory.mktemp("fields")

    def image(seed: int, size: int = 512) -> Path:
        path = folder / f"field_{seed}_{size}.png"
        if not path.exists():
            field = generate_field(seed, size, size, mpp=0.2, blast_fraction=0.3)
            assert cv2.imwrite(str(path), cv2.cvtColor(field.image, cv2.COLOR_RGB2BGR))
        return path

    return image


def results_json(cli, *args) -> list[dict]:
    shown = cli("results", "--format", "json", *args)
    assert shown.exit_code == 0, shown.output
    return json.loads(shown.output)


# --- result keys ------------------------------------------------------------------------------------


def test_submit_reuses_only_a_result_computed_at_the_same_scale(cli, images):
    # The issue: `submit --mpp 0.1 --wait` answered "existing result" with the 0.08 result.
    image = images(31)
    assert cli("run", image, "--mpp", "0.08").exit_code == 0
    same = cli("submit", image, "--mpp", "0.08")
    assert same.exit_code == 0, same.output
    assert "succeeded (existing result" in same.output
    other = cli("submit", image, "--mpp", "0.1")
    assert other.exit_code == 0, other.output
    assert " queued" in other.output and "existing result" not in other.output
    assert "existing result" not in cli("submit", image).output  # estimated scale: a third result

    assert cli("run", image, "--mpp", "0.1").exit_code == 0
    rows = results_json(cli)
    assert sorted(r["mpp"] for r in rows) == [0.08, 0.1]  # two rows, one per scale
    assert len({r["params_key"] for r in rows}) == 2 and len({r["sha256"] for r in rows}) == 1
    reused = cli("submit", image, "--mpp", "0.1")
    assert f"existing result {next(r['id'] for r in rows if r['mpp'] == 0.1)})" in reused.output


def test_run_replacing_a_result_shows_when_it_was_computed_again(cli, images):
    image = images(32, 256)
    assert cli("run", image, "--mpp", "0.2").exit_code == 0
    (first,) = results_json(cli)
    assert cli("run", image, "--mpp", "0.2").exit_code == 0
    (again,) = results_json(cli)
    assert again["id"] == first["id"] and again["created_at"] > first["created_at"]


# --- verdicts ------------------------------------------------------------------------------------------


def test_a_crop_with_few_cells_gets_no_verdict_in_run_and_results(cli, images):
    crop = images(36, 192)  # two white cells in truth
    shown = cli("run", crop, "--mpp", "0.2")
    assert shown.exit_code == 0, shown.output
    (row,) = results_json(cli)
    assert 0 < row["white_cells"] < 100 and row["verdict"] == "insufficient cells" and row["flagged"] is False
    line = next(line for line in shown.output.splitlines() if line.startswith(str(crop)))
    assert f"insufficient cells ({row['white_cells']} < 100)" in line
    assert "% blasts" not in line and "FLAGGED" not in line  # nothing that reads like a verdict

    header, values = cli("results").output.splitlines()
    columns = header.split()
    assert "verdict" in columns
    flagged_at = header.index("flagged")
    assert values[flagged_at : flagged_at + 2] == "no"  # false is shown, not left blank
    assert "insufficient cells" in values


def test_the_minimum_is_a_setting(cli, images, monkeypatch):
    monkeypatch.setenv("BLASTQ_MIN_WHITE_CELLS", "1")
    shown = cli("run", images(36, 192), "--mpp", "0.2")
    assert "% blasts" in shown.output and "insufficient" not in shown.output
    assert results_json(cli)[0]["min_white_cells"] == 1


def test_results_csv_has_its_header_with_no_rows(cli):
    lines = cli("results", "--format", "csv").output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("id,image,sha256,model_version,params_key,")
    assert "verdict" in lines[0].split(",") and "neutrophil_percent" in lines[0]
    samples = cli("results", "--samples", "--format", "csv").output.splitlines()
    assert samples == [samples[0]] and samples[0].startswith("sample,images,pending,failed,white_cells")


# --- samples ----------------------------------------------------------------------------------------------


def test_run_with_a_sample_pools_its_images_and_keeps_adding_to_it(cli, images, tmp_path, monkeypatch):
    # Fields of a few cells each: below the minimum alone, above it pooled.
    monkeypatch.setenv("BLASTQ_MIN_WHITE_CELLS", str(MIN_CELLS))
    out = tmp_path / "out"
    a, b, c = images(35), images(39), images(36)
    shown = cli("run", "--sample", "P-1", a, b, "--mpp", "0.2", "--out", out)
    assert shown.exit_code == 0, shown.output
    per_image = [json.loads((out / p.stem / "summary.json").read_text()) for p in (a, b)]
    white = sum(s["white_cells"] for s in per_image)
    blasts = sum(s["blasts"] for s in per_image)
    sample_line = shown.output.splitlines()[-2]  # then "files written under ..."
    assert sample_line.startswith(f"sample P-1: 2 image(s), {white} white cells, {blasts} blasts")
    pooled = json.loads((out / "sample-summary.json").read_text())
    assert (pooled["sample"], pooled["images"]) == ("P-1", 2)
    assert (pooled["white_cells"], pooled["blasts"]) == (white, blasts)
    assert [s["verdict"] for s in per_image] == ["insufficient cells"] * 2
    expected = verdict(white, pooled["blast_percent"], 20.0, MIN_CELLS)
    assert pooled["verdict"] == expected != "insufficient cells"
    assert "Sample P-1" in (out / "sample-report.html").read_text()

    # A later run adds a field to the same sample: pooled from every recorded image.
    assert cli("run", "--sample", "P-1", c, "--mpp", "0.2").exit_code == 0
    listed = cli("results", "--sample", "P-1")
    assert len(listed.output.splitlines()) == 1 + 3 + 1  # header, three images, the pooled line
    (sample,) = json.loads(cli("results", "--samples", "--format", "json").output)
    assert sample["images"] == 3 and sample["white_cells"] == sum(r["white_cells"] for r in results_json(cli))
    assert {m["image"] for m in sample["members"]} == {a.name, b.name, c.name}


def test_run_with_a_sample_and_no_record_pools_this_runs_images(cli, images):
    shown = cli("run", "--no-record", "--sample", "P-2", images(34, 256), images(36, 256), "--mpp", "0.2")
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[-1].startswith("sample P-2: 2 image(s), ")


def test_a_bad_sample_name_is_one_line_before_any_work(cli, images):
    shown = cli("run", "--sample", " ", images(34, 256))
    assert shown.exit_code == 2 and shown.output.count("\n") == 1 and "sample name" in shown.output


def test_a_submitted_sample_is_pooled_right_whichever_image_finishes_last(cli, images, data_dir):
    from blastq.core.adapters.db import connect, get_sample, list_results
    from blastq.core.adapters.settings import load_settings
    from blastq.worker.celery_app import make_app
    from blastq.worker.tasks import PROCESS_SLIDE

    fields = [images(37), images(38), images(39)]
    submitted = cli("submit", "--sample", "P-3", *fields, "--mpp", "0.2")
    assert submitted.exit_code == 0, submitted.output
    job_ids = [line.split(" job ")[1].split()[0] for line in submitted.output.splitlines() if " job " in line]
    settings = load_settings()
    db = connect(settings.database_url.get_secret_value())
    try:
        assert get_sample(db, "P-3").pending == 3
        task = make_app(settings).tasks[PROCESS_SLIDE]
        for done, job_id in enumerate(reversed(job_ids), start=1):  # the workers finish in another order
            assert task.apply(args=[job_id]).get() == "succeeded"
            sample = get_sample(db, "P-3")
            assert (len(sample.images), sample.pending) == (done, 3 - done)
        rows = list_results(db, sample="P-3")
    finally:
        db.dispose()
    assert sample.stats.white_cells == sum(r.white_cells for r in rows) > 0 and len(rows) == 3
    assert sample.stats.blasts == sum(r.blasts for r in rows)
    # Submitting one of them again reuses its result and counts it once.
    again = cli("submit", "--sample", "P-3", fields[0], "--mpp", "0.2")
    assert "existing result" in again.output
    listed = cli("results", "--sample", "P-3").output.splitlines()
    assert listed[-1].startswith(f"sample P-3: 3 image(s), {sample.stats.white_cells} white cells")
