"""`GET /` on the admin listener: the status page as a person sees it, in a real browser
(Debian's chromium driven by Playwright): a healthy firehose and one failing into a dead
webhook, the failing one marked with its error, numbers as /v1/status gives them, no
console errors, readable on a phone; a screenshot is kept with the test's files."""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import pytest

from tests.daemon import Daemon, free_port, signal_record, wait_until

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parent.parent

FIREHOSES = """
[channels.dead]
type = "webhook"
url = "http://127.0.0.1:{port}/in"
secret = "whsec_{secret}"
timeout = "1s"

[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.01

[firehoses.hook]
account = "acme"
channel = "dead"
"""


def chromium() -> str:
    """Debian's chromium; skip without it (fail under CI, which must install it)."""
    if not (os.path.exists(CHROMIUM) and shutil.which("chromium")):
        reason = "chromium is not installed (Debian package: chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
def page_daemon(make_daemon) -> Daemon:
    secret = "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5"
    daemon: Daemon = make_daemon(FIREHOSES.format(port=free_port(), secret=secret)).start()
    assert daemon.post([signal_record(n) for n in range(3)]).status_code == 202
    wait_until(lambda: daemon.status()["firehoses"]["files"]["last_delivery"])
    wait_until(lambda: daemon.status()["firehoses"]["hook"]["last_error"])
    return daemon


def test_the_status_page_in_a_browser(page_daemon: Daemon, tmp_path: Path) -> None:
    executable = chromium()
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only with a browser

    daemon = page_daemon
    status = daemon.status()
    hook, files = status["firehoses"]["hook"], status["firehoses"]["files"]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            response = page.goto(daemon.admin_url + "/")
            assert response is not None and response.status == 200
            failing = page.locator("[data-firehose=hook]")
            healthy = page.locator("[data-firehose=files]")
            assert "bad" in (failing.get_attribute("class") or "")
            assert failing.locator(".state").inner_text().startswith("retrying since")
            shown_error = failing.locator(".error").inner_text()
            assert hook["last_error"]["error"] in shown_error  # escaped, shown as text
            assert "('127.0.0.1'," in shown_error  # quotes in the error, shown as text
            assert (
                failing.locator(".queued")
                .inner_text()
                .startswith(f"{hook['queued_records']} records")
            )
            assert healthy.locator(".state").inner_text() == "delivering"
            assert "ok" in (healthy.get_attribute("class") or "")
            assert healthy.locator(".error").count() == 0
            assert (
                healthy.locator(".queued")
                .inner_text()
                .startswith(f"{files['queued_records']} records")
            )
            assert "ago" in healthy.locator(".last-delivery").inner_text()
            assert page.locator("#summary").inner_text().startswith("2 firehoses, 1 failing")
            assert page.locator("#gauge-disk [role=meter]").get_attribute("aria-valuemax") == str(
                status["storage_max_bytes"]
            )
            assert page.locator("#chart-accepted polyline").count() == 1
            # Readable on a phone: nothing wider than the screen.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390
            shot = tmp_path / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("FIREHOSED_UPDATE_SCREENSHOT"):
                shutil.copy(shot, REPO / "docs" / "status-page.png")
        finally:
            browser.close()
    assert errors == []


def test_every_string_on_the_page_is_escaped(page_daemon: Daemon) -> None:
    """No browser needed: the raw HTML never carries the error's markup unescaped."""
    text = page_daemon.admin("/").text
    assert "('127.0.0.1'," not in text and "(&#x27;127.0.0.1&#x27;," in text
    error = page_daemon.status()["firehoses"]["hook"]["last_error"]["error"]
    assert html.escape(error) in text
    assert page_daemon.get("/").status_code == 404  # not on the ingest listener
