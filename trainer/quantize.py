"""Make the int8 U-Net for CPUs, and judge it against fp32 on held-out data before it ships.

    python -m blastq.trainer.quantize core/weights/blastq-unet-default.pt \\
        --wbc ../shared/data/segmentation_wbc --out core/weights/blastq-unet-default.int8.onnx

Calibration (the activation ranges): CALIBRATION_FIELDS synthetic fields (512 px at 0.2 um/px, seeds from
CALIBRATION_SEED0, used by nothing else) and the segmentation_wbc *training* crops (every
CALIBRATION_CROP_STEP-th, preprocessed as the pipeline does), never a test image.

Judged, each with the fp32 ONNX engine and the int8 one through the whole pipeline:
- segmentation_wbc test split (trainer/SPLIT.md): whole-cell and nucleus Dice per dataset;
- the synthetic test fields (seeds 9,000,000+): white-cell and blast Dice;
- blast calls: every cell of the synthetic test fields and of the wide fields of the operating point
  (seeds 9,100,000+: blasts of four looks beside their look-alikes), matched to the truth in both runs;
  the share of them called alike (a cell found in one run only counts as a disagreement).
It ships (the file is written) only when every Dice moves by less than MAX_DICE_CHANGE and the blast
calls agree on more than MIN_CALL_AGREEMENT of the cells; otherwise it prints why and exits 1. The
figures go to FILE.json beside it either way, with the speed of both engines on one 1024 px tile.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blastq.core.image import Slide
from blastq.core.pipeline import PipelineConfig, prepare_image, process_slide
from blastq.core.segment import (
    Engine,
    ModelInfo,
    OnnxEngine,
    UNet,
    load_engine,
    median_infer_seconds,
    pad_to_stride,
    quantize_int8,
    to_model_input,
)
from blastq.core.synth import generate_field
from blastq.trainer.datasets import read_rgb, segmentation_wbc_items
from blastq.trainer.evaluate import evaluate_synthetic, evaluate_wbc, synth_truth, synthetic_test_fields
from blastq.trainer.metrics import matched_pairs
from blastq.trainer.operating import WIDE_TEST_SEED0, WIDE_TEST_SIZE_PX

CALIBRATION_SEED0 = 8_000_000
CALIBRATION_FIELDS = 16
CALIBRATION_CROP_STEP = 4
MAX_DICE_CHANGE = 0.005
MIN_CALL_AGREEMENT = 0.995
TEST_FIELDS = 24
WIDE_FIELDS = 24


def calibration_batches(info: ModelInfo, wbc_root: Path | None) -> tuple[list[np.ndarray], str]:
    """NCHW batches of preprocessed pixels to calibrate on, and what they are in words."""
    batches = []
    for i in range(CALIBRATION_FIELDS):
        field = generate_field(CALIBRATION_SEED0 + i, 512, 512, mpp=info.mpp, blast_fraction=0.3)
        batches.append(to_model_input(prepare_image(field.image, info.mpp, info)[None]))
    what = f"{CALIBRATION_FIELDS} synthetic fields of 512 px (seeds {CALIBRATION_SEED0:,}+)"
    if wbc_root is not None:
        crops = segmentation_wbc_items(wbc_root, "train")[::CALIBRATION_CROP_STEP]
        for item in crops:
            work = pad_to_stride(prepare_image(read_rgb(item.image_path), item.mpp, info), 8)
            batches.append(to_model_input(work[None]))
        what += f" and {len(crops)} segmentation_wbc training crops (every {CALIBRATION_CROP_STEP}th)"
    return batches, what


# The engine probe (core.segment.probe_batch): a prepared 256 px field with white cells and a blast, what
# every engine must reproduce before it is used. Random pixels do not drive the convolutions as a smear does:
# an int8 engine that saturated on AVX2 CPUs agreed with fp32 on 99.9% of random pixels but on 68-88% of a
# smear's. Seeds from PROBE_SEED0, used by nothing else.
PROBE_SEED0 = 8_500_000
PROBE_SIDE = 256


def write_engine_probe(info: ModelInfo, out: Path) -> int:
    """Write the engine probe PNG (the first seed whose field holds two white cells or more, a blast among
    them); returns the seed.

        python -c "from pathlib import Path; from blastq.core.segment import UNet, default_model_path;
        from blastq.trainer.quantize import write_engine_probe;
        print(write_engine_probe(UNet.from_checkpoint(default_model_path())[1], Path('core/weights/engine-probe.png')))"
    """
    import cv2

    for seed in range(PROBE_SEED0, PROBE_SEED0 + 1000):
        field = generate_field(seed, PROBE_SIDE, PROBE_SIDE, mpp=info.mpp, blast_fraction=0.5)
        if len(field.cells) >= 2 and any(c.is_blast for c in field.cells):  # field.cells: the white cells
            prepared = prepare_image(field.image, info.mpp, info)[:PROBE_SIDE, :PROBE_SIDE]
            if not cv2.imwrite(str(out), cv2.cvtColor(prepared, cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write {out}")
            return seed
    raise RuntimeError("no probe field with white cells in 1000 seeds")


@dataclass(frozen=True)
class Calls:
    """Blast calls of the truth-matched cells of synthetic fields: (field seed, true cell id) -> is blast."""

    calls: dict[tuple[int, int], bool]

    @classmethod
    def of(cls, engine: Engine, info: ModelInfo, fields: list[tuple[int, object]]) -> Calls:
        calls = {}
        for seed, truth in fields:
            slide = Slide(rgb=truth.image, mpp=info.mpp, mpp_source="user", name=f"field_{seed}", sha256="")
            result = process_slide(slide, engine, info, PipelineConfig())
            cells = {c.cell_id: c for c in result.maps.cells}
            for predicted, true_id in matched_pairs(result.maps.instances, truth.instances):
                calls[(seed, true_id)] = cells[predicted].label == "blast"
        return cls(calls)

    def agreement(self, other: Calls) -> tuple[float, int, int]:
        """(share called alike, cells called alike, cells either run found)."""
        keys = set(self.calls) | set(other.calls)
        alike = sum(
            1 for k in keys if k in self.calls and k in other.calls and self.calls[k] == other.calls[k]
        )
        return (alike / len(keys) if keys else 1.0), alike, len(keys)


def figures(engine: Engine, info: ModelInfo, wbc_root: Path, fields, wide) -> dict:
    """The held-out figures the verdict compares, for one engine."""
    out: dict = {}
    for e in evaluate_wbc(engine, info, segmentation_wbc_items(wbc_root, "test")):
        out[f"{e.dataset} cell Dice"] = e.cell_dice
        out[f"{e.dataset} nucleus Dice"] = e.nucleus_dice
    synth = evaluate_synthetic(engine, info, [synth_truth(f) for f in fields], classifier=None)
    out["synthetic white-cell Dice"] = synth.white_cell_dice
    out["synthetic blast Dice"] = synth.blast_dice
    out["_calls"] = Calls.of(engine, info, [(i, f) for i, f in enumerate(fields)] + wide)
    return out


def tile_seconds(engine: Engine, info: ModelInfo, rounds: int = 5) -> float:
    """Median seconds of one 1024 px synthetic tile."""
    field = generate_field(2048, 1024, 1024, mpp=info.mpp, blast_fraction=0.3)
    x = to_model_input(prepare_image(field.image, info.mpp, info)[None])
    return median_infer_seconds(engine, x, rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--wbc", type=Path, required=True, help="segmentation_wbc folder (calibration and test)")
    ap.add_argument("--out", type=Path, required=True, help="the int8 ONNX file, written when it passes")
    ap.add_argument("--fields", type=int, default=TEST_FIELDS, help="synthetic test fields")
    ap.add_argument("--wide-fields", type=int, default=WIDE_FIELDS, help="wide fields for the blast calls")
    args = ap.parse_args(argv)
    model, info = UNet.from_checkpoint(args.model)
    batches, calibration = calibration_batches(info, args.wbc)
    candidate = args.out.with_name(f".{args.out.name}.candidate")
    quantize_int8(model, info, candidate, batches, calibration)
    try:
        fp32, _ = load_engine(args.model, kind="onnx")
        int8 = OnnxEngine(candidate, info)
        fields = synthetic_test_fields(args.fields, 512)
        wide = [
            (
                seed,
                generate_field(
                    seed,
                    WIDE_TEST_SIZE_PX,
                    WIDE_TEST_SIZE_PX,
                    mpp=info.mpp,
                    variety="wide",
                    blast_fraction=0.4,
                ),
            )
            for seed in range(WIDE_TEST_SEED0, WIDE_TEST_SEED0 + args.wide_fields)
        ]
        before, after = (
            figures(fp32, info, args.wbc, fields, wide),
            figures(int8, info, args.wbc, fields, wide),
        )
        share, alike, cells = before.pop("_calls").agreement(after.pop("_calls"))
        changes = {name: after[name] - before[name] for name in before}
        fp32_s, int8_s = tile_seconds(fp32, info), tile_seconds(int8, info)
        worst = max(changes, key=lambda n: abs(changes[n]))
        passed = abs(changes[worst]) < MAX_DICE_CHANGE and share > MIN_CALL_AGREEMENT
        print(f"int8 {info.version}: calibrated on {calibration}")
        print(f"{'held-out figure':<28} {'fp32':>7} {'int8':>7} {'change':>8}")
        for name in before:
            print(f"{name:<28} {before[name]:7.4f} {after[name]:7.4f} {changes[name]:+8.4f}")
        print(f"blast calls alike: {alike} of {cells} cells ({share:.2%}; needed > {MIN_CALL_AGREEMENT:.1%})")
        print(f"one 1024 px tile: fp32 {fp32_s:.3f} s, int8 {int8_s:.3f} s ({fp32_s / int8_s:.2f}x)")
        verdict = (
            "ships"
            if passed
            else f"refused: {worst} moved {changes[worst]:+.4f}"
            if abs(changes[worst]) >= MAX_DICE_CHANGE
            else f"refused: blast calls agree on {share:.2%}"
        )
        print(
            f"verdict: {verdict} (every Dice within {MAX_DICE_CHANGE}, calls alike > {MIN_CALL_AGREEMENT:.1%})"
        )
        report = {
            "model_version": info.version,
            "model_sha256": info.sha256,
            "calibration": calibration,
            "fp32": before,
            "int8": after,
            "change": changes,
            "blast_calls_alike": {"share": share, "cells": cells, "alike": alike},
            "seconds_per_1024_tile": {"fp32": fp32_s, "int8": int8_s},
            "verdict": verdict,
        }
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        if passed:
            candidate.replace(args.out)
        return 0 if passed else 1
    finally:
        candidate.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
