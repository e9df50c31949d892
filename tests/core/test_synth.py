"""Tests for the synthetic smear generator: exact truth, determinism, morphology and file round trips."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from blastq.core.common.errors import InvalidConfig
from blastq.core.synth.field import (
    CELL_KINDS,
    SynthField,
    find_truth,
    generate_field,
    read_field_masks,
    truth_paths,
    write_dataset,
    write_field,
)


def _fields(seeds: range, size: int = 384, **kwargs: object) -> list[SynthField]:
    return [generate_field(s, size, size, **kwargs) for s in seeds]


def _adjacent_id_pairs(instances: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different non-zero ids that share an edge or a corner."""
    pairs = set()
    h, w = instances.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = instances[: h - dy, max(0, -dx) : w - max(0, dx)]
        b = instances[dy:, max(0, dx) : w - max(0, -dx)]
        touching = (a > 0) & (b > 0) & (a != b)
        pairs |= {
            (min(p, q), max(p, q)) for p, q in zip(a[touching].tolist(), b[touching].tolist(), strict=True)
        }
    return pairs


def _assert_truth_is_consistent(field: SynthField) -> None:
    assert np.array_equal(field.classes > 0, field.instances > 0)
    assert not (field.nuclei & (field.instances == 0)).any()
    ids = set(np.unique(field.instances).tolist()) - {0}
    assert ids == {c.cell_id for c in field.cells}
    assert len(ids) == len(field.cells)
    for cell in field.cells:
        assert cell.kind in CELL_KINDS
        assert cell.is_blast == (cell.kind == "blast")
        mask = field.instances == cell.cell_id
        assert np.all(field.classes[mask] == (2 if cell.is_blast else 1))
        assert (field.nuclei & mask).any(), "every white cell shows a nucleus"
        assert mask.sum() * field.mpp**2 >= 20.0, "no sliver cells in the truth"
        ys, xs = np.nonzero(mask)
        assert cell.centroid_xy == pytest.approx((xs.mean(), ys.mean()), abs=1e-6)
    blast_ids = [c.cell_id for c in field.cells if c.is_blast]
    assert np.array_equal(field.classes == 2, np.isin(field.instances, blast_ids))


def test_same_seed_gives_identical_field() -> None:
    a = generate_field(11, 256, 320)
    b = generate_field(11, 256, 320)
    for name in ("image", "classes", "nuclei", "instances"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.cells == b.cells
    assert (a.mpp, a.seed) == (b.mpp, b.seed) == (0.2, 11)


def test_different_seeds_give_different_fields() -> None:
    a, b = generate_field(1, 256, 256), generate_field(2, 256, 256)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.instances, b.instances)


def test_artefacts_change_pixels_but_not_the_truth() -> None:
    clean = generate_field(5, 256, 256, artefacts=False)
    noisy = generate_field(5, 256, 256, artefacts=True)
    assert not np.array_equal(clean.image, noisy.image)
    assert np.array_equal(clean.instances, noisy.instances)
    assert np.array_equal(clean.nuclei, noisy.nuclei)
    assert clean.cells == noisy.cells


@pytest.mark.parametrize("height_px, width_px", [(200, 300), (97, 64), (1, 1)])
def test_arrays_have_documented_shapes_and_dtypes(height_px: int, width_px: int) -> None:
    field = generate_field(0, height_px, width_px)
    assert field.image.shape == (height_px, width_px, 3) and field.image.dtype == np.uint8
    assert field.classes.shape == (height_px, width_px) and field.classes.dtype == np.uint8
    assert field.nuclei.shape == (height_px, width_px) and field.nuclei.dtype == bool
    assert field.instances.shape == (height_px, width_px) and field.instances.dtype == np.int32
    assert set(np.unique(field.classes).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"touching_fraction": 1.0, "wbc_per_10k_um2": 25.0},
        {"mpp": 0.4, "rbc_coverage": 0.7, "blast_fraction": 0.5},
        {"mpp": 0.12, "rbc_coverage": 0.0},
        {"mpp": 0.1, "rbc_coverage": 1.0, "rbc_overlap": 0.9},  # crowded, overlapping red cells
        {"variety": "wide", "blast_fraction": 0.5},
    ],
)
def test_ground_truth_is_exact(kwargs: dict) -> None:
    for field in _fields(range(3), size=320, **kwargs):
        _assert_truth_is_consistent(field)


def test_ids_are_consecutive_from_one_when_cells_overlap() -> None:
    for field in _fields(range(3), touching_fraction=1.0, wbc_per_10k_um2=25.0):
        assert [c.cell_id for c in field.cells] == list(range(1, len(field.cells) + 1))


def test_blast_fraction_zero_gives_no_blasts_and_one_gives_only_blasts() -> None:
    none = _fields(range(4), blast_fraction=0.0, wbc_per_10k_um2=15.0)
    assert all(not (f.classes == 2).any() for f in none)
    assert all(not c.is_blast for f in none for c in f.cells)
    only = _fields(range(4), blast_fraction=1.0, wbc_per_10k_um2=15.0)
    assert sum(len(f.cells) for f in only) > 0
    assert all(c.kind == "blast" for f in only for c in f.cells)
    assert all(not (f.classes == 1).any() for f in only)


def test_blast_share_over_many_fields_is_near_the_requested_fraction() -> None:
    cells = [
        c
        for f in _fields(range(20), blast_fraction=0.4, wbc_per_10k_um2=20.0, artefacts=False)
        for c in f.cells
    ]
    assert len(cells) > 150
    share = sum(c.is_blast for c in cells) / len(cells)
    # Binomial standard error at n > 150 is under 0.04; 0.12 leaves room without hiding a wrong rate.
    assert share == pytest.approx(0.4, abs=0.12)


def test_normal_kinds_all_occur_with_neutrophils_and_lymphocytes_most_common() -> None:
    kinds = [
        c.kind
        for f in _fields(range(15), blast_fraction=0.0, wbc_per_10k_um2=20.0, artefacts=False)
        for c in f.cells
    ]
    counts = {k: kinds.count(k) for k in CELL_KINDS}
    assert counts["blast"] == 0
    assert all(counts[k] > 0 for k in ("neutrophil", "lymphocyte", "monocyte", "eosinophil"))
    assert min(counts["neutrophil"], counts["lymphocyte"]) > max(counts["monocyte"], counts["eosinophil"])


def test_blasts_are_larger_than_lymphocytes_and_more_nuclear_than_neutrophils() -> None:
    area: dict[str, list[int]] = {k: [] for k in CELL_KINDS}
    ratio: dict[str, list[float]] = {k: [] for k in CELL_KINDS}
    for field in _fields(range(12), blast_fraction=0.4, wbc_per_10k_um2=20.0, artefacts=False):
        for cell in field.cells:
            mask = field.instances == cell.cell_id
            area[cell.kind].append(int(mask.sum()))
            ratio[cell.kind].append(float((field.nuclei & mask).sum() / mask.sum()))
    assert min(len(area["blast"]), len(area["lymphocyte"]), len(area["neutrophil"])) >= 5
    assert np.mean(area["blast"]) > 1.5 * np.mean(area["lymphocyte"])
    assert np.mean(ratio["blast"]) > np.mean(ratio["neutrophil"]) + 0.3
    assert 0.65 <= np.mean(ratio["blast"]) <= 0.92


def test_touching_fraction_yields_adjacent_different_ids() -> None:
    fields = _fields(range(4), touching_fraction=0.8, wbc_per_10k_um2=15.0)
    assert any(_adjacent_id_pairs(f.instances) for f in fields)


def test_no_touching_keeps_every_cell_apart_even_when_crowded() -> None:
    for field in _fields(range(6), touching_fraction=0.0, wbc_per_10k_um2=30.0):
        assert len(field.cells) > 1
        assert not _adjacent_id_pairs(field.instances)


def test_white_cell_count_follows_density_with_at_least_one_per_field() -> None:
    # 512 px at 0.2 mpp is ~10,500 um^2: ~6 white cells at the default density.
    counts = [len(f.cells) for f in _fields(range(10), size=512, artefacts=False)]
    assert 3.5 <= np.mean(counts) <= 9.0
    # 300 px at 0.2 mpp is 60 um on a side: one cell even when the density asks for none.
    assert all(len(f.cells) == 1 for f in _fields(range(3), size=300, wbc_per_10k_um2=0.0))


def test_doubling_mpp_halves_cell_diameter_in_pixels() -> None:
    def mean_diameter_px(fields: list[SynthField]) -> float:
        areas = [np.sum(f.instances == c.cell_id) for f in fields for c in f.cells]
        return float(np.mean(2 * np.sqrt(np.asarray(areas) / np.pi)))

    # The same field in microns (102.4 um square) at two scales.
    fine = [generate_field(s, 512, 512, mpp=0.2, wbc_per_10k_um2=15.0) for s in range(3)]
    coarse = [generate_field(s, 256, 256, mpp=0.4, wbc_per_10k_um2=15.0) for s in range(3)]
    assert mean_diameter_px(coarse) / mean_diameter_px(fine) == pytest.approx(0.5, abs=0.06)


def test_red_cells_are_background() -> None:
    field = generate_field(4, 384, 384, artefacts=False)
    rgb = field.image.astype(int)
    reddish = (rgb[..., 0] - rgb[..., 1] > 40) & (field.classes == 0)
    assert reddish.sum() > 0.05 * field.classes.size


def test_written_field_reads_back_exactly(tmp_path: Path) -> None:
    field = generate_field(8, 192, 256, touching_fraction=1.0, wbc_per_10k_um2=25.0)
    image_path = write_field(field, tmp_path / "out", "case")
    assert image_path == tmp_path / "out" / "case.png"
    decoded = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    assert np.array_equal(decoded[..., ::-1], field.image)
    assert tifffile.imread(tmp_path / "out" / "truth" / "case.instances.tif").dtype == np.uint32
    classes, nuclei, instances = read_field_masks(image_path)
    assert classes.dtype == np.uint8 and nuclei.dtype == bool and instances.dtype == np.int32
    assert np.array_equal(classes, field.classes)
    assert np.array_equal(nuclei, field.nuclei)
    assert np.array_equal(instances, field.instances)


def test_truth_goes_to_a_sub_folder_so_the_folder_holds_only_smears(tmp_path: Path) -> None:
    paths = write_dataset(tmp_path, 2, seed=3, height_px=64, width_px=64)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [p.name for p in paths]
    assert sorted(p.name for p in (tmp_path / "truth").iterdir()) == [
        f"synth_0000{i}{suffix}" for i in (3, 4) for suffix in (".instances.tif", ".mask.png", ".nuclei.png")
    ]
    assert truth_paths(paths[0]) == find_truth(paths[0])


def test_truth_written_beside_the_image_by_older_versions_still_reads(tmp_path: Path) -> None:
    field = generate_field(8, 64, 64)
    image_path = write_field(field, tmp_path, "case")
    for path in truth_paths(image_path):  # the layout before truth/
        path.rename(tmp_path / path.name)
    (tmp_path / "truth").rmdir()
    assert find_truth(image_path) == tuple(tmp_path / p.name for p in truth_paths(image_path))
    assert np.array_equal(read_field_masks(image_path)[2], field.instances)


def test_reading_masks_of_an_unknown_image_raises(tmp_path: Path) -> None:
    field = generate_field(8, 64, 64)
    image_path = write_field(field, tmp_path, "case")
    (tmp_path / "truth" / "case.instances.tif").unlink()
    with pytest.raises(FileNotFoundError, match="case.instances.tif"):
        read_field_masks(image_path)
    with pytest.raises(FileNotFoundError):
        read_field_masks(tmp_path / "other.png")


def test_dataset_names_fields_by_seed_and_reports_progress(tmp_path: Path) -> None:
    ticks: list[int] = []
    paths = write_dataset(tmp_path, 3, seed=5, height_px=96, width_px=128, progress=ticks.append)
    assert [p.name for p in paths] == ["synth_00005.png", "synth_00006.png", "synth_00007.png"]
    assert ticks == [1, 1, 1]
    expected = generate_field(6, 96, 128)
    assert np.array_equal(cv2.imread(str(paths[1]))[..., ::-1], expected.image)
    assert np.array_equal(read_field_masks(paths[1])[2], expected.instances)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"height_px": 0},
        {"mpp": 0.0},
        {"blast_fraction": 1.5},
        {"touching_fraction": -0.1},
        {"rbc_coverage": 2.0},
        {"rbc_overlap": 1.5},
        {"variety": "fancy"},
        {"wbc_per_10k_um2": -1.0},
    ],
)
def test_out_of_range_arguments_raise_invalid_config(kwargs: dict) -> None:
    with pytest.raises(InvalidConfig):
        generate_field(0, **kwargs)


def test_overlap_lets_more_red_cells_crowd_the_same_field() -> None:
    def red_share(field) -> float:
        return float(np.mean((field.image[..., 1] < 200) & (field.classes == 0)))

    thin = generate_field(5, 320, 320, mpp=0.2, rbc_coverage=1.0, rbc_overlap=0.0, wbc_per_10k_um2=0.0)
    thick = generate_field(5, 320, 320, mpp=0.2, rbc_coverage=1.0, rbc_overlap=1.0, wbc_per_10k_um2=0.0)
    assert red_share(thick) > red_share(thin) + 0.05


def test_wide_fields_draw_blasts_across_their_range_beside_their_look_alikes() -> None:
    from blastq.core.synth.field import LOOKS

    looks: dict[str, set[bool]] = {}
    for seed in range(12):
        field = generate_field(
            seed, 400, 400, mpp=0.2, variety="wide", blast_fraction=0.5, wbc_per_10k_um2=40
        )
        for cell in field.cells:
            looks.setdefault(cell.look, set()).add(cell.is_blast)
    assert set(LOOKS) <= set(looks)
    assert all(looks[look] == {True} for look in ("blast_l1", "blast_l2", "monoblast"))
    assert all(
        looks[look] == {False} for look in ("large_lymphocyte", "plasma_cell", "large_granular_lymphocyte")
    )
    classic = {
        c.look for s in range(4) for c in generate_field(s, 400, 400, mpp=0.2, blast_fraction=0.5).cells
    }
    assert classic == {""}


def _nucleus_greens(field, blast: bool) -> list[float]:
    return [
        float(field.image[..., 1][(field.instances == c.cell_id) & field.nuclei].mean())
        for c in field.cells
        if c.is_blast == blast and c.kind in ("blast", "lymphocyte") and c.look in ("", "blast_l1")
    ]


def test_in_wide_fields_colour_no_longer_tells_a_blast_from_a_lymphocyte() -> None:
    def overlap(variety: str) -> float:
        blasts, lymphs = [], []
        for seed in range(16):
            field = generate_field(seed, 400, 400, mpp=0.2, variety=variety, blast_fraction=0.4, stain_seed=0)
            blasts += _nucleus_greens(field, True)
            lymphs += _nucleus_greens(field, False)
        # The share of blasts whose nuclei are as dark as the median lymphocyte's, or darker.
        return float(np.mean(np.array(blasts) <= np.median(lymphs)))

    assert overlap("classic") < 0.05  # the classic blast's nucleus is paler: colour alone would do
    assert overlap("wide") > 0.2


def _mean_rgb(field: SynthField, where: np.ndarray) -> np.ndarray:
    return field.image[where].reshape(-1, 3).astype(float).mean(axis=0)


def test_a_stain_family_changes_colours_never_the_truth() -> None:
    from blastq.core.synth.field import STAIN_FAMILIES

    with pytest.raises(InvalidConfig, match="stain_family"):
        generate_field(0, 64, 64, stain_family="gram")
    fields = {
        family: generate_field(3, 320, 320, mpp=0.2, variety="wide", stain_family=family, artefacts=False)
        for family in STAIN_FAMILIES
    }
    first = fields["mgg"]
    for family, field in fields.items():
        assert field.stain_family == family
        assert np.array_equal(field.instances, first.instances)
        assert np.array_equal(field.nuclei, first.nuclei)
    # Wright: bluer nuclei, more orange red cells than Leishman's redder purple and pink (the tints of
    # _FAMILY_TINT, seen through the same light and gamma since the stain's seed is the same).
    nuclei = first.nuclei
    red = (first.classes == 0) & (first.image[..., 1] < np.percentile(first.image[..., 1], 30))
    w, lei = fields["wright"], fields["leishman"]
    assert (_mean_rgb(w, nuclei)[2] - _mean_rgb(w, nuclei)[0]) > (
        _mean_rgb(lei, nuclei)[2] - _mean_rgb(lei, nuclei)[0]
    )
    assert (_mean_rgb(w, red)[0] - _mean_rgb(w, red)[2]) > (_mean_rgb(lei, red)[0] - _mean_rgb(lei, red)[2])
    # Wide fields draw a family themselves; classic fields keep the generator's own stain.
    drawn = {generate_field(s, 64, 64, variety="wide").stain_family for s in range(40)}
    assert drawn == set(STAIN_FAMILIES)
    assert generate_field(3, 64, 64).stain_family == ""


def test_wide_fields_hold_objects_that_are_not_white_cells_as_background() -> None:
    from blastq.core.synth.field import DECOY_KINDS

    seen: set[str] = set()
    for seed in range(24):
        field = generate_field(seed, 320, 320, mpp=0.2, variety="wide", wbc_per_10k_um2=4.0, artefacts=False)
        _assert_truth_is_consistent(field)
        background = float(np.median(field.image[..., 1][field.classes == 0]))
        for decoy in field.decoys:
            seen.add(decoy.kind)
            x, y = (round(v) for v in decoy.centroid_xy)
            assert field.classes[y, x] == 0 and field.instances[y, x] == 0
            # Something dark is drawn there (a 4 um window: a clump's platelets scatter around its centre).
            window = field.image[max(y - 10, 0) : y + 11, max(x - 10, 0) : x + 11, 1]
            assert window.min() < background - 25, decoy
    assert seen == set(DECOY_KINDS)
    assert all(not generate_field(s, 320, 320, mpp=0.2).decoys for s in range(4))  # classic: none
