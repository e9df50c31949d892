"""A worker's /metrics, /healthz and /readyz, scraped over HTTP from a real prefork worker on PostgreSQL,
Redis and the S3 server; and the stage times the pipeline reports."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from faults import free_port
from servicekit import Service, WorkerProcess, use_service, wait_until

from blastq.core.common import STAGES, recording

REPO = Path(__file__).resolve().parents[2]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def value(page: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, v in page.items():
        metric, _, rest = key.partition("{")
        if metric == name and all(f'{k}="{want}"' in rest for k, want in labels.items()):
            total += v
    return total


def test_a_worker_counts_its_slides_stages_and_failures_and_reports_the_queue(
    lab_service, start_worker, cli, make_slide, tmp_path, monkeypatch
):
    port = free_port()
    service = Service({**lab_service.env, "BLASTQ_METRICS_PORT": str(port)}, lab_service.data_dir)
    use_service(monkeypatch, service)
    worker = start_worker(service, "--pool", "prefork", "--concurrency", "1")
    base = f"http://127.0.0.1:{port}"
    assert get(f"{base}/healthz") == (200, "ok\n")
    wait_until(lambda: get(f"{base}/readyz")[0] == 200, 30, "the worker to be ready")

    bad = tmp_path / "truncated.png"
    bad.write_bytes(make_slide(301).read_bytes()[:400])  # a PNG cut short: the input's fault
    submitted = cli("submit", make_slide(302), bad, "--mpp", "0.2", "--wait")
    assert "1 succeeded, 1 failed" in submitted.output, submitted.output

    status, text = get(f"{base}/metrics")
    assert status == 200
    page = samples(text)
    assert value(page, "blastq_slides_total", outcome="succeeded") == 1
    assert value(page, "blastq_slides_total", outcome="failed") == 1
    assert value(page, "blastq_failures_total", reason="input") == 1
    assert value(page, "blastq_cells_total") > 0
    engine_label = (
        next(k for k in page if k.startswith("blastq_cells_total{")).split('engine="')[1].split('"')[0]
    )
    assert engine_label.startswith("onnx")
    for stage in (
        "read",
        "preprocess",
        "engine",
        "stitch",
        "cells",
        "typing",
        "artifacts",
        "store",
        "database",
    ):
        assert value(page, "blastq_stage_seconds_count", stage=stage) == 1, stage
        assert value(page, "blastq_stage_seconds_sum", stage=stage) > 0, stage
    assert value(page, "blastq_slide_seconds_count") == 1
    # From the shared database, read when scraped.
    assert value(page, "blastq_database_up") == 1
    assert (
        value(page, "blastq_jobs", state="succeeded") >= 1 and value(page, "blastq_jobs", state="queued") == 0
    )
    assert value(page, "blastq_oldest_queued_job_age_seconds") == 0
    assert value(page, "blastq_worker_ready") == 1
    assert value(page, "blastq_worker_info", queues="slides") == 1

    # Every metric the Grafana dashboard plots is one the worker exports.
    dashboard = json.loads((REPO / "docker" / "grafana-dashboard.json").read_text())
    plotted = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"blastq_[a-z_]+", target["expr"])
    }
    exported = {key.partition("{")[0] for key in page}
    assert len(plotted) >= 10 and plotted <= exported, plotted - exported

    assert get(f"{base}/nothing")[0] == 404
    worker.stop()
    with pytest.raises(OSError):  # the endpoint went with the worker
        urllib.request.urlopen(f"{base}/healthz", timeout=2)
    assert not list((lab_service.data_dir / "metrics").glob("worker-*"))  # its multiprocess folder removed


def test_a_metrics_port_in_use_stops_the_worker_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {"BLASTQ_DATA_DIR": str(tmp_path / "d"), "BLASTQ_METRICS_PORT": str(port)}
        worker = WorkerProcess(Service(env, tmp_path / "d"), tmp_path / "worker.log", "--pool", "solo")
        try:
            assert worker.proc.wait(120) == 2
        finally:
            worker.stop()
    assert f"blastq: error: cannot serve metrics on 127.0.0.1:{port} (BLASTQ_METRICS_PORT)" in worker.output
    assert "Traceback" not in worker.output


def test_a_metric_that_cannot_be_recorded_does_not_fail_the_slide(monkeypatch, caplog):
    from blastq.worker import metrics

    def broken() -> dict:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics, "_defined", broken)
    metrics.slide_succeeded("onnx", "m", 3, 1, 0.5)  # logged, not raised
    metrics.slide_failed("input")
    assert caplog.text.count("not recorded: OSError") == 2


def test_process_slide_reports_the_seconds_of_its_stages(shipped_engine, smear):
    from blastq.core.cells import load_cell_classifier
    from blastq.core.image import Slide
    from blastq.core.pipeline import process_slide

    engine, info = shipped_engine
    slide = Slide(smear.image, 0.2, "user", "smear.png", "")
    with recording() as times:
        result = process_slide(slide, engine, info, classifier=load_cell_classifier("default"))
    assert set(times.seconds) == {"preprocess", "engine", "stitch", "cells", "typing"} <= set(STAGES)
    assert all(s > 0 for s in times.seconds.values())
    assert sum(times.seconds.values()) <= result.seconds * 1.05 + 0.01
    # Outside a recording nothing is kept, and the answer is the same.
    again = process_slide(slide, engine, info, classifier=load_cell_classifier("default"))
    assert again.stats == result.stats
