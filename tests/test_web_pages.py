"""The pages, mostly end to end in a real headless Chromium (Debian's package, driven by
Playwright; these tests are marked `browser` and FAIL, never skip, when it is missing).

Log in, search by a caller number, play a recording inline (its duration is known and its
time advances), download it from the call page (the bytes equal the archived file), see the
play and the download in the audit log, and check that a listener scoped to other
extensions finds nothing, by search or by URL; opening the call page fetches no audio until
play is pressed. Search and status fit a 390 px phone and a desktop, with labelled fields,
buttons with text, readable contrast and nothing refused by the Content Security Policy.
Screenshots land in the test's tmp_path. Over plain HTTP: the protective headers and the
favicon.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
from playwright.sync_api import Browser, Page

from callvault.index import audit
from support.browser import DESKTOP, PHONE, ConsoleWatch, log_in, page_problems
from support.web import (
    ADMIN,
    LISTENER_2000,
    LiveWeb,
    a_working_day,
    audit_entries,
    elements,
    live_web,
    rows_by_from,
)


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        yield live


@pytest.mark.browser
def test_search_play_download_audit(browser: Browser, web: LiveWeb, tmp_path: Path) -> None:
    caller = "0612345678"
    row = rows_by_from(web.archive)[caller]
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    log_in(page, web.base, *ADMIN)

    page.fill("input[name=number]", caller)
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/search?**number=0612345678**")
    results = page.locator("table.results tbody tr")
    assert results.count() == 1
    assert results.first.locator("td.from").inner_text() == caller
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

    audio = results.first.locator("audio")
    audio.evaluate("a => a.play()")
    page.wait_for_function(
        "a => a.duration > 0 && a.currentTime > 0.3", arg=audio.element_handle(), timeout=15000
    )
    duration = audio.evaluate("a => a.duration")
    assert 2.5 < duration < 3.5  # the archived WAV is 3 s long
    played = audio.evaluate("a => a.currentTime")
    page.wait_for_function(
        f"a => a.currentTime > {played}", arg=audio.element_handle(), timeout=10000
    )
    audio.evaluate("a => a.pause()")

    page.click("a.details")
    page.wait_for_url(f"{web.base}/recordings/{row.id}")
    assert page.locator("#sha256").inner_text() == row.sha256
    player = page.locator("#player")
    # preload="none": the page fetches no audio until the user presses play.
    player.evaluate("a => a.play()")
    page.wait_for_function(
        "a => a.duration > 0 && a.currentTime > 0", arg=player.element_handle(), timeout=15000
    )
    player.evaluate("a => a.pause()")
    page.screenshot(path=str(tmp_path / "call.png"), full_page=True)
    assert (tmp_path / "search.png").stat().st_size > 1000
    assert (tmp_path / "call.png").stat().st_size > 1000

    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert download.suggested_filename == "2024-05-02_100000_0612345678_to_1000.wav"
    assert Path(download.path()).read_bytes() == web.archive.audio[row.id]

    page.click("#verify")
    assert "Verified" in page.locator("#verify-result").inner_text()

    page.goto(f"{web.base}/admin/audit?target={row.name}")
    audit_rows = page.locator("table#audit tbody tr")
    actions = [
        audit_rows.nth(i).locator("td").nth(2).inner_text() for i in range(audit_rows.count())
    ]
    assert "play" in actions and "download" in actions and "verify" in actions
    context.close()


@pytest.mark.browser
def test_listener_out_of_scope_gets_nothing(browser: Browser, web: LiveWeb) -> None:
    caller = "0612345678"
    row = rows_by_from(web.archive)[caller]
    context = browser.new_context()
    page = context.new_page()
    log_in(page, web.base, *LISTENER_2000)
    page.goto(f"{web.base}/search?number={caller}")
    assert page.locator("td.empty").inner_text() == "No recordings match."
    page.goto(f"{web.base}/search")
    froms = page.locator("table.results tbody td.from").all_inner_texts()
    assert froms == ["2001"]
    for url in (
        f"/recordings/{row.id}",
        f"/api/recordings/{row.id}",
        f"/api/recordings/{row.id}/audio",
        f"/api/recordings/{row.id}/download",
    ):
        response = page.request.get(f"{web.base}{url}")
        assert response.status == 404, url
    answer = page.goto(f"{web.base}/recordings/{row.id}")
    assert answer is not None and answer.status == 404
    assert "Not found" in page.content()
    context.close()


@pytest.mark.browser
def test_call_page_fetches_no_audio_until_played(browser: Browser, web: LiveWeb) -> None:
    # Opening the call page is not a play: the player fetches nothing until it is started.
    row = rows_by_from(web.archive)["2001"]
    audio_path = f"/api/recordings/{row.id}/audio"
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    log_in(page, web.base, *LISTENER_2000)
    # The search page's players do not preload either.
    page.goto(f"{web.base}/recordings/{row.id}", wait_until="networkidle")
    player = page.locator("#player")
    assert player.evaluate("a => a.readyState") == 0  # HAVE_NOTHING
    assert not [url for url in requested if audio_path in url]
    assert audit_entries(web, actor="bob", action=audit.PLAY) == []

    # Pressing play fetches the audio and logs exactly one play.
    player.evaluate("a => a.play()")
    page.wait_for_function("a => a.currentTime > 0.2", arg=player.element_handle(), timeout=15000)
    assert [url for url in requested if audio_path in url]
    assert [e.target for e in audit_entries(web, actor="bob", action=audit.PLAY)] == [row.name]


def test_pages_send_protective_headers(web: LiveWeb) -> None:
    response = web.client().get("/login")
    assert response.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_pages_have_a_favicon_of_their_own(web: LiveWeb) -> None:
    client = web.client()
    login_page = client.get("/login").text
    [(link, _)] = elements(login_page, "link", rel="icon")
    assert (link["href"], link["type"]) == ("/static/favicon.svg", "image/svg+xml")
    icon = client.get("/static/favicon.svg")
    assert icon.status_code == 200
    assert icon.headers["content-type"] == "image/svg+xml"
    svg = ElementTree.fromstring(icon.content)
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    # Drawn, not fetched: no links, scripts or styles that the CSP would have to allow.
    tags = {element.tag.rsplit("}", 1)[-1] for element in svg.iter()}
    assert not tags & {"script", "style", "image", "use", "a", "foreignObject"}, tags
    attributes = [value for element in svg.iter() for value in element.attrib.values()]
    assert not [value for value in attributes if "url(" in value or "//" in value]
    # Browsers that ask for /favicon.ico without reading the page get the same icon.
    legacy = client.get("/favicon.ico", follow_redirects=True)
    assert legacy.status_code == 200 and legacy.content == icon.content


def _fits(page: Page, width: int) -> None:
    """Nothing scrolls sideways and every player is within the screen."""
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for box in [player.bounding_box() for player in page.locator("audio").all()]:
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, box


@pytest.mark.browser
@pytest.mark.parametrize("screen", ["phone", "desktop"])
def test_search_and_status_fit_the_screen_and_read_well(
    browser: Browser, web: LiveWeb, tmp_path: Path, screen: str
) -> None:
    a_working_day(web)
    viewport = PHONE if screen == "phone" else DESKTOP
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = context.new_page()
    console = ConsoleWatch(page)
    log_in(page, web.base, *ADMIN)

    page.goto(f"{web.base}/search", wait_until="networkidle")
    assert page.locator("td.from").count() == 8
    _fits(page, viewport["width"])
    assert page_problems(page) == []
    page.screenshot(path=str(tmp_path / f"search-{screen}.png"), full_page=True)

    # The date pickers: pick a day, and the search runs with it.
    page.fill("#since", "2024-05-02")
    page.fill("#until", "2024-05-02")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/search?**since=2024-05-02**")
    assert page.locator("td.from").all_inner_texts() == ["0612345678"]
    assert page.locator("#since").input_value() == "2024-05-02"

    # A refused search says so, with the reason, and shows no results at all.
    answer = page.goto(f"{web.base}/search?since=yesterday")
    assert answer is not None and answer.status == 422
    assert page.locator("#search-error").is_visible()
    assert "From: 'yesterday' is not a time" in page.locator("#search-error").inner_text()
    assert page.locator("table").count() == 0
    _fits(page, viewport["width"])
    assert page_problems(page) == []
    page.screenshot(path=str(tmp_path / f"search-refused-{screen}.png"), full_page=True)

    page.goto(f"{web.base}/status", wait_until="networkidle")
    assert "logged in, last contact 2 min ago" in page.locator("#pbx-session").inner_text()
    _fits(page, viewport["width"])
    assert page_problems(page) == []
    page.screenshot(path=str(tmp_path / f"status-{screen}.png"), full_page=True)
    for name in ("search", "search-refused", "status"):
        assert (tmp_path / f"{name}-{screen}.png").stat().st_size > 1000

    # The other pages hold to the same.
    row = rows_by_from(web.archive)["0612345678"]
    for path in (f"/recordings/{row.id}", "/admin", "/admin/audit", "/admin/audit?since=x"):
        page.goto(f"{web.base}{path}", wait_until="networkidle")
        _fits(page, viewport["width"])
        assert page_problems(page) == [], path
    page.click("header form.logout button")
    page.wait_for_url("**/login")
    _fits(page, viewport["width"])
    assert page_problems(page) == []

    assert console.csp_violations() == []
    context.close()


@pytest.mark.browser
def test_the_page_checks_find_what_they_look_for(browser: Browser, web: LiveWeb) -> None:
    # The checks above pass on these pages; here they must fail on a page made worse.
    page = browser.new_page(viewport=PHONE)  # type: ignore[arg-type]
    console = ConsoleWatch(page)
    log_in(page, web.base, *ADMIN)
    assert page_problems(page) == []
    page.evaluate(
        """() => {
        document.querySelector("label[for=number]").remove();
        document.querySelector("h1").style.color = "#c8c8c8";
        document.querySelector("form.filters button").textContent = "";
        document.querySelector("audio").removeAttribute("aria-label");
        document.querySelector("main").style.minWidth = "900px";
    }"""
    )
    problems = page_problems(page)
    assert [p.split(":")[0] for p in problems][:4] == [
        "the page scrolls sideways",
        "no label",
        "no text",
        "player without a name",
    ], problems
    assert problems[4].startswith("contrast 1.") and '"Search recordings"' in problems[4]
    assert len(problems) == 5
    # An inline script is refused by the Content Security Policy, and that is seen.
    page.evaluate(
        """() => {
        const script = document.createElement("script");
        script.textContent = "document.title = 'injected'";
        document.body.appendChild(script);
    }"""
    )
    page.wait_for_function("() => true")
    assert page.title() != "injected"
    assert console.csp_violations()
