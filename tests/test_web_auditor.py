"""The auditor role and the audit log's verification in the web app, over real sockets.

An auditor reads, exports and verifies the audit log and may keep the signing key, but
hears no recording (403, saying why) unless also a listener; the pages show them only what
they may use, and they start on the audit log. Anyone may verify the chain from the audit
page or `POST /api/audit/verify`: a row changed in the database is named by its seq.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from callvault.index import audit
from callvault.index.schema import audit_log
from callvault.keys import Keyring, MasterKey
from callvault.ops import parse_public_key, rotate_signing_key, signer
from support.web import (
    ADMIN,
    LISTENER_2000,
    LiveWeb,
    audit_entries,
    csrf_of,
    elements,
    live_web,
    login,
    rows_by_from,
    text_of,
)

KEYRING = Keyring((MasterKey.generate(),), "test")
AUDITOR = ("dora", "dora-password-1")
AUDITOR_LISTENER = ("eric", "eric-password-1")  # also a listener, scope 2000-2099


@pytest.fixture()
def web(tmp_path: Path) -> Iterator[LiveWeb]:
    with live_web(tmp_path / "archive") as live:
        index = live.archive.index
        index.users.add(AUDITOR[0], "auditor", AUDITOR[1])
        index.users.add(AUDITOR_LISTENER[0], "listener,auditor", AUDITOR_LISTENER[1], "2000-2099")
        yield live


def _nav(page: str) -> list[str]:
    """The pages the menu offers."""
    menu = page.split('<nav aria-label="Pages">', 1)[1].split("</nav>", 1)[0]
    return [text for _attrs, text in elements(menu, "a")]


def test_an_auditor_reads_and_verifies_the_audit_log_but_hears_no_recording(
    web: LiveWeb,
) -> None:
    dora, _ = web.bearer(AUDITOR[0])
    assert dora.get("/api/me").json()["role"] == "auditor"
    assert dora.get("/api/audit").status_code == 200
    assert dora.get("/api/audit.csv").status_code == 200
    checked = dora.post("/api/audit/verify")
    assert checked.status_code == 200, checked.text
    assert checked.json()["ok"] is True and checked.json()["problems"] == []
    assert checked.json()["summary"].startswith("the audit chain is intact")
    last = dora.get("/api/audit/verification").json()
    assert (last["by"], last["ok"]) == ("dora", True)

    row = rows_by_from(web.archive)["2001"]
    refused = {
        "search": dora.get("/api/recordings"),
        "recording": dora.get(f"/api/recordings/{row.id}"),
        "audio": dora.get(f"/api/recordings/{row.id}/audio"),
        "download": dora.get(f"/api/recordings/{row.id}/download"),
        "export": dora.get("/api/export"),
        "verify": dora.post(f"/api/recordings/{row.id}/verify"),
    }
    for what, answer in refused.items():
        assert answer.status_code == 403, what
        assert answer.json()["detail"] == (
            "your role (auditor) may not search, play or download recordings: "
            "that needs the listener role"
        ), what
    # Admins' things stay theirs.
    for path in ("/api/users", "/api/tokens", "/api/status", "/api/pbxs", "/api/stats"):
        assert dora.get(path).status_code == 403, path
    actions = {e.action for e in audit_entries(web, actor="dora")}
    assert actions == {audit.AUDIT_EXPORT, audit.AUDIT_VERIFY}  # no play, download, export


def test_an_auditor_who_is_a_listener_may_also_play_within_their_scope(web: LiveWeb) -> None:
    eric, _ = web.bearer(AUDITOR_LISTENER[0])
    rows = rows_by_from(web.archive)
    played = eric.get(f"/api/recordings/{rows['2001'].id}/audio")
    assert played.status_code == 200 and played.content == web.archive.audio[rows["2001"].id]
    assert eric.get(f"/api/recordings/{rows['2001'].id}/download").status_code == 200
    assert eric.get(f"/api/recordings/{rows['1001'].id}/audio").status_code == 404  # scope
    assert [i["call_from"] for i in eric.get("/api/recordings").json()["items"]] == ["2001"]
    assert eric.get("/api/audit").status_code == 200
    assert eric.post("/api/audit/verify").json()["ok"] is True
    assert eric.get("/api/users").status_code == 403


def test_a_listener_may_not_read_or_verify_the_audit_log(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    for answer in (
        bob.get("/api/audit"),
        bob.get("/api/audit.csv"),
        bob.post("/api/audit/verify"),
        bob.get("/api/audit/verification"),
    ):
        assert answer.status_code == 403
        assert answer.json()["detail"] == "the audit log is for auditors and admins"
    assert bob.get("/api/keys").status_code == 200  # the public key is for everyone
    bob_page = web.login(*LISTENER_2000)
    assert bob_page.get("/admin/audit").status_code == 403
    assert "Audit log" not in _nav(bob_page.get("/search").text)


def test_an_auditor_starts_on_the_audit_log_and_sees_only_what_they_may_use(
    web: LiveWeb,
) -> None:
    client = web.client()
    landed = login(client, *AUDITOR)
    assert landed.status_code == 303 and landed.headers["location"] == "/admin/audit"
    assert client.get("/").headers["location"] == "/admin/audit"
    page = client.get("/admin/audit")
    assert page.status_code == 200
    assert _nav(page.text) == ["Audit log", "Retention", "Holds"]
    assert [a["href"] for a, _ in elements(page.text, "a", class_="brand")] == ["/admin/audit"]
    row = rows_by_from(web.archive)["2001"]
    for path in ("/search", f"/recordings/{row.id}", "/admin", "/status"):
        refused = client.get(path)
        assert refused.status_code == 403, path
        assert "Back to the audit log" in refused.text
    assert "may not search, play or download recordings" in client.get("/search").text
    # A listener and auditor starts on the search, and has both in the menu.
    both = web.client()
    assert login(both, *AUDITOR_LISTENER).headers["location"] == "/search"
    assert _nav(both.get("/search").text) == ["Search", "Audit log", "Retention", "Holds"]
    # An admin has everything.
    admin = web.login(*ADMIN)
    assert _nav(admin.get("/search").text) == [
        "Search",
        "Status",
        "Users & tokens",
        "PBXs",
        "Audit log",
        "Retention",
        "Holds",
        "Data subjects",
    ]


def test_the_audit_page_verifies_the_chain_and_says_when_it_was_last_verified(
    web: LiveWeb,
) -> None:
    dora = web.login(*AUDITOR)
    page = dora.get("/admin/audit")
    assert text_of(page.text, "chain-heading") == "Not verified yet"
    csrf = csrf_of(page.text)
    assert dora.post("/admin/audit/verify", data={"csrf": "wrong"}).status_code == 403
    assert dora.post("/api/audit/verify").status_code == 403  # a cookie needs X-CSRF-Token
    assert audit_entries(web, action=audit.AUDIT_VERIFY) == []

    checked = dora.post("/admin/audit/verify", data={"csrf": csrf})
    assert checked.status_code == 200
    assert text_of(checked.text, "chain-heading") == "Last verification: intact"
    said = text_of(checked.text, "last-verified")
    assert said.startswith("Verified ") and " by you: the audit chain is intact: " in said
    assert elements(checked.text, id="problems") == []
    [entry] = audit_entries(web, action=audit.AUDIT_VERIFY)
    assert (entry.actor, entry.remote_addr) == ("dora", "127.0.0.1")

    web.clock.advance(timedelta(hours=3))
    later = web.login(*ADMIN).get("/admin/audit")
    said = text_of(later.text, "last-verified")
    assert said.startswith("Verified 3 h") and " by dora: the audit chain is intact: " in said
    [(section, _)] = elements(later.text, "section", id="chain")
    assert section["class"] == "attention well"
    # With a session cookie, the API takes the CSRF token as a header.
    token = dora.get("/api/me").json()["csrf_token"]
    assert dora.post("/api/audit/verify", headers={"X-CSRF-Token": token}).json()["ok"] is True


def test_an_entry_changed_in_the_database_is_named_by_verification(web: LiveWeb) -> None:
    index = web.archive.index
    admin, _ = web.bearer(ADMIN[0])
    entries = index.audit.query(limit=1000)
    assert len(entries) >= 3
    with index.engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(actor="mallory"))
    checked = admin.post("/api/audit/verify")
    assert checked.status_code == 200
    report = checked.json()
    assert report["ok"] is False
    first = report["problems"][0]
    assert (first["kind"], first["seq"]) == ("altered", 2)
    assert "entry 2 " in first["message"] and "entry 2 " in report["summary"]
    last = admin.get("/api/audit/verification").json()
    assert (last["ok"], last["by"]) == (False, "alice")

    dora = web.login(*AUDITOR)
    page = dora.get("/admin/audit")
    [(section, _)] = elements(page.text, "section", id="chain")
    assert section["class"] == "attention needs"  # red
    assert text_of(page.text, "chain-heading") == "Last verification: the chain is broken"
    assert "by alice: the audit chain is broken: entry 2 " in text_of(page.text, "last-verified")
    checked_page = dora.post("/admin/audit/verify", data={"csrf": csrf_of(page.text)})
    problems = [text for _attrs, text in elements(checked_page.text, "li")]
    assert problems and problems[0].startswith("entry 2 (")
    assert [(a["role"]) for a, _ in elements(checked_page.text, id="last-verified")] == ["alert"]


def test_the_signing_key_is_listed_and_downloadable_by_any_user(web: LiveWeb) -> None:
    index = web.archive.index
    bob, _ = web.bearer(LISTENER_2000[0])
    assert bob.get("/api/keys").json() == []
    none = bob.get("/api/keys/signing.pem")
    assert none.status_code == 404
    assert none.json()["detail"].startswith("there is no signing key yet")
    dora = web.login(*AUDITOR)
    assert text_of(dora.get("/admin/audit").text, "signing-key").startswith("No signing key yet")

    key = signer(index, KEYRING, now=web.clock())
    pem = bob.get("/api/keys/signing.pem")
    assert pem.status_code == 200
    assert pem.headers["content-type"] == "application/x-pem-file"
    assert pem.headers["content-disposition"].startswith(
        f'attachment; filename="callvault-signing-key-{key.id}.pem"'
    )
    assert pem.text == key.public.pem()
    assert parse_public_key(pem.text, where="download").fingerprint == key.public.fingerprint
    [listed] = bob.get("/api/keys").json()
    assert (listed["id"], listed["fingerprint"], listed["active"]) == (
        key.id,
        key.public.fingerprint,
        True,
    )
    assert listed["pem"] == key.public.pem() and listed["retired_at"] is None
    said = text_of(dora.get("/admin/audit").text, "signing-key")
    assert key.id in said and key.public.fingerprint in said
    [(link, _)] = elements(dora.get("/admin/audit").text, "a", href="/api/keys/signing.pem")
    assert "download" in link

    web.clock.advance(timedelta(days=1))
    newer = rotate_signing_key(index, KEYRING, now=web.clock(), actor="cli:root")
    assert bob.get("/api/keys/signing.pem").text == newer.public.pem()
    listed_now = bob.get("/api/keys").json()
    assert [(k["id"], k["active"]) for k in listed_now] == [(newer.id, True), (key.id, False)]
    assert listed_now[1]["retired_at"] is not None
    assert web.client().get("/api/keys/signing.pem").status_code == 401  # logged in only
