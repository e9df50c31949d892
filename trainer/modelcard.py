"""Measure a checkpoint on the held-out test data and write its model card.

    python -m blastq.trainer.modelcard MODEL.pt --wbc ../shared/data/segmentation_wbc \
        --card core/weights/MODEL_CARD.md

Test data: the segmentation_wbc test split (trainer/SPLIT.md) and the fixed synthetic test fields
(seeds from SYNTH_TEST_SEED0), none of which the trainer ever loads.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from blastq.core.segment import load_engine
from blastq.trainer.datasets import SEGMENTATION_WBC_MPP, segmentation_wbc_items
from blastq.trainer.evaluate import (
    SYNTH_TEST_FIELDS,
    SYNTH_TEST_SIZE_PX,
    EvaluationReport,
    evaluate_synthetic,
    evaluate_wbc,
    synth_truth,
    synthetic_test_fields,
)
from blastq.trainer.heldout import CONDITIONS, condition_figures, figures_table
from blastq.trainer.operating import (
    MAX_REAL_FALSE_BLAST,
    MAX_SYNTH_FALSE_BLAST,
    TARGET_SENSITIVITY,
    WIDE_TEST_SIZE_PX,
    BlastShares,
    choose,
    real_normal_shares,
    sweep,
    sweep_text,
    synthetic_shares,
)

WIDE_TEST_FIELDS = 24
HELDOUT_FIELDS = 8
# The training command of the shipped model (--recipe replaces it for another).
RECIPE_1_0 = """`blastq train --out model.pt --wbc ../shared/data/segmentation_wbc --synth-fields 400
  --epochs 40 --steps 80 --patience 8 --version blastq-unet-1.0` (400 synthetic 320 px fields + 280 real
  crops; batches of 12 patches of 160 px, half real, half synthetic; best validation loss 0.477 at
  epoch 39 of 40; about 20 minutes on 2 CPU cores)"""


def measure(
    model: Path,
    wbc_root: Path,
    n_fields: int = SYNTH_TEST_FIELDS,
    wide_fields: int = WIDE_TEST_FIELDS,
    heldout_fields: int = HELDOUT_FIELDS,
) -> dict:
    engine, info = load_engine(model)
    items = segmentation_wbc_items(wbc_root, "test")
    t0 = time.perf_counter()
    with tqdm(total=len(items), desc="segmentation_wbc test", disable=None) as bar:
        wbc = evaluate_wbc(engine, info, items, tick=bar.update)
    fields = [synth_truth(f) for f in synthetic_test_fields(n_fields, SYNTH_TEST_SIZE_PX)]
    with tqdm(total=len(fields), desc="synthetic test", disable=None) as bar:
        synth = evaluate_synthetic(engine, info, fields, tick=bar.update)
    report = EvaluationReport(info.version, "test split", "test", wbc=tuple(wbc), synthetic=synth)
    figures = report.as_dict()
    figures["sha256"] = info.sha256
    figures["trained_on"] = info.trained_on
    figures["evaluation_seconds"] = round(time.perf_counter() - t0, 1)
    figures["text"] = report.as_text()
    figures["operating"] = operating_points(engine, info, wbc_root, wide_fields)
    figures["heldout"] = heldout_conditions(engine, info, heldout_fields)
    return figures


def heldout_conditions(engine, info, n_fields: int) -> dict:
    """Wide fields by stain family and magnification (trainer.heldout), at the shipped operating point."""
    rows = []
    with tqdm(total=len(CONDITIONS), desc="stain families and magnifications", disable=None) as bar:
        for family, mpp in CONDITIONS:
            rows.append((info.version, condition_figures(engine, info, family, mpp, n_fields)))
            bar.update()
    return {
        "fields": n_fields,
        "table": figures_table(rows),
        "conditions": [
            asdict(f) | {"precision": f.precision, "recall": f.recall, "f1": f.f1} for _, f in rows
        ],
    }


def operating_points(engine, info, wbc_root: Path, n_fields: int) -> dict:
    """The blast-call threshold sweep on held-out data and the screening point it chooses."""
    with tqdm(total=n_fields, desc="wide synthetic test", disable=None) as bar:
        synthetic = synthetic_shares(engine, info, n_fields, tick=bar.update)
    with tqdm(desc="segmentation_wbc normals", disable=None) as bar:
        real_test, real_other = real_normal_shares(engine, info, wbc_root, tick=bar.update)
    shares = BlastShares({k: tuple(v) for k, v in synthetic.items()}, tuple(real_test), tuple(real_other))
    points = sweep(shares)
    chosen = choose(points)
    return {
        "chosen_threshold": chosen.threshold,
        "table": sweep_text(points, chosen),
        "points": [asdict(p) for p in points],
        "cells": {k: len(v) for k, v in synthetic.items()} | {"real_test": len(real_test)},
        "real_other_false_blast_at_chosen": float(np.mean(np.asarray(real_other) >= chosen.threshold))
        if real_other
        else None,
    }


CARD = """# Model card: {version}

The U-Net shipped inside blastq (`core/weights/blastq-unet-default.pt`, sha256 `{sha256}`).
Trained by blastq's own trainer; regenerate this card with
`python -m blastq.trainer.modelcard core/weights/blastq-unet-default.pt --wbc ../shared/data/segmentation_wbc --card core/weights/MODEL_CARD.md`.

## What it does
Per pixel at 0.2 um/px: background / white cell / blast (softmax), nucleus (sigmoid), and a marker
channel (each white cell's inner core, the seeds that split touching cells). Input: RGB after
blastq's preprocessing (flat-field background removal and white balance, CLAHE on lightness).
Architecture: U-Net, depth 4, width 16 (0.45 M parameters), bilinear upsampling.

## Training data
- {trained_on}.
- Synthetic smears: blastq's own generator (`blastq.core.synth.field`), with exact truth for red cells,
  platelets, neutrophils, lymphocytes, monocytes, eosinophils and blasts, touching cells, stain
  and light variation, blur, noise and JPEG artefacts. Its `wide` variety (domain randomisation) adds
  named stain families (Wright, Wright-Giemsa, May-Grunwald-Giemsa, Leishman) stained pale to heavy,
  the camera's light and gamma, magnifications of 0.08-0.3 um/px resampled to the model's scale,
  sparse to crowded and overlapping red cells and rouleaux, blasts across their range (L1, L2,
  myeloblasts, monoblasts) beside their look-alikes (large, reactive and large granular lymphocytes,
  plasma cells) with colours mixed between mononuclear cells and cytoplasms tinted beige, grey,
  pink or blue, and objects that are not white cells as background (nucleated red cells, smudge
  cells, platelet clumps, stain debris).
- segmentation_wbc (Zheng et al., Micron 2018; GPL-3.0; dataset1 courtesy of Jiangxi Tecom Science
  Corporation, dataset2 from the CellaVision blog): the train split only, 280 crops of normal white
  cells (labelled white cell, never blast); red cells there are background.
- Split: `trainer/SPLIT.md` (test = image number divisible by 5, never loaded by the trainer).
- Recipe: cross-entropy + Dice (classes), BCE + Dice (nucleus), BCE (markers); rotation, flip,
  scale 0.8-1.25, hue/saturation/brightness/gamma jitter, blur, noise; AdamW, one-cycle learning rate,
  early stopping on the validation loss; CPU (2 cores).
- Command: {recipe}.

## Licence of the training data
segmentation_wbc is GPL-3.0; the authors ask that users acknowledge Jiangxi Tecom Science Corporation
(dataset1) and the CellaVision blog (dataset2) and cite Zheng, Wang, Wang, Liu, "Fast and Robust
Segmentation of White Blood Cell Images by Self-supervised Learning", Micron 107:55-71, 2018.
Whether weights trained on GPL data carry the GPL is not settled; treat these weights as GPL-3.0.

## Figures on held-out data
segmentation_wbc test split (60 dataset1 + 20 dataset2 crops, scales {mpp}), whole white cell =
mask >= 128, nucleus = mask 255; pixel accuracy over background / cytoplasm / nucleus. Synthetic:
{n_fields} fields of {size} x {size} px at 0.2 um/px, blast fraction 0.3, seeds 9,000,000+.

```
{text}
```

The study this follows reported Dice 0.85, IoU 0.78 and pixel accuracy 92.8% on its validation data.

## Screening operating point of the blast call
A cell is a blast when its mean blast share reaches the threshold (`BLASTQ_BLAST_CELL_THRESHOLD`,
default {threshold}); blasts called below 0.5 are marked for review. Chosen by `blastq.trainer.operating`: the
highest threshold at which held-out synthetic blasts are caught at >= {target:.0%}, with <= {max_real:.0%} of real
normal white cells and <= {max_synth:.0%} of synthetic normal cells called blast. Held-out data:
{wide_fields} wide synthetic fields ({wide_size} px at 0.2 um/px, seeds 9,100,000+: L1 and L2 lymphoblasts,
myeloblasts, monoblasts beside large, reactive and large granular lymphocytes and plasma cells, colours
mixed between mononuclear cells, stain families drawn by field) and the labelled cell of the {real_test} segmentation_wbc test crops (normal cells; the train and
validation crops, which the model saw, give {real_other} called blast at the chosen threshold).
Matched cells: {cells}.

```
{operating}
```

No real blast images were available: the sensitivity is on synthetic blasts, the false-blast rate on
real normal cells. A lab with labelled cells can replace the share rule by a blast caller fitted on
its own cells (`blastq blast-caller fit`, `BLASTQ_BLAST_CALLER`).

## By stain family and magnification
Wide synthetic fields (100 um square, seeds 9,400,000+, {heldout_fields} per condition) in each named
stain family at 0.15 um/px, and in May-Grunwald-Giemsa at 0.065-0.3 um/px, each run at its own scale as
a user would (`python -m blastq.trainer.heldout MODEL`). WBC precision / recall / F1: white-cell
detection at IoU >= 0.5; decoys outlined: nucleated red cells, smudge cells, platelet clumps and debris
with a predicted white cell at their centre.

```
{heldout}
```

## Limits
- Blasts are learnt from synthetic cells only: no real blast images were available here. The blast
  figures above are on synthetic test fields; on real leukaemic smears they are unmeasured.
- Real training cells come from two sources and two stains; other stains and scanners may need
  fine-tuning: a model of this recipe trained without dataset1 scored whole-cell Dice 0.76-0.80 on it
  (README, "Held out from training"). Scale must be known or estimated (red cells), else results
  degrade.
- Not a medical device; every flagged slide needs review by a person.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--wbc", type=Path, required=True, help="segmentation_wbc folder")
    ap.add_argument(
        "--card", type=Path, help="write the model card here (and its figures as .json beside it)"
    )
    ap.add_argument("--fields", type=int, default=SYNTH_TEST_FIELDS)
    ap.add_argument("--wide-fields", type=int, default=WIDE_TEST_FIELDS, help="for the blast-call sweep")
    ap.add_argument(
        "--heldout-fields", type=int, default=HELDOUT_FIELDS, help="per stain family / magnification"
    )
    ap.add_argument("--recipe", default=RECIPE_1_0, help="the training command, for the card")
    args = ap.parse_args()
    if args.card:  # found out now, not after minutes of measuring
        args.card.parent.mkdir(parents=True, exist_ok=True)
    figures = measure(args.model, args.wbc, args.fields, args.wide_fields, args.heldout_fields)
    print(figures["text"])
    print(figures["operating"]["table"])
    print(figures["heldout"]["table"])
    if args.card:
        text = figures.pop("text")
        args.card.write_text(
            CARD.format(
                version=figures["model_version"],
                sha256=figures["sha256"],
                trained_on=figures["trained_on"],
                text=text,
                mpp=", ".join(f"{k} {v} um/px" for k, v in SEGMENTATION_WBC_MPP.items()),
                n_fields=args.fields,
                size=SYNTH_TEST_SIZE_PX,
                recipe=args.recipe,
                threshold=figures["operating"]["chosen_threshold"],
                target=TARGET_SENSITIVITY,
                max_real=MAX_REAL_FALSE_BLAST,
                max_synth=MAX_SYNTH_FALSE_BLAST,
                wide_fields=args.wide_fields,
                wide_size=WIDE_TEST_SIZE_PX,
                real_test=figures["operating"]["cells"]["real_test"],
                real_other=_percent(figures["operating"]["real_other_false_blast_at_chosen"]),
                cells=", ".join(f"{k} {v}" for k, v in figures["operating"]["cells"].items()),
                operating=figures["operating"]["table"],
                heldout_fields=figures["heldout"]["fields"],
                heldout=figures["heldout"]["table"],
            )
        )
        args.card.with_suffix(".json").write_text(json.dumps(figures, indent=2))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


if __name__ == "__main__":
    main()
