"""The classifier comparison as one HTML page with its PNGs and JSON.

    index.html              summary table, winner, per-class table, confusion matrices, suspect labels, split
    comparison.json         Comparison.as_dict(): every figure, prediction and fold
    macro_f1.png            macro F1 per model and dataset
    confusion_<dataset>.png one confusion matrix per model

Plots are drawn like the evaluation report's (blastq.trainer.reporting): bare Agg figures, no pyplot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from blastq.core.cells import CELL_TYPES
from blastq.core.outputs import blastq_version, render_page
from blastq.trainer.compare import (
    MIN_MEANINGFUL_CELLS,
    REAL,
    SUSPECT_VOTES,
    Comparison,
    DatasetResult,
    rare_mark,
)
from blastq.trainer.reporting import agg_figure, figure_png

PAGE = "index.html"
JSON_NAME = "comparison.json"
MACRO_F1_PNG = "macro_f1.png"
DATASET_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
PANEL_PX = 300  # one confusion matrix


def confusion_png_name(dataset: str) -> str:
    """The file name of a dataset's confusion matrices."""
    return f"confusion_{dataset}.png"


def _shown_classes(dataset: DatasetResult) -> list[int]:
    # The classes a dataset holds or any model predicted there: a row and column of zeros says nothing.
    counts = np.zeros(len(CELL_TYPES), np.int64)
    for r in dataset.results:
        cm = np.array(r.scores.confusion)
        counts += cm.sum(axis=0) + cm.sum(axis=1)
    return [i for i in range(len(CELL_TYPES)) if counts[i]]


def confusion_png(dataset: DatasetResult) -> bytes:
    """One confusion matrix per model, side by side: counts, shaded by the share of each given class."""
    shown = _shown_classes(dataset)
    names = [CELL_TYPES[i] for i in shown]
    n_models = max(1, len(dataset.results))
    fig = agg_figure(n_models * PANEL_PX + 80, PANEL_PX + 90)
    for k, r in enumerate(dataset.results):
        cm = np.array(r.scores.confusion)[np.ix_(shown, shown)]
        rows = cm.sum(axis=1, keepdims=True)
        share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
        ax = fig.add_subplot(1, n_models, k + 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i, j] > 0.6 else "black",
            )
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names if k == 0 else [""] * len(names), fontsize=7)
        ax.set_title(f"{r.model}\nmacro F1 {r.scores.macro_f1:.3f}", fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        if k == 0:
            ax.set_ylabel("given label", fontsize=7)
    fig.suptitle(f"{dataset.name}: out-of-fold predictions, {len(dataset.labels)} cells", fontsize=9)
    fig.tight_layout()
    return figure_png(fig, {"Title": f"blastq confusion matrices: {dataset.name}"})


def macro_f1_png(comparison: Comparison) -> bytes:
    """Bars of macro F1 per model, one per dataset, the winner's mean marked."""
    models = comparison.models
    fig = agg_figure(max(480, 150 * len(models) + 160), 380)
    ax = fig.add_subplot()
    n = len(comparison.datasets)
    width = 0.8 / max(1, n)
    x = np.arange(len(models))
    for j, d in enumerate(comparison.datasets):
        values = [d.result(m).scores.macro_f1 for m in models]
        bars = ax.bar(
            x + (j - (n - 1) / 2) * width, values, width, label=d.name, color=DATASET_COLOURS[j % 4]
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    means = [comparison.mean_macro_f1(m) for m in models]
    ax.plot(x, means, "k_", markersize=30, mew=2, label="mean over datasets")
    ax.set_xticks(x, [f"{m}\n(winner)" if m == comparison.winner else m for m in models], fontsize=8)
    ax.set_ylim(0, 1.22)  # headroom for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("macro F1 (out-of-fold)")
    ax.set_title(f"macro F1, {comparison.folds}-fold cross-validation")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(comparison.datasets) + 1, frameon=False)
    fig.tight_layout()
    return figure_png(
        fig, {"Title": "blastq classifier comparison: macro F1", "blastq:winner": comparison.winner}
    )


def _page(comparison: Comparison) -> str:
    facts = {
        "models": ", ".join(comparison.models),
        "datasets": "; ".join(
            f"{d.name}: {len(d.labels)} cells, {d.groups} {'images' if d.name == REAL else 'fields'}"
            for d in comparison.datasets
        ),
        "folds": str(comparison.folds),
        "seed": str(comparison.seed),
        "settings": ", ".join(f"{k}={v}" for k, v in comparison.settings),
        "wall time": f"{comparison.seconds:.0f} s",
        "blastq": blastq_version(),
    }
    per_class = []
    for d in comparison.datasets:
        shown = [i for i, n in enumerate(d.class_counts) if n]
        per_class.append(
            {
                "name": d.name,
                "counts": ", ".join(f"{CELL_TYPES[i]} {n}" for i, n in enumerate(d.class_counts) if n),
                "heads": [
                    f"{CELL_TYPES[i]} ({d.class_counts[i]}{rare_mark(d.class_counts[i])})" for i in shown
                ],
                "shown": shown,
                "results": d.results,
            }
        )
    return render_page(
        __package__,
        "comparison.html",
        c=comparison,
        facts=facts,
        per_class=per_class,
        min_cells=MIN_MEANINGFUL_CELLS,
        suspect_votes=SUSPECT_VOTES,
        has_real=any(d.name == REAL for d in comparison.datasets),
        macro_f1_png=MACRO_F1_PNG,
        json_name=JSON_NAME,
        confusion_png_name=confusion_png_name,
    ).decode()


def write_comparison_report(comparison: Comparison, out_dir: Path) -> Path:
    """Write index.html, comparison.json, macro_f1.png and confusion_<dataset>.png into out_dir.

    Returns the page's path; it links the other files beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(
        json.dumps({**comparison.as_dict(), "blastq_version": blastq_version()}, indent=1)
    )
    (out_dir / MACRO_F1_PNG).write_bytes(macro_f1_png(comparison))
    for d in comparison.datasets:
        (out_dir / confusion_png_name(d.name)).write_bytes(confusion_png(d))
    page = out_dir / PAGE
    page.write_text(_page(comparison))
    return page
