"""The review station's pages and JSON API against the real PostgreSQL: sign-in, roles, CSRF, the review
steps, the report, CSV and the HL7 message (parsed back by hl7apy)."""

from __future__ import annotations

import csv
import io
import os
import stat

import pytest
from hl7apy.parser import parse_message
from webkit import PASSWORDS, sign_in


def test_nothing_but_health_and_metrics_answers_without_sign_in(client, station, app):
    sample_id, _ = station.new_sample()
    assert client.get("/healthz").text == "ok"
    assert client.get("/readyz").text == "ready"
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "blastq_database_up 1.0" in metrics.text
    # Counts of jobs only: no sample, image or patient in what a scraper may read.
    assert "blastq_jobs{state=" in metrics.text and "sample" not in metrics.text
    for route in app.routes:
        path = getattr(route, "path", "")
        if path.startswith("/static") or path in ("/healthz", "/readyz", "/metrics", "/login", "/logout"):
            continue
        url = path.format(sample_id=sample_id, result_id=station.result_id, cell_id=1)
        url += "?sample=1" if path.endswith("/view") else ""
        for method in route.methods - {"HEAD"}:
            response = client.request(method, url, follow_redirects=False)
            if path.startswith("/api/"):
                assert response.status_code == 401, (method, url)
            else:
                assert response.status_code == 303 and response.headers["location"].startswith("/login"), url


def test_readiness_and_metrics_say_when_the_database_is_gone(app, client):
    real = app.state.db
    try:
        from sqlalchemy import create_engine

        app.state.db = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.text.startswith("not ready: database")
    finally:
        app.state.db = real


def test_a_wrong_password_signs_nobody_in(client):
    page = client.get("/login").text
    token = page.split('name="csrf" value="')[1].split('"')[0]
    response = client.post("/login", data={"username": "ana", "password": "wrong-password", "csrf": token})
    assert response.status_code == 401 and "Wrong name or password" in response.text
    assert client.get("/api/me").status_code == 401


def test_sign_in_needs_the_forms_csrf_token_and_never_redirects_off_site(client):
    response = client.post("/login", data={"username": "ana", "password": PASSWORDS["ana"], "csrf": "forged"})
    assert response.status_code == 403
    page = client.get("/login?next=//evil.example/x").text
    token = page.split('name="csrf" value="')[1].split('"')[0]
    response = client.post(
        "/login",
        data={"username": "ana", "password": PASSWORDS["ana"], "csrf": token, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert response.headers["location"] == "/"


def test_a_change_without_the_csrf_header_is_refused(as_user, station):
    sample_id, _ = station.new_sample()
    client = as_user("ana")
    key = client.get(f"/api/samples/{sample_id}").json()["cells"][0]["key"]
    response = client.post(
        f"/api/samples/{sample_id}/reclassify",
        json={"cells": [key], "to": "blast"},
        headers={"X-CSRF-Token": ""},
    )
    assert response.status_code == 403
    assert client.get(f"/api/samples/{sample_id}").json()["state"] == "pre-classified"


def test_a_viewer_sees_but_cannot_reclassify(as_user, station):
    sample_id, name = station.new_sample()
    client = as_user("vic")
    review = client.get(f"/api/samples/{sample_id}").json()
    assert review["sample"] == name and review["cells"]
    response = client.post(
        f"/api/samples/{sample_id}/reclassify", json={"cells": [review["cells"][0]["key"]], "to": "smudge"}
    )
    assert response.status_code == 403 and "viewer" in response.json()["detail"]
    assert 'data-locked="true"' in client.get(f"/samples/{sample_id}").text


def test_review_to_sign_off_through_the_api(as_user, station, client):
    sample_id, name = station.new_sample()
    client = as_user("ana")
    review = client.get(f"/api/samples/{sample_id}").json()
    normal = next(c for c in review["cells"] if c["current"] != "blast")
    changed = client.post(
        f"/api/samples/{sample_id}/reclassify", json={"cells": [normal["key"]], "to": "blast"}
    ).json()
    assert changed["after"]["blasts"] == review["after"]["blasts"] + 1
    assert changed["before"] == review["before"] and changed["state"] == "in review"
    assert client.post(f"/api/samples/{sample_id}/complete").json()["state"] == "reviewed"
    assert client.post(f"/api/samples/{sample_id}/sign-off").status_code == 403  # a technologist

    client.post("/logout", data={"csrf": client.headers["X-CSRF-Token"]})
    client = as_user("pat")
    signed = client.post(f"/api/samples/{sample_id}/sign-off").json()
    assert (signed["state"], signed["signed_by"]) == ("signed off", "pat")
    locked = client.post(
        f"/api/samples/{sample_id}/reclassify", json={"cells": [normal["key"]], "to": "smudge"}
    )
    assert locked.status_code == 409 and "amend" in locked.json()["detail"]
    amended = client.post(f"/api/samples/{sample_id}/amend", json={"reason": "re-read"}).json()
    assert (amended["state"], amended["version"]) == ("in review", 2)
    trail = client.get(f"/api/samples/{sample_id}/audit").json()
    assert [a["action"] for a in trail] == ["open", "reclassify", "complete", "sign off", "amend"]
    assert trail[1]["username"] == "ana" and trail[1]["to_label"] == "blast"


def test_the_hl7_message_parses_back_with_the_reviewed_figures(as_user, station):
    sample_id, name = station.new_sample("HL7|^~&")
    client = as_user("ana")
    review = client.get(f"/api/samples/{sample_id}").json()
    key = review["cells"][0]["key"]
    after = client.post(
        f"/api/samples/{sample_id}/reclassify", json={"cells": [key], "to": "eosinophil"}
    ).json()
    response = client.get(f"/samples/{sample_id}/oru.hl7")
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    message = parse_message(response.text, find_groups=True)
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == "P"  # not signed off: preliminary
    values = {
        obx.obx.obx_3.to_er7().split("^")[0]: obx.obx.obx_5.to_er7() for obx in order.oru_r01_observation
    }
    assert values["BQ-WBC"] == str(after["after"]["white_cells"])
    assert float(values["BQ-EOS"]) == pytest.approx(
        after["after"]["differential"]["eosinophil"]["percent"], abs=0.05
    )
    assert values["BQ-VERDICT"] == after["after"]["verdict"]
    assert "HL7" in message.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7()  # delimiters replaced


def test_the_csv_has_every_cell_with_both_classes(as_user, station):
    sample_id, _ = station.new_sample()
    client = as_user("ana")
    review = client.get(f"/api/samples/{sample_id}").json()
    key = review["cells"][1]["key"]
    client.post(f"/api/samples/{sample_id}/reclassify", json={"cells": [key], "to": "artefact"})
    rows = list(csv.DictReader(io.StringIO(client.get(f"/samples/{sample_id}/cells.csv").text)))
    assert len(rows) == len(review["cells"])
    [row] = [r for r in rows if f"{r['result_id']}-{r['cell_id']}" == key]
    assert (row["reviewed_class"], row["labelled_by"]) == ("artefact", "ana")


def test_cells_and_overlays_are_served_only_through_their_rows(as_user, station):
    sample_id, _ = station.new_sample()
    client = as_user("vic")
    key = client.get(f"/api/samples/{sample_id}").json()["cells"][0]["key"]
    result_id, cell_id = key.split("-")
    crop = client.get(f"/cells/{result_id}/{cell_id}.png")
    assert crop.status_code == 200 and crop.content.startswith(b"\x89PNG")
    assert client.get(f"/cells/{result_id}/999999.png").status_code == 404
    assert client.get("/cells/999999/1.png").status_code == 404
    assert client.get(f"/results/{result_id}/overlay.png").content.startswith(b"\x89PNG")
    for hostile in (
        "/cells/..%2F..%2Fetc/passwd.png",
        "/results/..%2Fsecret/overlay.png",
        "/static/../app.py",
    ):
        response = client.get(hostile)
        assert response.status_code in (404, 422) and b"import" not in response.content


def test_the_report_prints_on_one_a4_page_worth_of_markup(as_user, station):
    sample_id, name = station.new_sample()
    client = as_user("vic")
    page = client.get(f"/samples/{sample_id}/report").text
    assert name in page and "PRELIMINARY" in page and "size: A4" in page


def test_the_worklist_page_and_api_list_the_sample(as_user, station):
    sample_id, name = station.new_sample()
    client = as_user("vic")
    assert name in client.get("/").text
    assert name in client.get("/fragments/worklist?state=pre-classified").text
    listed = client.get("/api/samples", params={"state": "pre-classified"}).json()
    assert any(e["name"] == name for e in listed)
    assert client.get("/api/samples", params={"state": "nonsense"}).status_code == 400
    assert client.get("/api/samples", params={"since": "yesterday"}).status_code == 400


def test_the_openapi_schema_documents_the_api(as_user):
    schema = as_user("vic").get("/api/openapi.json").json()
    assert "/api/samples/{sample_id}/reclassify" in schema["paths"]
    assert "/login" not in schema["paths"]


def test_bad_requests_get_a_reason(as_user, station):
    sample_id, _ = station.new_sample()
    client = as_user("ana")
    bad = client.post(f"/api/samples/{sample_id}/reclassify", json={"cells": ["x"], "to": "blast"})
    assert bad.status_code == 400 and "result id" in bad.json()["detail"]
    bad = client.post(f"/api/samples/{sample_id}/reclassify", json={"cells": ["1-1"], "to": "platelet"})
    assert bad.status_code in (400, 404)
    assert client.get("/api/samples/999999").status_code == 404
    assert client.post(f"/api/samples/{sample_id}/reclassify", content=b"{").status_code == 422


def test_a_disabled_account_is_signed_out_at_once(client, station):
    from blastq.core.adapters import add_user, set_user

    add_user(station.db, "tmp-user", "tmp-user-password", "technologist")
    page = client.get("/login").text
    token = page.split('name="csrf" value="')[1].split('"')[0]
    client.post("/login", data={"username": "tmp-user", "password": "tmp-user-password", "csrf": token})
    assert client.get("/api/me").json()["role"] == "technologist"
    set_user(station.db, "tmp-user", active=False)
    assert client.get("/api/me").status_code == 401


def test_the_session_key_is_kept_private_and_never_shown(tmp_path):
    from blastq.core.adapters import Settings
    from blastq.web.auth import session_key

    settings = Settings(data_dir=tmp_path)
    key = session_key(settings)
    assert session_key(settings) == key and len(key) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / "session-key").st_mode) == 0o600
    shown = Settings(data_dir=tmp_path, secret_key="s" * 40).describe()["secret_key"]
    assert shown == "(set)"


def test_a_session_cookie_signed_with_another_key_is_not_accepted(client, station):
    from fastapi.testclient import TestClient

    from blastq.web.app import create_app

    sign_in(client, "ana")
    other = create_app(station.settings.updated(secret_key="z" * 40), db=station.db)
    with TestClient(other, cookies=client.cookies) as stranger:
        assert stranger.get("/api/me").status_code == 401


def test_sign_off_posts_the_hl7_message_to_the_lis_and_a_failed_post_is_audited(station, as_user):
    import http.server
    import threading

    from fastapi.testclient import TestClient
    from webkit import sign_in as form_sign_in

    from blastq.web.app import create_app

    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server name
            received.append(
                (self.headers["Content-Type"], self.rfile.read(int(self.headers["Content-Length"])))
            )
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for url, sample_prefix in (
            (f"http://127.0.0.1:{server.server_port}/hl7", "LIS"),
            ("http://127.0.0.1:9/", "NOLIS"),
        ):
            sample_id, name = station.new_sample(sample_prefix)
            app = create_app(station.settings.updated(lis_url=url), db=station.db)
            with TestClient(app) as client:
                client.headers["X-CSRF-Token"] = form_sign_in(client, "ana")
                client.post(f"/api/samples/{sample_id}/complete")
                client.post("/logout", data={"csrf": client.headers["X-CSRF-Token"]})
                client.headers["X-CSRF-Token"] = form_sign_in(client, "pat")
                assert client.post(f"/api/samples/{sample_id}/sign-off").json()["state"] == "signed off"
                trail = client.get(f"/api/samples/{sample_id}/audit").json()
            if sample_prefix == "LIS":
                [(content_type, body)] = received
                assert content_type == "application/hl7-v2" and name.encode() in body
                assert parse_message(body.decode(), find_groups=True).msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
                assert all(a["action"] != "lis" for a in trail)
            else:
                assert trail[-1]["action"] == "lis" and "LIS post failed" in trail[-1]["note"]
    finally:
        server.shutdown()


def test_names_from_the_data_are_escaped_in_every_page(as_user, station):
    sample_id, name = station.new_sample("<script>alert(1)</script>")
    client = as_user("vic")
    for url in ("/", f"/samples/{sample_id}", f"/samples/{sample_id}/report"):
        page = client.get(url).text
        assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_class_with_more_cells_than_a_page_shows_keeps_its_whole_count(station):
    from blastq.core.adapters import sample_review
    from blastq.web.app import class_groups

    _, name = station.new_sample()
    review = sample_review(station.db, name)
    groups = {g: (cells, total) for g, cells, total in class_groups(review, shown=1)}
    assert sum(total for _, total in groups.values()) == len(review.cells)
    assert all(len(cells) == min(1, total) for cells, total in groups.values())


def test_an_image_in_no_sample_can_be_opened_for_review_by_a_technologist(as_user, station):
    from blastq.core.adapters import record_result

    cells = _station_cells(station)[:3]
    sha = "f" * 64
    values = {
        "sha256": sha, "model_version": "v1", "params_key": "lone", "image": "lone.png", "width": 64,
        "height": 64, "mpp": 0.2, "mpp_source": "user", "white_cells": 3, "blasts": 0,
        "blast_percent": 0.0, "flagged": False, "threshold_percent": station.threshold,
        "seconds": 0.1, "review_cells": 0, "differential": {}, "classifier_version": "", "verdict": "",
        "min_white_cells": 1,
    }  # fmt: skip
    result_id = record_result(station.db, values, cells, f"slides/{sha}")
    viewer = as_user("vic")
    assert any(i["result_id"] == result_id for i in viewer.get("/api/images").json())
    assert f'data-review-image="{result_id}"' not in viewer.get("/").text  # a viewer gets no button
    assert viewer.post(f"/api/images/{result_id}/review").status_code == 403
    tech = as_user("ana")
    assert f'data-review-image="{result_id}"' in tech.get("/").text
    opened = tech.post(f"/api/images/{result_id}/review").json()
    assert opened["sample"] == f"lone.png #{result_id}" and len(opened["cells"]) == 3
    assert all(i["result_id"] != result_id for i in tech.get("/api/images").json())


def _station_cells(station):
    from sqlalchemy import select

    from blastq.core.adapters.db.schema import CellRow
    from blastq.core.cells import CellRecord

    names = [f for f in CellRecord.__dataclass_fields__]
    with station.db.connect() as conn:
        rows = conn.execute(
            select(CellRow.__table__).where(CellRow.__table__.c.result_id == station.result_id)
        )
        return [CellRecord(**{n: getattr(r, n) for n in names}) for r in rows]


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path, monkeypatch):
    import socket

    from click.testing import CliRunner

    from blastq.cli.main import main

    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "data"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"blastq: error: cannot listen on 127.0.0.1:{port}: Address already in use (another blastq serve?)"
    )
