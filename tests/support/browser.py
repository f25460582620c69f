"""A real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) for the web
tests, kept on loopback, and the checks the pages must pass in it.

The fixture `browser` is registered in tests/conftest.py. It FAILS, never skips, when
Chromium is missing. `log_in` fills the login form; `page_problems` lists what a page does
wrong for a person: horizontal scrolling, inputs without a label, buttons without text,
text below the WCAG AA contrast ratio, and anything the Content Security Policy refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Keep Chromium on loopback: every host name but 127.0.0.1 resolves to nothing, and the
# background traffic to Google's services (updates, sync, metrics, safe browsing, field
# trials, domain reliability) is switched off.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--disable-field-trial-config",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
    "--metrics-recording-only",
    "--no-pings",
    "--no-first-run",
    "--no-default-browser-check",
    "--autoplay-policy=no-user-gesture-required",
]

# An iPhone-sized screen in CSS pixels, and a laptop's.
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture()
def browser() -> Iterator[Browser]:
    """Chromium, launched for one test and closed after it."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


def log_in(page: Page, base: str, name: str, password: str) -> None:
    """Log in through the form, as a person would; waits for the search page."""
    page.goto(f"{base}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/search")


class ConsoleWatch:
    """Collects what the browser's console says about refused content (CSP) and errors."""

    def __init__(self, page: Page) -> None:
        self.messages: list[str] = []
        page.on("console", self._seen)

    def _seen(self, message: ConsoleMessage) -> None:
        if message.type == "error" or "Content Security Policy" in message.text:
            self.messages.append(message.text)

    def csp_violations(self) -> list[str]:
        return [m for m in self.messages if "Content Security Policy" in m]


# The checks run in the page (plain JavaScript, kept beside this module).
_PROBLEMS_JS = (Path(__file__).resolve().parent / "page_problems.js").read_text()


def page_problems(page: Page) -> list[str]:
    """What the page now shown does wrong for a person (empty when nothing)."""
    problems: list[str] = page.evaluate(_PROBLEMS_JS)
    return problems
