"""The slide service with no servers: SQLite, a file store and the embedded SQLite broker, one machine."""

from __future__ import annotations

import json

from servicekit import Service, use_service
from sqlalchemy import create_engine, text

from blastq.core.artifacts import ARTIFACT_NAMES


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
    assert records[0]["classifier_version"] == "blastq-cells-1.0"
    csv_lines = cli("results", "--format", "csv").output.splitlines()
    assert csv_lines[0].startswith("id,image,sha256,model_version,params_key,") and len(csv_lines) == 2
    assert "neutrophil_percent" in csv_lines[0] and "differential" not in csv_lines[0]
    assert cli("results", "--since", "2999-01-01").output == "no results\n"
    assert cli("results", "--batch", "no-such-batch", "--format", "json").output == "[]\n"
    assert cli("status", "no-such-job").exit_code == 2


def test_db_upgrade_prints_the_revision_and_can_run_twice(tmp_path, cli, monkeypatch):
    from blastq.core.db import head_revision

    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BLASTQ_DATABASE_URL", raising=False)
    for _ in range(2):
        upgraded = cli("db", "upgrade")
        assert upgraded.exit_code == 0, upgraded.output
        assert upgraded.output.strip().endswith(f"is at revision {head_revision()}")
