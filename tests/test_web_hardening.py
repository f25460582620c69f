"""Findings of a security review of the web app, each checked over real sockets.

Plays are audited whatever the Range; the call page fetches no audio until asked (Chromium);
CSV cells of the audit log and the ZIP manifest cannot be read as formulas; Unicode digits
and absurd Range numbers are refused, never a 500; another site cannot start an export or a
download with the victim's cookie; exporting the audit log is audited; a throttled login
storm leaves one audit row per throttle window.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from callvault.index import audit, open_index
from callvault.storage import LocalStorage
from callvault.web import create_app
from test_web_browser import CHROMIUM, CHROMIUM_ARGS
from web_fixtures import (
    ADMIN,
    LISTENER_2000,
    T0,
    FakeClock,
    LiveWeb,
    WebArchive,
    csrf_of,
    live_web,
    login,
    rows_by_from,
    serve,
)


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        yield live


def _entries(web: LiveWeb, **where: str) -> list[audit.AuditEntry]:
    return web.archive.index.audit.query(audit.AuditFilter(**where), limit=1000)


# 1. A play is audited whatever the Range asks for.


def test_a_play_starting_past_byte_zero_is_audited(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    row = rows_by_from(web.archive)["2001"]
    url = f"/api/recordings/{row.id}/audio"
    data = web.archive.audio[row.id]

    almost_all = bob.get(url, headers={"Range": "bytes=1-"})
    assert almost_all.status_code == 206 and almost_all.content == data[1:]
    plays = _entries(web, actor="bob", action=audit.PLAY)
    assert [(e.target, e.detail) for e in plays] == [(row.name, f"id={row.id}")]

    # The player's next range requests (seeks) within 30 s are the same play ...
    assert bob.get(url, headers={"Range": "bytes=500-"}).status_code == 206
    assert bob.get(url).status_code == 200
    assert len(_entries(web, actor="bob", action=audit.PLAY)) == 1
    # ... and a later one is a new play, wherever it starts.
    web.clock.advance(timedelta(seconds=31))
    assert bob.get(url, headers={"Range": "bytes=-100"}).status_code == 206
    assert len(_entries(web, actor="bob", action=audit.PLAY)) == 2


# 2. Opening the call page is not a play: the player fetches nothing until it is started.


@pytest.mark.browser
def test_call_page_fetches_no_audio_until_played(web: LiveWeb) -> None:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    row = rows_by_from(web.archive)["2001"]
    audio_path = f"/api/recordings/{row.id}/audio"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{web.base}/login")
            page.fill("input[name=username]", LISTENER_2000[0])
            page.fill("input[name=password]", LISTENER_2000[1])
            page.click("button[type=submit]")
            page.wait_for_url(f"{web.base}/search")
            # The search page's players do not preload either.
            page.goto(f"{web.base}/recordings/{row.id}", wait_until="networkidle")
            player = page.locator("#player")
            assert player.evaluate("a => a.readyState") == 0  # HAVE_NOTHING
            assert not [url for url in requested if audio_path in url]
            assert _entries(web, actor="bob", action=audit.PLAY) == []

            # Pressing play fetches the audio and logs exactly one play.
            player.evaluate("a => a.play()")
            page.wait_for_function(
                "a => a.currentTime > 0.2", arg=player.element_handle(), timeout=15000
            )
            assert [url for url in requested if audio_path in url]
            assert [e.target for e in _entries(web, actor="bob", action=audit.PLAY)] == [row.name]
        finally:
            browser.close()


# 3. No CSV cell the app writes can be run as a formula by a spreadsheet.

FORMULAS = ["=HYPERLINK(A1)", "+1+2", "-3+4", "@SUM(A1)", "\t=1", "\r=2"]


def test_audit_csv_quotes_every_text_cell_that_could_be_a_formula(web: LiveWeb) -> None:
    # A failed login records whatever name was typed, as actor and target.
    typed = '=HYPERLINK("http://evil.example","click")'
    attempt = web.client()
    page = attempt.get("/login")
    refused = attempt.post(
        "/login", data={"username": typed, "password": "x", "csrf": csrf_of(page.text)}
    )
    assert refused.status_code == 401
    # Entries written by other paths (the CLI, a future action) go through the same CSV.
    index = web.archive.index
    for text in FORMULAS:
        index.audit.record(text, text, text, text, text, at=web.clock())

    admin = web.login(*ADMIN)
    answer = admin.get("/api/audit.csv")
    assert answer.status_code == 200
    lines = list(csv.reader(io.StringIO(answer.text, newline="")))
    assert lines[0] == list(audit.CSV_HEADER)
    cells = [cell for line in lines[1:] for cell in line[2:]]  # every text column
    assert "'" + typed in cells
    for text in FORMULAS:
        assert cells.count("'" + text) == 5, text  # actor, action, target, detail, address
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


def test_zip_manifest_quotes_every_text_cell_that_could_be_a_formula(tmp_path: Path) -> None:
    index = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    try:
        archive = WebArchive(tmp_path, index, LocalStorage(tmp_path))
        for n, text in enumerate(FORMULAS):
            archive.add(
                start=T0 + timedelta(hours=n),
                call_from=f"200{n}",
                call_to="+49301234567",
                status=text,
                did=text,
            )
        index.users.add(ADMIN[0], "admin", ADMIN[1])
        _token, secret = index.tokens.create(ADMIN[0], label="tests")
        app = create_app(index, archive.storage, clock=FakeClock(T0 + timedelta(days=1)))
        with serve(app) as base:
            client = httpx.Client(
                base_url=base, timeout=10, headers={"Authorization": f"Bearer {secret}"}
            )
            exported = client.get("/api/export")
        assert exported.status_code == 200
        manifest_text = zipfile.ZipFile(io.BytesIO(exported.content)).read("manifest.csv")
        manifest = list(csv.DictReader(io.StringIO(manifest_text.decode(), newline="")))
        assert len(manifest) == len(FORMULAS)
        assert {m["status"] for m in manifest} == {"'" + text for text in FORMULAS}
        assert {m["did"] for m in manifest} == {"'" + text for text in FORMULAS}
        assert {m["to"] for m in manifest} == {"'+49301234567"}
        assert all(m["matches_index"] == "yes" for m in manifest)
    finally:
        index.close()


# 4. and 5. Digits int() refuses and absurdly long numbers: a clear answer, never a 500.


def test_unicode_digits_in_page_numbers_and_filters_are_no_500(web: LiveWeb) -> None:
    bob = web.login(*LISTENER_2000)
    page = bob.get("/search", params={"page": "²"})
    assert page.status_code == 200 and 'class="from">2001<' in page.text  # page 1
    talk = bob.get("/search", params={"min_talk_s": "²"})
    assert talk.status_code == 200
    assert "Minimum talk time must be a number of seconds." in talk.text
    admin = web.login(*ADMIN)
    audit_page = admin.get("/admin/audit", params={"page": "²"})
    assert audit_page.status_code == 200 and 'id="audit"' in audit_page.text
    api, _ = web.bearer(ADMIN[0])
    assert api.get("/api/recordings", params={"min_talk_s": "²"}).status_code == 422
    assert api.get("/api/audit", params={"offset": "²"}).status_code == 422


@pytest.mark.parametrize(
    "header",
    [
        "bytes=" + "9" * 5000 + "-",
        "bytes=0-" + "9" * 5000,
        "bytes=-" + "9" * 5000,
        "bytes=" + "1" * 20 + "-",  # 20 digits: more than any file
        "bytes=²-",  # str.isdigit() is true, int() refuses it
        "bytes=0-²",
        "bytes=-³",
    ],
)
def test_range_with_unusable_numbers_is_416(web: LiveWeb, header: str) -> None:
    client, _ = web.bearer(LISTENER_2000[0])
    row = rows_by_from(web.archive)["2001"]
    size = len(web.archive.audio[row.id])
    raw = header.encode("latin-1")  # as a client may send it; the server reads Latin-1
    answer = client.get(f"/api/recordings/{row.id}/audio", headers={"Range": raw})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == f"bytes */{size}"


def test_range_end_of_nineteen_digits_is_clamped_to_the_file(web: LiveWeb) -> None:
    client, _ = web.bearer(LISTENER_2000[0])
    row = rows_by_from(web.archive)["2001"]
    data = web.archive.audio[row.id]
    answer = client.get(f"/api/recordings/{row.id}/audio", headers={"Range": "bytes=4-" + "9" * 19})
    assert answer.status_code == 206 and answer.content == data[4:]


# 6. Another site cannot make a logged-in browser export or download.

CROSS_SITE = ("cross-site", "same-site")
OWN_SITE = ("same-origin", "none", None)


def _fetch_site(value: str | None) -> dict[str, str]:
    return {} if value is None else {"Sec-Fetch-Site": value}


@pytest.mark.parametrize("kind", ["export", "download"])
def test_cross_site_export_and_download_with_a_cookie_are_refused(web: LiveWeb, kind: str) -> None:
    row = rows_by_from(web.archive)["2001"]
    url = "/api/export" if kind == "export" else f"/api/recordings/{row.id}/download"
    action = audit.EXPORT if kind == "export" else audit.DOWNLOAD
    bob = web.login(*LISTENER_2000)
    for site in CROSS_SITE:
        refused = bob.get(url, headers=_fetch_site(site))
        assert refused.status_code == 403, site
        assert refused.headers["content-type"] == "application/json"
    assert _entries(web, actor="bob", action=action) == []  # refused before anything ran
    for site in OWN_SITE:
        allowed = bob.get(url, headers=_fetch_site(site))
        assert allowed.status_code == 200, site
        assert allowed.content[:2] == (b"PK" if kind == "export" else b"RI")
    assert len(_entries(web, actor="bob", action=action)) == len(OWN_SITE)

    # A script with an API token has no cookie another site could use: never refused.
    script, _ = web.bearer(LISTENER_2000[0])
    for site in (*CROSS_SITE, *OWN_SITE):
        assert script.get(url, headers=_fetch_site(site)).status_code == 200, site


def test_cross_site_play_with_a_cookie_is_refused(web: LiveWeb) -> None:
    # A link from another site would otherwise log a play in the victim's name.
    row = rows_by_from(web.archive)["2001"]
    bob = web.login(*LISTENER_2000)
    url = f"/api/recordings/{row.id}/audio"
    for site in CROSS_SITE:
        assert bob.get(url, headers=_fetch_site(site)).status_code == 403, site
    assert _entries(web, actor="bob", action=audit.PLAY) == []
    played = bob.get(url, headers={**_fetch_site("same-origin"), "Range": "bytes=0-99"})
    assert played.status_code == 206 and played.content[:4] == b"RIFF"
    assert len(_entries(web, actor="bob", action=audit.PLAY)) == 1


def test_cross_site_audit_csv_with_a_cookie_is_refused(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    assert admin.get("/api/audit.csv", headers=_fetch_site("cross-site")).status_code == 403
    assert _entries(web, action=audit.AUDIT_EXPORT) == []
    assert admin.get("/api/audit.csv", headers=_fetch_site("same-origin")).status_code == 200


# 7. The audit log's own export is audited; a login storm leaves bounded traces.


def test_exporting_the_audit_log_is_audited(web: LiveWeb) -> None:
    admin, _ = web.bearer(ADMIN[0])
    answer = admin.get("/api/audit.csv", params={"actor": "bob", "since": "2024-05-01"})
    assert answer.status_code == 200
    exports = _entries(web, action=audit.AUDIT_EXPORT)
    assert [(e.actor, e.target, e.remote_addr) for e in exports] == [
        ("alice", "audit.csv", "127.0.0.1")
    ]
    assert "actor=bob" in exports[0].detail and "since=2024-05-01" in exports[0].detail
    # The audit page offers it as a filter like every other action.
    page = web.login(*ADMIN).get("/admin/audit", params={"action": audit.AUDIT_EXPORT})
    assert page.status_code == 200
    assert f"<option selected>{audit.AUDIT_EXPORT}</option>" in page.text


def test_throttled_logins_write_one_audit_row_per_address_and_window(web: LiveWeb) -> None:
    client = web.client()
    for _ in range(5):
        assert login(client, ADMIN[0], "guess-guess").status_code == 401
    for _ in range(30):  # a script that keeps trying while refused
        assert login(client, ADMIN[0], "guess-guess").status_code == 429
    # Other names from the same address fail until the address as a whole is throttled
    # (20 failures), and add no throttle row in the same window either.
    answers = [login(client, f"mallory{n}", "guess-guess").status_code for n in range(20)]
    assert answers == [401] * 15 + [429] * 5
    assert len(_entries(web, action=audit.LOGIN_THROTTLED)) == 1
    assert len(_entries(web, action=audit.LOGIN_FAILED)) == 20  # the limiter's own bound

    # The next window is throttled anew and audited once more.
    web.clock.advance(timedelta(minutes=16))
    for _ in range(5):
        assert login(client, ADMIN[0], "guess-guess").status_code == 401
    for _ in range(10):
        assert login(client, ADMIN[0], "guess-guess").status_code == 429
    assert len(_entries(web, action=audit.LOGIN_THROTTLED)) == 2


# A pending recording's storage key names where its file will go, not a file.


def test_verifying_a_pending_recording_says_not_archived(web: LiveWeb) -> None:
    from callvault.index import SearchFilters

    everything = web.archive.index.recordings.search(SearchFilters(), limit=100)
    [pending] = [row for row in everything if row.state == "pending"]
    archived = rows_by_from(web.archive)["2001"]
    assert archived.storage_key is not None
    # The worst case: the planned key names a file that exists (another recording's).
    assert web.archive.index.jobs.reserve_storage_key(pending.id, archived.storage_key)
    admin, _ = web.bearer(ADMIN[0])
    answer = admin.post(f"/api/recordings/{pending.id}/verify")
    assert answer.status_code == 200
    assert (answer.json()["ok"], answer.json()["error"]) == (False, "not archived")


# One-time secrets and CSRF tokens stay out of caches and reprs.


def test_answers_with_secrets_are_not_cached_and_reprs_hide_them(web: LiveWeb) -> None:
    from callvault.web._api import MeOut, TokenCreated, UserCreated, UserIn

    admin, _ = web.bearer(ADMIN[0])
    created = admin.post("/api/tokens", json={"user": ADMIN[0], "label": "cache test"})
    assert created.status_code in (200, 201), created.text
    assert created.headers["cache-control"] == "no-store"
    bob = web.login(*LISTENER_2000)
    me = bob.get("/api/me")
    assert me.headers["cache-control"] == "no-store"
    static = web.client().get("/static/app.css")
    assert static.status_code == 200
    assert static.headers.get("cache-control") != "no-store"  # shared assets may be cached

    secret = created.json()["secret"]
    assert secret not in repr(TokenCreated.model_validate(created.json()))
    csrf = me.json()["csrf_token"]
    assert csrf not in repr(MeOut.model_validate(me.json()))
    assert "S3cret-Pw-123" not in repr(UserIn(name="x", role="admin", password="S3cret-Pw-123"))
    user = {"id": 1, "name": "x", "role": "admin", "scope": "", "created_at": T0}
    made = UserCreated.model_validate({"user": user, "password": "Gen-Pw-4567"})
    assert "Gen-Pw-4567" not in repr(made)
