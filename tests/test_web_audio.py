"""Audio and export over real sockets: the whole file and byte ranges (unusable ranges
are 416, never a 500), readable download names, the ZIP export with its manifest (whose
cells a spreadsheet cannot run as formulas), one audited play whatever the Range, and no
export, download or play that another site starts with the victim's cookie.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from callvault.index import audit, open_index
from callvault.storage import LocalStorage
from callvault.web import create_app
from support.web import (
    ADMIN,
    CROSS_SITE,
    LISTENER_2000,
    OWN_SITE,
    SPREADSHEET_FORMULAS,
    T0,
    FakeClock,
    LiveWeb,
    WebArchive,
    audit_entries,
    fetch_site,
    live_web,
    rows_by_from,
    serve,
)


@pytest.fixture(params=["local", "s3"])
def web(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveWeb]:
    """The web app over the standard archive, its recordings in a directory or in a bucket
    of the S3 server (playback, ranges and exports then read from the bucket)."""
    storage = request.getfixturevalue("s3_storage") if request.param == "s3" else None
    with live_web(tmp_path / "archive", storage=storage) as live:
        yield live


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


def test_a_play_starting_past_byte_zero_is_audited(web: LiveWeb) -> None:
    bob, _ = web.bearer(LISTENER_2000[0])
    row = rows_by_from(web.archive)["2001"]
    url = f"/api/recordings/{row.id}/audio"
    data = web.archive.audio[row.id]

    almost_all = bob.get(url, headers={"Range": "bytes=1-"})
    assert almost_all.status_code == 206 and almost_all.content == data[1:]
    plays = audit_entries(web, actor="bob", action=audit.PLAY)
    assert [(e.target, e.detail) for e in plays] == [(row.name, f"id={row.id}")]

    # The player's next range requests (seeks) within 30 s are the same play ...
    assert bob.get(url, headers={"Range": "bytes=500-"}).status_code == 206
    assert bob.get(url).status_code == 200
    assert len(audit_entries(web, actor="bob", action=audit.PLAY)) == 1
    # ... and a later one is a new play, wherever it starts.
    web.clock.advance(timedelta(seconds=31))
    assert bob.get(url, headers={"Range": "bytes=-100"}).status_code == 206
    assert len(audit_entries(web, actor="bob", action=audit.PLAY)) == 2


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


def test_zip_manifest_quotes_every_text_cell_that_could_be_a_formula(tmp_path: Path) -> None:
    index = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    try:
        archive = WebArchive(tmp_path, index, LocalStorage(tmp_path))
        for n, text in enumerate(SPREADSHEET_FORMULAS):
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
        assert len(manifest) == len(SPREADSHEET_FORMULAS)
        assert {m["status"] for m in manifest} == {"'" + text for text in SPREADSHEET_FORMULAS}
        assert {m["did"] for m in manifest} == {"'" + text for text in SPREADSHEET_FORMULAS}
        assert {m["to"] for m in manifest} == {"'+49301234567"}
        assert all(m["matches_index"] == "yes" for m in manifest)
    finally:
        index.close()


@pytest.mark.parametrize("kind", ["export", "download"])
def test_cross_site_export_and_download_with_a_cookie_are_refused(web: LiveWeb, kind: str) -> None:
    row = rows_by_from(web.archive)["2001"]
    url = "/api/export" if kind == "export" else f"/api/recordings/{row.id}/download"
    action = audit.EXPORT if kind == "export" else audit.DOWNLOAD
    bob = web.login(*LISTENER_2000)
    for site in CROSS_SITE:
        refused = bob.get(url, headers=fetch_site(site))
        assert refused.status_code == 403, site
        assert refused.headers["content-type"] == "application/json"
    assert audit_entries(web, actor="bob", action=action) == []  # refused before anything ran
    for site in OWN_SITE:
        allowed = bob.get(url, headers=fetch_site(site))
        assert allowed.status_code == 200, site
        assert allowed.content[:2] == (b"PK" if kind == "export" else b"RI")
    assert len(audit_entries(web, actor="bob", action=action)) == len(OWN_SITE)

    # A script with an API token has no cookie another site could use: never refused.
    script, _ = web.bearer(LISTENER_2000[0])
    for site in (*CROSS_SITE, *OWN_SITE):
        assert script.get(url, headers=fetch_site(site)).status_code == 200, site


def test_cross_site_play_with_a_cookie_is_refused(web: LiveWeb) -> None:
    # A link from another site would otherwise log a play in the victim's name.
    row = rows_by_from(web.archive)["2001"]
    bob = web.login(*LISTENER_2000)
    url = f"/api/recordings/{row.id}/audio"
    for site in CROSS_SITE:
        assert bob.get(url, headers=fetch_site(site)).status_code == 403, site
    assert audit_entries(web, actor="bob", action=audit.PLAY) == []
    played = bob.get(url, headers={**fetch_site("same-origin"), "Range": "bytes=0-99"})
    assert played.status_code == 206 and played.content[:4] == b"RIFF"
    assert len(audit_entries(web, actor="bob", action=audit.PLAY)) == 1
