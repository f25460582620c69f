"""`callvault list`, `status` and `verify` on a real SQLite index and real files."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner

from callvault.cli import _register, app
from callvault.index import SettingKey, Worker, open_index
from callvault.pbx._types import CallDetail
from callvault.storage import LocalStorage, recording_key

_register()
PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
# As `callvault serve` writes it (callvault.archive._session).
HEALTH = {
    "state": "error",
    "error": "cannot log in to the PBX: wrong API username or password, errno 20003",
    "last_success_at": "2024-05-01T11:00:00+00:00",
}
runner = CliRunner()


def build_archive(root: Path) -> dict[str, bytes]:
    """Four calls: two archived, one pending, one failed. Returns name -> archived bytes."""
    index = open_index(f"sqlite:///{root / 'callvault.db'}")
    storage = LocalStorage(root)
    cdrs = [
        CallDetail(
            callid=f"171456480{i}.{i}",
            timestart=f"2024-04-0{i + 1} 10:00:00",
            callfrom="1001",
            callto=f"+3361234567{i}",
            type="Outbound",
            status="ANSWERED",
            talkduration=10 * i,
            recording=f"2024040{i + 1}100005-171456480{i}.{i}-1001-0612-Outbound.wav",
            sn="369451090405",
        )
        for i in range(4)
    ]
    index.calls.record(cdrs, source="event", tz=PARIS, now=NOW)
    archived: dict[str, bytes] = {}
    jobs = index.jobs.claim(Worker(None, "w1"), 10, now=NOW, lease=timedelta(minutes=5))
    for job in jobs[:2]:
        data = b"RIFF" + job.name.encode() * 10
        assert job.start_at is not None
        key = recording_key(job.pbx_serial, job.start_at.astimezone(PARIS), job.name)
        stored = storage.put(key, io.BytesIO(data))
        assert index.jobs.mark_archived(
            job.recording_id,
            worker=Worker(None, "w1"),
            size=stored.size,
            sha256=stored.sha256 or "",
            storage_key=key,
            content_type="audio/wav",
            now=NOW,
        )
        archived[job.name] = data
    # As a worker does at the first attempt: the key names where the file will go.
    pending = jobs[2]
    assert pending.start_at is not None
    planned = recording_key(pending.pbx_serial, pending.start_at.astimezone(PARIS), pending.name)
    assert index.jobs.reserve_storage_key(pending.recording_id, planned) == planned
    index.jobs.mark_retry(
        jobs[2].recording_id,
        worker=Worker(None, "w1"),
        error="PBX said 20014: not ready",
        next_attempt_at=NOW + timedelta(seconds=30),
        now=NOW,
        not_found=True,
    )
    index.jobs.mark_failed(
        jobs[3].recording_id, worker=Worker(None, "w1"), reason="gave up after 8 timeouts", now=NOW
    )
    index.settings.set(SettingKey.LAST_EVENT_AT, "2024-05-01T12:00:00+00:00", NOW)
    index.settings.set(SettingKey.PBX_HEALTH, json.dumps(HEALTH), NOW)
    index.close()
    return archived


@pytest.fixture
def archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, bytes]]:
    monkeypatch.setenv("CALLVAULT_TIMEZONE", "Europe/Paris")
    root = tmp_path / "archive"
    return root, build_archive(root)


def test_list_json_carries_every_field(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, archived = archive
    result = runner.invoke(app, ["list", "--json", "--archive", str(root)])
    assert result.exit_code == 0, result.output
    objects = json.loads(result.stdout)
    assert len(objects) == 4
    assert [o["callid"] for o in objects] == [f"171456480{i}.{i}" for i in (3, 2, 1, 0)]
    for obj in objects:
        for field in (
            "recording",
            "callid",
            "state",
            "sha256",
            "size",
            "path",
            "start",
            "from",
            "to",
            "type",
            "status",
        ):
            assert field in obj
    done = [o for o in objects if o["state"] == "archived"]
    assert {o["recording"] for o in done} == set(archived)
    for obj in done:
        path = Path(obj["path"])
        assert path.is_absolute() and path.read_bytes() == archived[obj["recording"]]
        assert obj["size"] == len(archived[obj["recording"]])
        assert path.is_relative_to(root.resolve() / "369451090405" / "2024" / "04")
    # A pending recording has a planned storage key but no file yet: no path.
    assert [o["path"] for o in objects if o["state"] != "archived"] == [None, None]
    first = objects[-1]
    assert first["start"] == "2024-04-01T10:00:00+02:00"
    assert (first["from"], first["type"], first["status"]) == ("1001", "Outbound", "ANSWERED")


def test_list_filters_and_text_output(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = archive
    base = ["list", "--json", "--archive", str(root)]
    by_state = json.loads(runner.invoke(app, [*base, "--state", "failed"]).stdout)
    assert [o["state"] for o in by_state] == ["failed"]
    by_number = json.loads(runner.invoke(app, [*base, "--number", "5672"]).stdout)
    assert [o["callid"] for o in by_number] == ["1714564802.2"]
    window = json.loads(
        runner.invoke(app, [*base, "--since", "2024-04-02", "--until", "2024-04-03"]).stdout
    )
    assert [o["callid"] for o in window] == ["1714564802.2", "1714564801.1"]
    limited = json.loads(runner.invoke(app, [*base, "--limit", "1"]).stdout)
    assert len(limited) == 1
    text = runner.invoke(app, ["list", "--archive", str(root), "--limit", "2"])
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert lines[0].split() == [
        "START",
        "(Europe/Paris)",  # CALLVAULT_TIMEZONE: the zone the times are shown in
        "STATE",
        "FROM",
        "TO",
        "TYPE",
        "STATUS",
        "SIZE",
        "RECORDING",
    ]
    assert lines[1].split()[:3] == ["2024-04-04", "10:00:00", "failed"]
    assert lines[-1] == "(2 of 4; use --limit 0 for all)"


def test_list_times_follow_the_saved_pbx_zone_not_the_hosts(
    archive: tuple[Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls were made at 10:00 in Paris. `serve` saved the PBX's zone; the host says
    Tokyo. Without a zone given, `list` shows and reads times in the saved one."""
    root, _ = archive
    monkeypatch.delenv("CALLVAULT_TIMEZONE")
    monkeypatch.setenv("TZ", "Asia/Tokyo")

    def listed(*extra: str) -> list[str]:
        result = runner.invoke(app, ["list", "--json", "--archive", str(root), *extra])
        assert result.exit_code == 0, result.output
        return [o["start"] for o in json.loads(result.stdout)]

    # Nothing saved yet (an index from before this setting): the host's zone.
    assert listed()[-1] == "2024-04-01T17:00:00+09:00"
    with open_index(f"sqlite:///{root / 'callvault.db'}") as index:
        index.settings.set(SettingKey.PBX_TIMEZONE, "Europe/Paris", NOW)
    assert listed()[-1] == "2024-04-01T10:00:00+02:00"
    text = runner.invoke(app, ["list", "--archive", str(root), "--state", "archived"])
    assert text.stdout.splitlines()[-1].split()[:2] == ["2024-04-01", "10:00:00"]
    # --since/--until are read in the same zone: 10:00 to 10:01 on April 2nd, Paris time.
    window = ["--since", "2024-04-02T10:00", "--until", "2024-04-02T10:01"]
    assert listed(*window) == ["2024-04-02T10:00:00+02:00"]
    # A zone given on purpose wins: flag, then CALLVAULT_TIMEZONE, then the config file.
    assert listed("--timezone", "UTC")[-1] == "2024-04-01T08:00:00+00:00"
    monkeypatch.setenv("CALLVAULT_TIMEZONE", "America/New_York")
    assert listed()[-1] == "2024-04-01T04:00:00-04:00"
    assert listed("--timezone", "UTC")[-1] == "2024-04-01T08:00:00+00:00"
    monkeypatch.delenv("CALLVAULT_TIMEZONE")
    config = root.parent / "callvault.toml"
    config.write_text('timezone = "Asia/Kolkata"\n', encoding="utf-8")
    assert listed("--config", str(config))[-1] == "2024-04-01T13:30:00+05:30"
    bad = runner.invoke(app, ["list", "--archive", str(root), "--timezone", "Mars/Base"])
    assert bad.exit_code == 2 and "unknown time zone 'Mars/Base'" in bad.stderr
    status = json.loads(runner.invoke(app, ["status", "--json", "--archive", str(root)]).stdout)
    assert status["pbx_timezone"] == "Europe/Paris"


def test_list_rejects_bad_options_in_one_line(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = archive
    result = runner.invoke(app, ["list", "--archive", str(root), "--state", "lost"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("callvault: error: unknown state 'lost'")
    result = runner.invoke(app, ["list", "--archive", str(root), "--since", "yesterday"])
    assert result.exit_code == 2 and "bad date" in result.stderr
    assert "Traceback" not in result.output


def test_status(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = archive
    result = runner.invoke(app, ["status", "--json", "--archive", str(root)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"] == {
        "pending": 1,
        "downloading": 0,
        "archived": 2,
        "failed": 1,
        "missing": 0,
    }
    assert report["total"] == 4
    assert [(f["state"], f["error"]) for f in report["failures"]] == [
        ("failed", "gave up after 8 timeouts")
    ]
    assert [r["error"] for r in report["retrying"]] == ["PBX said 20014: not ready"]
    assert report["last_event_at"] == "2024-05-01T12:00:00+00:00"
    assert report["pbx_health"] == HEALTH
    text = runner.invoke(app, ["status", "--archive", str(root)]).stdout
    assert "archived 2" in text and "gave up after 8 timeouts" in text
    assert "last event: 2024-05-01T12:00:00+00:00" in text
    assert (
        "PBX session: error: cannot log in to the PBX: wrong API username or password, "
        "errno 20003 (last answer from the PBX 2024-05-01T11:00:00+00:00)"
    ) in text


def test_verify_ok_then_mismatch_then_missing(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, archived = archive
    result = runner.invoke(app, ["verify", "--json", "--archive", str(root)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["checked"], report["ok"], report["mismatched"], report["missing"]) == (
        2,
        2,
        [],
        [],
    )
    assert report["unindexed"] == []
    index = open_index(f"sqlite:///{root / 'callvault.db'}")
    assert all(r.verified_at is not None for r in index.recordings.archived())
    index.close()

    damaged, gone = sorted(archived)
    paths = {
        o["recording"]: Path(o["path"])
        for o in json.loads(runner.invoke(app, ["list", "--json", "--archive", str(root)]).stdout)
        if o["path"]
    }
    paths[damaged].write_bytes(b"RIFF" + b"\0" * 20)
    paths[gone].unlink()
    result = runner.invoke(app, ["verify", "--archive", str(root)])
    assert result.exit_code == 1
    assert f"MISMATCH {damaged}" in result.stdout
    assert f"MISSING  {gone}" in result.stdout
    assert "verified 2 archived recordings: 0 ok, 1 mismatched, 1 missing" in result.stdout
    report = json.loads(runner.invoke(app, ["verify", "--json", "--archive", str(root)]).stdout)
    assert report["mismatched"][0]["actual_size"] == 24
    assert report["missing"][0]["recording"] == gone


def test_verify_reports_unindexed_files_without_failing(
    archive: tuple[Path, dict[str, bytes]],
) -> None:
    root, _ = archive
    stray = LocalStorage(root).put("369451090405/2024/04/09/stray.wav", io.BytesIO(b"RIFFx"))
    result = runner.invoke(app, ["verify", "--json", "--archive", str(root)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["unindexed"] == [str(root.resolve() / stray.key)]
    text = runner.invoke(app, ["verify", "--archive", str(root)]).stdout
    assert "UNINDEXED" in text and "1 unindexed files" in text


def test_missing_archive_or_index_is_one_clear_line(tmp_path: Path) -> None:
    for command in ("list", "status", "verify"):
        result = runner.invoke(app, [command, "--archive", str(tmp_path / "nope")])
        assert result.exit_code == 1
        assert result.stderr.count("\n") == 1
        assert "does not exist" in result.stderr
        result = runner.invoke(app, [command, "--archive", str(tmp_path)])
        assert result.exit_code == 1
        assert "no index database" in result.stderr
        assert not (tmp_path / "callvault.db").exists()
        result = runner.invoke(app, [command])
        assert result.exit_code == 2 and "no archive directory" in result.stderr


def test_db_option_and_config_file(archive: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, _ = archive
    moved = tmp_path / "elsewhere.db"
    (root / "callvault.db").rename(moved)
    for suffix in ("-wal", "-shm"):
        side = root / f"callvault.db{suffix}"
        if side.exists():
            side.rename(tmp_path / f"elsewhere.db{suffix}")
    result = runner.invoke(app, ["status", "--json", "--archive", str(root), "--db", str(moved)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total"] == 4
    config = tmp_path / "callvault.toml"
    config.write_text(f'archive = "{root}"\ndb = "sqlite:///{moved}"\n', encoding="utf-8")
    result = runner.invoke(app, ["list", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4
    config.write_text("archive = [unclosed\n", encoding="utf-8")
    result = runner.invoke(app, ["list", "--config", str(config)])
    assert result.exit_code == 2 and "is not valid TOML" in result.stderr


def test_unreachable_database_url_hides_its_password(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "status",
            "--archive",
            str(tmp_path),
            "--db",
            f"postgresql+psycopg://cv:pg-s3cret@127.0.0.1:{_closed_port()}/cv",
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("callvault: error: cannot open the index")
    assert result.stderr.count("\n") == 1
    assert "pg-s3cret" not in result.output
    assert "Traceback" not in result.output


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_requeue_brings_back_given_up_recordings(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = archive
    index = open_index(f"sqlite:///{root / 'callvault.db'}")
    with index:  # the PBX kept saying the pending one does not exist: `missing`, final
        [job] = index.jobs.claim(
            Worker(None, "w1"), 1, now=NOW + timedelta(hours=1), lease=timedelta(minutes=5)
        )
        assert index.jobs.mark_missing(
            job.recording_id, worker=Worker(None, "w1"), reason="20014", now=NOW
        )
        assert index.recordings.counts_by_state()["missing"] == 1
    args = ["--archive", str(root)]

    later = runner.invoke(app, ["requeue", "--json", "--since", "2024-05-02", *args])
    assert later.exit_code == 0, later.output
    assert json.loads(later.stdout)["requeued"] == {"failed": 0, "missing": 0}

    missing = runner.invoke(app, ["requeue", "--state", "missing", *args])
    assert missing.exit_code == 0, missing.output
    assert missing.stdout.startswith("queued again: 1 missing;")

    both = runner.invoke(app, ["requeue", "--json", "--since", "2024-05-01", *args])
    assert json.loads(both.stdout)["requeued"] == {"failed": 1, "missing": 0}
    with open_index(f"sqlite:///{root / 'callvault.db'}") as index:
        counts = index.recordings.counts_by_state()
    assert (counts["pending"], counts["failed"], counts["missing"]) == (2, 0, 0)

    bad = runner.invoke(app, ["requeue", "--state", "archived", *args])
    assert bad.exit_code == 2
    assert bad.output.strip() == (
        "callvault: error: --state 'archived': only failed and missing can be queued again"
    )
