"""Retention policies, legal holds, deleting and data-subject requests in the web app, over
real sockets: admins change them (each change audited in their name), auditors read the
policy and the holds, listeners see none of it; page forms need the CSRF token.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from callvault.index import audit
from support.web import (
    ADMIN,
    LISTENER_2000,
    T0,
    LiveWeb,
    audit_entries,
    csrf_of,
    live_web,
    rows_by_from,
    text_of,
)

AUDITOR = ("dora", "dora-password-1")
EVERYTHING_1D = [{"name": "everything", "keep": "1d"}]
POLICY_TOML = """
[[rule]]
name = "inbound"
direction = ["Inbound"]
keep = "1y"

[[rule]]
name = "everything else"
keep = "3d"
"""


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        live.archive.index.users.add(AUDITOR[0], "auditor", AUDITOR[1])
        yield live


def _archived(web: LiveWeb) -> set[int]:
    return {row.id for row in rows_by_from(web.archive).values() if row.state == "archived"}


def test_an_admin_sets_the_policy_through_the_api_and_a_bad_rule_is_refused_in_one_line(
    web: LiveWeb,
) -> None:
    alice, _ = web.bearer(ADMIN[0])
    assert alice.get("/api/retention").json() is None
    put = alice.put("/api/retention", json={"rules": EVERYTHING_1D, "note": "first"})
    assert put.status_code == 200, put.text
    assert put.json()["version"] == 1 and put.json()["created_by"] == "alice"
    current = alice.get("/api/retention").json()
    assert (current["version"], current["note"], current["rules"]) == (1, "first", EVERYTHING_1D)

    bad = alice.put("/api/retention", json={"rules": [{"name": "x", "keep": "soon"}]})
    assert bad.status_code == 422
    assert bad.json()["detail"] == (
        "rule 1 (x): keep 'soon' is not a period: use e.g. 90d, 18m, 7y or forever"
    )
    unknown = alice.put(
        "/api/retention", json={"rules": [{"name": "p", "keep": "1d", "pbx": ["x"]}]}
    )
    assert unknown.status_code == 422 and "no PBX is registered as 'x'" in unknown.json()["detail"]
    assert [p["version"] for p in alice.get("/api/retention/history").json()] == [1]
    [entry] = audit_entries(web, action=audit.RETENTION_SET)
    assert (entry.actor, entry.target) == ("alice", "policy v1")

    # The dry run (the default) lists what would go, and deletes nothing.
    dry = alice.post("/api/retention/run")
    assert dry.status_code == 200, dry.text
    report = dry.json()
    assert report["dry_run"] is True and report["policy_version"] == 1
    assert {item["id"] for item in report["recordings"]} == _archived(web)
    assert report["deleted"] == len(_archived(web)) == 4
    assert report["summary"].startswith("retention (policy v1) would delete 4 of 4")


def test_the_retention_page_previews_and_saves_rules_and_shows_errors_in_one_line(
    web: LiveWeb,
) -> None:
    alice = web.login(*ADMIN)
    page = alice.get("/admin/retention")
    assert page.status_code == 200
    assert text_of(page.text, "in-force") == "No retention policy is set: every recording is kept."
    form = {"csrf": csrf_of(page.text), "rules": POLICY_TOML, "note": "review"}

    preview = alice.post("/admin/retention", data={**form, "action": "preview"})
    assert preview.status_code == 200, preview.text
    # Day 10: the inbound call is kept a year, the three other archived ones go.
    assert text_of(preview.text, "preview-summary").startswith(
        "these rules (v1 once saved) would delete 3 of 4 recordings (3 by everything else)"
    )
    assert web.archive.index.retention.current() is None  # a preview saves nothing

    bad = alice.post(
        "/admin/retention", data={**form, "rules": POLICY_TOML + "oops", "action": "save"}
    )
    assert bad.status_code == 422
    [error] = [line for line in bad.text.splitlines() if 'class="error"' in line]
    assert "the rules: neither TOML nor JSON" in error

    saved = alice.post("/admin/retention", data={**form, "action": "save"})
    assert saved.status_code == 303 and saved.headers["location"] == "/admin/retention?saved=1"
    shown = alice.get("/admin/retention?saved=1").text
    assert "Version 1 of the policy is in force." in shown
    rules = text_of(shown, "rules")
    assert (
        rules
        == "# Rule Conditions Keep 1 inbound direction inbound 1y 2 everything else any call 3d"
    )
    [entry] = audit_entries(web, action=audit.RETENTION_SET)
    assert (entry.actor, entry.remote_addr) == ("alice", "127.0.0.1")


def test_an_auditor_reads_policies_and_holds_but_changes_nothing(web: LiveWeb) -> None:
    alice, _ = web.bearer(ADMIN[0])
    alice.put("/api/retention", json={"rules": EVERYTHING_1D})
    row = rows_by_from(web.archive)["2001"]
    hold = alice.post(
        "/api/holds", json={"case": "Smith", "reason": "claim", "recording_ids": [row.id]}
    ).json()
    dora, _ = web.bearer(AUDITOR[0])
    for path in ("/api/retention", "/api/retention/history", "/api/holds", "/api/holds?all=true"):
        assert dora.get(path).status_code == 200, path
    detail = dora.get(f"/api/holds/{hold['id']}").json()
    assert detail["recording_ids"] == [row.id] and detail["items"][0]["call_from"] == "2001"
    refused = [
        dora.put("/api/retention", json={"rules": EVERYTHING_1D}),
        dora.post("/api/retention/run"),
        dora.post("/api/holds", json={"case": "c", "reason": "r", "recording_ids": [row.id]}),
        dora.post(f"/api/holds/{hold['id']}/release", json={"reason": "done"}),
        dora.post("/api/recordings/delete", json={"ids": [row.id], "reason": "r"}),
        dora.post("/api/subjects/find", json={"number": "0612345678"}),
        dora.post("/api/subjects/erase", json={"number": "0612345678", "reason": "r"}),
    ]
    assert [answer.status_code for answer in refused] == [403] * len(refused)
    page = web.login(*AUDITOR)
    shown = page.get("/admin/retention")
    assert shown.status_code == 200 and 'id="editor"' not in shown.text
    holds = page.get("/admin/holds")
    assert "Smith" in holds.text and 'id="place"' not in holds.text
    assert 'id="release"' not in page.get(f"/admin/holds/{hold['id']}").text
    assert page.get("/admin/subjects").status_code == 403


def test_a_listener_sees_none_of_it(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    answers = [
        bob.get("/api/retention"),
        bob.get("/api/retention/history"),
        bob.put("/api/retention", json={"rules": EVERYTHING_1D}),
        bob.post("/api/retention/run"),
        bob.get("/api/holds"),
        bob.get("/api/holds/1"),
        bob.post("/api/holds", json={"case": "c", "reason": "r", "recording_ids": [1]}),
        bob.post("/api/holds/1/release", json={"reason": "r"}),
        bob.post("/api/recordings/delete", json={"ids": [1], "reason": "r"}),
        bob.post("/api/subjects/find", json={"number": "0612345678"}),
        bob.post("/api/subjects/erase", json={"number": "0612345678", "reason": "r"}),
        bob.post("/api/subjects/export", json={"number": "0612345678"}),
    ]
    assert [answer.status_code for answer in answers] == [403] * len(answers)
    page = web.login(*LISTENER_2000)
    for path in ("/admin/retention", "/admin/holds", "/admin/holds/1", "/admin/subjects"):
        assert page.get(path).status_code == 403, path
    menu = page.get("/search").text.split('<nav aria-label="Pages">', 1)[1].split("</nav>")[0]
    assert "Retention" not in menu and "Holds" not in menu and "Data subjects" not in menu


def test_a_hold_placed_by_a_search_keeps_exactly_its_recordings_through_a_retention_run(
    web: LiveWeb,
) -> None:
    alice, _ = web.bearer(ADMIN[0])
    matching = {item["id"] for item in alice.get("/api/recordings?number=1000").json()["items"]}
    assert len(matching) == 2
    placed = alice.post(
        "/api/holds", json={"case": "Smith v Acme", "reason": "claim", "number": "1000"}
    )
    assert placed.status_code == 201, placed.text
    hold = placed.json()
    assert hold["selection"] == "number 1000" and hold["recordings"] == len(matching)
    assert set(alice.get(f"/api/holds/{hold['id']}").json()["recording_ids"]) == matching

    alice.put("/api/retention", json={"rules": EVERYTHING_1D})
    run = alice.post("/api/retention/run?dry_run=false").json()
    assert run["dry_run"] is False
    held_archived = matching & _archived(web)
    assert run["held"] == len(held_archived) == 2
    assert _archived(web) == held_archived  # the others are gone
    [entry] = audit_entries(web, action=audit.HOLD_ADD)
    assert (entry.actor, entry.target, entry.remote_addr) == ("alice", "Smith v Acme", "127.0.0.1")

    # Nothing to hold, or no reason: refused, saying so.
    nothing = alice.post("/api/holds", json={"case": "c", "reason": "r"})
    assert nothing.status_code == 422 and nothing.json()["detail"].startswith("choose what")
    empty = alice.post("/api/holds", json={"case": "c", "reason": "r", "number": "55555"})
    assert empty.json()["detail"] == "nothing to hold: the selection matches no recording"

    # Released with a reason: the next run deletes them.
    assert alice.post(f"/api/holds/{hold['id']}/release", json={"reason": ""}).status_code == 422
    released = alice.post(f"/api/holds/{hold['id']}/release", json={"reason": "settled"})
    assert released.status_code == 200, released.text
    assert (released.json()["released_by"], released.json()["release_reason"]) == (
        "alice",
        "settled",
    )
    again = alice.post(f"/api/holds/{hold['id']}/release", json={"reason": "settled"})
    assert again.status_code == 409
    assert alice.post("/api/holds/999/release", json={"reason": "x"}).status_code == 404
    assert alice.get("/api/holds").json() == []
    assert [h["id"] for h in alice.get("/api/holds?all=true").json()] == [hold["id"]]
    [entry] = audit_entries(web, action=audit.HOLD_RELEASE)
    assert entry.actor == "alice"
    alice.post("/api/retention/run?dry_run=false")
    assert _archived(web) == set()


def test_subject_requests_find_export_and_erase_keeping_what_is_held(web: LiveWeb) -> None:
    web.archive.add(start=T0 + timedelta(hours=5), call_from="1004", call_to="+33612345678")
    rows = rows_by_from(web.archive)
    held, free = rows["0612345678"].id, rows["1001"]
    other = rows["1004"].id
    alice, _ = web.bearer(ADMIN[0])
    hold = alice.post(
        "/api/holds", json={"case": "Smith", "reason": "claim", "recording_ids": [held]}
    ).json()

    found = alice.post("/api/subjects/find", json={"number": "0612345678"})
    assert found.status_code == 200, found.text
    calls = {c["recording_id"]: c for c in found.json()["calls"]}
    assert set(calls) == {held, other}
    assert calls[held]["holds"] == [f"hold {hold['id']} (Smith)"] and calls[other]["holds"] == []
    assert alice.post("/api/subjects/find", json={"number": "abc"}).status_code == 422

    export = alice.post("/api/subjects/export", json={"number": "0612345678"})
    assert export.status_code == 200 and export.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(export.content)).namelist()
    assert sum(name.startswith("recordings/") for name in names) == 2

    erased = alice.post(
        "/api/subjects/erase", json={"number": "0612345678", "reason": "request 42"}
    )
    assert erased.status_code == 200, erased.text
    result = erased.json()
    assert result["deleted"] == [other]
    assert result["kept"] == [{"id": held, "reason": f"kept by hold {hold['id']} (Smith)"}]
    assert web.archive.index.recordings.by_id(other).state == "deleted"  # type: ignore[union-attr]
    assert web.archive.index.recordings.by_id(held).state == "archived"  # type: ignore[union-attr]
    requests = audit_entries(web, action=audit.SUBJECT_REQUEST)
    assert {e.actor for e in requests} == {"alice"} and all(
        "0612345678" not in e.target for e in requests
    )
    assert any("erase: 1 recordings deleted, 1 kept" in e.detail for e in requests)

    # An admin's delete: the held one is refused, naming its hold.
    deleted = alice.post(
        "/api/recordings/delete", json={"ids": [held, free.id], "reason": "duplicate"}
    ).json()
    assert deleted["deleted"] == [free.id]
    assert deleted["refused"] == [{"id": held, "reason": f"kept by hold {hold['id']} (Smith)"}]
    assert {e.actor for e in audit_entries(web, action=audit.DELETE)} == {"alice"}


def test_the_holds_and_subject_pages_place_release_and_erase_with_confirmation(
    web: LiveWeb,
) -> None:
    alice = web.login(*ADMIN)
    csrf = csrf_of(alice.get("/admin/holds").text)
    placed = alice.post(
        "/admin/holds",
        data={"csrf": csrf, "case": "Jones", "reason": "claim", "ids": "", "number": "2001"},
    )
    assert placed.status_code == 303, placed.text
    page = alice.get(placed.headers["location"])
    assert "The hold is placed." in page.text and "2001" in text_of(page.text, "held")
    hold_id = int(placed.headers["location"].split("/")[3].split("?")[0])
    refused = alice.post("/admin/holds", data={"csrf": csrf, "case": "x", "reason": "y"})
    assert refused.status_code == 422 and "choose what to hold" in refused.text
    no_reason = alice.post(f"/admin/holds/{hold_id}/release", data={"csrf": csrf, "reason": ""})
    assert no_reason.status_code == 422
    released = alice.post(f"/admin/holds/{hold_id}/release", data={"csrf": csrf, "reason": "ok"})
    assert released.status_code == 303
    assert "released" in text_of(alice.get(f"/admin/holds/{hold_id}").text, "hold")

    form = {"csrf": csrf, "number": "0612345678", "reason": "request 7"}
    found = alice.post("/admin/subjects", data={**form, "action": "find"})
    assert found.status_code == 200 and "0612345678" in text_of(found.text, "calls")
    asked = alice.post("/admin/subjects", data={**form, "action": "erase"})
    assert asked.status_code == 200 and 'id="confirm"' in asked.text
    assert rows_by_from(web.archive)["0612345678"].state == "archived"  # not before confirming
    done = alice.post("/admin/subjects", data={**form, "action": "confirm"})
    assert done.status_code == 200 and "Erased 1 recording;" in text_of(done.text, "erased")
    export = alice.post("/admin/subjects", data={**form, "action": "export"})
    assert export.status_code == 200 and export.headers["content-type"] == "application/zip"


def test_page_forms_and_cookie_writes_need_the_csrf_token(web: LiveWeb) -> None:
    alice = web.login(*ADMIN)
    forms = [
        ("/admin/retention", {"rules": POLICY_TOML, "action": "save"}),
        ("/admin/holds", {"case": "c", "reason": "r", "number": "1000"}),
        ("/admin/holds/1/release", {"reason": "r"}),
        ("/admin/subjects", {"number": "0612345678", "action": "find"}),
    ]
    for path, data in forms:
        for token in ({}, {"csrf": "forged"}):
            answer = alice.post(path, data={**data, **token})
            assert answer.status_code == 403, path
    api: list[httpx.Response] = [
        alice.put("/api/retention", json={"rules": EVERYTHING_1D}),
        alice.post("/api/holds", json={"case": "c", "reason": "r", "number": "1000"}),
        alice.post("/api/subjects/find", json={"number": "0612345678"}),
    ]
    assert [answer.status_code for answer in api] == [403] * len(api)
    assert web.archive.index.retention.current() is None
    assert web.archive.index.retention.holds() == []
    assert audit_entries(web, action=audit.SUBJECT_REQUEST) == []
