"""Search and recordings over real sockets: the API's filters and paging, the search page
(date pickers that still read typed times, a refused search shown as refused with the
reason naming the field as the page labels it, never as "0 recordings"), a listener's
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
    elements,
    live_web,
    rows_by_from,
    text_of,
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


def _field(page: str, name: str) -> dict[str, str]:
    """The attributes of the one form field called `name`, and the text of its label."""
    [(attrs, _)] = [(a, t) for a, t in elements(page, name=name) if a["<tag>"] != "a"]
    [(_, label)] = elements(page, "label", for_=attrs["id"])
    return {**attrs, "label": label}


def _page_froms(page: str) -> list[str]:
    return [text for _attrs, text in elements(page, "td", class_="from")]


def test_api_pages_by_cursor_and_counts_only_as_far_as_asked(web: LiveWeb) -> None:
    client, _ = web.bearer(ADMIN[0])
    whole = _froms(client.get("/api/recordings").json())
    seen: list[str] = []
    params: dict[str, object] = {"limit": 4}
    while True:
        page = client.get("/api/recordings", params=params).json()
        assert (page["total"], page["total_exact"]) == (6, True)
        seen += _froms(page)
        if page["next"] is None:
            break
        params = {"limit": 4, "after": page["next"]}
    assert seen == whole and len(seen) == 6
    exact = client.get("/api/recordings", params={"exact_total": "true"}).json()
    assert (exact["total"], exact["total_exact"]) == (6, True)
    # Offsets are for the first pages; a cursor that is not one is refused, never a 500.
    far = client.get("/api/recordings", params={"offset": 1001})
    assert far.status_code == 422 and "page on with after=" in far.json()["detail"]
    assert client.get("/api/recordings", params={"offset": 1000}).status_code == 200
    for cursor in ("no-such-cursor", "fDk5OTk5OTk5OTk5OTk5OTk5OTk5"):  # the second: a huge id
        bad = client.get("/api/recordings", params={"after": cursor})
        assert bad.status_code == 422
        assert bad.json()["detail"].startswith("after: not a cursor of a search")


def test_search_page_goes_older_by_cursor(web: LiveWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    from callvault.web import _pages

    monkeypatch.setattr(_pages, "PAGE_SIZE", 4)
    admin = web.login(*ADMIN)
    first = admin.get("/search")
    assert text_of(first.text, "summary").startswith("6 recordings, page 1 of 2.")
    older = [attrs["href"] for attrs, text in elements(first.text, "a") if "Older" in text]
    assert len(older) == 1 and "after=" in older[0] and "page=2" in older[0]
    second = admin.get(older[0])
    assert text_of(second.text, "summary").startswith("6 recordings, page 2 of 2.")
    assert _page_froms(first.text) + _page_froms(second.text) == [
        "1002", "1003", "2001", "1000", "0612345678", "1001"
    ]  # fmt: skip
    assert not [text for _attrs, text in elements(second.text, "a") if "Older" in text]
    newest = [attrs["href"] for attrs, text in elements(second.text, "a") if "Newest" in text]
    assert newest == ["/search?"]
    # Pages far down open from the page before them, not by number.
    far = admin.get("/search", params={"page": "300"})
    assert far.status_code == 422 and "open from the one before them (Older" in far.text


def test_search_page_dates_are_date_pickers_that_read_typed_times(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    empty = admin.get("/search").text
    for name, label in (("since", "From"), ("until", "To")):
        field = _field(empty, name)
        assert (field["type"], field["label"]) == ("date", label)
        assert "aria-invalid" not in field
    # What a picker sends: a day, and To counts through that day.
    picked = admin.get("/search", params={"since": "2024-05-02", "until": "2024-05-02"})
    assert picked.status_code == 200
    assert _page_froms(picked.text) == ["0612345678"]
    assert _field(picked.text, "since")["value"] == "2024-05-02"
    assert _field(picked.text, "since")["type"] == "date"
    # A time of day, typed or from a link, is read as the API reads it; its field keeps it
    # as text (a date picker cannot show a time, and would drop it on the next search).
    typed = admin.get("/search", params={"since": "2024-05-03 11:30"})
    assert typed.status_code == 200
    assert _page_froms(typed.text) == ["1002", "1003", "2001"]
    assert {k: _field(typed.text, "since")[k] for k in ("type", "value")} == {
        "type": "text",
        "value": "2024-05-03 11:30",
    }
    assert text_of(typed.text, "summary").startswith("3 recordings.")


FORMATS = "use YYYY-MM-DD or YYYY-MM-DD hh:mm[:ss]"


@pytest.mark.parametrize(
    ("params", "field", "reason"),
    [
        ({"since": "yesterday"}, "since", f"From: 'yesterday' is not a time: {FORMATS}"),
        ({"until": "2024-02-30"}, "until", f"To: '2024-02-30' is not a time: {FORMATS}"),
        (
            {"min_talk_s": "ten"},
            "min_talk_s",
            "Min. talk (s): 'ten' is not a number of seconds: use digits, such as 30",
        ),
        (
            {"state": "lost"},
            "state",
            "State: 'lost' is not an archive state: use one of pending, downloading, "
            "archived, failed, missing, deleted",
        ),
    ],
    ids=["from", "to", "min-talk", "state"],
)
def test_a_refused_search_is_shown_as_refused_with_the_fields_label(
    web: LiveWeb, params: dict[str, str], field: str, reason: str
) -> None:
    admin = web.login(*ADMIN)
    page = admin.get("/search", params={"number": "100", **params})
    assert page.status_code == 422
    assert text_of(page.text, "search-error") == f"This search was refused: {reason}"
    # Not "0 recordings": no count, no table of results, no export of nothing.
    assert elements(page.text, id="summary") == []
    assert elements(page.text, "table") == []
    assert "No recordings match" not in page.text
    assert elements(page.text, "a", id="export") == []
    # The field at fault says so to assistive technology; the others keep their values.
    bad = _field(page.text, field)
    assert bad["aria-invalid"] == "true"
    assert "search-error" in bad["aria-describedby"].split()
    assert _field(page.text, "number")["value"] == "100"
    assert "aria-invalid" not in _field(page.text, "number")


def test_two_refused_fields_are_both_named(web: LiveWeb) -> None:
    admin = web.login(*ADMIN)
    page = admin.get("/search", params={"since": "soon", "until": "later"})
    assert page.status_code == 422
    reasons = [text for _attrs, text in elements(page.text, "li", class_="reason")]
    assert reasons == [
        f"From: 'soon' is not a time: {FORMATS}",
        f"To: 'later' is not a time: {FORMATS}",
    ]


def test_unicode_digits_in_page_numbers_and_filters_are_no_500(web: LiveWeb) -> None:
    bob = web.login(*LISTENER_2000)
    page = bob.get("/search", params={"page": "²"})
    assert page.status_code == 200 and _page_froms(page.text) == ["2001"]  # page 1
    talk = bob.get("/search", params={"min_talk_s": "²"})
    assert talk.status_code == 422
    assert "Min. talk (s): '²' is not a number of seconds" in text_of(talk.text, "search-error")
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
