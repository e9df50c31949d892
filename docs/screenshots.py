"""The README's pictures of the review station, taken in Chromium from a running `blastq serve`.

    python docs/screenshots.py http://127.0.0.1:8000 SAMPLE_NAME --tech ana:PASSWORD --pathologist pat:PASSWORD

Signs in as the technologist, reclassifies the first two cells of the gallery by keyboard, shoots the
sample page (docs/review-gallery.png), completes the review, signs it off as the pathologist and shoots
the printed report (docs/review-report.png). Needs playwright and Debian's chromium (/usr/bin/chromium).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).parent


def sign_in(page, url: str, account: str) -> None:
    name, password = account.split(":", 1)
    page.goto(f"{url}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("sample")
    parser.add_argument("--tech", required=True, help="NAME:PASSWORD of a technologist")
    parser.add_argument("--pathologist", required=True, help="NAME:PASSWORD of a pathologist")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        sign_in(page, args.url, args.tech)
        page.click(f"text={args.sample}")
        page.focus("#gallery")
        for key in ("x", "ArrowRight", "l"):
            page.keyboard.press(key)
            page.wait_for_timeout(400)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(HERE / "review-gallery.png"))
        page.click("button[data-action=complete]")
        page.wait_for_selector("#state:has-text('reviewed')")
        sample_url = page.url
        page.context.clear_cookies()
        sign_in(page, args.url, args.pathologist)
        page.goto(sample_url)
        page.click("button[data-action=sign-off]")
        page.wait_for_selector("#state:has-text('signed off')")
        page.goto(f"{sample_url}/report")
        page.set_viewport_size({"width": 800, "height": 1000})
        page.screenshot(path=str(HERE / "review-report.png"), full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
