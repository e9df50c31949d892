"""The evaluation report: Table I, the loss curves, best and worst examples, as PNGs and one HTML page.

Rendering takes evaluation results and returns bytes; write_report puts them in a folder. matplotlib
(the `report` extra) is imported only when a plot is drawn, and always draws with the Agg backend.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from blastq.core.common import BlastqError
from blastq.core.outputs import COLOUR_BLAST, COLOUR_WHITE_CELL, blastq_version, render_page
from blastq.trainer.evaluate import CASE_PX
from blastq.trainer.train import EpochLog

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from blastq.core.segment import ModelInfo
    from blastq.trainer.evaluate import EvaluationReport, ExampleCases, ImageCase

REPORT_FILES = ("report.html", "loss_curve.png", "examples.png", "metrics.json")

# Mask colours (RGB) by label name: the slide overlays' green and red, a dark background.
LABEL_COLOURS: dict[str, tuple[int, int, int]] = {
    "background": (35, 35, 40),
    "white_cell": COLOUR_WHITE_CELL,
    "blast": COLOUR_BLAST,
    "cytoplasm": COLOUR_WHITE_CELL,
    "nucleus": (170, 240, 170),
    "unscored cell": (120, 120, 120),
}
LABEL_TEXT = {"white_cell": "white cell", "unscored cell": "other predicted cell (not scored)"}

# Examples grid geometry in pixels (figures are drawn at 100 dpi, one point of layout per pixel).
DPI = 100
PANEL_PX = 150
GAP_PX = 6
GROUP_GAP_PX = 24
MARGIN_PX = 8
TITLE_PX = 24
HEADER_PX = 18
ROW_LABEL_PX = 16
LEGEND_PX = 24


# ---------------------------------------------------------------- loss curves


def load_history(path: Path) -> tuple[EpochLog, ...]:
    """The `<checkpoint>.history.json` train() writes: one EpochLog per epoch."""
    try:
        rows = json.loads(Path(path).read_text())
        names = {f.name for f in fields(EpochLog)}
        return tuple(EpochLog(**{k: v for k, v in row.items() if k in names}) for row in rows)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise BlastqError(
            f"not a training history (list of epoch, train_loss, val_loss): {path} ({exc})"
        ) from exc


def _losses(history: Sequence[EpochLog | Mapping[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    if not history:
        raise ValueError("empty training history")
    rows = [asdict(h) if is_dataclass(h) else h for h in history]
    return (
        [int(r["epoch"]) for r in rows],
        [float(r["train_loss"]) for r in rows],
        [float(r["val_loss"]) for r in rows],
    )


def best_epoch(history: Sequence[EpochLog | Mapping[str, Any]]) -> int:
    """The epoch of the lowest validation loss (the first, on ties): the one train() keeps."""
    epochs, _, val = _losses(history)
    return epochs[int(np.argmin(val))]


def agg_figure(width_px: int, height_px: int) -> Figure:
    # A bare Figure on an Agg canvas: no pyplot, no global backend switch, safe in threads and servers.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise BlastqError("the evaluation report needs matplotlib: pip install 'blastq[report]'") from exc
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, metadata: Mapping[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=dict(metadata or {}))
    return buf.getvalue()


def loss_curve_png(
    history: Sequence[EpochLog | Mapping[str, Any]], *, width_px: int = 640, height_px: int = 400
) -> bytes:
    """Training and validation loss per epoch, the best epoch marked (its number in the PNG's text too)."""
    epochs, train, val = _losses(history)
    best = best_epoch(history)
    best_val = val[epochs.index(best)]
    fig = agg_figure(width_px, height_px)
    ax = fig.add_subplot()
    style = {"marker": "o", "markersize": 3} if len(epochs) <= 60 else {}
    ax.plot(epochs, train, label="training loss", color="#1f77b4", **style)
    ax.plot(epochs, val, label="validation loss", color="#ff7f0e", **style)
    ax.axvline(best, color="0.6", linestyle="--", linewidth=1)
    ax.plot(
        [best],
        [best_val],
        "*",
        color="#d62728",
        markersize=14,
        label=f"best: epoch {best}, validation {best_val:.3f}",
    )
    positive = [v for v in train + val if v > 0]
    # Losses fall by an order of magnitude or more in the first epochs: a log axis keeps the tail legible.
    if positive and len(positive) == len(train + val) and max(positive) / min(positive) > 10:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        # Label the minor ticks 2, 3 and 5 (x 10^n) only: all of them crowd each other.
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training and validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return figure_png(fig, {"Title": "blastq loss curve", "blastq:best_epoch": str(best)})


# ---------------------------------------------------------------- examples grid


def _as_groups(cases: ExampleCases | Sequence[ExampleCases]) -> list[ExampleCases]:
    groups = list(cases) if isinstance(cases, Sequence) else [cases]
    return [g for g in groups if g.best or g.worst]


def grid_size_px(rows: int, groups: int = 1) -> tuple[int, int]:
    """(height, width) of examples_grid_png for `groups` side by side, the tallest with `rows` rows."""
    width = 2 * MARGIN_PX + groups * (3 * PANEL_PX + 2 * GAP_PX) + (groups - 1) * GROUP_GAP_PX
    height = (
        2 * MARGIN_PX
        + TITLE_PX
        + HEADER_PX
        + rows * (ROW_LABEL_PX + PANEL_PX)
        + (rows - 1) * GAP_PX
        + LEGEND_PX
    )
    return height, width


def _label_lut(label_names: Sequence[str]) -> np.ndarray:
    fallback = [(0, 120, 255), (255, 170, 0), (200, 0, 200), (0, 200, 200)]
    return np.array(
        [LABEL_COLOURS.get(n, fallback[i % len(fallback)]) for i, n in enumerate(label_names)], np.uint8
    )


def colour_labels(labels: np.ndarray, label_names: Sequence[str]) -> np.ndarray:
    """An HW label map as HWC uint8 RGB in the report's class colours."""
    lut = _label_lut(label_names)
    return lut[np.clip(labels, 0, len(lut) - 1)]


def _fit(rgb: np.ndarray, nearest: bool) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = PANEL_PX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if nearest:
        return cv2.resize(rgb, size, interpolation=cv2.INTER_NEAREST)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def _panels(case: ImageCase) -> list[np.ndarray]:
    return [
        _fit(case.image, nearest=False),
        _fit(colour_labels(case.truth, case.label_names), nearest=True),
        _fit(colour_labels(case.pred, case.label_names), nearest=True),
    ]


def examples_grid_png(cases: ExampleCases | Sequence[ExampleCases]) -> bytes:
    """Rows of input / truth / prediction, best first then worst, each labelled with its Dice.

    Several groups (e.g. real crops and synthetic fields) are drawn side by side. Size: grid_size_px.
    """
    groups = _as_groups(cases)
    if not groups:
        raise ValueError("no example images to draw")
    n_rows = max(len(g.best) + len(g.worst) for g in groups)
    height, width = grid_size_px(n_rows, len(groups))
    fig = agg_figure(width, height)
    from matplotlib.patches import Patch  # after agg_figure: its error says how to install matplotlib

    def text(x: float, y: float, s: str, **kw) -> None:  # pixel coordinates from the top left
        fig.text(x / width, 1 - y / height, s, va="top", **kw)

    group_w = 3 * PANEL_PX + 2 * GAP_PX
    for gi, group in enumerate(groups):
        x0 = MARGIN_PX + gi * (group_w + GROUP_GAP_PX)
        title = group.title or "examples"
        text(x0, MARGIN_PX, f"{title}: best and worst of {group.images}", fontsize=10, weight="bold")
        for ci, name in enumerate(("input", "truth", "prediction")):
            text(
                x0 + ci * (PANEL_PX + GAP_PX) + PANEL_PX / 2,
                MARGIN_PX + TITLE_PX,
                name,
                fontsize=8,
                ha="center",
            )
        rows = [("best", i, c) for i, c in enumerate(group.best)] + [
            ("worst", i, c) for i, c in enumerate(group.worst)
        ]
        used: set[str] = set()
        for ri, (kind, i, case) in enumerate(rows):
            y = MARGIN_PX + TITLE_PX + HEADER_PX + ri * (ROW_LABEL_PX + PANEL_PX + GAP_PX)
            colour = "#1a7f1a" if kind == "best" else "#b00020"
            text(
                x0, y, f"{kind} {i + 1}: {case.name}, {case.metric} {case.dice:.3f}", fontsize=7, color=colour
            )
            for ci, panel in enumerate(_panels(case)):
                ph, pw = panel.shape[:2]
                px = x0 + ci * (PANEL_PX + GAP_PX) + (PANEL_PX - pw) / 2
                py = y + ROW_LABEL_PX + (PANEL_PX - ph) / 2
                ax = fig.add_axes((px / width, 1 - (py + ph) / height, pw / width, ph / height))
                ax.imshow(panel, interpolation="none")
                ax.set_axis_off()
            used |= {
                case.label_names[v]
                for v in np.unique(np.concatenate([case.truth.ravel(), case.pred.ravel()]))
            }
        label_names = rows[0][2].label_names
        handles = [
            Patch(color=rgb / 255, label=LABEL_TEXT.get(n, n))
            for n, rgb in zip(label_names, _label_lut(label_names), strict=True)
            if n in used
        ]
        fig.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(x0 / width, MARGIN_PX / 2 / height),
            ncol=len(handles),
            frameon=False,
            fontsize=7,
            handlelength=1,
            columnspacing=0.8,
            borderaxespad=0,
        )
    return figure_png(fig, {"Title": "blastq examples"})


def report_plots_png(
    history: Sequence[EpochLog | Mapping[str, Any]] | None,
    cases: ExampleCases | Sequence[ExampleCases],
    *,
    rows_per_kind: int = 2,
    max_width_px: int = 1400,
) -> bytes:
    """The README picture: the loss curve beside the best and worst `rows_per_kind` examples of each group.

    A palette PNG: a few hundred kilobytes where the full-colour one would be a megabyte.
    """
    groups = [
        replace(g, best=g.best[:rows_per_kind], worst=g.worst[:rows_per_kind]) for g in _as_groups(cases)
    ]
    grid = cv2.imdecode(np.frombuffer(examples_grid_png(groups), np.uint8), cv2.IMREAD_COLOR)
    from PIL import Image  # Pillow comes with matplotlib

    parts = [grid]
    if history:
        loss = loss_curve_png(history, width_px=720, height_px=grid.shape[0])
        gap = np.full((grid.shape[0], 16, 3), 255, np.uint8)
        parts = [cv2.imdecode(np.frombuffer(loss, np.uint8), cv2.IMREAD_COLOR), gap, grid]
    picture = np.hstack(parts)
    if picture.shape[1] > max_width_px:
        scale = max_width_px / picture.shape[1]
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    rgb = Image.fromarray(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB))
    buf = io.BytesIO()
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        buf, format="PNG", optimize=True
    )
    return buf.getvalue()


# ---------------------------------------------------------------- Table I


@dataclass(frozen=True)
class TableRow:
    section: str  # "segmentation_wbc dataset1", "synthetic fields"
    metric: str
    values: tuple[float | None, ...]  # one per column; None: not measured there
    kind: str  # how to print: "count", "ratio" (0.981), "percent" (97.5%), "points" (0.12)

    def formatted(self) -> tuple[str, ...]:
        return tuple(_format(v, self.kind) for v in self.values)


def _format(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "count":
        return f"{int(value)}"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    if kind == "points":
        return f"{value:.2f}"
    return f"{value:.3f}"


@dataclass(frozen=True)
class MetricsTable:
    """Figures by split (columns) like the study's Table I, in sections by data source."""

    columns: tuple[str, ...]
    rows: tuple[TableRow, ...]

    def sections(self) -> list[tuple[str, list[TableRow]]]:
        out: dict[str, list[TableRow]] = {}
        for row in self.rows:
            out.setdefault(row.section, []).append(row)
        return list(out.items())

    def as_markdown(self) -> str:
        lines = ["| | " + " | ".join(self.columns) + " |", "| --- |" + " --- |" * len(self.columns)]
        for section, rows in self.sections():
            lines.append(f"| **{section}** |" + " |" * len(self.columns))
            lines += [f"| {r.metric} | " + " | ".join(r.formatted()) + " |" for r in rows]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "columns": list(self.columns),
            "rows": [
                {
                    "section": r.section,
                    "metric": r.metric,
                    "values": list(r.values),
                    "text": list(r.formatted()),
                }
                for r in self.rows
            ],
        }


def table_one(evaluations_by_split: Mapping[str, EvaluationReport]) -> MetricsTable:
    """Dice, IoU and pixel accuracy per split, then precision, recall, F1 per class, then detection."""
    splits = list(evaluations_by_split)
    rows: list[TableRow] = []

    def add(section: str, metric: str, kind: str, get) -> None:
        values = tuple(get(evaluations_by_split[s]) for s in splits)
        if any(v is not None for v in values):
            rows.append(TableRow(section, metric, values, kind))

    datasets = sorted({e.dataset for r in evaluations_by_split.values() for e in r.wbc})
    for ds in datasets:

        def wbc(attr: str, ds: str = ds):
            def get(report):
                e = next((e for e in report.wbc if e.dataset == ds), None)
                value = e
                for part in attr.split("."):
                    value = getattr(value, part) if value is not None else None
                return value

            return get

        section = f"segmentation_wbc {ds}"
        for metric, kind, attr in (
            ("images", "count", "images"),
            ("whole-cell Dice", "ratio", "cell_dice"),
            ("whole-cell IoU", "ratio", "cell_iou"),
            ("nucleus Dice", "ratio", "nucleus_dice"),
            ("nucleus IoU", "ratio", "nucleus_iou"),
            ("pixel accuracy", "percent", "pixel_accuracy"),
            ("whole-cell precision", "ratio", "cell.precision"),
            ("whole-cell recall", "ratio", "cell.recall"),
            ("whole-cell F1", "ratio", "cell.f1"),
            ("nucleus precision", "ratio", "nucleus.precision"),
            ("nucleus recall", "ratio", "nucleus.recall"),
            ("nucleus F1", "ratio", "nucleus.f1"),
        ):
            add(section, metric, kind, wbc(attr))

    def synth(get):
        return lambda report: get(report.synthetic) if report.synthetic is not None else None

    def cls(name: str, attr: str):
        return synth(lambda s: getattr(s.report.by_name(name), attr))

    section = "synthetic fields"
    for metric, kind, get in (
        ("fields", "count", synth(lambda s: s.fields)),
        ("blast Dice", "ratio", synth(lambda s: s.blast_dice)),
        ("blast IoU", "ratio", synth(lambda s: s.blast_iou)),
        ("white-cell Dice", "ratio", synth(lambda s: s.white_cell_dice)),
        ("white-cell IoU", "ratio", cls("white_cell", "iou")),
        ("pixel accuracy", "percent", synth(lambda s: s.pixel_accuracy)),
        ("white-cell precision", "ratio", cls("white_cell", "precision")),
        ("white-cell recall", "ratio", cls("white_cell", "recall")),
        ("white-cell F1", "ratio", cls("white_cell", "f1")),
        ("blast precision", "ratio", cls("blast", "precision")),
        ("blast recall", "ratio", cls("blast", "recall")),
        ("blast F1", "ratio", cls("blast", "f1")),
        ("blast detection precision", "ratio", synth(lambda s: s.blast_objects.precision)),
        ("blast detection recall", "ratio", synth(lambda s: s.blast_objects.recall)),
        ("blast detection F1", "ratio", synth(lambda s: s.blast_objects.f1)),
        ("white-cell detection F1", "ratio", synth(lambda s: s.cell_objects.f1)),
        ("blast percentage error, points", "points", synth(lambda s: s.blast_percent_abs_error)),
    ):
        add(section, metric, kind, get)
    return MetricsTable(tuple(splits), tuple(rows))


# ---------------------------------------------------------------- the page


def _page(
    model_info: ModelInfo,
    table: MetricsTable,
    sources: Mapping[str, str],
    history_best: tuple[int, float] | None,
    groups: list[ExampleCases],
) -> str:
    facts = {
        "model version": model_info.version,
        "sha256": model_info.sha256 or "–",
        "scale": f"{model_info.mpp} um/px",
        "trained on": model_info.trained_on or "–",
        "data": "; ".join(f"{k}: {v}" for k, v in sources.items()),
        "blastq": blastq_version(),
    }
    return render_page(
        __package__,
        "evaluation.html",
        info=model_info,
        facts=facts,
        table=table,
        history_best=history_best,
        groups=groups,
        example_metrics=", ".join(sorted({c.metric for g in groups for c in g.best + g.worst})),
        case_px=CASE_PX,
    ).decode()


def write_report(
    out_dir: Path,
    *,
    model_info: ModelInfo,
    evaluations_by_split: Mapping[str, EvaluationReport],
    history: Sequence[EpochLog | Mapping[str, Any]] | None = None,
    cases: ExampleCases | Sequence[ExampleCases] = (),
) -> Path:
    """Write report.html with loss_curve.png, examples.png (each when there is something to draw) and
    metrics.json into out_dir; return the page's path. The page links the PNGs beside it."""
    if not evaluations_by_split:
        raise ValueError("no evaluations to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = table_one(evaluations_by_split)
    groups = _as_groups(cases)
    history_best = None
    if history:
        epochs, _, val = _losses(history)
        best = best_epoch(history)
        history_best = (best, val[epochs.index(best)])
        (out_dir / "loss_curve.png").write_bytes(loss_curve_png(history))
    if groups:
        (out_dir / "examples.png").write_bytes(examples_grid_png(groups))
    figures = {
        "model": {
            "version": model_info.version,
            "sha256": model_info.sha256,
            "mpp": model_info.mpp,
            "trained_on": model_info.trained_on,
        },
        "splits": {split: r.as_dict() for split, r in evaluations_by_split.items()},
        "table_one": table.as_dict(),
        "best_epoch": history_best[0] if history_best else None,
        "history": [asdict(h) if is_dataclass(h) else dict(h) for h in history or ()],
        "examples": [
            {"group": g.title, "rank": rank, "name": c.name, "metric": c.metric, "dice": round(c.dice, 4)}
            for g in groups
            for rank, part in (("best", g.best), ("worst", g.worst))
            for c in part
        ],
        "blastq_version": blastq_version(),
    }
    (out_dir / "metrics.json").write_text(json.dumps(figures, indent=2))
    folders = {r.folder for r in evaluations_by_split.values()}
    sources = (
        {"all splits": folders.pop()}
        if len(folders) == 1
        else {split: r.folder for split, r in evaluations_by_split.items()}
    )
    page = out_dir / "report.html"
    page.write_text(_page(model_info, table, sources, history_best, groups))
    return page
