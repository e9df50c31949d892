from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
import tifffile

from blastq.core.outputs.tiffout import PyramidTiffSink, pyramid_shapes, read_tiff_level, tiff_levels

# Irregular band heights, zero-row writes included; they sum past 1000 so the last one is clipped.
CHUNKS = (0, 1, 37, 0, 256, 255, 3, 100, 0, 511, 64)


def write_in_chunks(sink: PyramidTiffSink, arr: np.ndarray) -> None:
    y = 0
    for n in CHUNKS * 10:
        if y >= arr.shape[0]:
            break
        sink.write_rows(arr[y : y + n])
        y += min(n, arr.shape[0] - y)
    assert y == arr.shape[0]


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 2**32, (1000, 1300), dtype=np.uint32)


def test_uint32_map_written_in_irregular_chunks_reads_back_equal(tmp_path, labels):
    path = tmp_path / "instances.tif"
    with PyramidTiffSink(path, 1000, 1300, np.uint32, tile=256, min_level_px=256) as sink:
        write_in_chunks(sink, labels)
        assert sink.rows_written == 1000
    np.testing.assert_array_equal(tifffile.imread(path), labels)
    np.testing.assert_array_equal(read_tiff_level(path), labels)


def test_uint8_mask_reads_back_equal(tmp_path):
    mask = (np.random.default_rng(1).random((777, 1029)) > 0.7).astype(np.uint8) * 255
    path = tmp_path / "nuclei.tif"
    with PyramidTiffSink(path, 777, 1029, np.uint8, tile=256, min_level_px=256) as sink:
        write_in_chunks(sink, mask)
    np.testing.assert_array_equal(read_tiff_level(path), mask)
    assert tifffile.imread(path).dtype == np.uint8


def test_each_level_is_the_map_subsampled_by_nearest_neighbour(tmp_path, labels):
    path = tmp_path / "instances.tif"
    with PyramidTiffSink(path, 1000, 1300, np.uint32, tile=256, min_level_px=256) as sink:
        write_in_chunks(sink, labels)
    assert tiff_levels(path) == [(1000, 1300), (500, 650), (250, 325), (125, 163)]
    for level in range(4):
        step = 2**level
        np.testing.assert_array_equal(read_tiff_level(path, level), labels[::step, ::step])


def test_sub_levels_are_reduced_resolution_subifds_of_the_first_page(tmp_path, labels):
    path = tmp_path / "instances.tif"
    with PyramidTiffSink(path, 1000, 1300, np.uint32, tile=256, min_level_px=256) as sink:
        write_in_chunks(sink, labels)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == 3
        assert [lv.keyframe.subfiletype for lv in tif.series[0].levels] == [0, 1, 1, 1]


def test_pyramid_stops_when_both_sides_fit_min_level():
    assert pyramid_shapes(1000, 1300, 1024) == [(1000, 1300), (500, 650)]
    assert pyramid_shapes(1024, 1024, 1024) == [(1024, 1024)]
    assert pyramid_shapes(20000, 20000, 1024) == [
        (20000, 20000),
        (10000, 10000),
        (5000, 5000),
        (2500, 2500),
        (1250, 1250),
        (625, 625),
    ]


def test_small_map_is_a_single_level_tiff(tmp_path):
    arr = np.arange(100 * 60, dtype=np.uint32).reshape(100, 60)
    path = tmp_path / "small.tif"
    with PyramidTiffSink(path, 100, 60, np.uint32, tile=16) as sink:
        sink.write_rows(arr)
    assert tiff_levels(path) == [(100, 60)]
    np.testing.assert_array_equal(read_tiff_level(path), arr)


@pytest.mark.parametrize("mpp", [0.25, 0.1234])
def test_mpp_round_trips_through_resolution_tags_of_every_level(tmp_path, mpp):
    arr = np.zeros((600, 500), np.uint8)
    path = tmp_path / "mask.tif"
    with PyramidTiffSink(path, 600, 500, np.uint8, mpp=mpp, tile=128, min_level_px=100) as sink:
        sink.write_rows(arr)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert len(levels) == 4
        for level, lv in enumerate(levels):
            page = lv.keyframe
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            x_px_per_cm, y_px_per_cm = page.resolution
            assert 10_000 / x_px_per_cm == pytest.approx(mpp * 2**level, rel=1e-6)
            assert 10_000 / y_px_per_cm == pytest.approx(mpp * 2**level, rel=1e-6)


def test_description_holds_mpp_level_count_and_the_callers_text(tmp_path):
    path = tmp_path / "mask.tif"
    with PyramidTiffSink(
        path, 300, 300, np.uint8, mpp=0.5, tile=64, min_level_px=100, description="class mask"
    ) as sink:
        sink.write_rows(np.zeros((300, 300), np.uint8))
    with tifffile.TiffFile(path) as tif:
        meta = json.loads(tif.pages[0].description)
    assert meta == {"mpp": 0.5, "levels": 3, "description": "class mask"}


def test_without_mpp_no_physical_unit_is_claimed(tmp_path):
    path = tmp_path / "mask.tif"
    with PyramidTiffSink(path, 64, 64, np.uint8, tile=32) as sink:
        sink.write_rows(np.zeros((64, 64), np.uint8))
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].resolutionunit == tifffile.RESUNIT.NONE
        assert json.loads(tif.pages[0].description)["mpp"] is None


def test_mostly_zero_map_is_compressed(tmp_path):
    arr = np.zeros((1000, 1300), np.uint32)
    arr[100:140, 200:260] = 7
    arr[800:820, 1000:1010] = 123456
    path = tmp_path / "instances.tif"
    with PyramidTiffSink(path, 1000, 1300, np.uint32, tile=256) as sink:
        sink.write_rows(arr)
    assert path.stat().st_size < arr.nbytes / 50
    np.testing.assert_array_equal(read_tiff_level(path), arr)


def test_too_many_rows_are_rejected_and_nothing_is_appended(tmp_path):
    with PyramidTiffSink(tmp_path / "m.tif", 10, 20, np.uint8, tile=16) as sink:
        sink.write_rows(np.ones((8, 20), np.uint8))
        with pytest.raises(ValueError, match="too many rows"):
            sink.write_rows(np.ones((3, 20), np.uint8))
        assert sink.rows_written == 8
        sink.write_rows(np.full((2, 20), 5, np.uint8))
    expected = np.ones((10, 20), np.uint8)
    expected[8:] = 5
    np.testing.assert_array_equal(read_tiff_level(tmp_path / "m.tif"), expected)


@pytest.mark.parametrize(
    "rows",
    [
        np.zeros((4, 21), np.uint8),  # wrong width
        np.zeros((4, 20), np.uint32),  # wrong dtype
        np.zeros((4, 20, 1), np.uint8),  # not 2-D
        np.zeros(20, np.uint8),  # a single row must still be (1, width)
    ],
)
def test_rows_of_the_wrong_shape_or_dtype_are_rejected(tmp_path, rows):
    with PyramidTiffSink(tmp_path / "m.tif", 10, 20, np.uint8, tile=16) as sink:
        with pytest.raises(ValueError):
            sink.write_rows(rows)
        sink.write_rows(np.zeros((10, 20), np.uint8))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile": 100},
        {"tile": 0},
        {"compression": "jpeg"},
        {"mpp": 0.0},
        {"min_level_px": 0},
        {"dtype": np.dtype(">u4")},
        {"dtype": object},
        {"dtype": bool},  # masks are uint8 0/255, not bool
        {"height": 0},
    ],
)
def test_unusable_settings_are_rejected_before_anything_is_written(tmp_path, kwargs):
    args = {"height": 10, "width": 20, "dtype": np.uint8} | kwargs
    with pytest.raises(ValueError):
        PyramidTiffSink(tmp_path / "m.tif", **args)
    assert list(tmp_path.iterdir()) == []


def test_close_with_missing_rows_raises_and_leaves_no_file(tmp_path):
    sink = PyramidTiffSink(tmp_path / "m.tif", 100, 20, np.uint8, tile=16)
    sink.write_rows(np.zeros((99, 20), np.uint8))
    with pytest.raises(ValueError, match="99 of 100 rows"):
        sink.close()
    assert list(tmp_path.iterdir()) == []


def test_temporaries_are_gone_after_close(tmp_path, labels):
    with PyramidTiffSink(tmp_path / "m.tif", 1000, 1300, np.uint32, tile=256, min_level_px=256) as sink:
        write_in_chunks(sink, labels)
        assert len(list(tmp_path.iterdir())) == 4  # one raw spool per level while writing
    assert [p.name for p in tmp_path.iterdir()] == ["m.tif"]


def test_exception_inside_with_leaves_no_temporaries_and_no_output(tmp_path):
    with (
        pytest.raises(RuntimeError, match="tile failed"),
        PyramidTiffSink(tmp_path / "m.tif", 100, 20, np.uint8, tile=16) as sink,
    ):
        sink.write_rows(np.zeros((50, 20), np.uint8))
        raise RuntimeError("tile failed")
    assert list(tmp_path.iterdir()) == []


def test_an_aborted_sink_leaves_an_existing_file_untouched(tmp_path):
    path = tmp_path / "m.tif"
    path.write_bytes(b"previous result")
    with PyramidTiffSink(path, 100, 20, np.uint8, tile=16) as sink:
        sink.write_rows(np.zeros((50, 20), np.uint8))
        sink.abort()
        with pytest.raises(ValueError, match="aborted"):
            sink.write_rows(np.zeros((50, 20), np.uint8))
    assert path.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tif"]


def test_a_failure_while_encoding_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_write(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile.TiffWriter, "write", broken_write)
    sink = PyramidTiffSink(tmp_path / "m.tif", 100, 20, np.uint8, tile=16)
    sink.write_rows(np.zeros((100, 20), np.uint8))
    with pytest.raises(OSError, match="disk full"):
        sink.close()
    assert list(tmp_path.iterdir()) == []


def test_large_mostly_empty_map_is_written_in_bounded_memory(tmp_path):
    height = width = 6000
    band_px = 250
    map_bytes = height * width * 4  # 144 MB as one uint32 array
    path = tmp_path / "instances.tif"
    tracemalloc.start()
    try:
        with PyramidTiffSink(path, height, width, np.uint32, tile=512) as sink:
            for y in range(0, height, band_px):
                band = np.zeros((band_px, width), np.uint32)
                band[10:30, (y % 5000) : (y % 5000) + 40] = y + 1  # a few labelled cells per band
                sink.write_rows(band)
                del band
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"peak traced memory {peak / 1e6:.1f} MB for a {map_bytes / 1e6:.0f} MB map"
    assert tiff_levels(path) == [(6000, 6000), (3000, 3000), (1500, 1500), (750, 750)]
    assert path.stat().st_size < map_bytes / 100
    with tifffile.TiffFile(path) as tif:
        level0 = tif.series[0].levels[0].asarray()
        # The last band (the one most likely to be lost) and one across a tile-row seam.
        assert (level0[5760:5780, 750:790] == 5751).all()
        assert (level0[1010:1030, 1000:1040] == 1001).all()
        assert np.count_nonzero(level0) == (height // band_px) * 20 * 40
        np.testing.assert_array_equal(tif.series[0].levels[3].asarray(), level0[::8, ::8])


def test_big_maps_are_written_as_bigtiff(tmp_path, labels, monkeypatch):
    monkeypatch.setattr("blastq.core.outputs.tiffout.BIGTIFF_ABOVE_BYTES", 0)  # real size would be > 2 GB raw
    path = tmp_path / "instances.tif"
    with PyramidTiffSink(path, 1000, 1300, np.uint32, mpp=0.25, tile=256, min_level_px=256) as sink:
        write_in_chunks(sink, labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    assert tiff_levels(path) == [(1000, 1300), (500, 650), (250, 325), (125, 163)]
    np.testing.assert_array_equal(read_tiff_level(path, 2), labels[::4, ::4])


def test_background_rows_leave_holes_and_read_back_as_zeros(tmp_path):
    """Rows of zeros are not written to the spool (sparse files: most of a slide is plasma), including
    a run of them at the very end, and still come back as zeros of the right size."""
    height, width = 3000, 2000
    arr = np.zeros((height, width), np.uint32)
    arr[1200:1260, 500:700] = 7
    path = tmp_path / "sparse.tif"
    with PyramidTiffSink(path, height, width, np.uint32, tile=256) as sink:
        for y in range(0, height, 100):
            sink.write_rows(arr[y : y + 100])
        spool = sink._raw_paths[0]
        allocated = os.stat(spool).st_blocks * 512
        assert allocated < arr.nbytes / 10, f"{allocated} bytes on disk for {arr.nbytes} of mostly zeros"
    np.testing.assert_array_equal(read_tiff_level(path), arr)
    np.testing.assert_array_equal(read_tiff_level(path, 1), arr[::2, ::2])


def test_the_pyramid_writer_lays_reduced_levels_out_as_subifds_or_as_pages(tmp_path):
    from blastq.core.outputs.tiffout import write_levels

    full = np.arange(64 * 96, dtype=np.uint16).reshape(64, 96)
    half = full[::2, ::2].copy()

    def tiles(a):
        for y in range(0, a.shape[0], 16):
            for x in range(0, a.shape[1], 16):
                yield a[y : y + 16, x : x + 16]

    for layout, pages in (("subifds", 1), ("pages", 2)):
        path = tmp_path / f"{layout}.tif"
        write_levels(
            path, [tiles(full), tiles(half)], [full.shape, half.shape], level_mpps=[0.25, 0.5], bigtiff=False,
            reduced_as=layout, tile=(16, 16), dtype=np.uint16, photometric="minisblack", compression="zlib",
        )  # fmt: skip
        with tifffile.TiffFile(path) as tif:
            assert len(tif.pages) == pages
            levels = tif.series[0].levels if layout == "subifds" else list(tif.pages)
            assert [lv.asarray().tolist() for lv in levels] == [full.tolist(), half.tolist()]
            x_res = [lv.keyframe.tags["XResolution"].value for lv in levels]
            assert [round(n / d) for n, d in x_res] == [40000, 20000]  # px per cm at 0.25 and 0.5 um/px
    with pytest.raises(ValueError, match="reduced_as"):
        write_levels(
            tmp_path / "x.tif",
            [],
            [],
            level_mpps=None,
            bigtiff=False,
            reduced_as="strips",
            tile=(16, 16),
            dtype=np.uint8,
        )
