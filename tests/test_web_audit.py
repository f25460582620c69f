"""The audit log over real sockets: plays, downloads and exports are in it, its CSV cells
cannot run as formulas, exporting it is itself audited, and another site cannot make a
browser export it. The audit page filters by date with date pickers, and a date it cannot
read refuses the filter, naming the field as labelled, instead of showing an empty log.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from callvault.index import audit
from support.web import (
    ADMIN,
    LISTENER_2000,
    SPREADSHEET_FORMULAS,
    LiveWeb,
    audit_entries,
    csrf_of,
    elements,
    fetch_site,
    live_web,
    rows_by_from,
    text_of,
)


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        yield live


def test_play_download_export_are_audited(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    row = rows_by_from(web.archive)["2001"]
    web.clock.advance(timedelta(minutes=5))
    started = web.clock().isoformat()
    bob.get(f"/api/recordings/{row.id}/audio", headers={"Range": "bytes=0-"})
    bob.get(f"/api/recordings/{row.id}/audio", headers={"Range": "bytes=500-"})  # a seek
    bob.get(f"/api/recordings/{row.id}/download")
    bob.get("/api/export", params={"extension": "2001"})
    admin, _ = web.bearer(ADMIN[0])
    entries = admin.get(
        "/api/audit", params={"actor": "bob", "since": started, "limit": 1000}
    ).json()["items"]
    plays = [e for e in entries if e["action"] == "play" and e["target"] == row.name]
    downloads = [e for e in entries if e["action"] == "download" and e["target"] == row.name]
    exports = [e for e in entries if e["action"] == "export"]
    assert len(plays) == 1  # the seek is part of the same play
    assert len(downloads) >= 1 and downloads[0]["remote_addr"] == "127.0.0.1"
    assert exports and "extension=2001" in exports[0]["detail"]
    csv_text = admin.get("/api/audit.csv", params={"actor": "bob", "action": "download"}).text
    lines = list(csv.reader(io.StringIO(csv_text)))
    assert lines[0] == list(audit.CSV_HEADER)
    assert all(line[2] == "bob" and line[3] == "download" for line in lines[1:]) and len(lines) > 1


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
    for text in SPREADSHEET_FORMULAS:
        index.audit.record(text, text, text, text, text, at=web.clock())

    admin = web.login(*ADMIN)
    answer = admin.get("/api/audit.csv")
    assert answer.status_code == 200
    lines = list(csv.reader(io.StringIO(answer.text, newline="")))
    assert lines[0] == list(audit.CSV_HEADER)
    cells = [cell for line in lines[1:] for cell in line[2:]]  # every text column
    assert "'" + typed in cells
    for text in SPREADSHEET_FORMULAS:
        assert cells.count("'" + text) == 5, text  # actor, action, target, detail, address
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


def test_exporting_the_audit_log_is_audited(web: LiveWeb) -> None:
    admin, _ = web.bearer(ADMIN[0])
    answer = admin.get("/api/audit.csv", params={"actor": "bob", "since": "2024-05-01"})
    assert answer.status_code == 200
    exports = audit_entries(web, action=audit.AUDIT_EXPORT)
    assert [(e.actor, e.target, e.remote_addr) for e in exports] == [
        ("alice", "audit.csv", "127.0.0.1")
    ]
    assert "actor=bob" in exports[0].detail and "since=2024-05-01" in exports[0].detail
    # The audit page offers it as a filter like every other action.
    page = web.login(*ADMIN).get("/admin/audit", params={"action": audit.AUDIT_EXPORT})
    assert page.status_code == 200
    assert f"<option selected>{audit.AUDIT_EXPORT}</option>" in page.text


def test_cross_site_audit_csv_with_a_cookie_is_refused(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    assert admin.get("/api/audit.csv", headers=fetch_site("cross-site")).status_code == 403
    assert audit_entries(web, action=audit.AUDIT_EXPORT) == []
    assert admin.get("/api/audit.csv", headers=fetch_site("same-origin")).status_code == 200


def test_audit_page_filters_by_date_and_refuses_what_it_cannot_read(web: LiveWeb) -> None:
    web.login(*LISTENER_2000)  # on 2024-05-11
    web.clock.advance(timedelta(days=1))
    admin = web.login(*ADMIN)  # on the next day
    page = admin.get("/admin/audit", params={"since": "2024-05-12", "action": audit.LOGIN})
    assert page.status_code == 200
    [(since, _)] = elements(page.text, "input", name="since")
    assert (since["type"], since["value"]) == ("date", "2024-05-12")
    assert [(e[0]["for"], e[1]) for e in elements(page.text, "label", for_="since")] == [
        ("since", "From")
    ]
    who = [text for _attrs, text in elements(page.text, "td", **{"data-label": "Who"})]
    assert who == ["alice"]

    refused = admin.get("/admin/audit", params={"since": "2024-05-12", "until": "tomorrow"})
    assert refused.status_code == 422
    assert text_of(refused.text, "audit-error") == (
        "This filter was refused: To: 'tomorrow' is not a time: "
        "use YYYY-MM-DD or YYYY-MM-DD hh:mm[:ss]"
    )
    assert elements(refused.text, "table") == [] and elements(refused.text, id="summary") == []
    assert elements(refused.text, "a", id="audit-csv") == []
    [(until, _)] = elements(refused.text, "input", name="until")
    assert (until["type"], until["value"], until["aria-invalid"]) == ("text", "tomorrow", "true")


def test_the_audit_page_leaves_out_callvaults_own_entries_unless_asked(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    # The standard archive's recordings were archived: one `archive` entry each.
    archived = web.archive.index.audit.count(audit.AuditFilter(action=audit.ARCHIVE))
    assert archived == len(web.archive.audio) > 0
    cell = '<td data-label="Action">archive</td>'
    people = admin.get("/admin/audit")
    assert people.status_code == 200 and cell not in people.text
    everything = admin.get("/admin/audit", params={"own": "1"})
    assert everything.text.count(cell) == archived
    only = admin.get("/admin/audit", params={"action": audit.ARCHIVE})
    assert only.text.count(cell) == archived
