"""`blastq doctor` on the embedded defaults and against the real PostgreSQL, Redis and S3 server; each
failure named with its fix, within bounded time; and a slide worker that cannot run its model refuses
to start."""

from __future__ import annotations

import json
import socket
import time

import pytest
from faults import free_port
from servicekit import Service, pg_schema, use_service

from blastq.worker import doctor

ALL_ON_CPU = ["database", "broker", "store", "model", "classifier", "engine", "disk", "clock"]


def report(result) -> dict:
    return json.loads(result.output)


def by_name(result) -> dict[str, dict]:
    return {c["name"]: c for c in report(result)["checks"]}


def test_embedded_defaults_pass_every_check(cli, tmp_path, monkeypatch):
    use_service(monkeypatch, Service({"BLASTQ_DATA_DIR": str(tmp_path / "fresh")}, tmp_path / "fresh"))
    text = cli("doctor")
    assert text.exit_code == 0, text.output
    assert text.output.splitlines()[-1] == "8 of 8 checks passed"
    result = cli("doctor", "--json")
    assert result.exit_code == 0 and report(result)["ok"] is True
    checks = by_name(result)
    assert list(checks) == ALL_ON_CPU  # no GPU check on a CPU deployment unless asked
    assert "sha256 as expected" in checks["model"]["verdict"]
    assert "sha256 as expected" in checks["classifier"]["verdict"]
    assert "as torch fp32's" in checks["engine"]["verdict"]
    assert "no worker on the slides queue" in checks["broker"]["verdict"]
    assert not list((tmp_path / "fresh" / "store").rglob("*.probe"))  # the probe was deleted


def test_the_real_services_pass_and_say_what_they_hold(cli, lab_service, monkeypatch):
    use_service(monkeypatch, lab_service)
    result = cli("doctor", "--json", "--only", "database,broker,store,clock")
    assert result.exit_code == 0, result.output
    checks = by_name(result)
    assert checks["database"]["verdict"].startswith("postgresql")
    assert "queued" in checks["database"]["verdict"]
    assert checks["broker"]["verdict"].startswith("redis://") and "reachable" in checks["broker"]["verdict"]
    assert checks["store"]["verdict"].startswith("s3://")
    assert "the database's" in checks["clock"]["verdict"]  # measured against PostgreSQL's clock
    store = lab_service_store(lab_service)
    assert store.list("doctor/") == []  # the probe did not stay behind


def lab_service_store(service: Service):
    from blastq.core.adapters import store_from_settings

    return store_from_settings(service.settings())


def test_a_database_never_migrated_fails_with_the_upgrade_command(cli, lab_service, monkeypatch):
    with pg_schema() as empty:
        use_service(
            monkeypatch, Service({**lab_service.env, "BLASTQ_DATABASE_URL": empty}, lab_service.data_dir)
        )
        result = cli("doctor", "--json", "--only", "database,store,clock")
    assert result.exit_code == 1
    checks = by_name(result)
    assert "never migrated" in checks["database"]["verdict"]
    assert "blastq db upgrade" in checks["database"]["fix"]
    assert checks["clock"]["verdict"] == "not run: the database check failed"
    assert checks["store"]["ok"]  # one failure does not stop the other checks


def test_a_broker_and_a_database_that_refuse_connections_are_named_with_their_fixes(
    cli, tmp_path, monkeypatch
):
    closed = free_port()
    env = {
        "BLASTQ_DATA_DIR": str(tmp_path / "d"),
        "BLASTQ_BROKER_URL": f"redis://127.0.0.1:{closed}/0",
        "BLASTQ_DATABASE_URL": f"postgresql://nobody:secret@127.0.0.1:{closed}/none",
    }
    use_service(monkeypatch, Service(env, tmp_path / "d"))
    result = cli("doctor", "--only", "database,broker,store")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[-1] == "1 of 3 checks passed; failed: database, broker"
    database = next(i for i, line in enumerate(lines) if line.split()[:2] == ["FAIL", "database"])
    assert "not reachable" in lines[database] and "secret" not in result.output
    assert lines[database + 1].split()[:2] == ["fix:", "start"]
    broker = next(i for i, line in enumerate(lines) if line.split()[:2] == ["FAIL", "broker"])
    assert "not reachable" in lines[broker] and "BLASTQ_BROKER_URL" in lines[broker + 1]


def test_a_broker_that_never_answers_fails_within_the_time_limit(cli, tmp_path, monkeypatch):
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        env = {
            "BLASTQ_DATA_DIR": str(tmp_path / "d"),
            "BLASTQ_BROKER_URL": f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
        }
        use_service(monkeypatch, Service(env, tmp_path / "d"))
        start = time.monotonic()
        result = cli("doctor", "--json", "--only", "broker,store", "--timeout", "2")
        took = time.monotonic() - start
    finally:
        silent.close()
    assert result.exit_code == 1
    checks = by_name(result)
    assert not checks["broker"]["ok"] and checks["store"]["ok"]
    assert took < 15, took  # bounded by the limit, not by the broker's own retries


def test_a_store_whose_bucket_is_missing_fails(cli, lab_service, monkeypatch):
    use_service(
        monkeypatch,
        Service({**lab_service.env, "BLASTQ_STORE_URL": "s3://no-such-bucket-here/x"}, lab_service.data_dir),
    )
    result = cli("doctor", "--json", "--only", "store")
    assert result.exit_code == 1
    (check,) = report(result)["checks"]
    assert "no-such-bucket-here" in check["verdict"] and "BLASTQ_STORE_URL" in check["fix"]


def test_a_model_that_is_not_a_checkpoint_fails_and_the_engine_is_not_tried(cli, tmp_path, monkeypatch):
    bad = with_a_bad_model(tmp_path, monkeypatch)
    result = cli("doctor", "--json", "--only", "model,engine")
    assert result.exit_code == 1
    checks = by_name(result)
    assert str(bad) in checks["model"]["verdict"] and "BLASTQ_MODEL" in checks["model"]["fix"]
    assert checks["engine"]["verdict"] == "not run: the model check failed"


def test_a_shipped_file_that_differs_from_its_recorded_sha256_fails(cli, tmp_path, monkeypatch):
    use_service(monkeypatch, Service({"BLASTQ_DATA_DIR": str(tmp_path / "d")}, tmp_path / "d"))
    monkeypatch.setattr(doctor, "shipped_sha256", lambda path: "0" * 64)
    result = cli("doctor", "--json", "--only", "model,classifier")
    assert result.exit_code == 1
    for check in report(result)["checks"]:
        assert "expected 000000000000" in check["verdict"] and "damaged" in check["verdict"]


def test_the_shipped_sums_match_the_shipped_files():
    from blastq.core.cells import default_classifier_path
    from blastq.core.common import file_sha256
    from blastq.core.segment import default_int8_path, default_model_path

    for path in (default_model_path(), default_classifier_path(), default_int8_path()):
        assert doctor.shipped_sha256(path) == file_sha256(path), path.name


def test_too_little_free_space_fails_the_disk_check(cli, tmp_path, monkeypatch):
    use_service(monkeypatch, Service({"BLASTQ_DATA_DIR": str(tmp_path / "d")}, tmp_path / "d"))
    result = cli("doctor", "--json", "--only", "disk", "--min-free-gb", "1000000000")
    assert result.exit_code == 1
    assert "under 1e+09 GiB" in report(result)["checks"][0]["verdict"]


def test_an_unknown_check_is_one_line(cli):
    result = cli("doctor", "--only", "database,spleen")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "blastq: error: unknown check(s) spleen; choose from " + ", ".join(doctor.CHECKS)
    )


def test_a_worker_whose_model_does_not_load_refuses_to_start(cli, tmp_path, monkeypatch):
    from blastq.worker import celery_app

    bad = with_a_bad_model(tmp_path, monkeypatch)
    started = []
    monkeypatch.setattr(celery_app.BlastqCelery, "Worker", lambda *a, **k: started.append(1), raising=False)
    result = cli("worker", "--pool", "solo")
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("blastq: error: this worker cannot run its model: ") and str(bad) in line
    assert "(fix: set BLASTQ_MODEL" in line and len(result.output.strip().splitlines()) == 1
    assert started == []


def with_a_bad_model(tmp_path, monkeypatch):
    """BLASTQ_MODEL names a file that is not a checkpoint; its path."""
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04 not a checkpoint")
    env = {"BLASTQ_DATA_DIR": str(tmp_path / "d"), "BLASTQ_MODEL": str(bad)}
    use_service(monkeypatch, Service(env, tmp_path / "d"))
    return bad


@pytest.fixture(autouse=True)
def _no_gpu_asked(monkeypatch):
    monkeypatch.delenv("BLASTQ_DEVICE", raising=False)
