"""Job handling under the faults an audit found: long downloads and leases, a crash between
storing and indexing, a PBX clock or zone that makes new calls look old, dead processes'
partial downloads, over-long CDR fields.

Real SQLite files, real storage directories, real child processes for the staging locks,
and the real simulator where the flow needs the PBX. Pool tests use an injectable clock
for the index's times and a downloader the test holds, so no outcome depends on how fast
the machine is.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from callvault.archive import Archiver, RetryPolicy, WorkerPool, after_not_found
from callvault.archive._workers import process_staging_dir, remove_staging_dir
from callvault.index import Index, Worker, open_index
from callvault.index.schema import ARCHIVED, DOWNLOADING, MISSING, PENDING
from callvault.pbx import DownloadResult, RecordingNotFound
from callvault.pbx._types import CallDetail
from callvault.simulator import Simulator, SimulatorConfig
from callvault.storage import LocalStorage, recording_key
from test_archive_flow import FAST_POLICY, archiver_config, states, wait_until

TZ = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 5, 1, 21, 59, 0, tzinfo=UTC)  # 23:59 in Berlin: the date is about to flip
NAME = "20240501235900-1714600740.7-1001-1002-Internal.wav"
CALLID = "1714600740.7"
WAV = (
    b"RIFF"
    + struct.pack("<I", 36 + 800)
    + b"WAVEfmt "
    + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16)
    + b"data"
    + struct.pack("<I", 800)
    + bytes(range(200)) * 4
)
WAV_SHA256 = hashlib.sha256(WAV).hexdigest()


class Clock:
    """The pool's and the index's notion of now, moved only by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Downloader:
    """Writes WAV into the staging file; optionally holds each download until released."""

    def __init__(self, *, hold: bool = False) -> None:
        self.calls = 0
        self.finished = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def download_recording(
        self, name: str, dest_dir: Path, *, filename: str | None = None
    ) -> DownloadResult:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        path = dest_dir / (filename or name)
        path.write_bytes(WAV)
        self.finished += 1
        return DownloadResult(name, path, len(WAV), WAV_SHA256, "audio/x-wav")


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[tuple[Index, LocalStorage]]:
    root = tmp_path / "archive"
    storage = LocalStorage(root)
    index = open_index(f"sqlite:///{root / 'callvault.db'}")
    yield index, storage
    index.close()


def record(index: Index, now: datetime, **fields: Any) -> int:
    [result] = index.calls.record(
        [CallDetail(callid=CALLID, recording=NAME, **fields)], source="event", tz=TZ, now=now
    )
    assert result.recording_id is not None
    return result.recording_id


def row_of(index: Index, recording_id: int) -> Any:
    row = index.recordings.by_id(recording_id)
    assert row is not None
    return row


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (without blocking the loop) until `predicate()` holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.02)


def pool_for(
    index: Index, storage: LocalStorage, client: Downloader | Gone, clock: Clock, **options: Any
) -> WorkerPool:
    settings: dict[str, Any] = {
        "workers": 1,
        "lease_s": 300.0,
        "poll_interval_s": 0.05,
        "worker_prefix": "pool",
        "policy": FAST_POLICY,
    }
    settings.update(options)
    return WorkerPool(
        index=index, storage=storage, client=client, session=None, tz=TZ, clock=clock, **settings
    )


# -- 1. the lease is renewed while a job runs ----------------------------------------------


async def test_a_download_longer_than_the_lease_keeps_its_claim(
    archive: tuple[Index, LocalStorage],
) -> None:
    index, storage = archive
    recording_id = record(index, NOW, sn="SN1", timestart="2024-05-01 23:59:00")
    clock = Clock(NOW)
    client = Downloader(hold=True)
    pool = pool_for(index, storage, client, clock, lease_s=0.6)
    stop = asyncio.Event()
    task = asyncio.create_task(pool.run(stop))
    try:
        await asyncio.wait_for(client.started.wait(), timeout=30)
        assert row_of(index, recording_id).claimed_until == NOW + timedelta(seconds=0.6)
        # The download goes on far past the lease it was claimed with.
        clock.advance(600)
        await until(lambda: row_of(index, recording_id).claimed_until > clock.now)
        row = row_of(index, recording_id)
        assert (row.state, row.claimed_by) == (DOWNLOADING, "pool:0")
        # So no other worker takes it while it runs.
        assert (
            index.jobs.claim(Worker(None, "other"), 1, now=clock.now, lease=timedelta(seconds=60))
            == []
        )
        client.release.set()
        await until(lambda: row_of(index, recording_id).state == ARCHIVED)
    finally:
        client.release.set()
        stop.set()
        await task
    row = row_of(index, recording_id)
    assert (row.attempts, row.sha256, client.calls) == (1, WAV_SHA256, 1)
    assert pool.archived == 1


async def test_a_stored_recording_whose_claim_was_lost_is_still_archived(
    archive: tuple[Index, LocalStorage],
) -> None:
    index, storage = archive
    recording_id = record(index, NOW, sn="SN1", timestart="2024-05-01 23:59:00")
    clock = Clock(NOW)
    client = Downloader(hold=True)
    pool = pool_for(index, storage, client, clock, lease_s=300.0)  # renews every 100 s
    stop = asyncio.Event()
    task = asyncio.create_task(pool.run(stop))
    try:
        await asyncio.wait_for(client.started.wait(), timeout=30)
        # The lease ran out (the index was unreachable, say) and another worker claimed it.
        clock.advance(301)
        [stolen] = index.jobs.claim(
            Worker(None, "other"), 1, now=clock.now, lease=timedelta(hours=1)
        )
        assert stolen.recording_id == recording_id
        client.release.set()
        await until(lambda: client.finished == 1 and not pool.busy)
    finally:
        client.release.set()
        stop.set()
        await task
    row = row_of(index, recording_id)
    assert (row.state, row.claimed_by, row.sha256) == (ARCHIVED, None, WAV_SHA256)
    assert row.size == len(WAV)
    assert row.storage_key is not None
    assert (storage.root / row.storage_key).read_bytes() == WAV
    assert pool.archived == 1
    # The other worker's claim no longer finishes anything.
    assert not index.jobs.mark_archived(
        recording_id,
        worker=Worker(None, "other"),
        size=1,
        sha256="0" * 64,
        storage_key="x/y.wav",
        content_type="audio/x-wav",
        now=clock.now,
    )
    assert row_of(index, recording_id).sha256 == WAV_SHA256


def test_renew_claim_only_for_the_claimant(archive: tuple[Index, LocalStorage]) -> None:
    index, _ = archive
    recording_id = record(index, NOW, sn="SN1")
    lease = timedelta(minutes=5)
    index.jobs.claim(Worker(None, "w1"), 1, now=NOW, lease=lease)
    later = NOW + timedelta(minutes=4)
    assert not index.jobs.renew(recording_id, worker=Worker(None, "w2"), now=later, lease=lease)
    assert row_of(index, recording_id).claimed_until == NOW + lease
    assert index.jobs.renew(recording_id, worker=Worker(None, "w1"), now=later, lease=lease)
    assert row_of(index, recording_id).claimed_until == later + lease
    assert index.jobs.claim(Worker(None, "w2"), 1, now=NOW + lease, lease=lease) == []


def test_archiving_without_the_claim_never_overwrites_an_archived_copy(
    archive: tuple[Index, LocalStorage],
) -> None:
    index, _ = archive
    recording_id = record(index, NOW, sn="SN1")
    index.jobs.claim(Worker(None, "w1"), 1, now=NOW, lease=timedelta(minutes=5))
    stored = {"size": 10, "storage_key": "SN1/2024/05/01/a.wav", "content_type": "audio/x-wav"}
    assert index.jobs.mark_archived(
        recording_id, worker=Worker(None, "w1"), sha256="a" * 64, now=NOW, **stored
    )
    assert not index.jobs.mark_archived_unclaimed(recording_id, sha256="b" * 64, now=NOW, **stored)
    assert row_of(index, recording_id).sha256 == "a" * 64


# -- 2. the storage key is fixed at the first attempt --------------------------------------


def crashes_before_indexing(index: Index, monkeypatch: pytest.MonkeyPatch) -> Index:
    """The index as a process sees it that dies right after storing the file (another
    `Index` on the same database, so `index` itself stays sound)."""
    crashing = open_index(index.engine.url.render_as_string(hide_password=False))

    def mark_archived(recording_id: int, **_kwargs: Any) -> bool:
        raise RuntimeError("the process died here")

    monkeypatch.setattr(crashing.jobs, "mark_archived", mark_archived)
    return crashing


async def test_a_retry_after_a_crash_between_storing_and_indexing_keeps_one_copy(
    archive: tuple[Index, LocalStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    index, storage = archive
    # A legacy NewCdr: no serial and no usable start, so the first key uses "unknown" and
    # today's date by the clock.
    recording_id = record(index, NOW)
    clock = Clock(NOW)
    first = Downloader()
    crashing = crashes_before_indexing(index, monkeypatch)
    pool = pool_for(crashing, storage, first, clock)
    stop = asyncio.Event()
    task = asyncio.create_task(pool.run(stop))
    try:
        await until(lambda: first.finished == 1 and row_of(index, recording_id).state == PENDING)
    finally:
        stop.set()
        await task
        crashing.close()
    [stored_key] = list(storage.list())
    assert stored_key == recording_key("", NOW.astimezone(TZ), NAME)
    # The CDR export fills in the serial and a start on another day; the retry runs a day on.
    index.calls.record(
        [CallDetail(callid=CALLID, recording=NAME, sn="SN1", timestart="2024-04-30 10:00:00")],
        source="cdr",
        tz=TZ,
        now=NOW,
    )
    clock.advance(86_400)
    second = Downloader()
    pool = pool_for(index, storage, second, clock)
    stop = asyncio.Event()
    task = asyncio.create_task(pool.run(stop))
    try:
        await until(lambda: row_of(index, recording_id).state == ARCHIVED)
    finally:
        stop.set()
        await task
    row = row_of(index, recording_id)
    assert list(storage.list()) == [stored_key]
    assert (row.storage_key, row.sha256, row.size) == (stored_key, WAV_SHA256, len(WAV))
    assert row.content_type == "audio/x-wav"
    assert second.calls == 0  # the stored copy was hashed, not downloaded again


def test_the_first_reserved_storage_key_wins(archive: tuple[Index, LocalStorage]) -> None:
    index, _ = archive
    recording_id = record(index, NOW)
    assert index.jobs.reserve_storage_key(recording_id, "unknown/2024/05/01/a.wav") == (
        "unknown/2024/05/01/a.wav"
    )
    assert index.jobs.reserve_storage_key(recording_id, "SN1/2024/04/30/a.wav") == (
        "unknown/2024/05/01/a.wav"
    )
    assert index.jobs.reserve_storage_key(recording_id + 99, "x/a.wav") is None


# -- 3. a just-queued recording gets the whole not-ready window ----------------------------


def test_a_call_that_looks_old_but_was_just_queued_is_not_missing_after_a_few_answers() -> None:
    now = NOW
    # The PBX's time read in the wrong zone: the call seems to have ended 8 hours ago.
    seems_ended = now - timedelta(hours=8)
    args: dict[str, Any] = {
        "error": "errno 20014",
        "attempts": 3,
        "missing_since": now - timedelta(seconds=7),
        "call_ended_at": seems_ended,
        "now": now,
    }
    policy = RetryPolicy()
    assert after_not_found(policy, **args).action == "missing"  # unknown queue time: as before
    queued_now = after_not_found(policy, **args, queued_at=now - timedelta(seconds=8))
    assert queued_now.action == "retry"
    queued_long_ago = after_not_found(policy, **args, queued_at=now - timedelta(days=2))
    assert queued_long_ago.action == "missing"
    # Unknown call end, just queued: the whole window too.
    no_end = dict(args, call_ended_at=None, attempts=20)
    assert after_not_found(policy, **no_end, queued_at=now).action == "retry"


def test_a_live_call_read_in_the_wrong_zone_is_archived_once_ready(tmp_path: Path) -> None:
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
        config = archiver_config(sim, tmp_path / "a", policy=policy, timezone=tokyo)
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


async def test_a_claim_in_flight_at_shutdown_is_handed_back(
    archive: tuple[Index, LocalStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim runs in a thread a cancellation cannot stop; what it claims must not stay
    # `downloading` until the lease runs out.
    index, storage = archive
    recording_id = record(index, NOW, sn="SN1", timestart="2024-05-01 23:59:00")
    entered, proceed = threading.Event(), threading.Event()
    real_claim = index.jobs.claim

    def slow_claim(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        proceed.wait(30)
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(index.jobs, "claim", slow_claim)
    client = Downloader()
    pool = pool_for(index, storage, client, Clock(NOW))
    stop = asyncio.Event()
    task = asyncio.create_task(pool.run(stop, grace_s=0.05))
    await until(entered.is_set)
    stop.set()
    await asyncio.sleep(0.2)  # past the grace: the worker is cancelled mid-claim
    proceed.set()
    await asyncio.wait_for(task, 30)
    row = row_of(index, recording_id)
    assert (row.state, row.claimed_by, client.calls) == (PENDING, None, 0)


class Gone:
    """A PBX on which the recording no longer exists."""

    def __init__(self) -> None:
        self.calls = 0

    async def download_recording(
        self, name: str, dest_dir: Path, *, filename: str | None = None
    ) -> DownloadResult:
        self.calls += 1
        raise RecordingNotFound(f"recording {name}: not found, errno 20014", errno="20014")


@pytest.mark.parametrize(("source", "final"), [("cdr", MISSING), ("event", PENDING)])
async def test_only_an_event_makes_an_old_looking_call_new(
    archive: tuple[Index, LocalStorage], source: str, final: str
) -> None:
    # A month-old call queued by backfill or reconciliation whose file is gone is missing
    # after a few answers; the same call reported by an event just now gets the whole window.
    index, storage = archive
    [result] = index.calls.record(
        [CallDetail(callid=CALLID, recording=NAME, timestart="2024-04-01 10:00:00")],
        source=source,
        tz=TZ,
        now=NOW,
    )
    recording_id = result.recording_id
    assert recording_id is not None
    clock = Clock(NOW)
    client = Gone()
    pool = pool_for(index, storage, client, clock)
    stop = asyncio.Event()
    task = asyncio.create_task(pool.run(stop))
    try:

        def attempted(count: int) -> Callable[[], bool]:
            def done() -> bool:
                row = row_of(index, recording_id)
                return row.attempts == count and row.claimed_by is None  # outcome recorded

            return done

        for attempt in range(1, FAST_POLICY.old_call_min_attempts + 1):
            if attempt > 1:
                clock.advance(1.0)  # past the not-found delay, inside missing_after_s
            await until(attempted(attempt))
    finally:
        stop.set()
        await task
    row = row_of(index, recording_id)
    assert (row.state, row.attempts) == (final, FAST_POLICY.old_call_min_attempts)


def test_requeue_missing_brings_back_recent_give_ups_only(
    archive: tuple[Index, LocalStorage],
) -> None:
    index, _ = archive
    old = index.calls.record(
        [CallDetail(callid="1.1", recording="old.wav")], source="cdr", tz=TZ, now=NOW
    )[0].recording_id
    later = NOW + timedelta(hours=3)
    recent = index.calls.record(
        [CallDetail(callid="1.2", recording="recent.wav")], source="event", tz=TZ, now=later
    )[0].recording_id
    assert old is not None and recent is not None
    lease = timedelta(minutes=5)
    index.jobs.claim(Worker(None, "w"), 2, now=later, lease=lease)
    for recording_id in (old, recent):
        assert index.jobs.mark_missing(
            recording_id, worker=Worker(None, "w"), reason="gone", now=later
        )
    again = later + timedelta(minutes=1)
    assert index.jobs.requeue([MISSING], since=later - timedelta(hours=1), now=again) == 1
    row = row_of(index, recent)
    assert (row.state, row.attempts, row.next_attempt_at, row.missing_since) == (
        PENDING,
        0,
        again,
        None,
    )
    assert row_of(index, old).state == MISSING
    [job] = index.jobs.claim(Worker(None, "w"), 5, now=again, lease=lease)
    assert job.recording_id == recent and job.attempts == 1


# -- 4. a dead process's partial downloads are removed whatever its pid became -----------

CHILD = """
import sys
from pathlib import Path
from callvault.archive._workers import process_staging_dir
from callvault.storage import LocalStorage

own = process_staging_dir(LocalStorage(Path(sys.argv[1])))
(own / "partial.wav").write_bytes(b"RIFF" + bytes(100))
print(own, flush=True)
sys.stdin.read()
"""


def test_a_killed_processs_staging_dir_is_removed_even_if_its_pid_is_alive(
    tmp_path: Path,
) -> None:
    root = tmp_path / "archive"
    storage = LocalStorage(root)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    mine: list[Path] = []
    try:
        assert child.stdout is not None
        theirs = Path(child.stdout.readline().strip())
        assert theirs.parent == storage.staging_dir() and (theirs / "partial.wav").exists()
        # While the child runs, neither the start-up cleanup nor the age rule touches it.
        mine.append(process_staging_dir(storage))
        far_future = datetime.now(UTC) + timedelta(days=30)
        assert storage.clean_staging(timedelta(hours=1), now=far_future) == 0
        assert (theirs / "partial.wav").exists()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    # Its pid is handed to another live process (here: this one).
    reused = theirs.with_name(theirs.name.replace(f"-{child.pid}-", f"-{os.getpid()}-"))
    assert reused != theirs
    theirs.rename(reused)
    mine.append(process_staging_dir(storage))
    assert not reused.exists()
    assert sorted(storage.staging_dir().iterdir()) == sorted(mine)
    for path in mine:
        remove_staging_dir(path)
    assert list(storage.staging_dir().iterdir()) == []


def test_clean_staging_handles_directories(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "archive")
    staging = storage.staging_dir()
    now = datetime.now(UTC)
    old_time = (now - timedelta(hours=2)).timestamp()
    # An older callvault's directory (no lock file) of a pid that is alive (pid 1), old...
    legacy = staging / "proc-1-deadbeef"
    legacy.mkdir()
    (legacy / "partial.part").write_bytes(b"x" * 100)
    for path in (legacy / "partial.part", legacy):
        os.utime(path, (old_time, old_time))
    # ...one with a fresh file in it...
    busy_legacy = staging / "proc-1-cafebabe"
    busy_legacy.mkdir()
    (busy_legacy / "partial.part").write_bytes(b"x")
    os.utime(busy_legacy, (old_time, old_time))
    # ...and a running process's, however old its files.
    live = process_staging_dir(storage)
    (live / "partial.part").write_bytes(b"x")
    os.utime(live / "partial.part", (old_time, old_time))
    try:
        assert storage.clean_staging(timedelta(hours=1), now=now) == 1
        assert not legacy.exists() and busy_legacy.exists() and (live / "partial.part").exists()
    finally:
        remove_staging_dir(live)
    assert storage.clean_staging(timedelta(hours=1), now=now + timedelta(hours=2)) == 1
    assert list(staging.iterdir()) == []


# -- 5. an over-long CDR field blocks nothing ----------------------------------------------


def test_over_long_fields_block_neither_reconciliation_nor_events(tmp_path: Path) -> None:
    with Simulator(SimulatorConfig(seed=3, event_retry_interval=0.2)) as sim:
        # Missed while the archiver was down, between two good ones.
        missed = [
            sim.place_call(callfrom="1001", talk_seconds=1),
            sim.place_call(callfrom="9" * 129, talk_seconds=1),
            sim.place_call(callfrom="1002", talk_seconds=1),
        ]
        config = archiver_config(sim, tmp_path / "a", reconcile_at_start=True)
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
