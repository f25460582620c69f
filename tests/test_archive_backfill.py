"""Backfill and reconciliation: calls whose events were missed are still archived.

The simulator only pushes events to logged-in app servers, so calls placed while no
archiver runs are exactly "events missed while serve was down". The index runs on both
engines; `callvault backfill` runs in process (CliRunner) or, for signals, as a child.

What every kind of PBX does alike (missed calls archived, idempotent runs, queue-only
then serve, resuming without --until, serve reconciling at start) runs for each kind
(S-Series, Cloud, P-Series: `support.kinds`, the fixture `pbx`; a P-Series PBX's history
is read from cdr/search). The rest is about the S-Series CSV export (its one-day windows,
v1.0.1 without it, rows it refuses) and runs against it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from callvault.archive import Archiver, backfill, reconcile
from callvault.cli import _register, app
from callvault.index import SettingKey, Worker, open_index
from callvault.index.schema import recordings
from callvault.pbx import CSV_COLUMNS, CallDetail, PbxClient, TlsOptions, parse_cdr_csv
from callvault.simulator import Faults, Simulator
from support.archive import archiver_config, cli_env, outer_env, states, wait_until
from support.kinds import PbxUnderTest, kind_params, start_pbx

CALLVAULT = str(Path(sys.executable).with_name("callvault"))
# A caller this long makes a recording name over 255 characters: the index refuses the row
# (the name identifies the file and is never shortened). The '#' keeps the simulator from
# using the name as its own file name (too long for the file system).
REFUSED_CALLER = "#" + "9" * 250


def _days_ago(sim: Simulator | PbxUnderTest, days: int) -> str:
    zone = sim.config.timezone if isinstance(sim, Simulator) else sim.timezone
    return (datetime.now(ZoneInfo(zone)) - timedelta(days=days)).strftime("%Y-%m-%d")


@pytest.fixture(params=kind_params())
def pbx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PbxUnderTest]:
    """A running PBX of each kind; an S-Series or Cloud one re-sends an unanswered report
    after 0.2 s, as `events_sim` does."""
    with start_pbx(
        request.param, seed=7, faults=Faults(), workdir=tmp_path, event_retry_interval=0.2
    ) as running:
        yield running


def _place_calls_across_windows(sim: Simulator) -> tuple[CallDetail, CallDetail, CallDetail]:
    """30 hours ago: a good call and one the index refuses; now: another good call. The
    refused row sits in an earlier one-day window than the last good call."""
    sim.clock.advance(-30 * 3600)
    try:
        early = sim.place_call(callfrom="1001", talk_seconds=1)
        refused = sim.place_call(callfrom=REFUSED_CALLER, talk_seconds=1)
    finally:
        sim.clock.advance(30 * 3600)
    late = sim.place_call(callfrom="1002", talk_seconds=1)
    assert refused.recording is not None and len(refused.recording) > 255
    return early, refused, late


# -- the command -------------------------------------------------------------------------------


def test_backfill_cli_archives_missed_calls_and_is_idempotent(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str
) -> None:
    _register()
    missed = [
        pbx.place_call(call_from=f"10{n:02d}", call_to="1099", talk_seconds=1) for n in range(6)
    ]
    assert pbx.place_call(status="NO ANSWER") is None
    archive = tmp_path / "archive"
    env = pbx.cli_env(archive, db_url)
    since = _days_ago(pbx, 2)
    runner = CliRunner()
    result = runner.invoke(app, ["backfill", "--since", since], env=env)
    assert result.exit_code == 0, result.output
    assert "6 recordings queued" in result.output and "6 archived" in result.output
    with open_index(db_url) as index:
        assert states(index) == {"archived": 6}
        for name in missed:
            assert name is not None
            row = index.recordings.by_name(name)
            assert row is not None and row.source == "cdr" and row.storage_key is not None
            data = (archive / row.storage_key).read_bytes()
            assert hashlib.sha256(data).hexdigest() == pbx.recording_sha256(name)
        progress = json.loads(index.settings.get(SettingKey.BACKFILL_PROGRESS) or "{}")
        assert progress["done_until"] == progress["until"]
        # Its downloads ran as a registered process of this run alone, stopped at its end.
        [process] = index.processes.all()
        assert process.kind == "backfill" and "/backfill-" in process.node
        assert process.stopped_at is not None
    # Run again: every window is already done; nothing new is queued or downloaded.
    again = runner.invoke(app, ["backfill", "--since", since], env=env)
    assert again.exit_code == 0, again.output
    assert "0 recordings queued" in again.output
    # From scratch (--restart): the CDR is read again, still nothing is duplicated.
    fresh = runner.invoke(app, ["backfill", "--since", since, "--restart"], env=env)
    assert fresh.exit_code == 0, fresh.output
    assert "0 recordings queued" in fresh.output
    assert len(list(archive.rglob("*.wav"))) == 6


def test_backfill_ends_with_its_summary_without_waiting_on_jobs_that_cannot_progress(
    events_sim: Simulator, tmp_path: Path, db_url: str
) -> None:
    """An unsafe name fails at once; a recording the PBX has not written yet is tried on
    the not-found schedule and, once its next attempt is beyond backfill's patience (a
    minute), left pending for serve. Backfill ends with its summary line."""
    sim = events_sim
    _register()
    sim.faults.not_ready_seconds = 3600.0  # written an hour after its call: these two...
    sim.clock.advance(-2 * 3600)
    try:
        good = sim.place_call(callfrom="1001", talk_seconds=1)
        unsafe = sim.place_call(callfrom="10/01", talk_seconds=1)
    finally:
        sim.clock.advance(2 * 3600)
    late = sim.place_call(callfrom="1002", talk_seconds=1)  # ...are ready, this one is not
    env = cli_env(sim, tmp_path / "archive", db_url)
    env["CALLVAULT_RETRY_SCHEDULE_S"] = "[0.2, 600]"
    result = CliRunner().invoke(app, ["backfill", "--since", _days_ago(sim, 1)], env=env)
    assert result.exit_code == 1, result.output  # something failed
    last = result.output.strip().splitlines()[-1]
    assert last == (
        "backfill: 3 calls, 3 recordings queued; archive now: "
        "1 archived, 0 missing, 1 failed, 1 waiting"
    )
    with open_index(db_url) as index:
        rows = {
            cdr.callid: index.recordings.by_name(cdr.recording or "")
            for cdr in (good, unsafe, late)
        }
    assert rows[good.callid] is not None and rows[good.callid].state == "archived"  # type: ignore[union-attr]
    failed = rows[unsafe.callid]
    assert failed is not None and (failed.state, failed.attempts) == ("failed", 1)
    waiting = rows[late.callid]
    assert waiting is not None and waiting.state == "pending" and waiting.attempts == 2
    assert "20014" in (waiting.last_error or "")


def test_backfill_queue_only_then_serve_downloads(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str
) -> None:
    _register()
    names = [pbx.place_call(talk_seconds=1) for _ in range(3)]
    archive = tmp_path / "archive"
    since = (datetime.now(ZoneInfo(pbx.timezone)) - timedelta(hours=3)).strftime(
        "%Y-%m-%d %H:%M:%S"
    )
    result = CliRunner().invoke(
        app, ["backfill", "--since", since, "--queue-only"], env=pbx.cli_env(archive, db_url)
    )
    assert result.exit_code == 0, result.output
    assert "3 recordings queued" in result.output
    with open_index(db_url) as index:
        assert states(index) == {"pending": 3}
    assert not list(archive.rglob("*.wav"))
    with Archiver(pbx.archiver_config(archive, db_url=db_url)) as archiver:
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 3}), states(index)
    assert {p.name for p in archive.rglob("*.wav")} == set(names)


def test_backfill_refuses_bad_options(events_sim: Simulator, tmp_path: Path) -> None:
    sim = events_sim
    _register()
    env = cli_env(sim, tmp_path / "archive")
    bad_date = CliRunner().invoke(app, ["backfill", "--since", "last tuesday"], env=env)
    assert bad_date.exit_code == 2
    assert bad_date.output.strip().splitlines() == [
        "callvault: error: --since: 'last tuesday' is not a time: "
        "use YYYY-MM-DD or YYYY-MM-DD hh:mm[:ss]"
    ]
    reverse = CliRunner().invoke(
        app, ["backfill", "--since", "2024-05-02", "--until", "2024-05-01"], env=env
    )
    assert reverse.exit_code == 2 and "--until must be after --since" in reverse.output
    old = CliRunner().invoke(
        app, ["backfill", "--since", "2024-05-01", "--api-version", "v1.0.1"], env=env
    )
    assert old.exit_code == 2
    assert old.output.strip().splitlines() == [
        "callvault: error: API v1.0.1 has no CDR export to backfill from (it came with "
        "v1.1.0): give --api-version v1.1.0 or later if the PBX's firmware has it"
    ]
    assert not (tmp_path / "archive").exists()  # refused before anything was made
    env["CALLVAULT_PASSWORD"] = "wrong-password"
    wrong = CliRunner().invoke(app, ["backfill", "--since", "2024-05-01"], env=env)
    assert wrong.exit_code == 1
    assert "wrong API username or password" in wrong.output
    assert "Traceback" not in wrong.output and "wrong-password" not in wrong.output


def test_backfill_skips_a_refused_row_and_archives_the_rest(
    events_sim: Simulator, tmp_path: Path, db_url: str
) -> None:
    sim = events_sim
    _register()
    early, _refused, late = _place_calls_across_windows(sim)
    result = CliRunner().invoke(
        app, ["backfill", "--since", _days_ago(sim, 2)], env=cli_env(sim, tmp_path / "a", db_url)
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "1 invalid CDR row skipped" in result.output
    assert "2 archived" in result.output
    with open_index(db_url) as index:
        assert states(index) == {"archived": 2}
        assert index.recordings.by_name(early.recording or "") is not None
        assert index.recordings.by_name(late.recording or "") is not None


def test_backfill_without_until_resumes_where_the_last_run_stopped(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str
) -> None:
    _register()
    pbx.place_call(talk_seconds=1)
    env = pbx.cli_env(tmp_path / "archive", db_url)
    args = ["backfill", "--since", _days_ago(pbx, 3), "--queue-only"]
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    assert "1 recording queued" in first.output
    exports = pbx.cdr_reads()
    assert exports >= 4  # three whole days and today
    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0, again.output
    # Only the stretch since the first run is asked for: one short window.
    assert pbx.cdr_reads() == exports + 1
    match = re.search(r"(\d+) calls? in (\d+) windows? \((\d+) already done\)", again.output)
    assert match is not None, again.output
    assert (int(match.group(2)), int(match.group(3))) == (1, exports)
    # --restart ignores the progress: every window again.
    fresh = CliRunner().invoke(app, [*args, "--restart"], env=env)
    assert fresh.exit_code == 0, fresh.output
    assert pbx.cdr_reads() == 2 * exports + 1


def _downloading(db_url: str) -> int:
    try:
        with open_index(db_url, create=False) as index:
            return index.recordings.counts_by_state()["downloading"]
    except Exception:  # not made yet
        return 0


def test_backfill_sigterm_releases_the_jobs_and_logs_out(
    events_sim: Simulator, tmp_path: Path
) -> None:
    sim = events_sim
    for _ in range(3):
        sim.place_call(talk_seconds=1)
    archive = tmp_path / "archive"
    db_url = f"sqlite:///{archive / 'callvault.db'}"
    env = outer_env()
    env.update(cli_env(sim, archive))
    sim.state.faults.slow_seconds = 0.5  # every answer of the PBX takes a while
    argv = [CALLVAULT, "backfill", "--since", _days_ago(sim, 1)]
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while _downloading(db_url) == 0:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no download ever started"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "callvault: backfill terminated: no download left claimed, logged out; "
        "run it again to resume"
    )
    with open_index(db_url) as index:
        assert index.recordings.counts_by_state()["downloading"] == 0
        with index.engine.connect() as conn:
            claimed = conn.execute(
                select(recordings.c.id).where(recordings.c.claimed_by.is_not(None))
            ).all()
        assert claimed == []
        [process_row] = index.processes.all()
        assert process_row.stopped_at is not None
    staging = archive / ".callvault-incoming"
    assert not staging.exists() or list(staging.iterdir()) == []
    assert ("logout", "Success") in sim.request_log
    assert sim.state.session_count() == 0


# -- the library -------------------------------------------------------------------------------


def test_backfill_progress_is_kept_per_pbx_and_since(events_sim: Simulator, db_url: str) -> None:
    sim = events_sim
    tz = ZoneInfo(sim.config.timezone)
    since = datetime.now(tz).replace(microsecond=0) - timedelta(days=2)

    async def run(pbx: str, start: datetime) -> tuple[int, int]:
        client = PbxClient(
            sim.url, sim.username, sim.password, tls=TlsOptions(pin_sha256=sim.cert_sha256)
        )
        async with client:
            await client.login()
            stats = await backfill(
                client, index, since=start, until=datetime.now(tz), tz=tz, pbx=pbx
            )
        return stats.windows, stats.windows_skipped

    with open_index(db_url) as index:
        done, skipped = asyncio.run(run("https://pbx-a.example", since))
        assert skipped == 0 and done >= 3
        assert asyncio.run(run("https://pbx-a.example", since)) == (1, done)
        assert asyncio.run(run("https://pbx-b.example", since)) == (done, 0)
        assert '"pbx": "https://pbx-b.example"' in (
            index.settings.get(SettingKey.BACKFILL_PROGRESS) or ""
        )
        later = since + timedelta(hours=1)
        assert asyncio.run(run("https://pbx-b.example", later))[1] == 0


def test_serve_reconciles_missed_calls_at_start(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str
) -> None:
    archive = tmp_path / "archive"
    with Archiver(pbx.archiver_config(archive, db_url=db_url)) as archiver:
        index = archiver.index
        assert index is not None
        assert pbx.wait_events_ready()
        pbx.place_call(talk_seconds=1)
        assert wait_until(lambda: states(index) == {"archived": 1})
    # Down: these events reach nobody.
    missed = [pbx.place_call(talk_seconds=1) for _ in range(4)]
    config = pbx.archiver_config(archive, db_url=db_url, reconcile_at_start=True)
    with Archiver(config) as archiver:
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 5}), states(index)
        for name in missed:
            assert name is not None
            row = index.recordings.by_name(name)
            assert row is not None and row.sha256 == pbx.recording_sha256(name)


def test_reconcile_skips_a_refused_row_and_goes_on_with_later_windows(
    events_sim: Simulator, tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sim = events_sim
    early, refused, late = _place_calls_across_windows(sim)
    caplog.set_level(logging.INFO, logger="callvault.archive")
    config = archiver_config(sim, tmp_path / "archive", db_url=db_url, reconcile_at_start=True)
    with Archiver(config) as archiver:
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
        for good in (early, late):
            assert good.recording is not None
            row = index.recordings.by_name(good.recording)
            assert row is not None and row.sha256 == sim.recording_sha256(good.recording)
        assert refused.recording is not None
        assert index.recordings.by_name(refused.recording[:255]) is None
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert any(refused.callid in r.getMessage() for r in skipped), skipped
    assert not any("reconcile failed" in r.getMessage() for r in caplog.records)


async def test_reconcile_without_a_cdr_export_only_requeues(db_url: str) -> None:
    # API v1.0.1 has no CDR export: reconciliation must not call it (each hour would end in
    # an error) but still give failed recordings another run.
    class NoExport:
        async def export_cdr_range(
            self, start: datetime, end: datetime, tz: object, *, extensions: str = "all"
        ) -> list[CallDetail]:
            raise AssertionError("the CDR export was asked for")

    with open_index(db_url) as index:
        now = datetime(2024, 5, 1, 12, tzinfo=UTC)
        cdr = CallDetail(callid="1.1", recording="20240501120000-1.1-1001-1002-Internal.wav")
        index.calls.record([cdr], source="event", tz=ZoneInfo("UTC"), now=now)
        worker = Worker(None, "w")
        [job] = index.jobs.claim(worker, 1, now=now, lease=timedelta(minutes=5))
        assert index.jobs.mark_failed(job.recording_id, worker=worker, reason="timeouts", now=now)
        woken: list[bool] = []
        stats = await reconcile(
            NoExport(), index, hours=48, tz=ZoneInfo("UTC"), clock=lambda: now,
            on_queued=lambda: woken.append(True), cdr_export=False,
        )  # fmt: skip
        assert (stats.queued, stats.windows, woken) == (1, 0, [True])
        assert index.recordings.counts_by_state()["pending"] == 1


def test_the_cdr_export_is_asked_for_one_day_at_a_time_in_the_pbxs_time(
    events_sim: Simulator, db_url: str
) -> None:
    sim = events_sim
    tz = ZoneInfo(sim.config.timezone)
    since = datetime(2024, 3, 30, 12, tzinfo=tz)
    until = since + timedelta(days=2, hours=3)
    asked: list[tuple[datetime, datetime]] = []

    class Recorder:
        async def export_cdr_range(
            self, start: datetime, end: datetime, tz: object, *, extensions: str = "all"
        ) -> list[CallDetail]:
            asked.append((start, end))
            return []

    with open_index(db_url) as index, contextlib.closing(asyncio.new_event_loop()) as loop:
        stats = loop.run_until_complete(
            backfill(Recorder(), index, since=since, until=until, tz=tz)
        )
    assert stats.windows == 3 == len(asked)
    assert asked[0][0] == since and asked[-1][1] == until
    assert all(end - start <= timedelta(days=1) for start, end in asked)


async def test_rows_with_impossible_times_are_skipped_and_the_rest_recorded(db_url: str) -> None:
    """The index's door refuses CDR rows of calls no PBX made (a start in year 9999 or year
    1, a duration of millennia, however many digits it is written with); the rest of the
    export is recorded."""
    header = ",".join(CSV_COLUMNS)

    def row(callid: str, timestart: str, duration: str) -> str:
        values = dict.fromkeys(CSV_COLUMNS, "")
        values.update(
            callid=callid,
            timestart=timestart,
            callduraction=duration,
            recording=f"20240501100000-{callid}-1001-1002-Internal.wav",
        )
        return ",".join(values[column] for column in CSV_COLUMNS)

    csv = (
        "\r\n".join(
            [
                header,
                row("1.1", "2024-05-01 10:00:00", "20"),
                row("1.2", "9999-12-31 23:59:59", "20"),
                row("1.3", "0001-01-01 00:00:00", "20"),
                row("1.4", "2024-05-01 10:00:00", "99999999999999999999999:00"),
                row("1.5", "2024-05-01 10:00:00", "9" * 5000 + ":00"),
                row("1.6", "2024-05-01 10:00:00", "1e300"),
            ]
        )
        + "\r\n"
    )
    rows = parse_cdr_csv(csv)

    class Export:
        async def export_cdr_range(
            self, start: datetime, end: datetime, tz: object, *, extensions: str = "all"
        ) -> list[CallDetail]:
            return rows

    berlin = ZoneInfo("Europe/Berlin")
    with open_index(db_url) as index:
        since = datetime(2024, 5, 1, tzinfo=berlin)
        stats = await backfill(
            Export(), index, since=since, until=since + timedelta(hours=1), tz=berlin
        )
        assert (stats.calls, stats.queued, stats.skipped) == (1, 1, 5)
        assert index.recordings.counts_by_state()["pending"] == 1
