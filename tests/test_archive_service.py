"""The archiver end to end: the real simulator over HTTPS, the real receiver on 127.0.0.1,
the index on both engines.

Calls placed on the simulated PBX push NewCdr to the archiver, whose workers download
each recording and store it; the tests compare the archived bytes with the simulator's,
and check what becomes of recordings that are late, gone, refused or oddly named.

What every kind of PBX does alike (events to archived bytes, duplicate events, "not
ready", transient faults, re-login) runs for each kind (S-Series, Cloud, P-Series:
`support.kinds`, the fixture `pbx`); the rest is about the S-Series API and its posted
reports, and runs against it alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from callvault.archive import Archiver, RetryPolicy
from callvault.index import open_index
from callvault.index.schema import ARCHIVED
from callvault.simulator import Faults, Simulator, SimulatorConfig
from support.archive import FAST_POLICY, archiver_config, file_sha256, states, wait_until
from support.kinds import PbxUnderTest, kind_params, start_pbx


@pytest.fixture(params=kind_params())
def pbx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PbxUnderTest]:
    """A running PBX of each kind; an S-Series or Cloud one re-sends an unanswered report
    after 0.2 s, as `events_sim` does."""
    with start_pbx(
        request.param, seed=7, faults=Faults(), workdir=tmp_path, event_retry_interval=0.2
    ) as running:
        yield running


def test_event_to_archived_bytes_equal_the_pbx(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str
) -> None:
    archive = tmp_path / "archive"
    with Archiver(pbx.archiver_config(archive, db_url=db_url)) as archiver:
        assert pbx.wait_events_ready()
        names = [
            pbx.place_call(call_from="1001", call_to="1003", talk_seconds=2),
            pbx.place_call(
                call_from="1002", call_to="015112345678", call_type="Outbound", talk_seconds=3
            ),
            pbx.place_call(call_from="1004", call_to="1005", status="NO ANSWER"),
        ]
        assert names[2] is None  # not answered: no recording
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 2}), states(index)
        assert archiver.session is not None and archiver.session.health["state"] == "ok"
        # The process that downloads is registered, its workers alive.
        assert archiver.pool is not None and archiver.pool.alive == archiver.pool.configured
    with open_index(db_url) as index:
        for name in names[:2]:
            assert name is not None
            row = index.recordings.by_name(name)
            assert row is not None and row.state == "archived"
            assert row.storage_key is not None and row.sha256 == pbx.recording_sha256(name)
            path = archive / row.storage_key
            assert path.is_file() and file_sha256(path) == row.sha256
            assert row.storage_key.startswith(f"{pbx.serial}/")
            assert row.size == path.stat().st_size
        [entry] = index.pbxs.list()  # the PBX of the flags, with its session's health
        assert entry.session["state"] in ("ok", "stopped")
        [process, node] = sorted(index.processes.all(), key=lambda p: p.kind, reverse=True)
        assert (process.kind, process.workers_configured) == ("serve", 2)
        assert process.stopped_at is not None  # a clean stop
        assert (node.kind, node.stopped_at is not None) == ("node", True)
        [lease] = index.leases.all()  # the node held the PBX, and released it at the end
        assert (lease.pbx_id, lease.node, lease.token) == (entry.id, None, 1)
    staging = archive / ".callvault-incoming"
    assert not staging.exists() or list(staging.iterdir()) == []


def test_duplicate_events_archive_once(pbx: PbxUnderTest, tmp_path: Path, db_url: str) -> None:
    archive = tmp_path / "archive"
    with Archiver(pbx.archiver_config(archive, db_url=db_url)) as archiver:
        assert pbx.wait_events_ready()
        name = pbx.place_call(talk_seconds=2)
        assert name is not None
        pbx.repeat_new_cdr(name, archiver, 5)
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 1})
        time.sleep(0.5)  # re-sent events after archiving must not reset it
        pbx.repeat_new_cdr(name, archiver, 3)
        time.sleep(0.3)  # P-Series: the WebSocket's events are committed a moment later
        row = index.recordings.by_name(name)
        assert row is not None and row.state == "archived" and row.attempts == 1
        assert archiver.pool is not None and archiver.pool.archived == 1
    assert len(list(archive.rglob("*.wav"))) == 1


@pytest.mark.parametrize("kind", kind_params())
def test_not_ready_then_ready(kind: str, tmp_path: Path, db_url: str) -> None:
    # P-Series: the recording is unknown to its API for that second (60001).
    faults = Faults(not_ready_seconds=1.0)
    with start_pbx(kind, seed=3, faults=faults, workdir=tmp_path, event_retry_interval=0.2) as pbx:
        archive = tmp_path / "archive"
        with Archiver(pbx.archiver_config(archive, db_url=db_url)) as archiver:
            assert pbx.wait_events_ready()
            name = pbx.place_call(talk_seconds=2)
            assert name is not None
            index = archiver.index
            assert index is not None
            assert wait_until(lambda: states(index) == {"archived": 1}, timeout=15)
            row = index.recordings.by_name(name)
            assert row is not None and row.attempts >= 2  # at least one "not ready" first
            assert row.sha256 == pbx.recording_sha256(name)
            assert row.missing_since is None and row.last_error is None


def test_missing_after_the_bound_with_the_reason(
    events_sim: Simulator, tmp_path: Path, db_url: str
) -> None:
    sim = events_sim
    archive = tmp_path / "archive"
    with Archiver(archiver_config(sim, archive, db_url=db_url)) as archiver:
        sim.faults.delete_rate = 1.0
        cdr = sim.place_call(talk_seconds=2)
        sim.faults.delete_rate = 0.0
        kept = sim.place_call(talk_seconds=2)
        assert cdr.recording is not None and kept.recording is not None
        index = archiver.index
        assert index is not None
        assert wait_until(lambda: states(index) == {"archived": 1, "missing": 1}, timeout=20), (
            states(index)
        )
        row = index.recordings.by_name(cdr.recording)
        assert row is not None and row.state == "missing"
        assert row.last_error is not None and "does not exist" in row.last_error
        assert "20014" in row.last_error
        assert row.attempts >= FAST_POLICY.missing_min_attempts
    assert not list(archive.rglob(cdr.recording))


@pytest.mark.parametrize("kind", kind_params())
def test_transient_faults_are_retried_until_archived(
    kind: str, tmp_path: Path, db_url: str
) -> None:
    with start_pbx(
        kind, seed=5, faults=Faults(), workdir=tmp_path, event_retry_interval=0.2
    ) as pbx:
        archive = tmp_path / "archive"
        with Archiver(pbx.archiver_config(archive, db_url=db_url)) as archiver:
            assert archiver.session is not None
            assert wait_until(archiver.session.ready.is_set)
            assert pbx.wait_events_ready()
            # Downloads dropped mid-body, then 5xx and HTML pages on the API calls (a
            # P-Series PBX: 5xx on its API calls, an HTML 404 page on a file GET).
            pbx.faults.drop_next_downloads = 3
            pbx.faults.error_5xx_next = 2
            pbx.faults.html_error_next = 1
            names = [pbx.place_call(talk_seconds=2) for _ in range(3)]
            index = archiver.index
            assert index is not None
            assert wait_until(lambda: states(index) == {"archived": 3}, timeout=30), states(index)
            for name in names:
                assert name is not None
                row = index.recordings.by_name(name)
                assert row is not None and row.sha256 == pbx.recording_sha256(name)


def test_an_unsafe_name_fails_at_once_and_a_non_ascii_one_is_archived(
    events_sim: Simulator, tmp_path: Path, db_url: str
) -> None:
    """A name with a '/' can never be a file name: the job fails at its first attempt with
    the reason, and never reaches the PBX session's health. A name with non-ASCII letters
    (raw bytes in the download's Content-Disposition) is archived like any other."""
    sim = events_sim
    archive = tmp_path / "archive"
    with Archiver(archiver_config(sim, archive, db_url=db_url)) as archiver:
        index, session = archiver.index, archiver.session
        assert index is not None and session is not None
        unsafe = sim.place_call(callfrom="10/01", talk_seconds=1)
        umlaut = sim.place_call(callfrom="Müller", talk_seconds=1)
        assert unsafe.recording is not None and umlaut.recording is not None
        assert wait_until(lambda: states(index) == {"archived": 1, "failed": 1}), states(index)
        failed = index.recordings.by_name(unsafe.recording)
        assert failed is not None and failed.state == "failed" and failed.attempts == 1
        assert failed.last_error is not None and "'/'" in failed.last_error
        archived = index.recordings.by_name(umlaut.recording)
        assert archived is not None and archived.sha256 == sim.recording_sha256(umlaut.recording)
        assert session.health["state"] == "ok"
        assert archived.storage_key is not None
    # Under a safe key of its own: the only file.
    assert [p.relative_to(archive).as_posix() for p in archive.rglob("*.wav")] == [
        archived.storage_key
    ]


def test_reports_with_a_broken_clock_are_refused_and_the_workers_carry_on(
    events_sim: Simulator, tmp_path: Path, db_url: str
) -> None:
    """Two reports of calls in year 9999 whose recordings the PBX does not have used to end
    both workers (an overflow in the retry arithmetic), silently and for good. They are
    refused at the door now (400: the PBX stops re-sending them), and calls after them are
    archived."""
    sim = events_sim
    with Archiver(archiver_config(sim, tmp_path / "archive", db_url=db_url)) as archiver:
        index = archiver.index
        assert index is not None
        for n in (1, 2):
            report = {
                "action": "NewCdr",
                "callid": f"253402300799.{n}",
                "timestart": "9999-12-31 23:59:59",
                "callfrom": "1001",
                "callto": "1003",
                "callduraction": "7200",
                "talkduraction": "7190",
                "status": "ANSWERED",
                "type": "Internal",
                "recording": f"99991231235959-253402300799.{n}-1001-1003-Internal.wav",
            }
            answer = httpx.post(archiver.events_url, json=report)
            assert answer.status_code == 400 and "out of range" in answer.json()["message"]
        cdr = sim.place_call(talk_seconds=1)
        assert cdr.recording is not None
        assert wait_until(lambda: states(index) == {"archived": 1}), states(index)
        assert archiver.pool is not None and archiver.pool.alive == 2


def test_reboot_and_revoked_tokens_lead_to_relogin(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str
) -> None:
    config = pbx.archiver_config(tmp_path / "archive", db_url=db_url, heartbeat_interval_s=0.3)
    with Archiver(config) as archiver:
        index = archiver.index
        session = archiver.session
        assert index is not None and session is not None
        assert pbx.wait_events_ready()
        pbx.place_call(talk_seconds=1)
        assert wait_until(lambda: states(index) == {"archived": 1})
        logins, pbx_logins = session.logins, pbx.pbx_logins
        # Tokens gone, BootUp pushed: the session logs in again.
        pbx.reboot()
        if pbx.kind == "p-series":
            # A restarted P-Series PBX sends no BootUp and its WebSocket just closes: the
            # client itself gets a new token (get_token) at the heartbeat's 10004, by
            # design (see callvault.pbx._pseries), without a new login of the session.
            assert wait_until(lambda: pbx.pbx_logins > pbx_logins, timeout=10)
        else:
            assert wait_until(lambda: session.logins > logins, timeout=10)
        # Tokens revoked without a report: events stop until the next heartbeat's token
        # error makes the client log in again.
        pbx_logins = pbx.pbx_logins
        pbx.revoke_tokens()
        assert wait_until(lambda: pbx.pbx_logins > pbx_logins, timeout=10)
        assert pbx.wait_events_ready()  # P-Series: the WebSocket is open again
        pbx.place_call(talk_seconds=1)
        assert wait_until(lambda: states(index) == {"archived": 2}, timeout=15), states(index)
        assert session.health["state"] == "ok"


def test_a_live_call_read_in_the_wrong_zone_is_archived_once_ready(
    tmp_path: Path, db_url: str
) -> None:
    policy = RetryPolicy(
        not_found_schedule_s=(0.2, 0.3, 0.5),
        missing_after_s=120.0,
        missing_min_attempts=4,
        old_call_min_attempts=3,
        transient_base_s=0.1,
        transient_max_s=0.5,
        jitter=0.1,
    )
    with Simulator(SimulatorConfig(seed=3, event_retry_interval=0.2)) as sim:
        assert sim.config.timezone != "Asia/Tokyo"
        # Tokyo is hours ahead of the PBX's zone: every call seems to have ended hours ago.
        tokyo = ZoneInfo("Asia/Tokyo")
        config = archiver_config(sim, tmp_path / "a", db_url=db_url, policy=policy, timezone=tokyo)
        with Archiver(config) as archiver:
            index = archiver.index
            assert index is not None
            sim.faults.not_ready_seconds = 2.0  # the PBX is still writing the file
            cdr = sim.place_call(talk_seconds=1)
            assert cdr.recording is not None
            assert wait_until(lambda: bool(set(states(index)) & {"archived", "missing"}), 60)
            row = index.recordings.by_name(cdr.recording)
            assert row is not None and row.state == ARCHIVED, (row.state if row else None, row)
            assert row.attempts >= 2 and row.sha256 == sim.recording_sha256(cdr.recording)


def test_over_long_fields_block_neither_reconciliation_nor_events(
    tmp_path: Path, db_url: str
) -> None:
    with Simulator(SimulatorConfig(seed=3, event_retry_interval=0.2)) as sim:
        # Missed while the archiver was down, between two good ones.
        missed = [
            sim.place_call(callfrom="1001", talk_seconds=1),
            sim.place_call(callfrom="9" * 129, talk_seconds=1),
            sim.place_call(callfrom="1002", talk_seconds=1),
        ]
        config = archiver_config(sim, tmp_path / "a", db_url=db_url, reconcile_at_start=True)
        with Archiver(config) as archiver:
            index = archiver.index
            assert index is not None
            assert wait_until(lambda: states(index) == {"archived": 3}, 60), states(index)
            live = sim.place_call(callfrom="8" * 129, talk_seconds=1)
            assert wait_until(lambda: states(index) == {"archived": 4}, 60), states(index)
            for cdr in [*missed, live]:
                assert cdr.recording is not None
                row = index.recordings.by_name(cdr.recording)
                assert row is not None and row.sha256 == sim.recording_sha256(cdr.recording)
                assert row.call_from == cdr.callfrom[:128]
                assert f'"callfrom": "{cdr.callfrom}"' in row.raw
