"""Every kind of Yeastar PBX works the same in the web app: a P-Series PBX registered
through the JSON API (its kind, Client ID and Secret), its calls archived from the
P-Series simulator (recordings in WAV or MP3), then searched, played (HTTP ranges, the
right Content-Type), exported as a signed ZIP that `verify-export` checks, with the kind
said wherever the PBX is shown; and the admin page that registers PBXs of every kind.

Everything real: the P-Series simulator over HTTPS and WSS on 127.0.0.1, the archiver in
this process, the web app under uvicorn on 127.0.0.1, SQLite.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser

from callvault.archive import Archiver
from callvault.index import audit
from callvault.keys import Keyring, MasterKey
from callvault.ops import verify_export
from callvault.simulator import PSeriesConfig, PSeriesSimulator
from support.archive import outer_env, states, wait_until
from support.browser import DESKTOP, PHONE, ConsoleWatch, log_in, page_problems
from support.index_data import register_pbx
from support.kinds import PSeriesPbx
from support.web import (
    ADMIN,
    LISTENER_2000,
    LiveWeb,
    audit_entries,
    csrf_of,
    elements,
    live_web,
    text_of,
)

KEYRING = Keyring((MasterKey.generate(),), "tests")
# A webhook Secret as a P-Series PBX makes them: 32 letters and digits.
WEBHOOK_SECRET = "Wh00kS3cretFromThePbx0123456789a"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive", keyring=KEYRING) as live:
        yield live


def p_series_body(sim: PSeriesSimulator, name: str = "lyon") -> dict[str, object]:
    """POST /api/pbxs of a P-Series PBX: its Client ID as user, its Client Secret as
    password."""
    return {
        "name": name,
        "kind": "p-series",
        "url": sim.url,
        "username": sim.client_id,
        "password": sim.client_secret,
        "pin_sha256": sim.cert_sha256,
        "timezone": sim.config.timezone,
    }


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`callvault ARGS` as a child process, without this process's CALLVAULT_* settings."""
    return subprocess.run(
        [sys.executable, "-m", "callvault", *args],
        env=outer_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("download_format", ["mp3", "wav"])
def test_a_p_series_pbx_is_searched_played_and_exported_like_any_other(
    web: LiveWeb, tmp_path: Path, download_format: str
) -> None:
    config = PSeriesConfig(seed=21, download_format=download_format, timezone="Europe/Paris")
    with PSeriesSimulator(config) as sim:
        # Registered through the JSON API, as an admin's script does.
        admin, _ = web.bearer(ADMIN[0])
        created = admin.post("/api/pbxs", json=p_series_body(sim))
        assert created.status_code == 201, created.text
        view = created.json()
        assert (view["name"], view["kind"], view["username"]) == ("lyon", "p-series", sim.client_id)
        assert (view["tls"], view["webhook_secret"]) == ("pinned", False)
        assert sim.client_secret not in created.text
        record = web.archive.index.pbxs.require("lyon")
        assert (record.config.kind, record.config.username) == ("p-series", sim.client_id)
        opened = KEYRING.open(record.password_sealed, "pbx:lyon:password")
        assert opened == sim.client_secret.encode()
        assert [p["kind"] for p in admin.get("/api/pbxs").json()] == ["p-series"]
        # The secret as sealed logs in to the PBX.
        tested = admin.post("/api/pbxs/lyon/test")
        assert tested.status_code == 200 and tested.json()["ok"] is True, tested.text
        assert tested.json()["calls_last_day"] == 0  # none placed yet
        register_pbx(web.archive.index, "paris", web.clock())  # an S-Series PBX beside it

        # Its calls archived by an archiver of the registered PBX, into the web's archive.
        pbx = PSeriesPbx(sim, 21, tmp_path / "unused.key")
        archiver_config = pbx.archiver_config(web.archive.root, registry_name="lyon")
        with Archiver(archiver_config) as archiver:
            assert pbx.wait_events_ready()
            names = [
                pbx.place_call(call_from="1001", call_to="1003", talk_seconds=3),
                pbx.place_call(
                    call_from="015112345678", call_to="1002", call_type="Inbound", talk_seconds=2
                ),
                pbx.place_call(call_from="1004", call_to="1005", status="NO ANSWER"),
            ]
            assert names[2] is None  # not answered: no recording
            index = archiver.index
            assert index is not None
            assert wait_until(lambda: states(index).get("archived") == 6), states(index)
        recorded = sorted(name for name in names if name is not None)
        assert all(name.endswith(f".{download_format}") for name in recorded)
        original = {name: sim.recording_path(name).read_bytes() for name in recorded}

    # Searched: the API says which PBX each call came from, and its kind.
    listener, _ = web.bearer(ADMIN[0])
    found = listener.get("/api/recordings", params={"pbx": "lyon"}).json()
    items = found["items"]
    assert sorted(item["name"] for item in items) == recorded and found["total"] == 2
    assert {(item["pbx"], item["pbx_kind"], item["state"]) for item in items} == {
        ("lyon", "p-series", "archived")
    }
    for item in items:
        assert item["sha256"] == sha256(original[item["name"]])
        assert item["pbx_serial"] == config.serial
    everything = listener.get("/api/recordings", params={"limit": 50}).json()["items"]
    assert {(item["pbx"], item["pbx_kind"]) for item in everything} == {
        ("", ""),  # the standard archive's calls: of no registered PBX
        ("lyon", "p-series"),
    }
    one = listener.get(f"/api/recordings/{items[0]['id']}").json()
    assert (one["pbx"], one["pbx_kind"]) == ("lyon", "p-series")
    by_number = listener.get("/api/recordings", params={"number": "0151123"}).json()["items"]
    assert [(item["call_from"], item["pbx_kind"]) for item in by_number] == [
        ("015112345678", "p-series")
    ]

    # The search page: the PBX column (two PBXs are registered) names the kind.
    browser = web.login(*ADMIN)
    page = browser.get("/search", params={"pbx": "lyon"})
    assert page.status_code == 200
    cells = [text for _attrs, text in elements(page.text, "td", class_="pbx")]
    assert cells == ["lyon p-series", "lyon p-series"]
    assert text_of(page.text, "summary").startswith("2 recordings")
    details = browser.get(f"/recordings/{items[0]['id']}")
    assert text_of(details.text, "pbx") == "lyon (p-series)"

    # Played: whole, and by ranges as a player seeks, with the type of the file.
    item = next(i for i in items if i["call_from"] == "1001")
    data = original[item["name"]]
    wanted_type = "audio/mpeg" if download_format == "mp3" else item["content_type"]
    assert wanted_type in ("audio/mpeg", "audio/wav", "audio/x-wav")
    whole = listener.get(item["audio_url"])
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == wanted_type
    assert whole.headers["accept-ranges"] == "bytes"
    part = listener.get(item["audio_url"], headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    assert part.headers["content-type"] == wanted_type
    tail = listener.get(item["audio_url"], headers={"Range": "bytes=-64"})
    assert tail.status_code == 206 and tail.content == data[-64:]
    beyond = listener.get(item["audio_url"], headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416
    assert len(audit_entries(web, action=audit.PLAY)) == 1  # one play, however it seeks
    download = listener.get(item["download_url"])
    assert download.status_code == 200 and download.content == data
    assert f".{download_format}" in download.headers["content-disposition"]

    # Exported: a signed ZIP of the PBX's recordings, byte for byte, that verify-export
    # checks, against the public key the web app publishes too.
    exported = listener.get("/api/export", params={"pbx": "lyon"})
    assert exported.status_code == 200
    assert exported.headers["content-type"] == "application/zip"
    path = tmp_path / "lyon.zip"
    path.write_bytes(exported.content)
    with zipfile.ZipFile(path) as bundle:
        manifest = list(csv.DictReader(io.StringIO(bundle.read("manifest.csv").decode())))
        files = {row["recording_name"]: bundle.read(row["file"]) for row in manifest}
    assert files == original
    assert {(row["pbx"], row["pbx_kind"]) for row in manifest} == {("lyon", "p-series")}
    assert all(row["file"].endswith(f".{download_format}") for row in manifest)
    report = verify_export(path)
    assert report.ok and report.signed and report.recordings == 2, report.problems
    key = listener.get("/api/keys/signing.pem")
    assert key.status_code == 200
    (tmp_path / "key.pem").write_bytes(key.content)
    checked = cli("verify-export", str(path), "--public-key", str(tmp_path / "key.pem"), "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    outcome = json.loads(checked.stdout)
    assert outcome["key_trusted"] is True and outcome["problems"] == []
    [entry] = audit_entries(web, action=audit.EXPORT)
    assert entry.target == "2 recordings" and "pbx=lyon" in entry.detail

    # `callvault list --json` says the kind too (the same page as the API's).
    listed = cli("list", "--json", "--pbx", "lyon", "--archive", str(web.archive.root))
    assert listed.returncode == 0, listed.stderr
    assert {item["pbx_kind"] for item in json.loads(listed.stdout)["items"]} == {"p-series"}


def _page_post(client: httpx.Client, path: str, **fields: str) -> httpx.Response:
    """A form of the PBX page posted as the browser does, with the page's CSRF token."""
    token = csrf_of(client.get("/admin/pbxs").text)
    return client.post(path, data={"csrf": token, **fields})


def _row(page: str, name: str) -> str:
    [(_attrs, text)] = elements(page, "tr", **{"data-pbx": name})
    return text


def test_the_pbx_page_registers_tests_changes_and_removes_pbxs_of_every_kind(
    web: LiveWeb,
) -> None:
    index = web.archive.index
    with PSeriesSimulator(PSeriesConfig(seed=22)) as sim:
        browser = web.login(*ADMIN)
        empty = browser.get("/admin/pbxs")
        assert empty.status_code == 200 and "No PBX is registered." in empty.text
        kinds = [text for _a, text in elements(empty.text, "option")]
        assert {"s-series", "cloud", "p-series"} <= set(kinds)
        assert '<a href="/admin/pbxs" aria-current="page">PBXs</a>' in empty.text

        added = _page_post(
            browser,
            "/admin/pbxs",
            name="lyon",
            kind="p-series",
            url=sim.url,
            username=sim.client_id,
            password=sim.client_secret,
            webhook_secret=WEBHOOK_SECRET,
            pin_sha256=sim.cert_sha256 or "",
            timezone="Europe/Paris",
        )
        assert added.status_code == 303 and added.headers["location"] == "/admin/pbxs?added=lyon"
        page = browser.get(added.headers["location"]).text
        assert "PBX lyon (p-series) registered." in page
        row = _row(page, "lyon")
        for shown in ("p-series", sim.url, sim.client_id, "OpenAPI", "pinned", "Europe/Paris"):
            assert shown in row
        assert sim.client_secret not in page and WEBHOOK_SECRET not in page
        record = index.pbxs.require("lyon")
        assert (record.config.kind, record.config.username) == ("p-series", sim.client_id)
        assert KEYRING.open(record.password_sealed, "pbx:lyon:password") == (
            sim.client_secret.encode()
        )
        assert record.has_webhook_secret
        # The same entry as through the JSON API.
        admin, _ = web.bearer(ADMIN[0])
        assert admin.get("/api/pbxs/lyon").json()["webhook_secret"] is True

        # "Test login" logs in with the Client Secret as sealed.
        tested = _page_post(browser, "/admin/pbxs/lyon/test")
        assert tested.status_code == 200
        assert text_of(tested.text, "test-result").startswith("PBX lyon answered: logged in")
        assert "0 calls in the last day" in text_of(tested.text, "test-result")

        # An S-Series PBX beside it, from the same form.
        paris = _page_post(
            browser,
            "/admin/pbxs",
            name="paris",
            kind="s-series",
            url="https://paris.example:8088",
            username="api",
            password="paris-Pa55word",
            api_version="v2.0.0",
        )
        assert paris.status_code == 303
        assert "v2.0.0" in _row(browser.get("/admin/pbxs").text, "paris")
        assert index.pbxs.require("paris").config.kind == "s-series"

        # Refused: one line naming the field, what was typed kept, never the secret.
        refused = _page_post(
            browser,
            "/admin/pbxs",
            name="nice",
            kind="p-series",
            url="ftp://nice.example",
            username="cid",
            password="Secret-not-to-echo",
        )
        assert refused.status_code == 422 and "url: PBX URL scheme" in refused.text
        assert 'value="nice"' in refused.text and "Secret-not-to-echo" not in refused.text
        webhook_for_s = _page_post(
            browser,
            "/admin/pbxs",
            name="nice",
            url="https://nice.example",
            username="api",
            password="x-Pa55word",
            webhook_secret=WEBHOOK_SECRET,
        )
        assert webhook_for_s.status_code == 422
        assert "only a P-Series PBX signs webhooks" in webhook_for_s.text
        bad_number = _page_post(
            browser,
            "/admin/pbxs",
            name="nice",
            url="https://nice.example",
            username="api",
            password="x-Pa55word",
            max_downloads="many",
        )
        assert bad_number.status_code == 422 and "Downloads at once:" in bad_number.text
        assert index.pbxs.get("nice") is None

        # Changed: only what differs; the webhook secret forgotten, a new Client Secret.
        changed = _page_post(
            browser,
            "/admin/pbxs/lyon/edit",
            kind="p-series",
            url=sim.url,
            username=sim.client_id,
            password="a-new-client-secret",
            api_version=record.config.api_version,
            timezone="Europe/Berlin",
            max_downloads="1",
            drop_webhook_secret="1",
        )
        assert changed.status_code == 303, changed.text
        after = index.pbxs.require("lyon")
        assert (after.config.timezone, after.config.max_downloads) == ("Europe/Berlin", 1)
        assert not after.has_webhook_secret
        assert KEYRING.open(after.password_sealed, "pbx:lyon:password") == b"a-new-client-secret"
        [edit] = audit_entries(web, action=audit.PBX_EDIT)
        assert edit.actor == ADMIN[0] and edit.target == "lyon"
        assert "a-new-client-secret" not in edit.detail
        unchanged = _page_post(
            browser,
            "/admin/pbxs/paris/edit",
            kind="s-series",
            url="https://paris.example:8088",
            username="api",
            api_version="v2.0.0",
            max_downloads="2",
        )
        assert unchanged.status_code == 200 and "Nothing to change in PBX paris." in unchanged.text
        # The kind is changed like any other field.
        to_cloud = _page_post(
            browser,
            "/admin/pbxs/paris/edit",
            kind="cloud",
            url="https://paris.example:8088",
            username="api",
            api_version="v2.0.0",
            max_downloads="2",
        )
        assert to_cloud.status_code == 303
        assert index.pbxs.require("paris").config.kind == "cloud"

        # Removed.
        removed = _page_post(browser, "/admin/pbxs/paris/remove")
        assert removed.status_code == 303 and index.pbxs.get("paris") is None
        assert "PBX taken off the registry." in browser.get(removed.headers["location"]).text
        actions = [e.action for e in audit_entries(web, target="paris")]
        assert actions == [audit.PBX_REMOVE, audit.PBX_EDIT, audit.PBX_ADD]

        # Only admins, and only with the page's CSRF token.
        forged = browser.post("/admin/pbxs/lyon/remove", data={"csrf": "forged"})
        assert forged.status_code == 403 and index.pbxs.get("lyon") is not None
        listener = web.login(*LISTENER_2000)
        assert listener.get("/admin/pbxs").status_code == 403
        assert "/admin/pbxs" not in listener.get("/search").text


def test_without_the_master_key_the_page_says_so_and_registers_nothing(tmp_path: Path) -> None:
    with live_web(tmp_path / "archive") as web:
        browser = web.login(*ADMIN)
        page = browser.get("/admin/pbxs")
        assert "started without the master key" in text_of(page.text, "no-master-key")
        answer = _page_post(
            browser,
            "/admin/pbxs",
            name="lyon",
            kind="p-series",
            url="https://lyon.example:8088",
            username="cid",
            password="client-secret",
        )
        assert answer.status_code == 409 and "no master key" in answer.text
        assert web.archive.index.pbxs.list() == []


@pytest.mark.browser
@pytest.mark.parametrize("screen", ["phone", "desktop"])
def test_the_pbx_page_reads_well_in_a_browser(browser: Browser, web: LiveWeb, screen: str) -> None:
    for name in ("paris", "lyon"):
        register_pbx(web.archive.index, name, web.clock())
    viewport = PHONE if screen == "phone" else DESKTOP
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = context.new_page()
    console = ConsoleWatch(page)
    log_in(page, web.base, *ADMIN)
    page.goto(f"{web.base}/admin/pbxs", wait_until="networkidle")
    assert page.locator("#pbxs tbody tr").count() == 2
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    assert page_problems(page) == []
    page.locator("#pbxs details summary").first.click()
    assert page_problems(page) == []
    assert console.csp_violations() == []
    context.close()
