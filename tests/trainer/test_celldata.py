"""Labelled cells for the classifiers: real CSV labels, synthetic kinds, and the cross-validation folds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from blastq.core.cells.cellcrops import CELL_TYPES, CROP_PX, CellCrop
from blastq.core.common.errors import InvalidConfig, InvalidDataset
from blastq.core.synth.field import SynthCell, SynthField, generate_field
from blastq.trainer.celldata import (
    SYNTH_BLAST_FRACTION,
    SYNTH_FIELD_PX,
    SYNTH_WBC_PER_10K_UM2,
    LabelledCells,
    concat_cells,
    cv_folds,
    read_wbc_labels,
    synthetic_cells,
    wbc_cells,
)


@pytest.fixture(scope="module")
def real(wbc_root) -> LabelledCells:
    return wbc_cells(wbc_root)


def _dummy_cells(labels, groups, names=None) -> LabelledCells:
    crop = CellCrop(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2), bool), np.zeros((2, 2), bool), 0.2)
    names = names or [f"img{g}/cell{i}" for i, g in enumerate(groups)]
    return LabelledCells([crop] * len(labels), np.asarray(labels), np.asarray(groups), "test", list(names))


def test_real_cells_have_the_csv_label_counts_per_dataset(real):
    assert len(real) == 400 and real.source == "segmentation_wbc"
    for ds, expected in (("dataset1", [176, 53, 48, 22, 1, 0]), ("dataset2", [33, 37, 15, 12, 3, 0])):
        mine = np.array([n.startswith(ds + "/") for n in real.names])
        assert np.bincount(real.labels[mine], minlength=len(CELL_TYPES)).tolist() == expected
    # The CSVs' first rows: dataset1 1 -> 2 (lymphocyte), 2 -> 1 (neutrophil).
    by_name = dict(zip(real.names, real.labels, strict=True))
    assert CELL_TYPES[by_name["dataset1/001"]] == "lymphocyte"
    assert CELL_TYPES[by_name["dataset1/002"]] == "neutrophil"
    assert len(set(real.groups.tolist())) == 400  # one cell per image, one group per image


def test_real_crops_are_normalised_single_cells_with_their_nucleus(real):
    for crop in real.crops[::37]:
        assert crop.rgb.shape == (CROP_PX, CROP_PX, 3) and crop.mpp == 0.2
        assert ndi.label(crop.cell)[1] == 1  # the largest part only: stray specks are dropped
        assert crop.nucleus.any() and not (crop.nucleus & ~crop.cell).any()
        assert (crop.rgb[~ndi.binary_dilation(crop.cell, iterations=8)] == 255).all()


def test_both_csv_headers_are_read_and_bad_rows_refused(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("image ID,class label\r\n1,2\r\n7,5\r\n")
    b.write_text("image ID,class\n3,1\n")
    assert read_wbc_labels(a) == {1: CELL_TYPES.index("lymphocyte"), 7: CELL_TYPES.index("basophil")}
    assert read_wbc_labels(b) == {3: CELL_TYPES.index("neutrophil")}
    (tmp_path / "c.csv").write_text("image ID,class\n3,6\n")
    with pytest.raises(InvalidDataset, match="within 1..5"):
        read_wbc_labels(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("id;label\n3;1\n")
    with pytest.raises(InvalidDataset, match="header"):
        read_wbc_labels(tmp_path / "d.csv")


def test_synthetic_labels_are_the_generated_kinds():
    cells = synthetic_cells(3, seed=40)
    assert cells.source == "synthetic" and len(cells) > 5
    for i in range(3):
        field = generate_field(
            40 + i, SYNTH_FIELD_PX, SYNTH_FIELD_PX, mpp=0.2,
            blast_fraction=SYNTH_BLAST_FRACTION, wbc_per_10k_um2=SYNTH_WBC_PER_10K_UM2,
        )  # fmt: skip
        kinds = {c.cell_id: c.kind for c in field.cells}
        mine = np.flatnonzero(cells.groups == i)
        assert len(mine) == len(field.cells)  # the generator keeps its cells off the border
        for j in mine:
            assert cells.names[j].startswith(f"synth/seed={40 + i}/cell=")
            cell_id = int(cells.names[j].rsplit("=", 1)[1])
            assert CELL_TYPES[cells.labels[j]] == kinds[cell_id]
            # The crop holds that very cell: same area (same scale, nothing cut at 25.6 um).
            assert cells.crops[j].cell.sum() == (field.instances == cell_id).sum()


def test_synthetic_cells_cut_by_the_field_border_are_skipped(monkeypatch):
    import blastq.trainer.celldata as celldata

    def field_with_a_cut_cell(seed, h, w, **_):
        instances = np.zeros((h, w), np.int32)
        yy, xx = np.ogrid[:h, :w]
        instances[(yy - 5) ** 2 + (xx - 100) ** 2 <= 900] = 1  # cut by the top edge
        instances[(yy - 200) ** 2 + (xx - 200) ** 2 <= 900] = 2
        cells = (
            SynthCell(1, "monocyte", False, (100.0, 5.0)),
            SynthCell(2, "blast", True, (200.0, 200.0)),
        )
        image = np.full((h, w, 3), 230, np.uint8)
        image[instances > 0] = 120
        return SynthField(image, (instances > 0).astype(np.uint8), instances > 0, instances, cells, 0.2, seed)

    monkeypatch.setattr(celldata, "generate_field", field_with_a_cut_cell)
    cells = synthetic_cells(2, seed=7)
    assert cells.names == ["synth/seed=7/cell=2", "synth/seed=8/cell=2"]
    assert [CELL_TYPES[c] for c in cells.labels] == ["blast", "blast"] and cells.groups.tolist() == [0, 1]


def test_folds_keep_groups_together_and_are_stable():
    labels = [0, 0, 1, 0, 5, 5, 0, 1, 1, 0, 3, 0, 0, 5, 1, 0]
    groups = [0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9]
    cells = _dummy_cells(labels, groups)
    folds = cv_folds(cells, k=3)
    for g in set(groups):
        assert len(set(folds[cells.groups == g].tolist())) == 1
    assert np.array_equal(folds, cv_folds(cells, k=3))
    # Worked by hand from the documented rule (rarest class first; sha1 of the first name within a
    # class; one deal over all classes): names and labels decide, so every machine gets this.
    assert folds.tolist() == [1, 1, 1, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0, 2, 2]
    # Listing the groups in another order (each group's cells in their order) changes nothing.
    order = np.concatenate([np.flatnonzero(cells.groups == g) for g in (7, 2, 9, 0, 5, 1, 8, 3, 6, 4)])
    assert np.array_equal(cv_folds(cells.subset(order), k=3), folds[order])


def test_every_real_class_is_spread_over_the_folds(real):
    folds = cv_folds(real, k=5)
    assert np.bincount(folds).tolist() == [80] * 5  # one cell per group: the deal keeps folds equal
    for c in range(len(CELL_TYPES)):
        n = int((real.labels == c).sum())
        assert len(set(folds[real.labels == c].tolist())) == min(n, 5)  # basophils: 4 cells in 4 folds


def test_synthetic_folds_hold_every_present_class_in_several_folds():
    cells = synthetic_cells(20, seed=0)
    folds = cv_folds(cells, k=5)
    assert len(set(folds.tolist())) == 5
    for c in np.unique(cells.labels):
        assert len(set(folds[cells.labels == c].tolist())) >= 3, CELL_TYPES[c]


def test_too_few_groups_or_folds_are_refused():
    cells = _dummy_cells([0, 1, 0], [0, 0, 1])
    with pytest.raises(InvalidConfig, match="groups"):
        cv_folds(cells, k=3)
    with pytest.raises(InvalidConfig, match="k >= 2"):
        cv_folds(cells, k=1)


def test_subset_and_concat_keep_cells_and_groups_apart():
    a = _dummy_cells([0, 1, 2], [0, 0, 1], ["a/0", "a/1", "a/2"])
    b = _dummy_cells([5, 5], [0, 1], ["b/0", "b/1"])
    sub = a.subset(np.array([False, True, True]))
    assert sub.names == ["a/1", "a/2"] and sub.labels.tolist() == [1, 2] and sub.groups.tolist() == [0, 1]
    both = concat_cells(a, b)
    assert both.names == ["a/0", "a/1", "a/2", "b/0", "b/1"]
    assert both.groups.tolist() == [0, 0, 1, 2, 3] and both.source == "test"
    assert both.counts()["blast"] == 2 and both.counts()["basophil"] == 0
    with pytest.raises(ValueError, match="labels"):
        LabelledCells(a.crops, a.labels[:2], a.groups, "test", a.names)


def test_wide_synthetic_cells_label_every_look_by_its_kind():
    cells = synthetic_cells(4, seed=60, variety="mixed")  # fields 1 and 3 wide, 0 and 2 classic
    looks = [name.split("/")[3] if name.count("/") == 3 else "" for name in cells.names]
    wide = {looks[j] for j in range(len(looks)) if cells.groups[j] % 2}
    assert not {looks[j] for j in range(len(looks)) if cells.groups[j] % 2 == 0} - {""}
    assert wide - {""}, "the wide fields draw the wide looks"
    for j, look in enumerate(looks):
        if look.startswith("blast_") or look == "monoblast":
            assert CELL_TYPES[cells.labels[j]] == "blast"
        elif look:
            assert CELL_TYPES[cells.labels[j]] == "lymphocyte"  # plasma cells and large lymphocytes
