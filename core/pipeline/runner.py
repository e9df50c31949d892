"""Running slides on this machine: read, process, store artifacts, record rows, copy to a folder.

The edge around `core.pipeline.field` that `blastq run` uses; the worker's task does the same steps with
the job row around them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blastq.core.adapters import (
    REGISTRY_MODEL,
    ObjectStore,
    Settings,
    add_to_sample,
    connect,
    ensure_sample,
    get_sample,
    record_result,
    slide_prefix,
    store_from_settings,
)
from blastq.core.cells import (
    CellClassifier,
    SampleImage,
    SampleResult,
    check_sample_name,
    load_cell_classifier,
    sample_result,
)
from blastq.core.common import stage
from blastq.core.image import read_slide
from blastq.core.outputs import Artifact, render_artifacts, sample_artifacts, summary_dict
from blastq.core.pipeline.field import PipelineConfig, SlideResult, pipeline_config, process_slide
from blastq.core.pipeline.wholeslide import WholeSlideResult, process_whole_slide, whole_slide_config
from blastq.core.segment import Engine, ModelInfo, load_engine

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine as DatabaseEngine


@dataclass
class LocalRunner:
    """Loads the model once, then processes slides one by one."""

    settings: Settings
    engine: Engine
    info: ModelInfo
    store: ObjectStore
    db: object
    config: PipelineConfig
    classifier: CellClassifier | None = None
    _sample_ids: dict[str, int] = field(default_factory=dict)  # sample name -> its row, once per run

    @classmethod
    def from_settings(cls, settings: Settings, record: bool = True) -> LocalRunner:
        model_path = model_checkpoint(settings, settings.model) if settings.model else None
        engine, info = load_engine(
            model_path,
            kind=settings.engine,
            device=settings.device,
            cache_dir=settings.engine_cache_dir,
        )
        config = pipeline_config(settings, info.sha256)
        store = store_from_settings(settings) if record else None
        db = connect(settings.database_url.get_secret_value()) if record else None
        classifier = load_cell_classifier(classifier_file(settings))
        return cls(settings, engine, info, store, db, config, classifier)

    def run(
        self,
        path: Path,
        *,
        mpp: float | None = None,
        out_folder: Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        sample: str | None = None,
    ) -> SlideResult | WholeSlideResult:
        """Process one image; artifacts go to the store (and into out_folder when given).

        Whole-slide files (tiled TIFF/OME-TIFF, SVS, NDPI, MRXS...) go chunk by chunk through
        `core.pipeline.wholeslide` and give a WholeSlideResult, with the maps as pyramidal TIFFs.
        `sample`: the recorded result is counted in this sample (pooled again at once).
        """
        from blastq.core.image import is_whole_slide

        if sample is not None:
            check_sample_name(sample)
        if is_whole_slide(path):
            return self.run_whole_slide(
                path, mpp=mpp, out_folder=out_folder, progress=progress, sample=sample
            )
        slide = read_slide(path, mpp=mpp, max_pixels=self.settings.max_pixels)
        result = process_slide(slide, self.engine, self.info, self.config, progress, self.classifier)
        artifacts = render_artifacts(result, slide.rgb)
        result_id = persist_result(result, store=self.store, db=self.db, artifacts=artifacts)
        self._add_to_sample(result_id, sample)
        if out_folder is not None:
            Path(out_folder).mkdir(parents=True, exist_ok=True)
            for a in artifacts:
                (Path(out_folder) / a.name).write_bytes(a.data)
        return result

    def run_whole_slide(
        self,
        path: Path,
        *,
        mpp: float | None = None,
        out_folder: Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        sample: str | None = None,
    ) -> WholeSlideResult:
        """A whole slide, read region by region; its files are written to a folder, then stored."""
        from blastq.core.image import file_sha256, open_slide_reader

        with open_slide_reader(path) as reader, tempfile.TemporaryDirectory(prefix="blastq-wsi-") as tmp:
            sha = file_sha256(path)
            folder = Path(out_folder) if out_folder is not None else Path(tmp)
            result = process_whole_slide(
                reader,
                self.engine,
                self.info,
                folder,
                sha256=sha,
                mpp=mpp,
                config=self.config,
                wsi=whole_slide_config(self.settings),
                classifier=self.classifier,
                progress=progress,
            )
            self._add_to_sample(persist_result(result, store=self.store, db=self.db), sample)
        return result

    def _add_to_sample(self, result_id: int | None, sample: str | None) -> None:
        if result_id is not None and sample is not None:
            if sample not in self._sample_ids:
                threshold, least = self.config.blast_threshold_percent, self.config.min_white_cells
                self._sample_ids[sample] = ensure_sample(self.db, sample, threshold, least)
            add_to_sample(self.db, self._sample_ids[sample], result_id)

    def sample(self, name: str, results: list[SlideResult | WholeSlideResult]) -> SampleResult:
        """The sample's pooled figures: from the database (every image recorded in it, this run's and
        earlier ones), or without one, of `results` alone."""
        if self.db is not None and (recorded := get_sample(self.db, name)) is not None:
            return recorded
        images = [SampleImage(r.name, r.sha256, r.stats) for r in results]
        return sample_result(name, images, self.config.blast_threshold_percent, self.config.min_white_cells)


def persist_result(
    result: SlideResult | WholeSlideResult,
    *,
    store: ObjectStore | None,
    db: DatabaseEngine | None,
    artifacts: list[Artifact] | None = None,
) -> int | None:
    """Save a result the one way `blastq run` and the worker both do: its files to the store under the
    prefix its key names (a field's `artifacts`, rendered by the caller, who may also want them in a
    folder; a whole slide's files already written), then its row and cells. Files first: a recorded row
    always has its files. A store or database left out (`blastq run --no-record`) is skipped. Returns
    the row's id (None with no database)."""
    prefix = slide_prefix(result.sha256, result.model_version, result.params_key)
    if isinstance(result, SlideResult):
        if artifacts is None:
            raise ValueError("a field's result is saved with its rendered artifacts")
        cells = result.maps.cells
        if store is not None:
            with stage("store"):
                for artifact in artifacts:
                    store.put(f"{prefix}/{artifact.name}", artifact.data, artifact.content_type)
    else:
        cells = result.cells
        if store is not None:
            with stage("store"):
                store_files(store, prefix, result.files)
    if db is None:
        return None
    with stage("database"):
        return record_result(db, summary_dict(result), cells, prefix)


CONTENT_TYPES = {
    ".tif": "image/tiff",
    ".png": "image/png",
    ".csv": "text/csv",
    ".geojson": "application/geo+json",
    ".json": "application/json",
    ".html": "text/html",
}


SAMPLE_FILE_PREFIX = "sample-"  # beside the images' folders: OUT/sample-summary.json, OUT/sample-report.html


def write_sample(sample: SampleResult, out_dir: Path) -> list[Path]:
    """A sample's summary.json and report.html into out_dir, as sample-summary.json, sample-report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for a in sample_artifacts(sample):
        (path := out_dir / f"{SAMPLE_FILE_PREFIX}{a.name}").write_bytes(a.data)
        written.append(path)
    return written


def store_files(store: ObjectStore, prefix: str, files: dict[str, Path]) -> None:
    """Put a whole slide's result files under prefix, streamed."""
    for name, file in files.items():
        store.put_file(f"{prefix}/{name}", file, CONTENT_TYPES[Path(name).suffix])


def model_checkpoint(settings: Settings, name: str) -> Path | None:
    """A checkpoint for NAME: a file, a registered version, or "registry" (the promoted version).

    Registered versions are fetched from the store and their sha256 verified; None means the shipped model
    ("registry" with nothing promoted).
    """
    from blastq.core.adapters import fetch_checkpoint, get_model
    from blastq.core.common import ModelInvalid, ModelNotFound

    if Path(name).is_file():
        return Path(name)
    if name == REGISTRY_MODEL:
        return registry_checkpoint(settings)
    if "/" in name or "\\" in name or Path(name).suffix in {".pt", ".pth", ".onnx"}:
        raise ModelNotFound(f"model file not found: {name}")
    model = get_model(connect(settings.database_url.get_secret_value()), name)
    if model is None:
        raise ModelNotFound(
            "no such checkpoint file, and no registered model version of that name", path=name
        )
    if model.kind != "unet":
        raise ModelInvalid(
            f"registered version {name} is a {model.kind}, not a segmentation model", path=name
        )
    return fetch_checkpoint(store_from_settings(settings), model, settings.data_dir / "models")


def registry_checkpoint(settings: Settings) -> Path | None:
    """The registry's promoted checkpoint, fetched and verified (None: nothing promoted, the shipped model)."""
    from blastq.core.adapters import fetch_checkpoint, promoted

    model = promoted(connect(settings.database_url.get_secret_value()))
    if model is None:
        return None
    return fetch_checkpoint(store_from_settings(settings), model, settings.data_dir / "models")


def classifier_file(settings: Settings) -> str:
    """The classifier setting with "registry" resolved: the promoted classifier fetched and verified, or
    "default" (the shipped one) when none is promoted."""
    from blastq.core.adapters import fetch_checkpoint, promoted

    if settings.classifier != REGISTRY_MODEL:
        return settings.classifier
    model = promoted(connect(settings.database_url.get_secret_value()), kind="classifier")
    if model is None:
        return "default"
    return str(fetch_checkpoint(store_from_settings(settings), model, settings.data_dir / "classifiers"))
