"""The slide service with no servers: SQLite, a file store and the embedded SQLite broker, one machine."""

from __future__ import annotations

import json
import os
import shutil
import threading

from servicekit import Service, use_service
from sqlalchemy import create_engine, text

from blastq.core.outputs.artifacts import ARTIFACT_NAMES
from blastq.worker.celery_app import make_app


def test_submit_and_a_worker_process_a_slide_with_no_servers(
    embedded_service, start_worker, cli, make_slide, monkeypatch
):
    use_service(monkeypatch, embedded_service)
    data_dir = embedded_service.data_dir
    start_worker(embedded_service, "--pool", "prefork", "--concurrency", "1")

    submitted = cli("submit", make_slide(201), "--mpp", "0.2", "--wait")
    assert submitted.exit_code == 0, submitted.output
    assert "1 succeeded, 0 failed" in submitted.output

    (result,) = json.loads(cli("results", "--format", "json").output)
    folder = data_dir / "store" / result["store_prefix"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(ARTIFACT_NAMES)
    assert (data_dir / "store" / "inputs" / f"{result['sha256']}.png").is_file()
    assert (data_dir / "broker.db").is_file()
    engine = create_engine(f"sqlite:///{data_dir}/blastq.db")
    with engine.connect() as c:
        assert c.execute(text("select state, attempts from jobs")).all() == [("succeeded", 1)]
    engine.dispose()
    # The worker announced itself: `submit --wait` can tell a running worker from none.
    from blastq.worker.celery_app import workers_on_queue

    app = make_app(embedded_service.settings())
    try:
        assert len(workers_on_queue(app, "slides")) == 1 and workers_on_queue(app, "train") == []
    finally:
        app.close()


def test_status_and_results_show_jobs_and_results_in_each_format(tmp_path, cli, make_slide, monkeypatch):
    from blastq.worker.celery_app import make_app
    from blastq.worker.tasks import PROCESS_SLIDE

    service = Service({"BLASTQ_DATA_DIR": str(tmp_path / "data")}, tmp_path / "data")
    use_service(monkeypatch, service)
    submitted = cli("submit", make_slide(202), "--mpp", "0.2")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.split(" job ")[1].split()[0]
    batch_id = submitted.output.splitlines()[-1].split()[1].rstrip(":")
    make_app(service.settings()).tasks[PROCESS_SLIDE].apply(args=[job_id])  # a worker, in this process

    overview = cli("status")
    assert overview.exit_code == 0 and overview.output.startswith("jobs: 0 queued, 0 running, 1 succeeded")
    assert f"batch {batch_id} " in overview.output
    assert f"{job_id}  succeeded  attempts 1" in cli("status", "--batch", batch_id).output
    shown = cli("status", job_id).output
    assert "state          succeeded" in shown and "attempts       1" in shown

    table = cli("results", "--batch", batch_id).output.splitlines()
    assert table[0].split() == [
        "id",
        "image",
        "white_cells",
        "blasts",
        "blast_percent",
        "flagged",
        "verdict",
        "differential",
        "review_cells",
        "mpp",
        "created_at",
    ]
    assert len(table) == 2
    # The worker typed the cells: the table shows the differential as percent per type present.
    assert "%" in table[1]  # only the differential column prints percent signs
    records = json.loads(cli("results", "--format", "json").output)
    differential = records[0]["differential"]
    assert list(differential) == ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "blast"]
    assert sum(d["count"] for d in differential.values()) == records[0]["white_cells"] > 0
    from blastq.core.cells.classify import default_classifier_path, load_classifier

    assert records[0]["classifier_version"] == load_classifier(default_classifier_path()).info.version
    csv_lines = cli("results", "--format", "csv").output.splitlines()
    assert csv_lines[0].startswith("id,image,sha256,model_version,params_key,") and len(csv_lines) == 2
    assert "neutrophil_percent" in csv_lines[0] and "differential" not in csv_lines[0]
    assert cli("results", "--since", "2999-01-01").output == "no results\n"
    assert cli("results", "--batch", "no-such-batch", "--format", "json").output == "[]\n"
    assert cli("status", "no-such-job").exit_code == 2


def test_db_upgrade_prints_the_revision_and_can_run_twice(tmp_path, cli, monkeypatch):
    from blastq.core.adapters.db import head_revision

    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BLASTQ_DATABASE_URL", raising=False)
    for _ in range(2):
        upgraded = cli("db", "upgrade")
        assert upgraded.exit_code == 0, upgraded.output
        assert upgraded.output.strip().endswith(f"is at revision {head_revision()}")


def _rows(data_dir, table: str) -> int:
    engine = create_engine(f"sqlite:///{data_dir}/blastq.db")
    try:
        with engine.connect() as c:
            return c.execute(text(f"select count(*) from {table}")).scalar()
    finally:
        engine.dispose()


def test_a_folder_of_pipes_devices_links_out_and_non_images_is_refused_at_once(
    tmp_path, cli, make_slide, monkeypatch
):
    service = Service({"BLASTQ_DATA_DIR": str(tmp_path / "data")}, tmp_path / "data")
    use_service(monkeypatch, service)
    folder = tmp_path / "scans"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "passwd.png").symlink_to("/etc/passwd")
    (folder / "notes.png").write_text("not an image")
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(result=cli("submit", folder)), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "submit hung on a pipe or a device"
    result = done["result"]
    assert result.exit_code == 1
    failed = sorted(line for line in result.output.splitlines() if line.startswith("FAILED"))
    assert len(failed) == 4, result.output
    assert "notes.png: not a PNG, JPEG, BMP or TIFF image" in failed[0]
    assert (
        "outside the folder" in failed[1] and "named pipe" in failed[2] and "outside the folder" in failed[3]
    )
    assert _rows(service.data_dir, "batches") == 0 and _rows(service.data_dir, "jobs") == 0  # no empty batch
    assert not (service.data_dir / "store" / "inputs").exists()  # /etc/passwd never reached the store

    # A good slide beside them: one batch, one job.
    shutil.copy(make_slide(203), folder / "good.png")
    result = cli("submit", folder, "--mpp", "0.2")
    assert result.exit_code == 1 and "good.png: job " in result.output
    assert _rows(service.data_dir, "batches") == 1 and _rows(service.data_dir, "jobs") == 1


def test_submit_wait_with_no_worker_says_so_instead_of_waiting_forever(
    tmp_path, cli, make_slide, monkeypatch
):
    from blastq.worker import submit as service_module

    service = Service({"BLASTQ_DATA_DIR": str(tmp_path / "data")}, tmp_path / "data")
    use_service(monkeypatch, service)
    monkeypatch.setattr(service_module, "NO_WORKER_AFTER_S", 0.5)
    result = cli("submit", make_slide(204), "--mpp", "0.2", "--batch", "no workers", "--wait")
    assert result.exit_code == 2
    (line,) = [line for line in result.output.splitlines() if line.startswith("blastq: error:")]
    assert "no worker takes jobs from the 'slides' queue: start one with `blastq worker`" in line
    assert "1 queued" in cli("status", "--batch", "no workers").output  # the job stays queued


def test_status_and_results_find_a_batch_by_the_name_given_at_submit(tmp_path, cli, make_slide, monkeypatch):
    from blastq.worker.tasks import PROCESS_SLIDE

    service = Service({"BLASTQ_DATA_DIR": str(tmp_path / "data")}, tmp_path / "data")
    use_service(monkeypatch, service)
    submitted = cli("submit", make_slide(205), "--mpp", "0.2", "--batch", "ward 3 monday")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.split(" job ")[1].split()[0]
    make_app(service.settings()).tasks[PROCESS_SLIDE].apply(args=[job_id])
    shown = cli("status", "--batch", "ward 3 monday")
    assert (
        shown.exit_code == 0 and "'ward 3 monday'" in shown.output and f"{job_id}  succeeded" in shown.output
    )
    (record,) = json.loads(cli("results", "--batch", "ward 3 monday", "--format", "json").output)
    assert record["image"].endswith("field_205_512.png")
    missing = cli("status", "--batch", "no such name")
    assert missing.exit_code == 2 and "no batch with the id or name 'no such name'" in missing.output


def test_the_embedded_broker_polls_fast_enough_for_small_crops(tmp_path):
    service = Service({"BLASTQ_DATA_DIR": str(tmp_path / "data")}, tmp_path / "data")
    app = make_app(service.settings())
    try:
        with app.connection_for_read() as conn:
            assert conn.transport.polling_interval <= 0.1  # Kombu's default: 1 s per job
            assert conn.transport.driver_name == "sqlalchemy"
    finally:
        app.close()
