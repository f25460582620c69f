"""Backfill and reconciliation: calls whose events were missed are still archived.

The simulator only pushes events to logged-in app servers, so calls placed while no
archiver runs are exactly "events missed while serve was down".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from callvault.archive import Archiver
from callvault.archive._backfill import reconcile
from callvault.cli import _register, app
from callvault.index import SettingKey, Worker, open_index
from callvault.pbx._types import CallDetail
from callvault.simulator import Simulator, SimulatorConfig
from test_archive_flow import archiver_config, states, wait_until


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(seed=11, event_retry_interval=0.2)) as running:
        yield running


def _cli_env(sim: Simulator, archive: Path) -> dict[str, str]:
    return {
        "CALLVAULT_PASSWORD": sim.password,
        "CALLVAULT_PBX": sim.url,
        "CALLVAULT_USERNAME": sim.username,
        "CALLVAULT_PIN_SHA256": sim.cert_sha256 or "",
        "CALLVAULT_ARCHIVE": str(archive),
        "CALLVAULT_TIMEZONE": sim.config.timezone,
        "CALLVAULT_RETRY_SCHEDULE_S": "[0.2, 0.5]",
        "CALLVAULT_TRANSIENT_BACKOFF_S": "0.1",
        "CALLVAULT_TRANSIENT_BACKOFF_MAX_S": "0.5",
    }


def test_backfill_cli_archives_missed_calls_and_is_idempotent(
    sim: Simulator, tmp_path: Path
) -> None:
    _register()
    missed = [
        sim.place_call(callfrom=f"10{n:02d}", callto="1099", talk_seconds=1) for n in range(6)
    ]
    sim.place_call(status="NO ANSWER")
    archive = tmp_path / "archive"
    tz = ZoneInfo(sim.config.timezone)
    since = (datetime.now(tz) - timedelta(days=2)).strftime("%Y-%m-%d")
    runner = CliRunner()
    result = runner.invoke(app, ["backfill", "--since", since], env=_cli_env(sim, archive))
    assert result.exit_code == 0, result.output
    assert "6 recordings queued" in result.output and "6 archived" in result.output
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        assert states(index) == {"archived": 6}
        for cdr in missed:
            assert cdr.recording is not None
            row = index.recordings.by_name(cdr.recording)
            assert row is not None and row.source == "cdr" and row.storage_key is not None
            data = (archive / row.storage_key).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sim.recording_sha256(cdr.recording)
        progress = json.loads(index.settings.get(SettingKey.BACKFILL_PROGRESS) or "{}")
        assert progress["done_until"] == progress["until"]
    # Run again: every window is already done; nothing new is queued or downloaded.
    again = runner.invoke(app, ["backfill", "--since", since], env=_cli_env(sim, archive))
    assert again.exit_code == 0, again.output
    assert "0 recordings queued" in again.output
    # From scratch (--restart): the CDR is read again, still nothing is duplicated.
    fresh = runner.invoke(
        app, ["backfill", "--since", since, "--restart"], env=_cli_env(sim, archive)
    )
    assert fresh.exit_code == 0, fresh.output
    assert "0 recordings queued" in fresh.output
    assert len(list(archive.rglob("*.wav"))) == 6


def test_backfill_queue_only_then_serve_downloads(sim: Simulator, tmp_path: Path) -> None:
    _register()
    cdrs = [sim.place_call(talk_seconds=1) for _ in range(3)]
    archive = tmp_path / "archive"
    since = (datetime.now(ZoneInfo(sim.config.timezone)) - timedelta(hours=3)).strftime(
        "%Y-%m-%d %H:%M:%S"
    )
    result = CliRunner().invoke(
        app, ["backfill", "--since", since, "--queue-only"], env=_cli_env(sim, archive)
    )
    assert result.exit_code == 0, result.output
    assert "3 recordings queued" in result.output
    with open_index(f"sqlite:///{archive / 'callvault.db'}") as index:
        assert states(index) == {"pending": 3}
    assert not list(archive.rglob("*.wav"))
    with Archiver(archiver_config(sim, archive)) as archiver:
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 3}), states(index)
    assert {p.name for p in archive.rglob("*.wav")} == {c.recording for c in cdrs}


def test_backfill_refuses_bad_options(sim: Simulator, tmp_path: Path) -> None:
    _register()
    env = _cli_env(sim, tmp_path / "archive")
    bad_date = CliRunner().invoke(app, ["backfill", "--since", "last tuesday"], env=env)
    assert bad_date.exit_code == 2 and "bad --since" in bad_date.output
    reverse = CliRunner().invoke(
        app, ["backfill", "--since", "2024-05-02", "--until", "2024-05-01"], env=env
    )
    assert reverse.exit_code == 2 and "--until must be after --since" in reverse.output
    env["CALLVAULT_PASSWORD"] = "wrong-password"
    wrong = CliRunner().invoke(app, ["backfill", "--since", "2024-05-01"], env=env)
    assert wrong.exit_code == 1
    assert "wrong API username or password" in wrong.output
    assert "Traceback" not in wrong.output and "wrong-password" not in wrong.output


def test_serve_reconciles_missed_calls_at_start(sim: Simulator, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    with Archiver(archiver_config(sim, archive)) as archiver:
        index = archiver.index
        assert index is not None
        sim.place_call(talk_seconds=1)
        assert wait_until(lambda: states(index) == {"archived": 1})
    # Down: these events reach nobody.
    missed = [sim.place_call(talk_seconds=1) for _ in range(4)]
    with Archiver(archiver_config(sim, archive, reconcile_at_start=True)) as archiver:
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 5}), states(index)
        for cdr in missed:
            assert cdr.recording is not None
            row = index.recordings.by_name(cdr.recording)
            assert row is not None and row.sha256 == sim.recording_sha256(cdr.recording)


async def test_reconcile_without_a_cdr_export_only_requeues(tmp_path: Path) -> None:
    # API v1.0.1 has no CDR export: reconciliation must not call it (each hour would end in
    # an error) but still give failed recordings another run.
    class NoExport:
        async def export_cdr(
            self, start: datetime, end: datetime, *, extensions: str = "all"
        ) -> list[CallDetail]:
            raise AssertionError("the CDR export was asked for")

    index = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    with index:
        now = datetime(2024, 5, 1, 12, tzinfo=UTC)
        cdr = CallDetail(callid="1.1", recording="20240501120000-1.1-1001-1002-Internal.wav")
        index.calls.record([cdr], source="event", tz=UTC, now=now)
        [job] = index.jobs.claim(Worker(None, "w"), 1, now=now, lease=timedelta(minutes=5))
        assert index.jobs.mark_failed(
            job.recording_id, worker=Worker(None, "w"), reason="timeouts", now=now
        )
        woken: list[bool] = []
        stats = await reconcile(
            NoExport(), index, hours=48, tz=UTC, clock=lambda: now,
            on_queued=lambda: woken.append(True), cdr_export=False,
        )  # fmt: skip
        assert (stats.queued, stats.windows, woken) == (1, 0, [True])
        assert index.recordings.counts_by_state()["pending"] == 1
