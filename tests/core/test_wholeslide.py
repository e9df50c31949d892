"""Whole slides chunk by chunk: the same cells as the whole image, each once, and bounded scratch."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from blastq.core.cells.classify import load_cell_classifier
from blastq.core.cells.instances import CellMaps, CellRecord
from blastq.core.common.errors import InvalidConfig, InvalidSlide, SlideTooLarge
from blastq.core.image.slide import Slide
from blastq.core.image.wsi import ArrayReader
from blastq.core.outputs.tiffout import read_tiff_level, tiff_levels
from blastq.core.pipeline.field import PipelineConfig, config_for_engine, process_slide
from blastq.core.pipeline.resultkey import ModelIdentity, result_key, scale_key
from blastq.core.pipeline.wholeslide import (
    DiskRaster,
    WholeSlideConfig,
    _take_cells,
    chunk_grid,
    process_whole_slide,
    whole_slide_key,
)
from blastq.core.synth.field import generate_field


def _centroids(cells) -> np.ndarray:
    return np.array([[c.centroid_x, c.centroid_y] for c in cells])


def _unmatched(a: np.ndarray, b: np.ndarray, tol: float = 4.0) -> tuple[int, int]:
    d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    return int((d.min(1) > tol).sum()), int((d.min(0) > tol).sum())


@pytest.mark.parametrize("mpp", [0.2, 0.25])
def test_chunked_slide_finds_the_whole_images_cells_once(shipped_engine, tmp_path, mpp):
    """Many chunk borders through crowded, touching cells (and, at 0.25 um/px, a resampled slide):
    every cell the whole-image pipeline finds is found once, at the same place, in slide pixels."""
    engine, info = shipped_engine
    field = generate_field(23, 1024, 1280, mpp=mpp, touching_fraction=0.6, wbc_per_10k_um2=12)
    whole = process_slide(Slide(field.image, mpp, "user", "f", "0"), engine, info)
    wsi = WholeSlideConfig(chunk_px=384)  # a 5x4 grid at the model's scale
    result = process_whole_slide(
        ArrayReader(field.image, "f.tif", mpp), engine, info, tmp_path / "out", sha256="abc", wsi=wsi
    )
    assert result.chunks >= 12
    assert len(result.cells) == len(whole.maps.cells) == len(field.cells)
    assert _unmatched(_centroids(whole.maps.cells), _centroids(result.cells)) == (0, 0)
    assert [c.cell_id for c in result.cells] == list(range(1, len(result.cells) + 1))
    # The same call for every cell, but for one whose blast share sits near the threshold, where a chunk's
    # context moves it a little (0.49 whole, 0.51 chunked; 0.41 and 0.35 on a resampled slide).
    for cell in whole.maps.cells:
        twin = min(
            result.cells,
            key=lambda c: (c.centroid_x - cell.centroid_x) ** 2 + (c.centroid_y - cell.centroid_y) ** 2,
        )
        assert twin.blast_probability == pytest.approx(cell.blast_probability, abs=0.1)
        if twin.label != cell.label:
            assert abs(cell.blast_probability - 0.5) < 0.1 and abs(twin.blast_probability - 0.5) < 0.1
    # The rasters: model scale, every cell id present once, mask labels agree with the cell records.
    inst = read_tiff_level(result.files["instances.tif"])
    mask = read_tiff_level(result.files["mask.tif"])
    nuclei = read_tiff_level(result.files["nuclei.tif"])
    scale = mpp / info.mpp
    assert inst.shape == (round(1024 * scale), round(1280 * scale)) == mask.shape == nuclei.shape
    assert set(np.unique(inst)) == set(range(len(result.cells) + 1))
    for cell in result.cells:
        labels = np.unique(mask[inst == cell.cell_id])
        assert labels.tolist() == [2 if cell.label == "blast" else 1]
    assert not nuclei[inst == 0].any()
    assert ((inst > 0) == (mask > 0)).all()
    # Pixel agreement with the whole image, at the model's scale.
    whole_fg = whole.maps.instances > 0
    if scale != 1:
        import cv2

        whole_fg = (
            cv2.resize(whole_fg.astype(np.uint8), inst.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        )
    assert ((inst > 0) == whole_fg).mean() > 0.995
    # Records are in slide pixels: areas match the whole image's.
    assert sum(c.area_px for c in result.cells) == pytest.approx(
        sum(c.area_px for c in whole.maps.cells), rel=0.01
    )
    assert result.width == 1280 and result.height == 1024 and result.mpp == mpp
    assert not list((tmp_path / "out").glob(".blastq-wsi-*")), "scratch rasters left behind"


def test_whole_slide_files_and_typing(shipped_engine, tmp_path):
    engine, info = shipped_engine
    field = generate_field(7, 900, 700, mpp=0.2)
    classifier = load_cell_classifier("default")
    out = tmp_path / "out"
    result = process_whole_slide(
        ArrayReader(field.image, "slide.tif", 0.2),
        engine,
        info,
        out,
        sha256="abc",
        wsi=WholeSlideConfig(chunk_px=384),
        classifier=classifier,
    )
    names = {"mask.tif", "nuclei.tif", "instances.tif", "overlay.png", "cells.csv", "cells.geojson"}
    gallery = {"gallery.png", "gallery-labels.png", "gallery.json"}
    assert names | gallery | {"summary.json", "report.html"} == set(result.files)
    # The gallery holds the slide's cells under their slide-wide ids, each square with its cell.
    from blastq.core.cells import gallery_crop

    index = json.loads((out / "gallery.json").read_text())
    assert index["cell_ids"] == [c.cell_id for c in result.cells]
    sheet = cv2.imread(str(out / "gallery.png"))[..., ::-1]
    labels = cv2.imread(str(out / "gallery-labels.png"), cv2.IMREAD_UNCHANGED)
    assert all(gallery_crop(sheet, labels, i).cell.any() for i in range(len(index["cell_ids"])))
    assert all(p.is_file() for p in result.files.values())
    assert all(c.cell_type for c in result.cells)
    assert sum(d["count"] for d in result.stats.differential.values()) == len(result.cells)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["white_cells"] == len(result.cells)
    # Keyed like a small image (model, classifier, the metadata scale), then by the chunking.
    image_key = result_key(  # the config as the engine runs it (int8: keyed apart from fp32)
        config_for_engine(PipelineConfig(), engine),
        ModelIdentity.of(info, classifier.info.sha256),
        scale_key(0.2, "metadata"),
    )
    assert summary["params_key"] == whole_slide_key(image_key, WholeSlideConfig(chunk_px=384))
    assert summary["analysis_mpp"] == info.mpp and summary["classifier_version"]
    geo = json.loads((out / "cells.geojson").read_text())
    assert len(geo["features"]) == len(result.cells)
    # Each outline lies around its cell's centroid, in slide pixels.
    for feature, cell in zip(geo["features"], result.cells, strict=True):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert ring[:, 0].min() <= cell.centroid_x <= ring[:, 0].max()
        assert ring[:, 1].min() <= cell.centroid_y <= ring[:, 1].max()
    csv_lines = (out / "cells.csv").read_text().strip().splitlines()
    assert len(csv_lines) == len(result.cells) + 1
    assert tiff_levels(result.files["instances.tif"])[0] == (900, 700)


def test_take_cells_ownership_rule(tmp_path):
    """Which cells the centre chunk of a 3x3 grid takes (global coordinates in the comments)."""
    chunks = chunk_grid(300, 300, 100, 50)
    chunk = chunks[4]  # core rows/cols 100..200, window 50..250
    assert chunk.window == (50, 250, 50, 250)
    local = np.zeros((200, 200), np.int32)  # window-local: global - 50
    cells = []

    def add(cell_id, y0, x0, h=10, w=10, centroid=None):
        local[y0 - 50 : y0 - 50 + h, x0 - 50 : x0 - 50 + w] = cell_id
        cy, cx = centroid or (y0 + h / 2, x0 + w / 2)
        box = (y0 - 50, x0 - 50, y0 - 50 + h, x0 - 50 + w)
        cells.append(_record(cell_id, (cy - 50, cx - 50), box, h * w))

    add(1, 140, 140)  # own core: taken
    add(2, 90, 140)  # centre in the core above (earlier), not claimed: taken
    add(3, 205, 140)  # centre in the core below (later), whose window holds it: left to it
    add(4, 80, 60)  # earlier core, claimed by an earlier chunk: left
    add(5, 170, 150)  # own core, 30% claimed: taken
    add(6, 50, 100)  # cut by this window's top edge (global row 50): a part, left
    add(7, 145, 120, h=100, w=8, centroid=(215, 124))  # centre below, but reaching above that window: taken
    claims = DiskRaster(tmp_path / "claims.raw", 300, 300, np.uint32)
    try:
        claims.write(80, 60, np.full((10, 10), 9, np.uint32))
        claims.write(170, 150, np.full((3, 10), 8, np.uint32))
        maps = CellMaps(np.zeros((200, 200), np.uint8), np.zeros((200, 200), bool), local, tuple(cells))
        taken = _take_cells(maps, chunk, claims, chunks, 100, 3)
    finally:
        claims.close()
    assert [c.cell_id for c in taken] == [1, 2, 5, 7]


def _record(cell_id, centroid, bbox, area) -> CellRecord:
    return CellRecord(
        cell_id=cell_id,
        label="white_cell",
        centroid_x=centroid[1],
        centroid_y=centroid[0],
        bbox_x0=bbox[1],
        bbox_y0=bbox[0],
        bbox_x1=bbox[3],
        bbox_y1=bbox[2],
        area_px=area,
        area_um2=0.0,
        perimeter_um=0.0,
        circularity=0.0,
        nucleus_area_px=0,
        nucleus_area_um2=0.0,
        nc_ratio=0.0,
        mean_r=0.0,
        mean_g=0.0,
        mean_b=0.0,
        blast_probability=0.0,
    )


def test_disk_raster_windows_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ref = np.zeros((300, 257), np.uint32)
    raster = DiskRaster(tmp_path / "r.raw", 300, 257, np.uint32)
    try:
        for _ in range(30):
            y0, x0 = rng.integers(0, 250), rng.integers(0, 200)
            block = rng.integers(0, 2**32, (rng.integers(1, 50), rng.integers(1, 57)), dtype=np.uint32)
            raster.write(y0, x0, block)
            ref[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block
        assert (raster.read(0, 300, 0, 257) == ref).all()
        assert (raster.read(17, 123, 5, 250) == ref[17:123, 5:250]).all()
        assert (np.concatenate(list(raster.row_stripes(64))) == ref).all()
        # Only the chosen rows of a block are written.
        block = np.full((4, 10), 5, np.uint32)
        raster.write(0, 0, block, np.array([True, False, False, True]))
        ref[0, :10] = ref[3, :10] = 5
        assert (raster.read(0, 4, 0, 257) == ref[:4]).all()
    finally:
        raster.close()
    assert not (tmp_path / "r.raw").exists()


def test_chunk_cores_tile_the_slide_and_windows_hold_them():
    chunks = chunk_grid(1000, 1300, 384, 192)
    cover = np.zeros((1000, 1300), int)
    for k, c in enumerate(chunks):
        assert c.index == k
        y0, y1, x0, x1 = c.core
        cover[y0:y1, x0:x1] += 1
        wy0, wy1, wx0, wx1 = c.window
        assert wy0 <= y0 and wy1 >= y1 and wx0 <= x0 and wx1 >= x1
        assert wy0 == max(0, y0 - 192) and wx1 == min(1300, x1 + 192)
    assert (cover == 1).all()


def test_grid_is_aligned_and_the_margin_holds_a_cell_and_the_models_context():
    config = PipelineConfig()  # overlap 128: a context of 64 px on either side of a cut
    # 12.8 um of cell radius at 0.2 um/px (64 px) + 64 px of context, on multiples of 64 px
    assert WholeSlideConfig(chunk_px=3072).grid(0.2, config) == (3072, 128)
    assert WholeSlideConfig(chunk_px=1000, margin_px=10).grid(0.2, config) == (1024, 64)
    assert WholeSlideConfig(chunk_px=3072).grid(0.1, config) == (3072, 192)  # 128 + 64 px
    with pytest.raises(InvalidConfig):
        WholeSlideConfig(chunk_px=10)


def test_no_pixel_size_and_no_red_cells_is_one_clear_error(shipped_engine, tmp_path):
    engine, info = shipped_engine
    blank = np.full((600, 600, 3), 240, np.uint8)
    with pytest.raises(InvalidSlide, match="no pixel size in the metadata.*pass mpp"):
        process_whole_slide(ArrayReader(blank, "blank.tif"), engine, info, tmp_path, sha256="x")


def test_engine_failure_leaves_no_scratch_or_partial_files(shipped_engine, tmp_path, smear):
    engine, info = shipped_engine

    class Broken:
        stride = engine.stride

        def infer(self, x):
            raise RuntimeError("device lost")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="device lost"):
        process_whole_slide(ArrayReader(smear.image, "s.tif", 0.2), Broken(), info, out, sha256="x")
    assert list(out.iterdir()) == []


# --- bounded work: sparse slides, the pixel cap, scratch folders ----------------------------------------


class _Counting:
    """A reader wrapper that counts region reads."""

    def __init__(self, reader) -> None:
        self._reader, self.reads = reader, 0

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def read_region(self, *args):
        self.reads += 1
        return self._reader.read_region(*args)


def test_slide_over_the_pixel_cap_at_the_models_scale_is_refused_before_any_work(
    shipped_engine, tmp_path, monkeypatch
):
    from hostile import sparse_tiff

    from blastq.core.adapters.settings import load_settings
    from blastq.core.image.wsi import open_slide_reader
    from blastq.core.pipeline.wholeslide import whole_slide_config

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where scratch folders would go
    _, info = shipped_engine
    path = sparse_tiff(tmp_path / "claims-10-gigapixels.tif", 100_000, 100_000)

    def no_progress(done, total):
        raise AssertionError("work started on a slide over the cap")

    wsi = whole_slide_config(load_settings({"BLASTQ_DATA_DIR": str(tmp_path)}))
    with (
        open_slide_reader(path) as reader,
        pytest.raises(
            SlideTooLarge,
            match=r"100000x100000 pixels at 0.25 um/px \(user\) are 125000x125000 "
            r"at the model's 0.2 um/px, over the maximum of 10000000000 pixels",
        ),
    ):
        process_whole_slide(
            reader, None, info, tmp_path / "out", sha256="x", mpp=0.25, wsi=wsi, progress=no_progress
        )
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("blastq-scratch-*"))
    # The cap is the setting BLASTQ_MAX_SLIDE_PIXELS.
    small = whole_slide_config(
        load_settings({"BLASTQ_DATA_DIR": str(tmp_path), "BLASTQ_MAX_SLIDE_PIXELS": "1000"})
    )
    assert small.max_pixels == 1000
    with pytest.raises(InvalidConfig):
        WholeSlideConfig(max_pixels=0)


def test_chunks_without_scanned_tiles_are_skipped_unread(shipped_engine, tmp_path):
    from hostile import sparse_tiff

    from blastq.core.image.wsi import open_slide_reader

    engine, info = shipped_engine
    field = generate_field(3, 512, 512, mpp=0.2, blast_fraction=0.5)
    # 4096 x 4096 in 1152-px chunks: 16 chunks, of which only those around tile (0, 0) hold data.
    path = sparse_tiff(tmp_path / "sparse.tif", 4096, 4096, tiles={(0, 0): field.image})
    wsi = WholeSlideConfig(chunk_px=1024)
    with open_slide_reader(path) as opened:
        reader = _Counting(opened)
        result = process_whole_slide(reader, engine, info, tmp_path / "out", sha256="x", mpp=0.2, wsi=wsi)
    assert result.chunks == 16
    assert reader.reads == 1  # only the first chunk's window reaches the scanned tile
    # Cells only at the scanned tile (a cell cut by its edge may reach a little past it).
    assert result.cells and all(c.centroid_x < 600 and c.centroid_y < 600 for c in result.cells)
    assert result.tiles_run < result.tiles_total


def test_scratch_folders_are_removed_and_a_killed_runs_are_cleaned_at_the_next_start(
    shipped_engine, tmp_path, smear, monkeypatch
):
    import os
    import subprocess
    import sys

    from blastq.core.pipeline import scratch

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    # What a run killed with SIGKILL leaves: its pid is gone, its folder (sparse rasters) stays.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    left = tmp_path / f"{scratch.PREFIX}{scratch._host()}-{dead_pid}-abc123"
    left.mkdir()
    (left / "stale.raw").write_bytes(b"\0" * 1024)
    # A live process's folder (this one's pid, another run in it) is not touched.
    live = tmp_path / f"{scratch.PREFIX}{scratch._host()}-{os.getppid()}-def456"
    live.mkdir()
    engine, info = shipped_engine
    seen = []

    def progress(done, total):
        seen.extend(p.name for p in tmp_path.glob(f"{scratch.PREFIX}*/*"))

    process_whole_slide(
        ArrayReader(smear.image, "s.tif", 0.2), engine, info, tmp_path / "out", sha256="x", progress=progress
    )
    assert "instances.raw" in seen, "the rasters were not in a scratch folder"
    assert not left.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.glob(f"{scratch.PREFIX}*")) == [live.name]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
