"""The archive's status for admins, over real sockets: the API's report, the status page
as a supervisor reads it (the PBX session in words, times as "3 min ago" with the exact UTC
time on hover, why there are more calls than recordings, workers alive against configured,
serve's processes, disk use, the index's health, failures with their reasons), and queueing
failed recordings again from the API and from the page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from callvault.index import SettingKey, audit
from support.web import (
    ADMIN,
    LISTENER_2000,
    LiveWeb,
    a_working_day,
    csrf_of,
    elements,
    live_web,
    text_of,
)


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        yield live


def test_stats_and_status(web: LiveWeb) -> None:
    admin, _ = web.bearer(ADMIN[0])
    stats = admin.get("/api/stats", params={"days": 15}).json()
    assert stats["counts_by_state"]["archived"] == 4
    assert stats["counts_by_state"]["pending"] == 1 and stats["counts_by_state"]["failed"] == 1
    assert stats["bytes_stored"] == sum(len(v) for v in web.archive.audio.values())
    per_day = {d["day"]: d["calls"] for d in stats["calls_per_day"]}
    assert len(per_day) == 15
    assert per_day["2024-05-01"] == 1 and per_day["2024-05-02"] == 1 and per_day["2024-05-03"] == 4
    status = admin.get("/api/status").json()
    assert [f["state"] for f in status["failures"]] == ["failed"]
    assert status["failures"][0]["error"] == "PBX said 20014"
    assert status["storage"]["total"] > 0


def test_status_page_and_api_show_pbx_health_and_last_event(web: LiveWeb) -> None:
    index = web.archive.index
    now = web.clock()
    index.settings.set(
        SettingKey.PBX_HEALTH, '{"state": "degraded", "error": "heartbeat failed"}', now
    )
    index.settings.set(SettingKey.LAST_EVENT_AT, "2024-05-11T08:59:00+00:00", now)
    admin, _ = web.bearer(ADMIN[0])
    status = admin.get("/api/status").json()
    session = status["pbx_session"]
    assert (session["state"], session["error"]) == ("degraded", "heartbeat failed")
    assert session["summary"] == (
        "logged in, but the last request failed: heartbeat failed; no contact yet"
    )
    assert status["last_event_at"] == "2024-05-11T08:59:00+00:00"
    page = web.login(*ADMIN).get("/status").text
    assert "logged in, but the last request failed: heartbeat failed" in page
    assert "2024-05-11 08:59:00 UTC" in page  # the last event's time, on hover
    assert "PBX said 20014" in page  # the failure's reason
    assert [text for _attrs, text in elements(page, "td", class_="count-archived")] == ["4"]
    [(busiest, _)] = elements(page, "progress", value="4")
    assert busiest["max"] == "4" and busiest["aria-label"] == "4 calls on 2024-05-03"


def test_requeue_is_for_admins_and_audited(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    assert bob.post("/api/requeue", json={}).status_code == 403
    admin, _ = web.bearer(ADMIN[0])
    bad = admin.post("/api/requeue", json={"states": ["archived"]})
    assert bad.status_code == 422
    done = admin.post("/api/requeue", json={"states": ["failed"]})
    assert done.status_code == 200, done.text
    assert done.json() == {"requeued": {"failed": 1}, "since": None}
    assert web.archive.index.recordings.counts_by_state()["failed"] == 0
    [entry] = web.archive.index.audit.query(audit.AuditFilter(action=audit.REQUEUE))
    assert (entry.actor, entry.detail) == (ADMIN[0], "failed=1")
    # No body: both states (none left of either now).
    both = admin.post("/api/requeue")
    assert both.status_code == 200, both.text
    assert both.json()["requeued"] == {"failed": 0, "missing": 0}
    # A browser session needs the CSRF token, as for every change; the answer says where.
    session = web.login(*ADMIN)
    refused = session.post("/api/requeue", json={})
    assert refused.status_code == 403
    assert refused.json() == {"detail": "missing or wrong CSRF token (header X-CSRF-Token)"}


def test_status_page_reads_for_a_supervisor(web: LiveWeb) -> None:
    a_working_day(web)
    page = web.login(*ADMIN).get("/status")
    assert page.status_code == 200
    html = page.text
    assert text_of(html, "pbx-session") == "logged in, last contact 2 min ago"
    # Times are read as "how long ago" by the app's clock, the exact UTC time on hover.
    [(last_event, words)] = elements(html, "time", id="last-event")
    assert words == "3 min ago"
    assert last_event["datetime"] == "2024-05-11T08:57:00+00:00"
    assert last_event["title"] == "2024-05-11 08:57:00 UTC"
    # Why "calls" exceeds the recordings: the calls that had none.
    assert text_of(html, "calls") == (
        "9 calls: 8 with a recording, 1 without (not answered or not recorded: nothing to archive)"
    )
    assert text_of(html, "workers") == "1 of 2 running"
    attention = text_of(html, "attention")
    assert "Only 1 of 2 download workers is running" in attention
    assert "2 recordings were given up on" in attention
    # serve's processes: the live one with its workers, the backfill that ended.
    rows = [text for _attrs, text in elements(html, "tr", class_="process")]
    assert rows == [
        "serve archiver pbx-archiver 4242 2 h ago just now 1 of 2 running",
        "backfill archiver pbx-archiver 4100 24 h ago 24 h ago — stopped 23 h ago",
    ]
    # Given up on, each with its reason, and what can be done about it.
    failures = [text for _attrs, text in elements(html, "tr", class_="failure")]
    assert len(failures) == 2
    assert "PBX said 20014" in failures[0] and "failed" in failures[0]
    assert "the PBX says the file does not exist" in failures[1] and "missing" in failures[1]
    [(form, _)] = elements(html, "form", action="/status/requeue")
    assert form["method"] == "post"
    assert text_of(html, "requeue") == "Queue these 2 again"
    retrying = [text for _attrs, text in elements(html, "tr", class_="retrying")]
    assert len(retrying) == 1 and "PBX busy (HTTP 503)" in retrying[0] and "due now" in retrying[0]
    # The disk and the index.
    assert re.fullmatch(
        r"[0-9.]+ KiB of recordings; the disk: [0-9.]+ (?:[KMGT]i)?B used of "
        r"[0-9.]+ (?:[KMGT]i)?B, [0-9.]+ (?:[KMGT]i)?B free \([0-9]+ %\)",
        text_of(html, "disk"),
    ), text_of(html, "disk")
    assert text_of(html, "index-health") == "ok (quick check)"


def test_status_page_says_all_is_well_when_it_is(web: LiveWeb) -> None:
    index, now = web.archive.index, web.clock()
    serve = index.processes.register(
        node="archiver", kind="serve", hostname="pbx-archiver", pid=4242, workers=2, now=now
    )
    assert index.processes.heartbeat(serve.id, now=now, workers_alive=2)
    health = {"state": "ok", "last_success_at": now.isoformat(), "updated_at": now.isoformat()}
    index.settings.set(SettingKey.PBX_HEALTH, json.dumps(health), now)
    admin = web.login(*ADMIN)
    assert "1 recording was given up on" in text_of(admin.get("/status").text, "attention")
    csrf = csrf_of(admin.get("/status").text)
    assert admin.post("/status/requeue", data={"csrf": csrf}).status_code == 303
    html = admin.get("/status").text
    assert text_of(html, "attention-title") == "All is well"
    assert text_of(html, "workers") == "2 of 2 running"
    assert text_of(html, "pbx-session") == "logged in, last contact just now"
    assert elements(html, "form", action="/status/requeue") == []


def test_status_page_says_when_serve_is_not_running(web: LiveWeb) -> None:
    index, now = web.archive.index, web.clock()
    serve = index.processes.register(
        node="archiver", kind="serve", hostname="pbx-archiver", pid=4242, workers=2,
        now=now - timedelta(hours=5),
    )  # fmt: skip
    index.processes.stop(serve.id, now=now - timedelta(hours=1))
    html = web.login(*ADMIN).get("/status").text
    assert "serve is not running" in text_of(html, "attention")
    assert text_of(html, "workers") == "none running (serve is not running)"


def test_requeue_from_the_status_page(web: LiveWeb) -> None:
    a_working_day(web)
    index = web.archive.index
    admin = web.login(*ADMIN)
    csrf = csrf_of(admin.get("/status").text)
    # As every change: only with the form's CSRF token, and only for admins.
    assert admin.post("/status/requeue", data={"csrf": "forged"}).status_code == 403
    bob = web.login(*LISTENER_2000)
    bob_csrf = csrf_of(bob.get("/search").text)
    assert bob.post("/status/requeue", data={"csrf": bob_csrf}).status_code == 403
    assert index.recordings.counts_by_state()["failed"] == 1
    assert index.audit.query(audit.AuditFilter(action=audit.REQUEUE)) == []

    done = admin.post("/status/requeue", data={"csrf": csrf})
    assert done.status_code == 303  # back to the page: a reload does not post again
    assert done.headers["location"] == "/status?requeued=2"
    counts = index.recordings.counts_by_state()
    assert (counts["failed"], counts["missing"]) == (0, 0)
    # Audited as the API's requeue is.
    [entry] = index.audit.query(audit.AuditFilter(action=audit.REQUEUE))
    assert (entry.actor, entry.target, entry.detail) == (
        ADMIN[0],
        "recordings",
        "failed=1, missing=1",
    )
    after = admin.get(done.headers["location"]).text
    assert text_of(after, "done") == "2 recordings queued again: serve downloads them now."
    assert elements(after, "form", action="/status/requeue") == []  # nothing left to queue
