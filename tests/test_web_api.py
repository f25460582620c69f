"""The JSON API over real sockets: filters, Range, export, scopes, roles, tokens, audit."""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from callvault.index import SettingKey, audit
from web_fixtures import ADMIN, LISTENER_1000, LISTENER_2000, LiveWeb, live_web, rows_by_from


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveWeb]:
    with live_web(tmp_path_factory.mktemp("web_api")) as live:
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


def test_audio_whole_file_and_ranges(web: LiveWeb) -> None:
    client, _ = web.bearer(ADMIN[0])
    row = rows_by_from(web.archive)["1001"]
    data = web.archive.audio[row.id]
    url = f"/api/recordings/{row.id}/audio"

    whole = client.get(url)
    assert whole.status_code == 200
    assert whole.content == data
    assert whole.headers["content-type"] == "audio/wav"
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-length"] == str(len(data))

    part = client.get(url, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    assert part.headers["content-length"] == "1000"

    open_end = client.get(url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert open_end.status_code == 206 and open_end.content == data[-10:]
    suffix = client.get(url, headers={"Range": "bytes=-44"})
    assert suffix.status_code == 206 and suffix.content == data[-44:]
    assert suffix.headers["content-range"] == f"bytes {len(data) - 44}-{len(data) - 1}/{len(data)}"
    past_end = client.get(url, headers={"Range": f"bytes=10-{len(data) * 2}"})
    assert past_end.status_code == 206 and past_end.content == data[10:]

    for bad in (f"bytes={len(data)}-", "bytes=50-10", "bytes=abc", "items=0-1", "bytes=0-1,5-6"):
        refused = client.get(url, headers={"Range": bad})
        assert refused.status_code == 416, bad
        assert refused.headers["content-range"] == f"bytes */{len(data)}"


def test_download_has_readable_name_and_exact_bytes(web: LiveWeb) -> None:
    client, _ = web.bearer(ADMIN[0])
    row = rows_by_from(web.archive)["0612345678"]
    response = client.get(f"/api/recordings/{row.id}/download")
    assert response.status_code == 200
    assert response.content == web.archive.audio[row.id]
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert 'filename="2024-05-02_100000_0612345678_to_1000.wav"' in disposition


def test_audio_of_unarchived_recording_is_404(web: LiveWeb) -> None:
    client, _ = web.bearer(ADMIN[0])
    pending = rows_by_from(web.archive)["1002"]
    assert client.get(f"/api/recordings/{pending.id}/audio").status_code == 404
    assert client.get("/api/recordings/999999/audio").status_code == 404


def test_export_zip_holds_audio_and_manifest_hashes(web: LiveWeb) -> None:
    client, _ = web.bearer(ADMIN[0])
    with client.stream("GET", "/api/export", params={"number": "100"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert "content-length" not in response.headers  # streamed, not built first
        chunks = list(response.iter_bytes())
    archive = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert archive.testzip() is None
    manifest = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    rows = rows_by_from(web.archive)
    # Archived calls with "100" in a number: 1001->1003, 0612345678->1000, 1000->0799887766.
    expected_ids = {rows["1001"].id, rows["0612345678"].id, rows["1000"].id}
    assert {int(m["recording_id"]) for m in manifest} == expected_ids
    audio_files = [n for n in archive.namelist() if n.startswith("recordings/")]
    assert len(audio_files) == 3
    for entry in manifest:
        data = archive.read(entry["file"])
        original = web.archive.audio[int(entry["recording_id"])]
        assert data == original
        assert entry["sha256"] == hashlib.sha256(original).hexdigest() == entry["index_sha256"]
        assert entry["matches_index"] == "yes"
        assert int(entry["size"]) == len(original)


def test_export_streams_in_many_chunks(web: LiveWeb) -> None:
    client, _ = web.bearer(ADMIN[0])
    with client.stream("GET", "/api/export") as response:
        sizes = [len(chunk) for chunk in response.iter_raw()]
    # Several audio files of tens of KB each leave as separate chunks, never one blob.
    assert len(sizes) > 3
    assert max(sizes) < 2 * 64 * 1024


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


def test_listener_cannot_use_admin_endpoints(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    for path in (
        "/api/users",
        "/api/tokens",
        "/api/audit",
        "/api/audit.csv",
        "/api/stats",
        "/api/status",
    ):
        assert bob.get(path).status_code == 403, path
    response = bob.post("/api/users", json={"name": "mallory", "role": "admin"})
    assert response.status_code == 403
    assert bob.post("/api/tokens", json={"user": "bob"}).status_code == 403


def test_anonymous_and_bad_tokens_are_401(web: LiveWeb) -> None:
    anonymous = web.client()
    assert anonymous.get("/api/recordings").status_code == 401
    assert (
        anonymous.get("/api/recordings", headers={"Authorization": "Bearer cvt_nope"}).status_code
        == 401
    )
    assert (
        anonymous.get("/api/recordings", headers={"Authorization": "Basic eDp5"}).status_code == 401
    )
    assert anonymous.get("/api/openapi.json").status_code == 200


def test_tokens_are_stored_hashed_and_revocable(web: LiveWeb) -> None:
    admin, _ = web.bearer(ADMIN[0])
    created = admin.post("/api/tokens", json={"user": "carol", "label": "nightly export"})
    assert created.status_code == 201
    secret = created.json()["secret"]
    token_id = created.json()["token"]["id"]
    # The database and its write-ahead log: every byte the index holds on disk.
    db_bytes = b"".join(p.read_bytes() for p in Path(web.archive.root).glob("callvault.db*"))
    assert secret.encode() not in db_bytes
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in db_bytes
    carol = web.client()
    carol.headers["Authorization"] = f"Bearer {secret}"
    assert carol.get("/api/me").json()["name"] == "carol"
    listed = {t["id"]: t for t in admin.get("/api/tokens").json()}
    assert listed[token_id]["last_used_at"] is not None
    assert "secret" not in listed[token_id]
    assert admin.delete(f"/api/tokens/{token_id}").status_code == 204
    assert carol.get("/api/me").status_code == 401
    assert admin.delete(f"/api/tokens/{token_id}").status_code == 404
    actions = [e.action for e in web.archive.index.audit.query(audit.AuditFilter(target="carol"))]
    assert audit.TOKEN_CREATE in actions and audit.TOKEN_REVOKE in actions


def test_user_admin_over_api(web: LiveWeb) -> None:
    admin, _ = web.bearer(ADMIN[0])
    made = admin.post(
        "/api/users", json={"name": "dave", "role": "listener", "scope": "3000-3009, 3100"}
    )
    assert made.status_code == 201
    password = made.json()["password"]
    assert password and len(password) >= 12
    assert made.json()["user"]["scope"] == "3000-3009,3100"
    dave = web.login("dave", password)
    assert dave.get("/api/me").json()["scope"] == "3000-3009,3100"
    assert admin.post("/api/users", json={"name": "dave", "role": "listener"}).status_code == 409
    assert (
        admin.post(
            "/api/users", json={"name": "eve", "role": "listener", "scope": "9-1"}
        ).status_code
        == 422
    )
    assert admin.delete("/api/users/alice").status_code == 409  # not yourself
    assert admin.delete("/api/users/dave").status_code == 204
    assert dave.get("/api/me").status_code == 401  # the session dies with the user
    assert admin.delete("/api/users/dave").status_code == 404


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
