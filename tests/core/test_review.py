"""Reviews on SQLite and PostgreSQL: reclassification, completion, sign-off by a second person, amendments
as new versions, the audit trail, the worklist, and the reviewed cells learning reads."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from blastq.core.adapters import (
    add_to_sample,
    amend,
    audit_trail,
    complete_review,
    ensure_sample,
    reclassify,
    record_result,
    reviewed_cells,
    sample_review,
    sign_off,
    worklist,
)
from blastq.core.cells import CellRecord, class_stats
from blastq.core.common import NotFound, ReviewConflict

BASE = CellRecord(
    1, "white_cell", 5.0, 6.0, 0, 0, 10, 12, 90, 3.6, 7.0, 0.9, 60, 2.4, 0.67, 100, 80, 160, 0.1
)


def typed(cell_id: int, cell_type: str, review: bool = False) -> CellRecord:
    label = "blast" if cell_type == "blast" else "white_cell"
    return dataclasses.replace(BASE, cell_id=cell_id, label=label, cell_type=cell_type, review=review)


def recorded_sample(engine, cells, name=None, threshold=20.0, least=1):
    """A sample with one recorded image holding `cells`; returns (name, result id)."""
    name = name or f"S-{uuid.uuid4().hex[:8]}"
    sha = uuid.uuid4().hex
    blasts = sum(c.label == "blast" for c in cells)
    summary = {
        "sha256": sha, "model_version": "v1", "params_key": "k1", "image": "field.png", "width": 64,
        "height": 64, "mpp": 0.2, "mpp_source": "user", "white_cells": len(cells), "blasts": blasts,
        "blast_percent": 100.0 * blasts / len(cells), "flagged": False, "threshold_percent": threshold,
        "seconds": 0.5, "review_cells": 0, "differential": {}, "classifier_version": "c1", "verdict": "",
        "min_white_cells": least,
    }  # fmt: skip
    result_id = record_result(engine, summary, cells, f"slides/{sha}")
    add_to_sample(engine, ensure_sample(engine, name, threshold, least), result_id)
    return name, result_id


FIVE = [typed(1, "blast"), typed(2, "lymphocyte", review=True), typed(3, "neutrophil"), typed(4, "neutrophil"),
        typed(5, "monocyte")]  # fmt: skip


def test_reclassifying_a_cell_changes_the_reviewed_figures_and_keeps_the_analysers(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    before = sample_review(migrated_db, name)
    assert before.state.state == "pre-classified"
    assert before.after().blasts == 1

    review = reclassify(migrated_db, name, [(rid, 2)], "blast", "ana")

    assert review.state.state == "in review" and review.state.version == 1
    assert review.before().blasts == 1 and review.before().blast_percent == 20.0
    assert review.after().blasts == 2 and review.after().blast_percent == 40.0
    assert review.after().verdict == "flagged"
    [changed] = [c for c in review.cells if c.cell_id == 2]
    assert (changed.analyser, changed.current, changed.labelled_by) == ("lymphocyte", "blast", "ana")
    assert review.changed() == 1


def test_smudges_and_artefacts_leave_the_white_cell_count(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    review = reclassify(migrated_db, name, [(rid, 3), (rid, 4)], "artefact", "ana")
    review = reclassify(migrated_db, name, [(rid, 5)], "smudge", "ana")
    after = review.after()
    assert after.white_cells == 2 and after.blasts == 1 and after.blast_percent == 50.0
    assert sum(v["percent"] for v in after.differential.values()) == pytest.approx(100.0)


def test_class_stats_counts_unidentified_cells_and_refuses_unknown_classes():
    s = class_stats(["blast", "unidentified", "smudge", "neutrophil"], 20.0, 1)
    assert (s.white_cells, s.blasts, s.differential["unidentified"]["count"]) == (3, 1, 1)
    with pytest.raises(ValueError, match="unknown cell classes"):
        class_stats(["blast", "platelet"])


def test_cells_of_another_sample_are_refused_and_nothing_changes(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    _, other = recorded_sample(migrated_db, FIVE)
    with pytest.raises(NotFound, match="not cells of sample"):
        reclassify(migrated_db, name, [(rid, 1), (other, 1)], "blast", "ana")
    with pytest.raises(NotFound):
        reclassify(migrated_db, name, [(rid, 99)], "blast", "ana")
    assert sample_review(migrated_db, name).state.state == "pre-classified"
    assert audit_trail(migrated_db, name) == []


def test_an_unknown_class_is_refused(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    with pytest.raises(ValueError, match="unknown class"):
        reclassify(migrated_db, name, [(rid, 1)], "platelet", "ana")


def test_sign_off_needs_a_completed_review_and_a_second_person(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    with pytest.raises(ReviewConflict, match="pre-classified"):
        sign_off(migrated_db, name, "pat")
    reclassify(migrated_db, name, [(rid, 2)], "blast", "ana")
    with pytest.raises(ReviewConflict, match="in review"):
        sign_off(migrated_db, name, "pat")
    complete_review(migrated_db, name, "ana")
    with pytest.raises(ReviewConflict, match="second person"):
        sign_off(migrated_db, name, "ana")
    review = sign_off(migrated_db, name, "pat")
    assert review.state.state == "signed off" and review.state.signed_by == "pat"
    figures = review.state.signed_figures
    assert figures["before"]["blasts"] == 1 and figures["after"]["blasts"] == 2
    assert (figures["reviewed_by"], figures["signed_by"], figures["models"]) == ("ana", "pat", ["v1"])


def test_a_signed_off_sample_is_locked_and_an_amendment_opens_a_new_version(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    reclassify(migrated_db, name, [(rid, 2)], "blast", "ana")
    complete_review(migrated_db, name, "ana")
    signed = sign_off(migrated_db, name, "pat")
    with pytest.raises(ReviewConflict, match="signed off"):
        reclassify(migrated_db, name, [(rid, 3)], "blast", "ana")
    with pytest.raises(ReviewConflict):
        complete_review(migrated_db, name, "ana")

    amended = amend(migrated_db, name, "pat", "  lymphocyte 2 looked again  ")
    assert (amended.state.state, amended.state.version) == ("in review", 2)
    assert amended.state.amendment_reason == "lymphocyte 2 looked again"
    assert amended.after().blasts == 2  # version 2 starts from version 1's labels
    amended = reclassify(migrated_db, name, [(rid, 2)], "lymphocyte", "ana")
    assert amended.after().blasts == 1

    # The signed version's figures are as they were signed.
    assert signed.state.signed_figures["after"]["blasts"] == 2
    actions = [(a.version, a.action) for a in audit_trail(migrated_db, name)]
    assert actions == [
        (1, "open"), (1, "reclassify"), (1, "complete"), (1, "sign off"), (2, "amend"), (2, "reclassify"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="reason"):
        amend(migrated_db, name, "pat", "   ")


def test_a_change_after_completion_reopens_the_review(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    complete_review(migrated_db, name, "ana")
    review = reclassify(migrated_db, name, [(rid, 3)], "eosinophil", "pat")
    assert review.state.state == "in review" and review.state.reviewed_by is None
    assert [a.action for a in audit_trail(migrated_db, name)][-2:] == ["reopen", "reclassify"]


def test_the_audit_names_who_changed_which_cell_from_what_to_what(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    reclassify(migrated_db, name, [(rid, 2)], "blast", "ana")
    reclassify(migrated_db, name, [(rid, 2)], "blast", "ana")  # no change: no audit row
    reclassify(migrated_db, name, [(rid, 2)], "unidentified", "pat")
    rows = [a for a in audit_trail(migrated_db, name) if a.action == "reclassify"]
    assert [(a.username, a.cell_id, a.from_label, a.to_label) for a in rows] == [
        ("ana", 2, "lymphocyte", "blast"),
        ("pat", 2, "blast", "unidentified"),
    ]
    assert all(a.at.tzinfo is not None for a in rows)


def test_the_worklist_puts_flagged_then_insufficient_samples_first_and_filters_by_state(migrated_db):
    tag = uuid.uuid4().hex[:6]
    clear, _ = recorded_sample(
        migrated_db, [typed(i, "neutrophil") for i in range(1, 6)], name=f"{tag}-clear"
    )
    few, _ = recorded_sample(migrated_db, FIVE, name=f"{tag}-few", least=100)
    flagged, rid = recorded_sample(migrated_db, FIVE, name=f"{tag}-flagged", threshold=10.0)
    names = [e.name for e in worklist(migrated_db) if e.name.startswith(tag)]
    assert names == [flagged, few, clear]
    reclassify(migrated_db, flagged, [(rid, 2)], "blast", "ana")
    in_review = [e.name for e in worklist(migrated_db, state="in review") if e.name.startswith(tag)]
    assert in_review == [flagged]
    later = datetime.now(UTC) + timedelta(days=1)
    assert [e for e in worklist(migrated_db, since=later) if e.name.startswith(tag)] == []
    with pytest.raises(ValueError, match="unknown review state"):
        worklist(migrated_db, state="done")


def test_reviewed_cells_are_the_signed_labels_and_the_confirmed_calls(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    reclassify(migrated_db, name, [(rid, 2)], "blast", "ana")
    complete_review(migrated_db, name, "ana")
    assert [c for c in reviewed_cells(migrated_db) if c.sample == name] == []  # not signed yet
    sign_off(migrated_db, name, "pat")
    amend(migrated_db, name, "pat", "checking")
    reclassify(migrated_db, name, [(rid, 3)], "smudge", "pat")  # the open amendment is not signed
    cells = {c.cell_id: c for c in reviewed_cells(migrated_db) if c.sample == name}
    assert len(cells) == 5
    assert (cells[2].label, cells[2].analyser, cells[2].labelled_by) == ("blast", "lymphocyte", "ana")
    assert (cells[3].label, cells[3].labelled_by) == ("neutrophil", "ana")  # confirmed by the reviewer
    assert cells[1].store_prefix.startswith("slides/") and cells[1].mpp == 0.2
    future = datetime.now(UTC) + timedelta(hours=1)
    assert [c for c in reviewed_cells(migrated_db, since=future) if c.sample == name] == []


def test_two_reviewers_at_once_leave_one_label_and_two_audit_rows(migrated_db):
    name, rid = recorded_sample(migrated_db, FIVE)
    errors = []

    def change(user, to):
        try:
            reclassify(migrated_db, name, [(rid, 2)], to, user)
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [
        threading.Thread(target=change, args=(u, t)) for u, t in (("ana", "blast"), ("bob", "monocyte"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    review = sample_review(migrated_db, name)
    [cell] = [c for c in review.cells if c.cell_id == 2]
    trail = [a for a in audit_trail(migrated_db, name) if a.action == "reclassify"]
    assert len(trail) == 2 and trail[-1].to_label == cell.current
    assert trail[1].from_label == trail[0].to_label  # the second saw the first's change


def lone_result(engine, cells=FIVE, image="lone.png"):
    """A recorded image in no sample; returns its result id."""
    sha = uuid.uuid4().hex
    summary = {
        "sha256": sha, "model_version": "v1", "params_key": "k1", "image": image, "width": 64,
        "height": 64, "mpp": 0.2, "mpp_source": "user", "white_cells": len(cells), "blasts": 1,
        "blast_percent": 20.0, "flagged": True, "threshold_percent": 15.0, "seconds": 0.5,
        "review_cells": 0, "differential": {}, "classifier_version": "c1", "verdict": "flagged",
        "min_white_cells": 3,
    }  # fmt: skip
    return record_result(engine, summary, cells, f"slides/{sha}")


def test_an_image_in_no_sample_is_listed_and_reviewed_as_a_sample_of_its_own(migrated_db):
    from blastq.core.adapters import lone_images, review_alone

    result_id = lone_result(migrated_db, image="smear\n7.png")
    listed = [i for i in lone_images(migrated_db) if i.result_id == result_id]
    assert listed and listed[0].verdict == "flagged"
    name = review_alone(migrated_db, result_id)
    assert name.isprintable() and name.endswith(f" #{result_id}")
    assert review_alone(migrated_db, result_id) == name  # the same sample again
    review = sample_review(migrated_db, name)
    assert (review.threshold_percent, review.min_white_cells) == (15.0, 3)  # the result's own rule
    assert len(review.cells) == 5 and review.after().verdict == "flagged"
    assert result_id not in [i.result_id for i in lone_images(migrated_db)]
    with pytest.raises(NotFound):
        review_alone(migrated_db, 10**9)
