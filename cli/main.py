"""The `blastq` command line: parse, call one function, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from blastq.cli.classify import register as register_classify_commands
from blastq.cli.models import register as register_model_commands
from blastq.cli.service import register as register_service_commands
from blastq.cli.trainer import register as register_trainer_commands
from blastq.cli.web import register as register_web_commands
from blastq.core.common import BlastqError
from blastq.trainer.defaults import TRAIN_DEFAULTS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"blastq: error: {message}", err=True)
    sys.exit(code)


# Modules of the optional extras (pyproject.toml) and the extra that installs each.
EXTRA_OF_MODULE = {
    "celery": "service",  # part of the main install; missing only from an install broken since
    "kombu": "service",
    "redis": "service",
    "boto3": "service",
    "botocore": "service",
    "psycopg": "service",
    "psycopg2": "service",
    "matplotlib": "report",
    "torch_tensorrt": "tensorrt",
    "monai": "bench",
}


class BlastqGroup(click.Group):
    """Turns a BlastqError anywhere in a command into one line on stderr and exit status 2, and so a
    module of an extra that is not installed (naming the extra)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BlastqError as exc:
            _fail(str(exc))
        except ImportError as exc:
            # ModuleNotFoundError names the module; Kombu's own says "Missing redis library".
            named = (exc.name or "").split(".")[0]
            module = (
                named
                if named in EXTRA_OF_MODULE
                else next((m for m in EXTRA_OF_MODULE if f" {m} " in f" {exc} "), None)
            )
            if module is None:
                raise
            _fail(
                f"this needs {module}, which is not installed: pip install 'blastq[{EXTRA_OF_MODULE[module]}]'"
            )


@click.group(cls=BlastqGroup, context_settings=CONTEXT)
@click.version_option(package_name="blastq")
def main() -> None:
    """blastq: find leukaemic blast cells in blood-smear images.

    \b
    Quick start:
      blastq synth --count 1 --size 2048 --out smears     # make an example smear
      blastq run smears/synth_00000.png --out results     # segment it with the shipped model
    Each image gets results/<name>/ with mask.png, nuclei.png, instances.tif, overlay.png,
    cells.csv, cells.geojson, summary.json and report.html; results are also recorded in the local database.
    Whole slides (tiled/pyramidal TIFF, OME-TIFF, SVS, NDPI, MRXS...) are read region by region and give
    mask.tif, nuclei.tif and instances.tif as tiled pyramidal TIFFs instead of the PNGs.

    Settings come from BLASTQ_* environment variables (see `blastq config`).
    """


@main.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write each image's files to OUT/<image name>/.",
)
@click.option(
    "--mpp",
    type=float,
    help="Microns per pixel of the images (default: from metadata, else estimated from red cells).",
)
@click.option(
    "--model",
    metavar="FILE|VERSION",
    help="A checkpoint file, a registered version (`blastq models list`), or `registry` for the promoted "
    "one (default: the shipped model).",
)
@click.option("--device", help="cpu or cuda:N (default: BLASTQ_DEVICE or cpu).")
@click.option("--no-record", is_flag=True, help="Do not record results in the database and store.")
@click.option(
    "--sample",
    metavar="ID",
    help="The images are fields of one sample (patient): their cells are pooled into one verdict, "
    "recorded with the sample's earlier images; with --out also OUT/sample-summary.json and report.",
)
def run(
    images: tuple[Path, ...],
    out_dir: Path | None,
    mpp: float | None,
    model: str | None,
    device: str | None,
    no_record: bool,
    sample: str | None,
) -> None:
    """Segment IMAGES (files, folders of images, or glob patterns) here; report white cells and blasts.

    Folders and globs are taken as `blastq submit` takes them: regular files only, no symlink
    leading out of the folder, and neither `blastq synth` truth nor `blastq run` outputs.

    Whole-slide files (tiled or pyramidal TIFF, OME-TIFF, and through OpenSlide SVS, NDPI, MRXS, SCN)
    are read region by region and processed in chunks, so memory stays bounded whatever the slide's
    size; their masks come as tiled pyramidal TIFFs (mask.tif, nuclei.tif, instances.tif).

    Exit status is 0 when every image succeeded; a failed image prints one line with the reason
    and the others are still processed.
    """
    from tqdm import tqdm

    from blastq.core.adapters import check_local_folders, load_settings
    from blastq.core.cells import check_sample_name
    from blastq.core.image import check_user_mpp, check_writable_folder, expand_inputs, output_folder_name
    from blastq.core.pipeline import SAMPLE_FILE_PREFIX, LocalRunner, write_sample

    # What can be checked is checked before the model loads (seconds) and the images are computed.
    check_user_mpp(mpp)
    if sample is not None:
        check_sample_name(sample)
    settings = load_settings(model=model, device=device)
    inputs = expand_inputs(images)  # files, folders and globs, as `blastq submit` takes them
    for refused in inputs.refused:
        click.echo(f"FAILED {refused}", err=True)
    if inputs.skipped:
        click.echo(inputs.skipped_line(), err=True)
    total = len(inputs.files) + len(inputs.refused)
    if not inputs.files:
        _fail(f"{total} of {total} image(s) failed", code=1)
    if out_dir is not None:
        check_writable_folder(out_dir, "the output folder (--out)")
    check_local_folders(settings, record=not no_record)
    runner = LocalRunner.from_settings(settings, record=not no_record)
    failed = len(inputs.refused)
    done = []
    # The sample's files sit beside the images' folders: no image folder may take their names.
    used: set[str] = {f"{SAMPLE_FILE_PREFIX}summary.json", f"{SAMPLE_FILE_PREFIX}report.html"}
    for path in inputs.files:
        name = output_folder_name(path, used)  # one part, never "..": stays inside OUT
        bar = tqdm(total=1, desc=path.name, unit="tile", leave=False, disable=None)

        def tick(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            result = runner.run(
                path, mpp=mpp, out_folder=out_dir and out_dir / name, progress=tick, sample=sample
            )
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch
            failed += 1
            bar.close()
            click.echo(_failure_line(path, exc), err=True)
            continue
        bar.close()
        done.append(result)
        s = result.stats
        click.echo(f"{path}: {s.describe()}  [{_scale_text(result)}, {result.seconds:.1f}s]")
        if s.differential:
            parts = ", ".join(
                f"{d['percent']:.0f}% {name}" for name, d in s.differential.items() if d["count"]
            )
            click.echo(f"  differential: {parts}; {s.review_cells} cell(s) to review")
    if sample is not None:
        pooled = runner.sample(sample, done)
        click.echo(pooled.describe())
        if out_dir is not None:
            write_sample(pooled, out_dir)
    if out_dir is not None and failed < total:
        click.echo(f"files written under {out_dir}/")
    if failed:
        _fail(f"{failed} of {total} image(s) failed", code=1)


def _scale_text(result) -> str:
    """ "0.200 um/px metadata", or for an estimate "0.200 um/px estimated, confidence 0.62"."""
    from blastq.core.image import LOW_CONFIDENCE

    text = f"{result.mpp:.3f} um/px {result.mpp_source}"
    if result.mpp_confidence is not None:
        text += f", confidence {result.mpp_confidence:.2f}"
        if result.mpp_confidence < LOW_CONFIDENCE:
            text += " (low: few red cells to measure; pass --mpp)"
    return text


def _failure_line(path: Path, exc: Exception) -> str:
    """`FAILED path: reason`, naming the image once: an error about the image itself (its `path` field is
    the image, by path or name) gives its reason; one about another file (a model, say) names that file."""
    if not isinstance(exc, BlastqError):
        return f"FAILED {path}: internal error ({type(exc).__name__}: {exc})"
    return f"FAILED {path}: {exc.reason_for(path, path.name)}"


@main.command(context_settings=CONTEXT)
@click.option(
    "--count", default=10, show_default=True, type=click.IntRange(1, 100000), help="Number of fields."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write into.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the first field; field i uses seed + i."
)
@click.option(
    "--size", default=1024, show_default=True, type=click.IntRange(64, 16384), help="Field side in pixels."
)
@click.option(
    "--mpp", default=0.2, show_default=True, type=click.FloatRange(0.05, 2.0), help="Microns per pixel."
)
@click.option(
    "--blast-fraction",
    default=0.3,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Expected share of white cells that are blasts.",
)
@click.option(
    "--variety",
    type=click.Choice(["classic", "wide"]),
    default="classic",
    show_default=True,
    help="wide: blasts across their range (L1, L2, myeloblasts, monoblasts) beside their look-alikes, in "
    "a named stain family, with rouleaux and decoys (nucleated red cells, smudge cells, platelet clumps, "
    "debris) that are background in the truth.",
)
@click.option(
    "--stain-family",
    type=click.Choice(["mgg", "wright", "wright_giemsa", "leishman"]),
    help="Stain every field in this family (default: classic fields keep the generator's own stain, "
    "wide fields draw one each).",
)
def synth(
    count: int,
    out_dir: Path,
    seed: int,
    size: int,
    mpp: float,
    blast_fraction: float,
    variety: str,
    stain_family: str | None,
) -> None:
    """Write synthetic smear fields with exact ground truth.

    Each field NAME gets NAME.png (the image) and, in OUT/truth/ so that the folder holds only smears,
    NAME.mask.png (0 background, 1 white cell, 2 blast), NAME.nuclei.png (255 = nucleus) and
    NAME.instances.tif (one id per white cell).
    """
    from tqdm import tqdm

    from blastq.core.synth import write_dataset

    with tqdm(total=count, desc="synth", unit="field", disable=None) as bar:
        paths = write_dataset(
            out_dir,
            count,
            seed=seed,
            height_px=size,
            width_px=size,
            mpp=mpp,
            blast_fraction=blast_fraction,
            variety=variety,
            stain_family=stain_family,
            progress=bar.update,
        )
    click.echo(f"wrote {len(paths)} field(s) to {out_dir}/ (first: {paths[0].name})")


@main.command("synth-slide", context_settings=CONTEXT)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--width", default=8192, show_default=True, type=click.IntRange(256, 200_000), help="Pixels.")
@click.option("--height", default=8192, show_default=True, type=click.IntRange(256, 200_000), help="Pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the first field of the mosaic.")
@click.option(
    "--mpp", default=0.2, show_default=True, type=click.FloatRange(0.05, 2.0), help="Microns per pixel."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["tiff", "ome", "svs"]),
    default="tiff",
    show_default=True,
    help="Pyramidal tiled TIFF, OME-TIFF, or Aperio SVS (read through OpenSlide).",
)
def synth_slide(out: Path, width: int, height: int, seed: int, mpp: float, fmt: str) -> None:
    """Write a whole synthetic slide: a tiled, pyramidal TIFF made of 2048 px synthetic fields.

    Memory stays at one band of fields whatever the size, so `--width 20000 --height 20000` works on a
    laptop. Run it with `blastq run OUT --out results`: whole slides are processed chunk by chunk.
    """
    from tqdm import tqdm

    from blastq.core.synth import write_synthetic_slide

    with tqdm(desc=out.name, unit="field", disable=None) as bar:

        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        info = write_synthetic_slide(
            out, width, height, seed=seed, mpp=mpp, ome=fmt == "ome", svs=fmt == "svs", progress=tick
        )
    click.echo(
        f"wrote {out} ({info['width']}x{info['height']} px, {len(info['levels'])} level(s), "
        f"{info['white_cells']} white cells of which {info['blasts']} blasts, {info['seconds']:.0f}s)"
    )


@main.command(context_settings=CONTEXT)
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model",
    metavar="FILE|VERSION",
    help="A checkpoint file, a registered version (`blastq models list`), or `registry` for the promoted "
    "one (default: the shipped model).",
)
@click.option(
    "--split",
    type=click.Choice(["test", "val", "train", "all"]),
    default="test",
    show_default=True,
    help="segmentation_wbc only: which part of the fixed split.",
)
@click.option(
    "--mpp", type=float, help="Microns per pixel of a synthetic folder (default 0.2, as `blastq synth`)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write an HTML report (Table I, loss curves, best and worst examples) into this folder.",
)
def evaluate(
    folder: Path, model: str | None, split: str, mpp: float | None, as_json: bool, report_dir: Path | None
) -> None:
    """Report Dice, IoU, pixel accuracy, precision, recall and F1 on FOLDER.

    FOLDER is either the segmentation_wbc layout (dataset1/, dataset2/ with NNN.bmp + NNN.png
    masks: 0 background, 128 cytoplasm, 255 nucleus) or a folder written by `blastq synth`.
    With --report and --split all, the report's table shows the train, val and test splits side by side;
    the loss curves come from MODEL.history.json beside the checkpoint, when there is one.
    """
    from blastq.core.adapters import load_settings
    from blastq.core.pipeline import model_checkpoint
    from blastq.trainer.report import evaluate_folder, write_folder_report

    model = model_checkpoint(load_settings(), model) if model else None
    if report_dir is None:
        report = evaluate_folder(folder, model=model, split=split, mpp=mpp)
    else:
        report, page = write_folder_report(folder, report_dir, model=model, split=split, mpp=mpp)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.as_text())
    if report_dir is not None:
        click.echo(f"report: {page}", err=True)


@main.command(context_settings=CONTEXT)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Checkpoint file to write (the best epoch).",
)
@click.option(
    "--wbc",
    "wbc_root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="segmentation_wbc folder to add real crops (train/val split only).",
)
@click.option(
    "--synth-fields",
    default=TRAIN_DEFAULTS["synth_train"],
    show_default=True,
    type=click.IntRange(0),
    help="Synthetic training fields.",
)
@click.option(
    "--epochs",
    default=TRAIN_DEFAULTS["max_epochs"],
    show_default=True,
    type=click.IntRange(1),
    help="Maximum epochs.",
)
@click.option(
    "--steps",
    default=TRAIN_DEFAULTS["steps_per_epoch"],
    show_default=True,
    type=click.IntRange(1),
    help="Batches per epoch.",
)
@click.option(
    "--patience",
    default=TRAIN_DEFAULTS["patience"],
    show_default=True,
    type=click.IntRange(1),
    help="Early stopping: epochs without a better validation loss.",
)
@click.option(
    "--width",
    default=TRAIN_DEFAULTS["width"],
    show_default=True,
    type=click.IntRange(4),
    help="U-Net channels at the top level.",
)
@click.option(
    "--depth",
    default=TRAIN_DEFAULTS["depth"],
    show_default=True,
    type=click.IntRange(2, 6),
    help="U-Net resolution levels.",
)
@click.option("--seed", default=TRAIN_DEFAULTS["seed"], show_default=True, type=int)
@click.option(
    "--version",
    "model_version",
    default=TRAIN_DEFAULTS["version"],
    show_default=True,
    help="Version name stored in the checkpoint.",
)
@click.option(
    "--pairs",
    "pairs_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A folder of image/mask pairs with a labelmap.json (repeatable; see trainer/SPLIT.md).",
)
@click.option(
    "--from-run",
    "from_run",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Repeat a recorded run (<model>.run.json): same config, seed and split; other options ignored.",
)
@click.option(
    "--submit",
    is_flag=True,
    help="Queue the run for the trainer service (`blastq trainer`) instead of training here; prints the run id.",
)
@click.option(
    "--synth-variety",
    type=click.Choice(["classic", "wide", "mixed"]),
    default=TRAIN_DEFAULTS["synth_variety"],
    show_default=True,
    help="wide: domain-randomised synthetic fields (magnification 40x-100x, crowded red cells, blasts "
    "across their range beside their look-alikes, mixed colours); mixed: half classic, half wide.",
)
@click.option(
    "--synth-families",
    default="mgg,wright,wright_giemsa,leishman",
    show_default=True,
    callback=lambda ctx, param, value: tuple(v.strip() for v in value.split(",") if v.strip()),
    help="Stain families wide fields are drawn in, comma-separated; leave one out to measure the model on "
    "a stain it never saw.",
)
@click.option(
    "--synth-mpp",
    type=(click.FloatRange(0.02, 2.0), click.FloatRange(0.02, 2.0)),
    default=(0.08, 0.3),
    show_default=True,
    metavar="MIN MAX",
    help="Magnifications (um/px) wide fields are rendered at before resampling to the model's scale; "
    "0.08-0.3 spans 100x oil to 40x dry.",
)
@click.option(
    "--lr",
    default=TRAIN_DEFAULTS["lr"],
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Peak learning rate.",
)
@click.option(
    "--wbc-only",
    type=click.Choice(["dataset1", "dataset2"]),
    help="Train on this segmentation_wbc source only (measure the model on the other, a lab it never saw).",
)
@click.option(
    "--init-from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Fine-tune: start from this checkpoint's weights (same --width and --depth).",
)
def train(
    out: Path,
    wbc_root: Path | None,
    pairs_dirs: tuple[Path, ...],
    from_run: Path | None,
    submit: bool,
    synth_variety: str,
    synth_families: tuple[str, ...],
    synth_mpp: tuple[float, float],
    lr: float,
    wbc_only: str | None,
    init_from: Path | None,
    synth_fields: int,
    epochs: int,
    steps: int,
    patience: int,
    width: int,
    depth: int,
    seed: int,
    model_version: str,
) -> None:
    """Train a U-Net on synthetic smears (plus segmentation_wbc crops with --wbc).

    Cross-entropy + Dice loss, rotation/flip/scale and colour augmentation, early stopping on the
    validation loss; the fixed split is in trainer/SPLIT.md (test images are never loaded).
    """
    from blastq.trainer.datasets import WBC_DATASETS
    from blastq.trainer.train import TrainConfig, retrain
    from blastq.trainer.train import train as run_training

    if from_run is not None and not submit:
        result = retrain(from_run, out, progress=click.echo)
        click.echo(
            f"best epoch {result.best_epoch}, validation loss {result.best_val_loss}: {result.checkpoint}"
        )
        return
    cfg = TrainConfig(
        pairs_dirs=pairs_dirs,
        out=out,
        version=model_version,
        wbc_root=wbc_root,
        synth_train=synth_fields,
        synth_variety=synth_variety,
        synth_families=synth_families,
        synth_mpp_min=synth_mpp[0],
        synth_mpp_max=synth_mpp[1],
        init_from=init_from,
        lr=lr,
        wbc_datasets=(wbc_only,) if wbc_only else WBC_DATASETS,
        max_epochs=epochs,
        steps_per_epoch=steps,
        patience=patience,
        width=width,
        depth=depth,
        seed=seed,
    )
    if submit:
        from blastq.core.adapters import load_settings
        from blastq.worker.submit import submit_training

        cfg = TrainConfig.from_run(from_run, out=out) if from_run is not None else cfg
        run_id = submit_training(load_settings(), cfg)
        click.echo(f"training run {run_id} queued: follow it with `blastq trainer status {run_id}`")
        return
    result = run_training(cfg, progress=click.echo)
    click.echo(f"best epoch {result.best_epoch}, validation loss {result.best_val_loss}: {result.checkpoint}")


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 21), help="ONNX opset.")
def export(model: Path, fmt: str, out: Path, opset: int) -> None:
    """Export a checkpoint as ONNX (dynamic batch and size) or TorchScript, checked against torch."""
    from blastq.trainer.export import export_onnx, export_torchscript

    path = export_onnx(model, out, opset=opset) if fmt == "onnx" else export_torchscript(model, out)
    click.echo(f"wrote {path}")


@main.command(context_settings=CONTEXT)
def config() -> None:
    """Show the settings in force (passwords masked) and the variables that set them."""
    from blastq.core.adapters import load_settings

    for name, value in load_settings().describe().items():
        click.echo(f"{name:24} {value}    (BLASTQ_{name.upper()})")


register_service_commands(main)
register_model_commands(main)
register_trainer_commands(main)
register_web_commands(main)
register_classify_commands(main)

if __name__ == "__main__":  # pragma: no cover
    main()
