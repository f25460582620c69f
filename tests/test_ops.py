"""callvault.ops: the operations the command line and the web app share, on both engines."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callvault.index import Index, SettingKey, Worker
from callvault.ops import (
    Archive,
    ArchiveError,
    archive_status,
    human_size,
    open_archive,
    requeue,
    verify_archive,
    verify_recording,
)
from callvault.storage import LocalStorage
from support.index_data import NOW, queue, register_pbx

LEASE = timedelta(minutes=5)


@pytest.fixture
def archive(index: Index, tmp_path: Path) -> Archive:
    return Archive(index, LocalStorage(tmp_path / "archive"))


def _archive_one(archive: Archive, recording_id: int, data: bytes, worker: Worker) -> str:
    key = f"SN1/2024/05/01/rec-{recording_id}.wav"
    stored = archive.storage.put(key, io.BytesIO(data))
    assert archive.index.jobs.mark_archived(
        recording_id,
        worker=worker,
        size=stored.size,
        sha256=stored.sha256 or "",
        storage_key=key,
        content_type="audio/wav",
        now=NOW,
    )
    return key


def test_status_counts_calls_without_a_recording_and_says_why(archive: Archive) -> None:
    queue(archive.index, 3)
    status = archive_status(archive, now=NOW)
    assert (status.calls, status.calls_with_recording, status.calls_without_recording) == (3, 3, 0)
    assert status.recordings["pending"] == 3 and status.recordings_total == 3
    assert status.index_problems == []
    assert status.pbx_session.state == "unknown"
    assert status.pbx_session.summary == "unknown: no callvault serve has run on this archive"
    assert status.serve == "never"
    assert status.attention == [
        "No callvault serve has run on this archive: nothing is archived as calls happen."
    ]
    assert status.archive == archive.storage.describe()
    assert status.storage is not None and status.storage.free is not None


def test_status_shows_serves_workers_alive_against_configured(archive: Archive) -> None:
    index = archive.index
    serve = index.processes.register(
        node="n1", kind="serve", hostname="h", pid=11, workers=2, now=NOW
    )
    index.processes.heartbeat(serve.id, now=NOW, workers_alive=1)
    health = {"state": "ok", "error": None, "last_success_at": (NOW - timedelta(minutes=2))}
    index.settings.set(SettingKey.PBX_HEALTH, json.dumps(health, default=str), NOW)
    status = archive_status(archive, now=NOW + timedelta(seconds=5))
    assert (status.workers.configured, status.workers.alive) == (2, 1)
    assert [(p.node, p.kind, p.alive) for p in status.processes] == [("n1", "serve", True)]
    assert status.pbx_session.summary == "logged in, last contact 2 min ago"
    # Its heartbeat stopped a minute ago: serve is not running, whatever it last said.
    later = archive_status(archive, now=NOW + timedelta(minutes=1))
    assert (later.workers.configured, later.workers.alive) == (0, 0)
    assert later.processes[0].alive is False and later.processes[0].workers_alive == 0
    assert later.pbx_session.state == "stopped"
    assert later.pbx_session.summary.startswith("serve is not running (its last report")
    assert later.serve == "stopped"
    assert later.attention[0].startswith("serve is not running")
    assert status.serve == "running"
    assert status.attention == ["Only 1 of 2 download workers is running."]


def test_status_names_the_pbx_whose_session_is_worst(archive: Archive) -> None:

    index = archive.index
    serve = index.processes.register(
        node="n1", kind="serve", hostname="h", pid=11, workers=2, now=NOW
    )
    index.processes.heartbeat(serve.id, now=NOW, workers_alive=2)
    for name in ("lyon", "nice", "paris"):
        register_pbx(index, name)
    contact = (NOW - timedelta(minutes=2)).isoformat()
    sessions = {
        "lyon": {"state": "ok", "error": None, "last_success_at": contact},
        "paris": {"state": "error", "error": "login: wrong API username or password"},
    }
    for name, health in sessions.items():
        index.pbxs.report_session(index.pbxs.require(name).id, json.dumps(health))
    status = archive_status(archive, now=NOW + timedelta(seconds=5))
    assert [(p.name, p.session.state) for p in status.pbxs] == [
        ("lyon", "ok"),
        ("nice", "unknown"),  # no serve reported on it
        ("paris", "error"),
    ]
    assert status.pbx_session.summary == (
        "paris: not working: login: wrong API username or password; no contact yet "
        "(1 of 3 PBX sessions ok)"
    )
    assert status.attention == [
        "No serve reports on PBX nice: start one for it (`callvault serve --only nice`).",
        "The session with PBX paris is not working: login: wrong API username or password; "
        "no contact yet.",
    ]


def test_status_says_a_pbx_whose_serve_stopped_is_not_archived(archive: Archive) -> None:
    index = archive.index
    serve = index.processes.register(
        node="n2", kind="serve", hostname="h", pid=12, workers=2, now=NOW
    )
    index.processes.heartbeat(serve.id, now=NOW, workers_alive=2)
    for name in ("lyon", "paris"):
        register_pbx(index, name)
    stopped = {"state": "stopped", "error": None, "updated_at": NOW.isoformat()}
    index.pbxs.report_session(index.pbxs.require("paris").id, json.dumps(stopped))
    ok = {"state": "ok", "error": None, "last_success_at": NOW.isoformat()}
    index.pbxs.report_session(index.pbxs.require("lyon").id, json.dumps(ok))
    status = archive_status(archive, now=NOW + timedelta(seconds=5))
    assert status.attention == [
        "PBX paris is not archived: the serve that archived it stopped just now; no contact yet."
    ]


def test_status_json_is_one_shape_with_utc_times(archive: Archive) -> None:
    queue(archive.index, 1)
    archive.index.settings.set(SettingKey.LAST_EVENT_AT, NOW.isoformat(), NOW)
    report = archive_status(archive, now=NOW).to_json()
    assert json.loads(json.dumps(report)) == report  # plain JSON all the way down
    assert report["last_event_at"] == "2024-05-01T12:00:00+00:00"
    assert report["checked_at"] == "2024-05-01T12:00:00+00:00"
    assert set(report["pbx_session"]) == {
        "state",
        "error",
        "last_contact_at",
        "reported_at",
        "summary",
    }


def test_verify_one_and_all(archive: Archive) -> None:
    ids = queue(archive.index, 3)
    worker = Worker(None, "w")
    archive.index.jobs.claim(worker, 3, now=NOW, lease=LEASE)
    good = _archive_one(archive, ids[0], b"RIFF good audio", worker)
    bad = _archive_one(archive, ids[1], b"RIFF changed later", worker)
    Path(archive.storage.locate(bad)).write_bytes(b"RIFF changed!")
    row = archive.index.recordings.by_id(ids[0])
    assert row is not None
    result = verify_recording(archive, row, now=NOW)
    assert (result.ok, result.storage_key) == (True, good)  # a key, never a server path
    pending = archive.index.recordings.by_id(ids[2])
    assert pending is not None
    assert verify_recording(archive, pending, now=NOW).error == "not archived"
    stray = archive.storage.put("SN1/2024/05/02/stray.wav", io.BytesIO(b"RIFF"))
    report = verify_archive(archive, now=NOW)
    assert (report.checked, report.ok, report.problems) == (2, 1, 1)
    assert [m.id for m in report.mismatched] == [ids[1]]
    assert report.mismatched[0].actual_size == len(b"RIFF changed!")
    assert report.unindexed == [stray.key]
    assert archive.index.recordings.by_id(ids[0]).verified_at is not None  # type: ignore[union-attr]


def test_requeue_gives_failed_and_missing_another_run(archive: Archive) -> None:
    ids = queue(archive.index, 2)
    worker = Worker(None, "w")
    archive.index.jobs.claim(worker, 2, now=NOW, lease=LEASE)
    archive.index.jobs.mark_failed(ids[0], worker=worker, reason="x", now=NOW)
    archive.index.jobs.mark_missing(ids[1], worker=worker, reason="y", now=NOW)
    later = requeue(archive, ["missing"], now=NOW, since=NOW + timedelta(days=1))
    assert later.requeued == {"missing": 0}
    result = requeue(archive, now=NOW)
    assert result.to_json() == {"requeued": {"failed": 1, "missing": 1}, "since": None}
    assert archive.index.recordings.counts_by_state()["pending"] == 2
    with pytest.raises(ValueError, match="only failed and missing"):
        requeue(archive, ["archived"], now=NOW)


def test_open_archive_says_what_to_do_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'callvault.db'}"
    with pytest.raises(ArchiveError, match="does not exist \\(check --archive\\)"):
        open_archive(tmp_path / "absent", url)
    with pytest.raises(ArchiveError, match="nothing archived yet"):
        open_archive(tmp_path, url)
    with open_archive(tmp_path, url, create=True) as opened:
        assert archive_status(opened, now=datetime.now(UTC)).recordings_total == 0


@pytest.mark.parametrize(
    ("size", "words"),
    [(None, ""), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**4, "5.0 TiB")],
)
def test_human_size(size: int | None, words: str) -> None:
    assert human_size(size) == words


def test_status_of_one_pbx_while_a_node_holds_several(archive: Archive) -> None:
    """`status --pbx NAME` with a node holding other PBXs too: the PBX's own lines, and
    the node still listed with every PBX it holds."""
    index = archive.index
    node = index.processes.register(
        node="site-1", kind="node", hostname="h", pid=12, workers=0, now=NOW
    )
    index.processes.heartbeat(node.id, now=NOW, workers_alive=0)
    records = [register_pbx(index, name) for name in ("lyon", "paris")]
    for record in records:
        lease = index.leases.acquire(record.id, node="site-1", now=NOW, ttl=timedelta(minutes=1))
        assert lease is not None
    status = archive_status(archive, now=NOW + timedelta(seconds=5), pbx_id=records[1].id)
    assert [(p.name, p.node) for p in status.pbxs] == [("paris", "site-1")]
    assert [(n.name, n.pbxs) for n in status.nodes] == [("site-1", ["lyon", "paris"])]
