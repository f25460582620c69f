"""Search and recordings over real sockets: the API's filters and paging, a listener's
scope, one recording's fields and its verification (a damaged or missing file is reported,
a pending one is not archived), and odd numbers in the page's query refused, never a 500.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from callvault.index import SearchFilters, audit
from support.web import (
    ADMIN,
    LISTENER_1000,
    LISTENER_2000,
    LiveWeb,
    live_web,
    rows_by_from,
)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveWeb]:
    """One archive for the tests that only read it."""
    with live_web(tmp_path_factory.mktemp("web_search")) as live:
        yield live


def _froms(payload: dict[str, object]) -> list[str]:
    items = payload["items"]
    assert isinstance(items, list)
    return [item["call_from"] for item in items]


def test_search_all_newest_first_and_paged(web: LiveWeb) -> None:
    client, _ = web.bearer(ADMIN[0])
    body = client.get("/api/recordings").json()
    assert body["total"] == 6
    starts = [item["start_at"] for item in body["items"]]
    assert starts == sorted(starts, reverse=True)
    assert _froms(body) == ["1002", "1003", "2001", "1000", "0612345678", "1001"]
    page = client.get("/api/recordings", params={"limit": 2, "offset": 2}).json()
    assert page["total"] == 6 and _froms(page) == ["2001", "1000"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"number": "5550"}, ["0612345678"]),  # part of the DID
        ({"number": "99887"}, ["1000"]),  # part of the callee
        ({"number": "061234"}, ["0612345678"]),  # part of the caller
        ({"extension": "1000"}, ["1000", "0612345678"]),
        ({"extension": "100"}, []),  # exact, not partial
        ({"direction": "Inbound"}, ["0612345678"]),
        ({"status": "NO ANSWER"}, ["1002"]),
        ({"min_talk_s": 45}, ["2001", "0612345678"]),
        ({"state": "failed"}, ["1003"]),
        ({"state": "pending"}, ["1002"]),
        ({"since": "2024-05-02", "until": "2024-05-02"}, ["0612345678"]),
        ({"since": "2024-05-03T11:30:00Z"}, ["1002", "1003", "2001"]),
        ({"until": "2024-05-02T10:00:00+00:00"}, ["1001"]),
        ({"number": "%"}, []),  # LIKE wildcards are literal
    ],
)
def test_search_filters(web: LiveWeb, params: dict[str, object], expected: list[str]) -> None:
    client, _ = web.bearer(ADMIN[0])
    response = client.get("/api/recordings", params=params)
    assert response.status_code == 200, response.text
    assert _froms(response.json()) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"since": "yesterday"},
        {"state": "lost"},
        {"min_talk_s": -1},
        {"limit": 0},
        {"number": "a\x01"},
    ],
)
def test_bad_filters_are_422(web: LiveWeb, params: dict[str, object]) -> None:
    client, _ = web.bearer(ADMIN[0])
    assert client.get("/api/recordings", params=params).status_code == 422


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


def test_listener_sees_only_their_scope(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    body = bob.get("/api/recordings").json()
    assert _froms(body) == ["2001"] and body["total"] == 1
    assert bob.get("/api/recordings", params={"number": "1001"}).json()["total"] == 0
    rows = rows_by_from(web.archive)
    hidden = rows["1001"].id
    for path in ("", "/audio", "/download"):
        assert bob.get(f"/api/recordings/{hidden}{path}").status_code == 404
    assert bob.post(f"/api/recordings/{hidden}/verify").status_code == 404
    visible = rows["2001"].id
    assert bob.get(f"/api/recordings/{visible}/audio").content == web.archive.audio[visible]
    # The export only ever holds in-scope recordings.
    exported = zipfile.ZipFile(io.BytesIO(bob.get("/api/export").content))
    manifest = list(csv.DictReader(io.StringIO(exported.read("manifest.csv").decode())))
    assert [int(m["recording_id"]) for m in manifest] == [visible]

    carol, _ = web.bearer(LISTENER_1000[0])
    # 0612345678 -> 1000 is in scope through its callee; 2001 -> 2002 is not.
    froms = _froms(carol.get("/api/recordings").json())
    assert "0612345678" in froms and "2001" not in froms
    assert carol.get(f"/api/recordings/{visible}").status_code == 404


def test_recording_metadata_and_integrity(web: LiveWeb) -> None:
    client, _ = web.bearer(ADMIN[0])
    row = rows_by_from(web.archive)["2001"]
    body = client.get(f"/api/recordings/{row.id}").json()
    data = web.archive.audio[row.id]
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["size"] == len(data)
    assert body["state"] == "archived"
    assert body["audio_url"] == f"/api/recordings/{row.id}/audio"
    verified = client.post(f"/api/recordings/{row.id}/verify").json()
    assert verified["ok"] is True and verified["actual_sha256"] == body["sha256"]
    assert client.get(f"/api/recordings/{row.id}").json()["verified_at"] is not None


def test_verifying_a_pending_recording_says_not_archived(tmp_path: Path) -> None:
    # A pending recording's storage key names where its file will go, not a file.
    with live_web(tmp_path) as web:
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


def test_damaged_and_missing_files_are_reported_not_hidden(tmp_path: Path) -> None:
    with live_web(tmp_path) as web:
        rows = rows_by_from(web.archive)
        damaged, missing = rows["1001"], rows["2001"]
        storage = web.archive.storage
        assert damaged.storage_key is not None and missing.storage_key is not None
        path = storage.local_path(damaged.storage_key)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        storage.local_path(missing.storage_key).unlink()
        admin, _ = web.bearer(ADMIN[0])

        check = admin.post(f"/api/recordings/{damaged.id}/verify").json()
        assert check["ok"] is False
        assert check["actual_sha256"] == hashlib.sha256(bytes(data)).hexdigest()
        assert check["expected_sha256"] == damaged.sha256
        gone = admin.post(f"/api/recordings/{missing.id}/verify").json()
        assert gone["ok"] is False
        assert gone["error"] == "the archived file is missing from storage"
        assert admin.get(f"/api/recordings/{missing.id}/audio").status_code == 404

        exported = zipfile.ZipFile(io.BytesIO(admin.get("/api/export").content))
        manifest = {
            int(m["recording_id"]): m
            for m in csv.DictReader(io.StringIO(exported.read("manifest.csv").decode()))
        }
        assert manifest[damaged.id]["matches_index"] == "no"
        assert manifest[damaged.id]["sha256"] == check["actual_sha256"]
        assert manifest[missing.id]["file"] == "" and manifest[missing.id]["matches_index"] == "no"
        assert manifest[rows["1000"].id]["matches_index"] == "yes"
        verify_entries = web.archive.index.audit.query(audit.AuditFilter(action=audit.VERIFY))
        assert {e.detail for e in verify_entries} == {
            "the file's bytes differ from the archived checksum",
            "the archived file is missing from storage",
        }
