"""`callvault list`, `status` and `verify` on a real SQLite index and real files."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from callvault.cli import _register, app
from callvault.index import SettingKey, Worker, open_index
from callvault.index.pbxs import PbxConfig
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


def listed_items(*args: str) -> list[dict[str, object]]:
    """The items of `callvault list --json ARGS` (a page, as GET /api/recordings answers)."""
    result = runner.invoke(app, ["list", "--json", *args])
    assert result.exit_code == 0, result.output
    page = json.loads(result.stdout)
    assert set(page) == {"total", "total_exact", "limit", "offset", "next", "items"}
    items: list[dict[str, object]] = page["items"]
    return items


def test_list_json_is_the_api_page(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, archived = archive
    objects = listed_items("--archive", str(root))
    assert [o["callid"] for o in objects] == [f"171456480{i}.{i}" for i in (3, 2, 1, 0)]
    storage = LocalStorage(root)
    done = [o for o in objects if o["state"] == "archived"]
    assert {o["name"] for o in done} == set(archived)
    for obj in done:
        key = str(obj["storage_key"])
        assert key.startswith("369451090405/2024/04/")
        assert Path(storage.locate(key)).read_bytes() == archived[str(obj["name"])]
        assert obj["size"] == len(archived[str(obj["name"])])
        assert obj["audio_url"] == f"/api/recordings/{obj['id']}/audio"
    # A pending recording has a planned storage key but no file yet: none is shown.
    assert [o["storage_key"] for o in objects if o["state"] != "archived"] == [None, None]
    first = objects[-1]
    assert (first["start_at"], first["timestart_local"]) == (
        "2024-04-01T08:00:00+00:00",
        "2024-04-01 10:00:00",
    )
    assert (first["call_from"], first["direction"], first["status"]) == (
        "1001",
        "Outbound",
        "ANSWERED",
    )


def test_list_filters_and_text_output(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = archive
    base = ["--archive", str(root)]
    assert [o["state"] for o in listed_items(*base, "--state", "failed")] == ["failed"]
    by_number = listed_items(*base, "--number", "5672")
    assert [o["callid"] for o in by_number] == ["1714564802.2"]
    window = listed_items(*base, "--since", "2024-04-02", "--until", "2024-04-03")
    assert [o["callid"] for o in window] == ["1714564802.2", "1714564801.1"]
    assert len(listed_items(*base, "--limit", "1")) == 1
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
    hint = lines[-1]
    assert hint.startswith("(more match: the next 2 with --after ")
    assert hint.endswith("; or use --limit N, --limit 0 for all)")
    # The printed cursor gives the next page, which is the last: no hint after it.
    cursor = hint.split("--after ")[1].split(";")[0]
    rest = runner.invoke(app, ["list", *base, "--limit", "2", "--after", cursor])
    assert rest.exit_code == 0, rest.output
    assert [line.split()[:2] for line in rest.stdout.splitlines()[1:]] == [
        ["2024-04-02", "10:00:00"],
        ["2024-04-01", "10:00:00"],
    ]
    one = json.loads(runner.invoke(app, ["list", *base, "--json", "--limit", "1"]).stdout)
    assert (one["total"], one["total_exact"], len(one["items"])) == (4, True, 1)
    # --json pages the same way, by its `next`, until there is none.
    seen = [one["items"][0]["callid"]]
    while one["next"]:
        one = json.loads(
            runner.invoke(
                app, ["list", *base, "--json", "--limit", "1", "--after", one["next"]]
            ).stdout
        )
        seen += [item["callid"] for item in one["items"]]
    assert seen == [f"171456480{i}.{i}" for i in (3, 2, 1, 0)]
    for cursor in ("not-a-cursor", "fDk5OTk5OTk5OTk5OTk5OTk5OTk5"):  # the second: a huge id
        bad = runner.invoke(app, ["list", *base, "--after", cursor])
        assert bad.exit_code == 2 and "--after: not a cursor of a search" in bad.stderr
    every = json.loads(runner.invoke(app, ["list", *base, "--json", "--limit", "0"]).stdout)
    assert (every["limit"], every["total"], every["total_exact"], every["next"]) == (
        0,
        4,
        True,
        None,
    )
    assert len(every["items"]) == 4


def test_list_times_follow_the_saved_pbx_zone_not_the_hosts(
    archive: tuple[Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls were made at 10:00 in Paris. `serve` saved the PBX's zone; the host says
    Tokyo. Without a zone given, `list` shows and reads times in the saved one."""
    root, _ = archive
    monkeypatch.delenv("CALLVAULT_TIMEZONE")
    monkeypatch.setenv("TZ", "Asia/Tokyo")

    def shown(*extra: str) -> list[str]:
        """The first START cell of the text listing: the first call's time as shown."""
        result = runner.invoke(app, ["list", "--archive", str(root), *extra])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        return [lines[0].split()[1], " ".join(lines[-1].split()[:2])]

    def window(since: str, until: str, *extra: str) -> list[object]:
        found = listed_items("--archive", str(root), "--since", since, "--until", until, *extra)
        return [o["callid"] for o in found]

    # Nothing saved yet (an index from before this setting): the host's zone.
    assert shown() == ["(Asia/Tokyo)", "2024-04-01 17:00:00"]
    with open_index(f"sqlite:///{root / 'callvault.db'}") as index:
        index.settings.set(SettingKey.PBX_TIMEZONE, "Europe/Paris", NOW)
    assert shown() == ["(Europe/Paris)", "2024-04-01 10:00:00"]
    # --since/--until are read in the same zone: 10:00 to 10:01 on April 2nd, Paris time.
    assert window("2024-04-02T10:00", "2024-04-02T10:01") == ["1714564801.1"]
    # A zone given on purpose wins: flag, then CALLVAULT_TIMEZONE, then the config file.
    assert shown("--timezone", "UTC") == ["(UTC)", "2024-04-01 08:00:00"]
    assert window("2024-04-02T08:00", "2024-04-02T08:01", "--timezone", "UTC") == ["1714564801.1"]
    monkeypatch.setenv("CALLVAULT_TIMEZONE", "America/New_York")
    assert shown() == ["(America/New_York)", "2024-04-01 04:00:00"]
    assert shown("--timezone", "UTC") == ["(UTC)", "2024-04-01 08:00:00"]
    monkeypatch.delenv("CALLVAULT_TIMEZONE")
    config = root.parent / "callvault.toml"
    config.write_text('timezone = "Asia/Kolkata"\n', encoding="utf-8")
    assert shown("--config", str(config)) == ["(Asia/Kolkata)", "2024-04-01 13:30:00"]
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
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "callvault: error: --since: 'yesterday' is not a time: use YYYY-MM-DD or "
        "YYYY-MM-DD hh:mm[:ss]"
    )
    assert "Traceback" not in result.output


def test_status(archive: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = archive
    result = runner.invoke(app, ["status", "--json", "--archive", str(root)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recordings"] == {
        "pending": 1,
        "downloading": 0,
        "archived": 2,
        "failed": 1,
        "missing": 0,
        "deleted": 0,
    }
    assert report["recordings_total"] == 4
    assert (report["calls"], report["calls_with_recording"]) == (4, 4)
    assert [(f["state"], f["error"]) for f in report["failures"]] == [
        ("failed", "gave up after 8 timeouts")
    ]
    assert [r["error"] for r in report["retrying"]] == ["PBX said 20014: not ready"]
    assert report["last_event_at"] == "2024-05-01T12:00:00+00:00"
    session = report["pbx_session"]
    assert (session["state"], session["error"], session["last_contact_at"]) == (
        "error",
        HEALTH["error"],
        HEALTH["last_success_at"],
    )
    assert report["index_problems"] == []
    text = runner.invoke(app, ["status", "--archive", str(root)]).stdout
    assert "archived 2" in text and "gave up after 8 timeouts" in text
    assert "calls: 4 (4 with a recording, 0 without" in text
    assert "needs attention:" in text and "1 recording was given up on" in text
    assert "last event: " in text and "index: ok (quick check)" in text
    assert (
        "PBX session: not working: cannot log in to the PBX: wrong API username or password, "
        "errno 20003; last contact "
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
    storage = LocalStorage(root)
    paths = {
        o["name"]: Path(storage.locate(str(o["storage_key"])))
        for o in listed_items("--archive", str(root))
        if o["storage_key"]
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
    assert report["missing"][0]["name"] == gone
    assert report["missing"][0]["error"] == "the archived file is missing from storage"


def test_verify_reports_unindexed_files_without_failing(
    archive: tuple[Path, dict[str, bytes]],
) -> None:
    root, _ = archive
    stray = LocalStorage(root).put("369451090405/2024/04/09/stray.wav", io.BytesIO(b"RIFFx"))
    result = runner.invoke(app, ["verify", "--json", "--archive", str(root)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["unindexed"] == [stray.key]
    text = runner.invoke(app, ["verify", "--archive", str(root)]).stdout
    assert f"UNINDEXED {root.resolve() / stray.key}" in text and "; 1 unindexed file" in text


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
    assert json.loads(result.stdout)["recordings_total"] == 4
    config = tmp_path / "callvault.toml"
    config.write_text(f'archive = "{root}"\ndb = "sqlite:///{moved}"\n', encoding="utf-8")
    assert len(listed_items("--config", str(config))) == 4
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


def test_list_names_each_pbx_with_its_kind(tmp_path: Path) -> None:
    """With calls of several PBXs, `list` names each call's PBX and its kind."""
    root = tmp_path / "archive"
    root.mkdir()
    index = open_index(f"sqlite:///{root / 'callvault.db'}", create=True)
    pbxs = {
        "paris": PbxConfig(url="https://paris.example:8088", username="api"),
        "lyon": PbxConfig(url="https://lyon.example", username="client", kind="p-series"),
    }
    for number, (name, config) in enumerate(pbxs.items()):
        record = index.pbxs.add(
            name, config, password_sealed="v1.x.y", events_path=f"path-{name}", now=NOW
        )
        cdr = CallDetail(
            callid=f"1714564900.{number}",
            timestart="2024-04-01 10:00:00",
            callfrom="1001",
            callto="1002",
            recording=f"20240401100000-1714564900.{number}-1001-1002-Internal.wav",
        )
        index.calls.record([cdr], source="event", tz=PARIS, now=NOW, pbx_id=record.id)
    index.close()
    text = runner.invoke(app, ["list", "--archive", str(root)])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split()[0] == "PBX"
    assert sorted(" ".join(line.split()[:2]) for line in lines[1:]) == [
        "lyon (p-series)",
        "paris (s-series)",
    ]
