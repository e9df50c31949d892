"""What leaves the review station for other systems: the reviewed cells as CSV, and the result as an HL7 v2.5
ORU^R01 message built (and checked) with hl7apy.

The message carries one OBR (the blood film differential of the sample) and one OBX per figure: white
cells counted, each type's percentage after review, the blast percentage and the verdict. Observation
codes are local (coding system "L", BQ-...): the lab's LIS interface maps them to its own (LOINC) codes.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from blastq.core.adapters import SampleReview

# The observations sent, as (local code, text, the differential key or None, unit).
OBSERVATIONS = (
    ("BQ-WBC", "White cells counted", None, "cells"),
    ("BQ-NEUT", "Neutrophils", "neutrophil", "%"),
    ("BQ-LYMPH", "Lymphocytes", "lymphocyte", "%"),
    ("BQ-MONO", "Monocytes", "monocyte", "%"),
    ("BQ-EOS", "Eosinophils", "eosinophil", "%"),
    ("BQ-BASO", "Basophils", "basophil", "%"),
    ("BQ-BLAST", "Blasts", "blast", "%"),
    ("BQ-UNID", "Unidentified white cells", "unidentified", "%"),
)
CSV_COLUMNS = (
    "image",
    "result_id",
    "cell_id",
    "analyser_class",
    "reviewed_class",
    "labelled_by",
    "flagged_for_review",
    "type_probability",
    "blast_probability",
    "centroid_x",
    "centroid_y",
    "area_um2",
    "nc_ratio",
)


def cells_csv(review: SampleReview) -> bytes:
    """One row per cell: the analyser's class and the reviewed one, with who changed it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in review.cells:
        writer.writerow(
            [
                c.image,
                c.result_id,
                c.cell_id,
                c.analyser,
                c.current,
                c.labelled_by or "",
                int(c.flagged_for_review),
                c.type_probability,
                c.blast_probability,
                round(c.centroid_x, 1),
                round(c.centroid_y, 1),
                round(c.area_um2, 2),
                round(c.nc_ratio, 3),
            ]
        )
    return out.getvalue().encode()


def _hl7_text(value: str) -> str:
    """Text safe inside an HL7 field: the delimiters and line breaks of the encoding replaced."""
    for char in "|^~\\&\r\n":
        value = value.replace(char, " ")
    return value.strip()[:199]


def hl7_message(review: SampleReview, *, facility: str = "BLASTQ", now: datetime | None = None) -> str:
    """The sample's result as an HL7 v2.5 ORU^R01 message (segments joined by CR), validated by hl7apy.

    Final ("F") once signed off, preliminary ("P") before; the sample name is the filler order number.
    """
    from hl7apy.core import Message

    now = now or datetime.now(UTC)
    stamp = now.strftime("%Y%m%d%H%M%S")
    state = review.state
    status = "F" if state.state == "signed off" else "P"
    after = review.after()
    sample = _hl7_text(state.sample)
    msg = Message("ORU_R01", version="2.5")
    msg.msh.msh_3 = "blastq"
    msg.msh.msh_4 = _hl7_text(facility)
    msg.msh.msh_7 = stamp
    msg.msh.msh_10 = f"BQ{state.sample_id}V{state.version}{stamp}"[:20]
    msg.msh.msh_9 = "ORU^R01^ORU_R01"
    msg.msh.msh_11 = "P"
    group = msg.add_group("ORU_R01_PATIENT_RESULT")
    patient = group.add_group("ORU_R01_PATIENT")
    patient.pid.pid_3 = sample
    # blastq knows the sample, not the patient: the LIS joins the result to its patient by the order
    # (OBR-3); PID-5 is required and carries the sample too, never a made-up name.
    patient.pid.pid_5 = sample
    order = group.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_3 = sample
    order.obr.obr_4 = "BQ-DIFF^Blood film differential (blastq)^L"
    order.obr.obr_22 = stamp
    order.obr.obr_25 = status
    if state.signed_by:
        order.obr.obr_32 = _hl7_text(state.signed_by)
    rows = [
        (code, text, str(after.white_cells) if key is None else _percent(after.differential, key), unit)
        for code, text, key, unit in OBSERVATIONS
    ]
    rows.append(("BQ-VERDICT", "Blast screen verdict", _hl7_text(after.verdict), ""))
    for i, (code, text, value, unit) in enumerate(rows, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(i)
        obx.obx_2 = "ST" if code == "BQ-VERDICT" else "NM"
        obx.obx_3 = f"{code}^{text}^L"
        obx.obx_5 = value
        if unit:
            obx.obx_6 = unit
        if code == "BQ-BLAST" and after.verdict == "flagged":
            obx.obx_8 = "H"
        obx.obx_11 = status
    msg.validate()
    return msg.to_er7()


def _percent(differential: dict, key: str) -> str:
    return f"{float(differential.get(key, {}).get('percent', 0.0)):.1f}"
