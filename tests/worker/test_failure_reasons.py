"""A failed job's reason is about the file the user submitted, never the worker's temporary copy."""

from __future__ import annotations

import hashlib

import pytest

from blastq.core.adapters.db import connect, create_job, job_status
from blastq.core.adapters.settings import load_settings
from blastq.core.adapters.store import FileStore
from blastq.worker.celery_app import make_app
from blastq.worker.tasks import PROCESS_SLIDE


@pytest.fixture
def local(tmp_path):
    settings = load_settings({"BLASTQ_DATA_DIR": str(tmp_path / "data")})
    app = make_app(settings)
    db = connect(settings.database_url.get_secret_value())
    yield settings, app, db
    app.resources.close()
    db.dispose()


def test_a_truncated_whole_slide_fails_naming_the_submitted_file(local, tmp_path):
    from blastq.core.synth.slide import write_synthetic_slide

    settings, app, db = local
    store = FileStore(settings.data_dir / "store")
    slide = tmp_path / "wsi.tif"
    write_synthetic_slide(slide, 1100, 900, seed=5, field_px=512)
    data = slide.read_bytes()[: slide.stat().st_size // 2]
    sha256 = hashlib.sha256(data).hexdigest()
    store.put(f"inputs/{sha256}.tif", data)
    submitted = "/scanner/ward 3/wsi.tif"
    job = create_job(
        db, batch_id=None, filename=submitted, input_key=f"inputs/{sha256}.tif", sha256=sha256, mpp=0.2,
        params_key="k",
    )  # fmt: skip
    assert app.tasks[PROCESS_SLIDE].apply(args=[job.id]).get() == "failed"
    error = job_status(db, job.id).error
    assert error.startswith(f"{submitted}: truncated TIFF"), error
    assert "blastq-job-" not in error
