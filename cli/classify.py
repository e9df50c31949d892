"""The per-cell commands: blastq compare-classifiers, blastq blast-caller fit.

Parse, call blastq.trainer.compare (load_cells, compare_cells, fit_final) and
blastq.trainer.compare_report, print. `register(main)` adds the command to the `blastq` group, which
turns a BlastqError (a bad --models value, an unusable folder) into one line and exit status 2.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("compare-classifiers", context_settings=CONTEXT)
@click.option(
    "--wbc",
    "wbc_root",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The segmentation_wbc folder (labels_dataset1.csv, labels_dataset2.csv, dataset1/, dataset2/).",
)
@click.option(
    "--synth-fields",
    default=60,
    show_default=True,
    type=click.IntRange(0),
    help="Synthetic fields (0: none).",
)
@click.option(
    "--synth-variety",
    type=click.Choice(["classic", "wide", "mixed"]),
    default="classic",
    show_default=True,
    help="Synthetic fields of the generator's classic look, its wide one (blasts across their range "
    "beside their look-alikes, stain families), or both by turns.",
)
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2), help="Cross-validation folds.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seeds models and fields.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder: index.html, comparison.json and PNGs.",
)
@click.option(
    "--models",
    "models_text",
    default="svm,random_forest,cnn,unet_encoder_linear",
    show_default=True,
    help="Comma-separated models to compare.",
)
@click.option(
    "--save-best",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Train the winner on all real and synthetic cells and write it as a classifier file here.",
)
@click.option(
    "--version",
    "classifier_version",
    help="Version name stored in the --save-best file (default: <model>-seed<seed>).",
)
@click.option("--cnn-epochs", type=click.IntRange(1), help="CNN training epochs (default: fit_cnn's).")
@click.option(
    "--limit-cells",
    type=click.IntRange(1),
    help="At most this many real cells, the classes taken in turn: a quick trial, not a result.",
)
def compare_classifiers(
    wbc_root: Path,
    synth_fields: int,
    synth_variety: str,
    folds: int,
    seed: int,
    out_dir: Path,
    models_text: str,
    save_best: Path | None,
    classifier_version: str | None,
    cnn_epochs: int | None,
    limit_cells: int | None,
) -> None:
    """Compare cell classifiers (hand-made features + SVM or random forest, a small CNN, a linear head on
    the U-Net encoder) by cross-validation on segmentation_wbc's labelled cells and synthetic fields.

    Writes an HTML report with accuracy, macro precision / recall / F1, per-class figures, confusion
    matrices, timings and the real cells whose label most models disagree with.
    """
    from tqdm import tqdm

    from blastq.trainer.compare import compare_cells, default_unet, fit_final, load_cells, parse_models
    from blastq.trainer.compare_report import write_comparison_report

    models = parse_models(models_text)
    started = time.perf_counter()
    unet, preprocess_config = default_unet()
    click.echo("loading cells ...")
    datasets = load_cells(
        wbc_root,
        synth_fields=synth_fields,
        seed=seed,
        preprocess_config=preprocess_config,
        wbc_limit=limit_cells,
        synth_variety=synth_variety,
    )
    bar = tqdm(total=1, unit="fold", disable=None)

    def tick(done: int, total: int, what: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_description(what, refresh=False)
        bar.refresh()

    try:
        comparison = compare_cells(
            datasets,
            folds=folds,
            seed=seed,
            models=models,
            unet=unet,
            cnn_epochs=cnn_epochs,
            progress=tick,
            settings={"synth_fields": synth_fields, "synth_variety": synth_variety, "wbc_limit": limit_cells},
        )
    finally:
        bar.close()
    page = write_comparison_report(comparison, out_dir)
    click.echo(comparison.as_text())
    click.echo(f"report: {page}")
    if save_best is not None:
        winner = comparison.winner
        click.echo(f"training {winner} on all {sum(len(c) for c in datasets.values())} cells ...")
        final = fit_final(
            winner,
            datasets,
            seed=seed,
            unet=unet,
            cnn_epochs=cnn_epochs,
            version=classifier_version or "",
            metrics={
                "cv_macro_f1_mean": round(comparison.mean_macro_f1(winner), 4),
                **{
                    f"cv_macro_f1_{d.name}": round(d.result(winner).scores.macro_f1, 4)
                    for d in comparison.datasets
                },
            },
        )
        sha256 = final.save(save_best)
        click.echo(f"wrote {save_best} ({winner}, sha256 {sha256[:12]})")
    click.echo(f"took {time.perf_counter() - started:.0f} s")


@click.group("blast-caller", context_settings=CONTEXT)
def blast_caller() -> None:
    """Which cells are blasts: fit the per-cell blast call on your own labelled cells.

    Without a caller a cell is a blast when the U-Net's blast share reaches BLASTQ_BLAST_CELL_THRESHOLD.
    A caller fitted here on your lab's cells (your stain, camera and blasts) decides from that share and
    the cell's size, nucleus-to-cell ratio and shape instead; use it with BLASTQ_BLAST_CALLER=FILE.
    """


@blast_caller.command("fit", context_settings=CONTEXT)
@click.argument("cells_csv", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--from-reviews",
    is_flag=True,
    help="Fit on the cells of the signed-off reviews (blastq serve) instead of cells.csv files.",
)
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="With --from-reviews: only reviews signed off since this local date/time.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The caller file to write (JSON).",
)
@click.option(
    "--truth-column",
    default="truth",
    show_default=True,
    help="The column you added to each cells.csv: 'blast', another type name (or 'other') for a cell "
    "that is not a blast, empty to leave the cell out.",
)
@click.option(
    "--sensitivity",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Share of the held-out blasts the threshold must catch (a screening tool: review settles the rest).",
)
@click.option(
    "--version", "caller_version", default="lab-caller", show_default=True, help="Name stored in the file."
)
def blast_caller_fit(
    cells_csv: tuple[Path, ...],
    from_reviews: bool,
    since: datetime | None,
    out: Path,
    truth_column: str,
    sensitivity: float,
    caller_version: str,
) -> None:
    """Fit a blast caller from blastq cells.csv files (one per image) with a truth column.

    Run blastq on your images, open each cells.csv, add a column (default `truth`) and write `blast` for
    every blast, a type (or `other`) for every cell that is not one. The figures printed are held out by
    image (5 folds): what the caller does on an image it was not fitted on.

    Or, with --from-reviews, fit on every cell of the signed-off reviews: a cell is a blast when the
    reviewer left it one (unidentified cells, smudges and artefacts are left out); held out by sample.

    \b
    Examples:
      blastq blast-caller fit out/*/cells.csv --out lab-caller.json
      blastq blast-caller fit --from-reviews --out lab-caller.json
    """
    from blastq.core.cells import write_caller
    from blastq.core.common import InvalidConfig
    from blastq.trainer.blastcaller import fit_caller, read_labelled_cells

    if from_reviews == bool(cells_csv):
        raise InvalidConfig("give cells.csv files or --from-reviews (one of them)")
    if from_reviews:
        from blastq.core.adapters import connect, load_settings, reviewed_cells
        from blastq.trainer.blastcaller import reviewed_labelled_cells

        db = connect(load_settings().database_url.get_secret_value())
        cells = reviewed_labelled_cells(reviewed_cells(db, since.astimezone() if since else None))
        trained_on = f"{len(cells.is_blast)} reviewed cells from {len(cells.sources)} signed-off samples"
    else:
        cells = read_labelled_cells(cells_csv, truth_column)
        trained_on = f"{len(cells.is_blast)} labelled cells from {len(cells_csv)} cells.csv files"
    caller = fit_caller(cells, version=caller_version, trained_on=trained_on, sensitivity=sensitivity)
    m = caller.metrics
    click.echo(
        f"{m['blasts']} blasts and {m['others']} other cells from {m['images']} {'samples' if from_reviews else 'images'}; held out: {m['held_out']}"
    )
    if "sensitivity" in m:
        share = m["share_rule"]
        click.echo(
            f"caller: P(blast) >= {caller.threshold:g}: sensitivity {m['sensitivity']:.3f}, "
            f"specificity {m['specificity']:.3f}"
        )
        click.echo(
            f"share rule alone: blast share >= {share['threshold']:g}: sensitivity {share['sensitivity']:.3f}, "
            f"specificity {share['specificity']:.3f}"
        )
    write_caller(caller, out)
    click.echo(f"wrote {out}: use it with BLASTQ_BLAST_CALLER={out}")


@click.group("classifier", context_settings=CONTEXT)
def classifier() -> None:
    """The per-cell classifier (cell types, blast or not): retrain it on your lab's labelled cells."""


@classifier.command("train", context_settings=CONTEXT)
@click.option("--from-reviews", is_flag=True, help="Learn from every cell of the signed-off reviews.")
@click.option(
    "--since", help="With --from-reviews: only reviews signed off on or after this date (YYYY-MM-DD)."
)
@click.option(
    "--cells",
    "cells_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Or learn from a folder: DIR/<class>/<image>, one sub-folder per cell type (or just blast and "
    "other); each image a crop whose labelled cell is the one nearest its centre.",
)
@click.option("--mpp", type=click.FloatRange(0.01, 5.0), help="With --cells: microns per pixel of the crops.")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The classifier file to write.",
)
@click.option(
    "--base",
    default="default",
    show_default=True,
    help="The classifier to start from: default (shipped) or a classifier file.",
)
@click.option(
    "--heldout",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of samples (images with --cells) held out to judge the result on.",
)
@click.option(
    "--lab-weight",
    default=3.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="How many anchor cells one lab cell weighs.",
)
@click.option(
    "--anchor-fields",
    default=60,
    show_default=True,
    type=click.IntRange(0),
    help="Synthetic fields whose cells anchor what the shipped classifier knows.",
)
@click.option(
    "--test-fields",
    default=20,
    show_default=True,
    type=click.IntRange(1),
    help="Synthetic test fields (seeds apart from the anchors') the result must not be worse on.",
)
@click.option(
    "--wbc",
    "wbc_root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The segmentation_wbc folder, if you have it: its real cells join the anchors and are checked too.",
)
@click.option(
    "--version", "classifier_version", default="", help="Name stored in the file (default: BASE+lab)."
)
@click.option(
    "--register",
    is_flag=True,
    help="Also register it in the registry as a candidate, with its figures and verdict (promote it with "
    "`blastq classifier promote VERSION`).",
)
def classifier_train(
    from_reviews: bool,
    since: datetime | None,
    cells_dir: Path | None,
    mpp: float | None,
    out: Path,
    base: str,
    heldout: float,
    lab_weight: float,
    anchor_fields: int,
    test_fields: int,
    wbc_root: Path | None,
    classifier_version: str,
    register: bool,
) -> None:
    """Refit the cell classifier with your lab's labelled cells and judge it on the ones it did not see.

    \b
    From the review station (every cell of a signed-off review, as the person left it):
      blastq classifier train --from-reviews --out lab-cells.pt
    From a folder of labelled crops:
      blastq classifier train --cells crops/ --mpp 0.1 --out lab-cells.pt

    The lab's cells are split by sample into a training and a held-out part (written into the file); the
    figures of the starting classifier and of the new one are printed on the held-out part and on the
    shipped test cells. Use the file with BLASTQ_CLASSIFIER=FILE when the verdict says it is not worse.
    """
    from tqdm import tqdm

    from blastq.core.cells import load_cell_classifier
    from blastq.core.common import InvalidConfig
    from blastq.trainer.celldata import concat_cells, synthetic_cells, wbc_cells
    from blastq.trainer.fromreviews import ANCHOR_SEED, TEST_SEED, adapt, folder_cells, review_cells

    if from_reviews == (cells_dir is not None):
        raise InvalidConfig("give --from-reviews or --cells DIR (one of them)")
    if cells_dir is not None and mpp is None:
        raise InvalidConfig("--cells needs --mpp: the microns per pixel of the crops")
    if since is not None and not from_reviews:
        raise InvalidConfig("--since goes with --from-reviews")
    started = time.perf_counter()
    base_classifier = load_cell_classifier(base)
    if base_classifier is None:
        raise InvalidConfig("--base none: there is nothing to start from")
    if from_reviews:
        from blastq.core.adapters import connect, load_settings, store_from_settings

        settings = load_settings()
        when = since.astimezone() if since else None  # naive: local time
        lab = review_cells(
            connect(settings.database_url.get_secret_value()), store_from_settings(settings), when
        )
    else:
        from blastq.core.segment import load_engine

        engine, info = load_engine()
        with tqdm(desc="segmenting crops", unit="image", leave=False) as bar:
            lab = folder_cells(cells_dir, mpp, engine, info, progress=lambda done, total: bar.update(1))
    click.echo(f"lab cells: {len(lab)} ({', '.join(f'{n} {k}' for k, n in lab.counts().items())})")
    click.echo("anchor and test cells ...", err=True)
    anchors = synthetic_cells(anchor_fields, seed=ANCHOR_SEED, variety="mixed")
    tests = {"synthetic test fields": synthetic_cells(test_fields, seed=TEST_SEED, variety="mixed")}
    if wbc_root is not None:
        real = wbc_cells(wbc_root)
        anchors = concat_cells(anchors, real)
        tests["segmentation_wbc (retention)"] = real
    adaptation = adapt(
        base_classifier,
        lab,
        anchors,
        tests,
        heldout_share=heldout,
        lab_weight=lab_weight,
        version=classifier_version,
    )
    for name, figures in [("lab held-out", adaptation.heldout), *adaptation.shipped.items()]:
        b, c = figures["base"], figures["candidate"]
        line = f"{name} ({figures['cells']} cells): macro F1 {b['macro_f1']:.3f} -> {c['macro_f1']:.3f}, accuracy {b['accuracy']:.3f} -> {c['accuracy']:.3f}"
        if c.get("blast_sensitivity") is not None:
            line += f", blast sensitivity {b['blast_sensitivity']:.3f} -> {c['blast_sensitivity']:.3f}"
        click.echo(line)
    from blastq.core.cells import save_classifier

    sha256 = save_classifier(
        out, adaptation.classifier.info, sklearn_model=adaptation.classifier.sklearn_model
    )
    verdict = "not worse: use it" if adaptation.acceptable else "WORSE somewhere: keep the one in use"
    click.echo(f"{verdict} ({'; '.join(adaptation.reasons)})")
    click.echo(
        f"wrote {out} ({adaptation.classifier.info.version}, sha256 {sha256[:12]}); BLASTQ_CLASSIFIER={out}"
    )
    if register:
        from blastq.core.adapters import connect, load_settings, register_model, store_from_settings

        settings = load_settings()
        model = register_model(
            connect(settings.database_url.get_secret_value()),
            store_from_settings(settings),
            out,
            metrics=adaptation.metrics(),
            split=adaptation.split,
            kind="classifier",
        )
        click.echo(f"registered classifier {model.version} as a {model.state}")
    click.echo(f"took {time.perf_counter() - started:.0f} s")
    if not adaptation.acceptable:
        sys.exit(1)


@classifier.command("list", context_settings=CONTEXT)
def classifier_list() -> None:
    """Registered classifiers: version, state, and the verdict each was registered with."""
    from blastq.core.adapters import connect, list_models, load_settings

    db = connect(load_settings().database_url.get_secret_value())
    rows = list_models(db, kind="classifier")
    if not rows:
        click.echo("no classifier registered: the shipped one is in use")
    for m in rows:
        verdict = "not worse" if m.metrics.get("acceptable") else "worse"
        click.echo(
            f"{m.version}\t{m.state}\tbase {m.metrics.get('base', '?')}\t{verdict}\t{m.created_at:%Y-%m-%d %H:%M}"
        )


@classifier.command("promote", context_settings=CONTEXT)
@click.argument("version")
@click.option(
    "--force", is_flag=True, help="Promote even without a not-worse verdict against the one in use."
)
def classifier_promote(version: str, force: bool) -> None:
    """Make VERSION the classifier of BLASTQ_CLASSIFIER=registry (workers take it when they start).

    Refused unless it was found not worse than the classifier in use, on the lab's held-out samples and
    on the shipped test cells, when it was trained."""
    from blastq.core.adapters import connect, get_model, load_settings, promote
    from blastq.core.common import InvalidConfig

    db = connect(load_settings().database_url.get_secret_value())
    model = get_model(db, version)
    if model is None or model.kind != "classifier":
        raise InvalidConfig(f"no classifier {version} in the registry (blastq classifier list)")
    promote(db, version, force=force)
    click.echo(f"promoted classifier {version}: restart the workers to use it (BLASTQ_CLASSIFIER=registry)")


@classifier.command("rollback", context_settings=CONTEXT)
def classifier_rollback() -> None:
    """Promote again the classifier promoted before the current one."""
    from blastq.core.adapters import connect, load_settings, rollback

    model = rollback(connect(load_settings().database_url.get_secret_value()), kind="classifier")
    click.echo(f"promoted classifier {model.version} again")


def register(main: click.Group) -> None:
    """Add `compare-classifiers`, `blast-caller` and `classifier` to the `blastq` group."""
    main.add_command(compare_classifiers)
    main.add_command(blast_caller)
    main.add_command(classifier)
