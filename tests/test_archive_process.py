"""The process lifecycle: claims belong to a registered process with a heartbeat, a
restarted `serve` takes over the downloads its predecessor held within seconds (not when
the 300 s lease runs out), a process whose registration was taken over stops downloading
at once (fencing), and `serve` shuts down cleanly after jobs that once killed its workers.

Real `callvault serve` child processes, the real simulator, the index on both engines.

What `serve` does with a PBX runs for each kind (S-Series, Cloud, P-Series:
`support.kinds`): a SIGKILLed serve's download resumed at its restart and archived once,
a clean exit 0 after jobs that once killed its workers, and the one-line exit of a serve
whose registration was taken over (S-Series and P-Series only: the Cloud PBX is the
S-Series API, and what is tested is serve's registration, not the API). The
registration's own tests and the fencing of the download pool (a downloader the test
holds, which no PBX's kind reaches) run once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update

from callvault.archive import (
    Downloads,
    PoolOptions,
    ProcessRegistration,
    backfill_node,
    default_node,
    process_alive,
)
from callvault.index import Index, RecordingRow, open_index
from callvault.index.schema import ARCHIVED, DOWNLOADING, PENDING, calls
from callvault.pbx import CallDetail
from callvault.simulator import Faults
from callvault.storage import LocalStorage
from support.archive import (
    FAST_POLICY,
    Downloader,
    ServeProcess,
    free_port,
    until,
    wait_until,
)
from support.kinds import PbxUnderTest, kind_params, start_pbx

TZ = ZoneInfo("UTC")
NAME = "20240501120000-1714564800.1-1001-1002-Internal.wav"


def _record(index: Index, callid: str = "1714564800.1", name: str = NAME) -> int:
    [result] = index.calls.record(
        [CallDetail(callid=callid, recording=name)], source="event", tz=TZ, now=datetime.now(UTC)
    )
    assert result.recording_id is not None
    return result.recording_id


def _row(index: Index, recording_id: int) -> RecordingRow:
    row = index.recordings.by_id(recording_id)
    assert row is not None
    return row


# -- registration -----------------------------------------------------------------------------


def test_a_registration_is_a_row_with_a_heartbeat_and_a_clean_stop(index: Index) -> None:
    registration = ProcessRegistration.register(index, node="node-a", kind="serve", workers=3)
    info = registration.info
    assert (info.node, info.kind, info.pid, info.workers_configured) == (
        "node-a",
        "serve",
        os.getpid(),
        3,
    )
    assert registration.worker(1).name == f"p{info.id}:w1"
    assert registration.worker(1).process_id == info.id
    assert registration.heartbeat(workers_alive=2, detail={"archived": 5})
    [live] = index.processes.live(now=datetime.now(UTC), stale_after=timedelta(seconds=30))
    assert (live.id, live.workers_alive, live.detail) == (info.id, 2, {"archived": 5})
    registration.stop()
    assert index.processes.live(now=datetime.now(UTC), stale_after=timedelta(seconds=30)) == []
    assert not registration.heartbeat(workers_alive=2)


def test_node_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_node()
    assert backfill_node("site-1") == f"site-1/backfill-{os.getpid()}"
    assert backfill_node() == f"{default_node()}/backfill-{os.getpid()}"


def test_dead_local_processes_are_stopped_even_when_their_pid_was_reused(index: Index) -> None:
    now = datetime.now(UTC)
    hostname = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def row(node: str, pid: int, started: datetime) -> int:
        return index.processes.register(
            node=node, kind="serve", hostname=hostname, pid=pid, workers=1, now=started
        ).id

    gone = row("gone", dead.pid, now)
    # A row of this very pid, registered long before this process started: the pid was
    # reused (as a container's serve is pid 1 on every start).
    reused = row("reused", os.getpid(), now - timedelta(days=3))
    elsewhere = index.processes.register(
        node="other", kind="serve", hostname="another-host", pid=dead.pid, workers=1, now=now
    ).id
    assert process_alive(os.getpid()) and not process_alive(dead.pid)
    if sys.platform == "linux":
        assert not process_alive(os.getpid(), registered_at=now - timedelta(days=3))
    fresh = ProcessRegistration.register(index, node="me", kind="serve", workers=1)
    assert fresh.info.hostname == hostname
    stopped = {p.id for p in index.processes.all() if p.stopped_at is not None}
    assert gone in stopped and elsewhere not in stopped and fresh.process_id not in stopped
    if sys.platform == "linux":
        assert reused in stopped


# -- fencing ----------------------------------------------------------------------------------


async def test_a_superseded_process_stops_downloading_at_once(
    index: Index, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recording_id = _record(index)
    storage = LocalStorage(tmp_path / "archive")
    client = Downloader(hold=True)
    options = PoolOptions(workers=1, poll_interval_s=0.05, heartbeat_s=0.05, policy=FAST_POLICY)
    caplog.set_level(logging.INFO, logger="callvault.archive")
    downloads = Downloads(index, storage, client, tz=TZ, kind="serve", node="n1", options=options)
    pool = await downloads.start()
    try:
        await asyncio.wait_for(client.started.wait(), 30)
        first = downloads.registration
        assert first is not None and _row(index, recording_id).claim_process_id == first.process_id
        await until(lambda: bool(index.processes.all()[0].workers_alive == 1))
        # Another start of node n1 (a second serve by mistake, or this one's restart).
        newer = await asyncio.to_thread(
            ProcessRegistration.register, index, node="n1", kind="serve", workers=1
        )
        await asyncio.wait_for(downloads.fenced.wait(), 30)
        await until(lambda: pool.alive == 0)  # the download in flight was cancelled
    finally:
        client.release.set()
        await downloads.stop()
    row = _row(index, recording_id)
    assert row.state in (PENDING, DOWNLOADING) and client.finished == 0
    # Its claim is the newer process's to take at once.
    [job] = index.jobs.claim(newer.worker(0), 1, now=datetime.now(UTC), lease=timedelta(minutes=5))
    assert job.recording_id == recording_id
    fenced = [r for r in caplog.records if "marked stopped" in r.getMessage()]
    assert fenced and fenced[0].levelno == logging.ERROR
    assert "--node" in str(downloads.fenced_error())
    assert not list(storage.staging_dir().iterdir())  # its staging area is gone


# -- serve killed and started again -------------------------------------------------------------


@pytest.fixture
def pbx(kind: str, tmp_path: Path) -> Iterator[PbxUnderTest]:
    """A running PBX of the test's `kind`; an S-Series or Cloud one re-sends an unanswered
    report after 0.2 s (as `events_sim` does)."""
    with start_pbx(
        kind, seed=7, faults=Faults(), workdir=tmp_path, event_retry_interval=0.2
    ) as running:
        yield running


def _serve_ready(pbx: PbxUnderTest, logins_before: int) -> bool:
    """Serve logged in to the PBX (so an S-Series PBX posts it its reports), and a
    P-Series PBX sends it its events (over the WebSocket serve opened since)."""
    return wait_until(lambda: pbx.pbx_logins > logins_before, 60) and pbx.wait_events_ready()


def _latest_serve(db_url: str) -> int:
    with open_index(db_url) as index:
        return max(p.id for p in index.processes.all() if p.kind == "serve")


@pytest.mark.parametrize("kind", kind_params())
@pytest.mark.parametrize("restart_as", ["same-node", "other-node"])
def test_a_killed_serves_download_resumes_within_seconds_of_the_restart(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str, restart_as: str
) -> None:
    """SIGKILL `serve` while it downloads, start it again: the new process claims the
    recording at once (the lease of 300 s is left as it is), and it is archived once. The
    same node supersedes its earlier incarnation as it registers; another node name on the
    same host finds the old pid gone."""
    archive = tmp_path / "archive"
    logs = tmp_path / "logs"
    logs.mkdir()
    serve = ServeProcess(pbx.serve_env(archive, free_port(), db_url), logs)
    try:
        logins = pbx.pbx_logins
        serve.start("--node", "site-1")
        assert _serve_ready(pbx, logins), serve.log_text()
        pbx.faults.slow_seconds = 1.0  # every answer of the PBX takes a second
        recording = pbx.place_call(talk_seconds=1)
        assert recording is not None
        name = recording

        def claimed_by() -> int | None:
            with open_index(db_url) as index:
                row = index.recordings.by_name(name)
            return row.claim_process_id if row is not None else None

        assert wait_until(lambda: claimed_by() is not None, 60), serve.log_text()
        first = claimed_by()
        serve.kill()
        with open_index(db_url) as index:
            row = index.recordings.by_name(name)
            assert row is not None and row.state == DOWNLOADING
            assert row.claimed_until is not None
            assert row.claimed_until - datetime.now(UTC) > timedelta(seconds=200)  # the lease
        serve.start("--node", "site-1" if restart_as == "same-node" else "site-2")
        assert wait_until(lambda: claimed_by() not in (None, first), 60), serve.log_text()
        assert claimed_by() == _latest_serve(db_url)
        pbx.faults.slow_seconds = 0.0

        def archived() -> bool:
            with open_index(db_url) as index:
                row = index.recordings.by_name(name)
            return row is not None and row.state == ARCHIVED

        assert wait_until(archived, 60), serve.log_text()
        assert serve.terminate() == 0
    finally:
        serve.stop()
    with open_index(db_url) as index:
        row = index.recordings.by_name(name)
        assert row is not None and row.attempts == 2 and row.sha256 == pbx.recording_sha256(name)
        rows = index.processes.all()
        [lease] = index.leases.all()
    # Two serves' download workers and two node rows, all stopped; the PBX released.
    assert sorted(p.kind for p in rows) == ["node", "node", "serve", "serve"]
    assert all(p.stopped_at is not None for p in rows)
    assert lease.node is None and lease.token == 2
    assert [p.name for p in archive.rglob("*.wav")] == [name]
    assert "Traceback" not in serve.log_text()


@pytest.mark.parametrize("kind", kind_params())
def test_serve_after_jobs_that_killed_its_workers_stops_with_exit_0(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str
) -> None:
    """Two jobs of calls in year 9999 whose recordings the PBX does not have (stored by an
    earlier version, before the door checked times) once ended both workers: `status`
    said "downloading", nothing was logged, SIGTERM exited 1 with "Task exception was
    never retrieved". Now their retries are decided, later calls are archived, and SIGTERM
    exits 0."""
    with open_index(db_url) as index:
        odd = [
            _record(index, f"253402300799.{n}", f"99991231235959-253402300799.{n}-1-2-Internal.wav")
            for n in (1, 2)
        ]
        with index.engine.begin() as conn:
            conn.execute(
                update(calls)
                .where(calls.c.callid.like("253402300799.%"))
                .values(start_at=datetime(9999, 12, 31, 23, 0, tzinfo=UTC), duration_s=7200)
            )
    archive = tmp_path / "archive"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = pbx.serve_env(archive, free_port(), db_url)
    env["CALLVAULT_TIMEZONE"] = "UTC"
    serve = ServeProcess(env, logs)
    try:
        logins = pbx.pbx_logins
        serve.start()
        assert _serve_ready(pbx, logins), serve.log_text()

        def attempted() -> bool:
            with open_index(db_url) as index:
                rows: list[Any] = [index.recordings.by_id(n) for n in odd]
            return all(r is not None and r.attempts >= 2 and r.state != DOWNLOADING for r in rows)

        assert wait_until(attempted, 60), serve.log_text()
        recording = pbx.place_call(talk_seconds=1)
        assert recording is not None

        def archived() -> bool:
            with open_index(db_url) as index:
                row = index.recordings.by_name(recording)
            return row is not None and row.state == ARCHIVED

        assert wait_until(archived, 60), serve.log_text()

        def workers() -> list[tuple[int, int]]:
            with open_index(db_url) as index:
                live = index.processes.live(
                    now=datetime.now(UTC), stale_after=timedelta(seconds=30)
                )
            return [(p.workers_alive, p.workers_configured) for p in live if p.kind == "serve"]

        assert wait_until(lambda: workers() == [(2, 2)], 30), workers()
        assert serve.terminate() == 0, serve.log_text()
    finally:
        serve.stop()
    text = serve.log_text()
    assert "Task exception was never retrieved" not in text and "Traceback" not in text
    assert "died" not in text


@pytest.mark.parametrize("kind", ["s-series", "p-series"])
def test_a_serve_whose_registration_is_taken_over_stops_with_one_line(
    pbx: PbxUnderTest, tmp_path: Path, db_url: str
) -> None:
    """A second start of the same node (here: its node row registered by hand, as a start
    does first) ends the first one's registration: at its next heartbeat it stops
    downloading, shuts down and exits 1 with one line saying why and what to do."""
    logs = tmp_path / "logs"
    logs.mkdir()
    serve = ServeProcess(pbx.serve_env(tmp_path / "archive", free_port(), db_url), logs)
    try:
        logins = pbx.pbx_logins
        serve.start("--node", "site-1")
        assert _serve_ready(pbx, logins), serve.log_text()
        with open_index(db_url) as index:
            index.processes.register(
                node="site-1",
                kind="node",
                hostname="elsewhere",
                pid=1,
                workers=0,
                now=datetime.now(UTC),
            )
        assert serve.process is not None
        assert serve.process.wait(60) == 1
    finally:
        serve.stop()
    lines = serve.log_text().strip().splitlines()
    assert lines[-1].startswith("callvault: error: process ")
    assert "was marked stopped in the index by another process" in lines[-1]
    assert "--node" in lines[-1]
    assert "Traceback" not in serve.log_text()
