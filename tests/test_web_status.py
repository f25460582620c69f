"""The archive's status for admins, over real sockets: the API's report and the status
page, and queueing failed recordings again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from callvault.index import SettingKey, audit
from support.web import (
    ADMIN,
    LISTENER_2000,
    LiveWeb,
    live_web,
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
    assert '<td class="count-archived">4</td>' in page
    assert '<th>2024-05-03</th><td><progress max="4" value="4"></progress></td>' in page


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
    # A browser session needs the CSRF token, as for every change.
    session = web.login(*ADMIN)
    assert session.post("/api/requeue", json={}).status_code == 403
