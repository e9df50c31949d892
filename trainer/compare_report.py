"""The classifier comparison as one HTML page with its PNGs and JSON.

    index.html              summary table, winner, per-class table, confusion matrices, suspect labels, split
    comparison.json         Comparison.as_dict(): every figure, prediction and fold
    macro_f1.png            macro F1 per model and dataset
    confusion_<dataset>.png one confusion matrix per model

Plots are drawn like the evaluation report's (blastq.trainer.reporting): bare Agg figures, no pyplot.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from blastq.core.cells import CELL_TYPES
from blastq.core.outputs import blastq_version
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


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:13px;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f6f6f6;text-align:left}
td.l{text-align:left}tr.w td{font-weight:bold}td.nm{color:#999}img{max-width:100%}"""


def _summary_table(comparison: Comparison) -> str:
    esc = html.escape
    head = (
        "<tr><th>dataset</th><th>model</th><th>cells</th><th>accuracy</th><th>macro precision</th>"
        "<th>macro recall</th><th>macro F1</th>"
        f"<th>macro F1 without classes under {MIN_MEANINGFUL_CELLS} cells</th>"
        "<th>train s</th><th>ms per cell</th></tr>"
    )
    rows = []
    for d in comparison.datasets:
        for r in d.results:
            s = r.scores
            cls = " class=w" if r.model == comparison.winner else ""
            rows.append(
                f"<tr{cls}><td class=l>{esc(d.name)}</td><td class=l>{esc(r.model)}</td>"
                f"<td>{len(d.labels)}</td>"
                f"<td>{s.accuracy:.3f}</td><td>{s.macro_precision:.3f}</td><td>{s.macro_recall:.3f}</td>"
                f"<td>{s.macro_f1:.3f}</td><td>{s.macro_f1_meaningful:.3f}</td>"
                f"<td>{r.train_seconds:.1f}</td><td>{r.infer_ms_per_cell:.2f}</td></tr>"
            )
    means = "".join(
        f"<tr><td class=l>{esc(m)}</td><td>{comparison.mean_macro_f1(m):.3f}</td></tr>"
        for m in comparison.models
    )
    return (
        f"<table>{head}{''.join(rows)}</table>"
        f"<table><tr><th>model</th><th>macro F1, mean over datasets</th></tr>{means}</table>"
    )


def _per_class_table(d: DatasetResult) -> str:
    esc = html.escape
    shown = [i for i, n in enumerate(d.class_counts) if n]
    head = "<tr><th>model</th><th>figure</th>" + "".join(
        f"<th>{esc(CELL_TYPES[i])} ({d.class_counts[i]}{rare_mark(d.class_counts[i])})</th>" for i in shown
    )
    rows = []
    for r in d.results:
        for figure in ("precision", "recall", "f1"):
            cells = []
            for i in shown:
                c = r.scores.classes[i]
                nm = "" if c.meaningful else " class=nm"
                cells.append(f"<td{nm}>{getattr(c, figure):.3f}{'' if c.meaningful else '*'}</td>")
            rows.append(f"<tr><td class=l>{esc(r.model)}</td><td class=l>{figure}</td>{''.join(cells)}</tr>")
    return f"<table>{head}</tr>{''.join(rows)}</table>"


def _suspects(comparison: Comparison) -> str:
    esc = html.escape
    rule = (
        f"Real cells whose given label at least {SUSPECT_VOTES} of the {len(comparison.models)} models' "
        "out-of-fold predictions disagree with. The dataset's authors say not every label was checked by "
        "an expert; these cells are listed for a person to look at. They are <b>kept as given</b> in "
        "training and in every figure above: nothing is relabelled."
    )
    if len(comparison.models) < SUSPECT_VOTES:
        ran = len(comparison.models)
        return f"<p>Not listed: it takes at least {SUSPECT_VOTES} models, this comparison ran {ran}.</p>"
    if not any(d.name == REAL for d in comparison.datasets):
        return "<p>Not listed: no real cells in this comparison.</p>"
    if not comparison.suspects:
        return f"<p>{rule}</p><p>None.</p>"
    head = "<tr><th>image</th><th>given</th><th>predicted</th><th>models disagreeing</th>" + "".join(
        f"<th>{esc(m)}</th>" for m in comparison.models
    )
    rows = "".join(
        f"<tr><td class=l>{esc(s.name)}</td><td class=l>{esc(s.given)}</td>"
        f"<td class=l>{esc(s.predicted)}</td>"
        f"<td>{s.votes}</td>" + "".join(f"<td class=l>{esc(p)}</td>" for _, p in s.predictions) + "</tr>"
        for s in comparison.suspects
    )
    return f"<p>{rule}</p><p>{len(comparison.suspects)} cells:</p><table>{head}</tr>{rows}</table>"


_NOTES = f"""<ul>
<li>Models: <b>svm</b> StandardScaler + RBF SVC (class_weight balanced, Platt probabilities) and
<b>random_forest</b> (300 trees, class_weight balanced_subsample) on the hand-made features of
blastq.core.cells.features (morphology, colour, GLCM and run-length texture); <b>cnn</b> a small CNN trained
from scratch on the crops (balanced class weights, label smoothing 0.1); <b>unet_encoder_linear</b>
StandardScaler + multinomial logistic regression (balanced) on the frozen U-Net encoder's mask-weighted
mean activations.
All seeded with the comparison's seed.</li>
<li>Macro precision / recall / F1 average the classes with at least one cell in the dataset: blasts are absent
from segmentation_wbc (normal cells), basophils from the synthetic fields.</li>
<li>*: fewer than {MIN_MEANINGFUL_CELLS} cells of that class in the dataset (segmentation_wbc has 4
basophils): its per-class figures are shown but not meaningful; it still counts in the macro.</li>
<li>train s: fitting only, summed over the folds. ms per cell: prediction plus the model's per-cell features
(hand-made features for svm and random_forest, encoder features for unet_encoder_linear), on this machine's
CPU; normalising the crops is the same for every model and is counted for none.</li>
<li>The U-Net whose encoder unet_encoder_linear uses was trained for segmentation on segmentation_wbc's train
and validation images (trainer/SPLIT.md), their pixels and masks but not their class labels; the synthetic
fields here use seeds outside the U-Net's.</li>
</ul>"""


def _page(comparison: Comparison) -> str:
    esc = html.escape
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
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td class=l>{esc(v)}</td></tr>" for k, v in facts.items())
    parts = [
        f"""<!doctype html><html><head><meta charset="utf-8"><title>blastq cell classifiers</title>
<style>{_STYLE}</style></head><body>
<h1>blastq cell classifiers: classical features vs deep models</h1>
<table>{fact_rows}</table>
<h2>Summary</h2>
<p>Winner: <b>{esc(comparison.winner)}</b>, the best macro F1 averaged over the datasets
({comparison.mean_macro_f1(comparison.winner):.3f}).</p>
{_summary_table(comparison)}
<img src="{MACRO_F1_PNG}" alt="macro F1 per model and dataset">
{_NOTES}
<h2>Per class</h2>"""
    ]
    for d in comparison.datasets:
        counts = ", ".join(f"{CELL_TYPES[i]} {n}" for i, n in enumerate(d.class_counts) if n)
        parts.append(
            f"<h3>{esc(d.name)}</h3><p>Cells by given label: {esc(counts)}.</p>{_per_class_table(d)}"
        )
    parts.append(
        "<h2>Confusion matrices</h2>"
        "<p>Rows: given label; columns: out-of-fold prediction; shading: share of the row.</p>"
    )
    for d in comparison.datasets:
        parts.append(
            f"<h3>{esc(d.name)}</h3>"
            f'<img src="{confusion_png_name(d.name)}" alt="confusion matrices, {esc(d.name)}">'
        )
    parts.append(f"<h2>Suspect labels</h2>{_suspects(comparison)}")
    parts.append(f"<h2>Split</h2><p>{esc(comparison.split)}</p>")
    parts.append(
        f'<p>All figures, per-cell predictions and folds as JSON: <a href="{JSON_NAME}">{JSON_NAME}</a>.</p>'
        "</body></html>\n"
    )
    return "\n".join(parts)


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
