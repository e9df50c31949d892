"""The review station in a real Chromium (Debian's package, driven by playwright): a technologist reviews by
keyboard, a pathologist signs off, the report prints on one A4 page, the HL7 message downloads and parses,
a viewer cannot change anything, a stranger lands on the login page.

BLASTQ_SCREENSHOTS=DIR also saves the gallery and the report as PNGs there (the README's pictures).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from webkit import PASSWORDS

CHROMIUM = os.environ.get("BLASTQ_TEST_CHROMIUM", "/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(station):
    """The review station under uvicorn on a loopback port, in this process."""
    import uvicorn

    from blastq.web.app import create_app

    port = _free_port()
    config = uvicorn.Config(
        create_app(station.settings, db=station.db), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the review station did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from services import missing_service

    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing_service(f"Chromium not found at {CHROMIUM}: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def sign_in(page, server: str, username: str, then: str = "/") -> None:
    page.goto(f"{server}/login?next={then}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORDS[username])
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(server) + re.escape(then) + "$"))


def figure(page, name: str) -> str:
    return page.inner_text(f'td[data-figure="{name}"]')


def test_review_by_keyboard_then_sign_off_report_and_lis_message(browser, server, station, tmp_path):
    sample_id, name = station.new_sample("BROWSER")
    shots = os.environ.get("BLASTQ_SCREENSHOTS")
    tech = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = tech.new_page()
    page.goto(f"{server}/samples/{sample_id}")
    assert "/login" in page.url  # strangers are sent to sign in
    sign_in(page, server, "ana")
    row = page.locator("#worklist-rows tr", has_text=name)
    assert row.get_attribute("class") == "verdict-flagged"  # the field's blasts are well over 20%
    page.click(f"text={name}")
    page.wait_for_url(f"{server}/samples/{sample_id}")

    blasts_before = figure(page, "blast")
    first = page.locator("figure.cell").first
    key, old_class = first.get_attribute("data-cell"), first.get_attribute("data-class")
    assert old_class != "blast"
    second = page.locator("figure.cell").nth(1).get_attribute("data-cell")
    page.focus("#gallery")
    page.keyboard.press("x")  # x: blast
    moved = page.locator(f'div.cells[data-group="blast"] figure[data-cell="{key}"]')
    moved.wait_for()
    assert figure(page, "blast") != blasts_before
    assert "blast" in page.inner_text("#message")
    # Focus moved on to the cell after the one reclassified; an arrow and a second key send the one
    # after that to lymphocyte.
    assert page.locator("figure.cell.focus").get_attribute("data-cell") == second
    page.keyboard.press("ArrowRight")
    focused = page.locator("figure.cell.focus").get_attribute("data-cell")
    assert focused not in (key, second)
    page.keyboard.press("l")
    page.locator(f'div.cells[data-group="lymphocyte"] figure[data-cell="{focused}"]').wait_for()
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(Path(shots) / "review-gallery.png"), full_page=False)
    page.click("button[data-action=complete]")
    page.wait_for_selector("#state:has-text('reviewed')")
    assert page.locator("button[data-action=sign-off]").count() == 0  # a technologist does not sign
    tech.close()

    doctor = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = doctor.new_page()
    sign_in(page, server, "pat", f"/samples/{sample_id}")
    page.click("button[data-action=sign-off]")
    page.wait_for_selector("#state:has-text('signed off')")
    audit = page.inner_text("#audit")
    assert "ana" in audit and f"{key}: {old_class} → blast" in audit and "sign off" in audit

    with page.expect_download() as download:
        page.click("text=LIS message (HL7)")
    from hl7apy.parser import parse_message

    message = parse_message(Path(download.value.path()).read_bytes().decode(), find_groups=True)
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == "F" and order.obr.obr_32.to_er7() == "pat"

    report = doctor.new_page()
    report.goto(f"{server}/samples/{sample_id}/report")
    assert "FINAL REPORT" in report.inner_text("body") and "pat" in report.inner_text("body")
    pdf = report.pdf(format="A4", print_background=True)
    assert len(re.findall(rb"/Type\s*/Page[^s]", pdf)) == 1  # the whole report on one A4 page
    letter = report.pdf(format="Letter", print_background=True)
    assert len(re.findall(rb"/Type\s*/Page[^s]", letter)) == 1
    if shots:
        report.set_viewport_size({"width": 800, "height": 1100})
        report.screenshot(path=str(Path(shots) / "review-report.png"), full_page=True)
    doctor.close()


def test_a_viewer_cannot_reclassify_in_the_browser(browser, server, station):
    sample_id, _ = station.new_sample("VIEW")
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, server, "vic", f"/samples/{sample_id}")
    cls = page.locator("figure.cell").first.get_attribute("data-class")
    page.focus("#gallery")
    page.keyboard.press("s")
    page.wait_for_selector("#message.error")
    assert page.locator("figure.cell").first.get_attribute("data-class") == cls
    assert page.locator("button[data-action]").count() == 0
    context.close()


def test_cells_without_a_crop_say_so_and_can_still_be_reviewed(browser, server, station):
    sample_id, _ = station.new_sample("NOCROP")
    context = browser.new_context()
    page = context.new_page()
    page.route("**/cells/**", lambda route: route.fulfill(status=404, body="no crop"))
    sign_in(page, server, "ana", f"/samples/{sample_id}")
    cells = page.locator("figure.cell").count()
    page.wait_for_function(f"document.querySelectorAll('.nocrop').length === {cells}")
    first = page.locator("figure.cell").first.get_attribute("data-cell")
    page.focus("#gallery")
    page.keyboard.press("u")
    page.locator(f'div.cells[data-group="unidentified"] figure[data-cell="{first}"]').wait_for()
    context.close()
