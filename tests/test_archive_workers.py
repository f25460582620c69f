"""The worker pool: claims and leases, the storage key, outcomes by error kind, a worker
that never dies from one job, its supervisor, storage errors.

Real indexes on both engines (the `index` fixture), real storage directories and an
injectable clock for the index's times, so no outcome depends on how fast the machine is.

What the pool does with a PBX runs for each kind (S-Series, Cloud, P-Series:
`support.kinds`, the fixture `pbx`): downloads held past the lease or whose claim was lost,
one copy after a crash between storing and indexing, "not found" by the call's age, an
unsafe name, 5xx answers backed off, a refused login. There the pool downloads with the
kind's own API client (`PbxUnderTest.client`) from the running simulator, each download
held or counted by the test (`Gate`), and the archived bytes are the PBX's.

The rest hold a downloader of their own (`support.archive.Downloader`) that the PBX's kind
never reaches: the client is not called (a claim handed back at shutdown), or an error is
injected to test the pool's decision (with an S-Series errno: 10003, 20003, 20014), or
the test is about storage, the staging areas or the supervisor. They run once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update

from callvault.archive import RetryPolicy, WorkerPool
from callvault.archive._metrics import ArchiverMetrics
from callvault.archive._workers import staging_tag
from callvault.index import Index, Worker, open_index
from callvault.index.schema import ARCHIVED, DOWNLOADING, FAILED, MISSING, PENDING, calls
from callvault.pbx import (
    CallDetail,
    DownloadResult,
    LoginFailed,
    RecordingNotFound,
    RequestRejected,
)
from callvault.simulator import Faults
from callvault.storage import LocalStorage, StoredObject, recording_key
from support.archive import FAST_POLICY, Clock, Downloader, file_sha256, until
from support.kinds import PbxUnderTest, kind_params, start_pbx

TZ = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 5, 1, 21, 59, 0, tzinfo=UTC)  # 23:59 in Berlin: the date is about to flip
NAME = "20240501235900-1714600740.7-1001-1002-Internal.wav"
CALLID = "1714600740.7"


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "archive")


@pytest.fixture
def pbx(kind: str, tmp_path: Path) -> Iterator[PbxUnderTest]:
    """A running PBX of the test's `kind` (``@pytest.mark.parametrize("kind", ...)``)."""
    with start_pbx(kind, seed=11, faults=Faults(), workdir=tmp_path) as running:
        yield running


class Gate:
    """The kind's real API client as the pool's downloader: downloads counted, and with
    `hold` each waits for `release` before it asks the PBX."""

    def __init__(self, client: Any, *, hold: bool = False) -> None:
        self.client = client
        self.calls = 0
        self.finished = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def download_recording(self, name: str, dest_dir: Path, **options: Any) -> Any:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        result: DownloadResult = await self.client.download_recording(name, dest_dir, **options)
        self.finished += 1
        return result


def archived_as_on_the_pbx(pbx: PbxUnderTest, storage: LocalStorage, row: Any, name: str) -> None:
    """The row is archived, its stored file byte-identical to the PBX's recording."""
    assert row.state == ARCHIVED and row.claimed_by is None
    assert row.storage_key is not None
    path = storage.root / row.storage_key
    assert row.sha256 == file_sha256(path) == pbx.recording_sha256(name)
    assert row.size == path.stat().st_size


def record(index: Index, now: datetime, **fields: Any) -> int:
    fields.setdefault("callid", CALLID)
    fields.setdefault("recording", NAME)
    [result] = index.calls.record([CallDetail(**fields)], source="event", tz=TZ, now=now)
    assert result.recording_id is not None
    return result.recording_id


def row_of(index: Index, recording_id: int) -> Any:
    row = index.recordings.by_id(recording_id)
    assert row is not None
    return row


def pool_for(
    index: Index,
    storage: LocalStorage,
    client: Any,
    clock: Callable[[], datetime],
    **options: Any,
) -> WorkerPool:
    settings: dict[str, Any] = {
        "workers": 1,
        "lease_s": 300.0,
        "poll_interval_s": 0.05,
        "worker_prefix": "pool",
        "policy": FAST_POLICY,
        "session": None,
        "tz": TZ,
    }
    settings.update(options)
    return WorkerPool(index=index, storage=storage, client=client, clock=clock, **settings)


class Running:
    """`pool.run` as a task, stopped (and awaited) on exit."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.pool.run(self.stop, grace_s=5))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


# -- claims and leases --------------------------------------------------------------------


@pytest.mark.parametrize("kind", kind_params())
async def test_a_download_longer_than_the_lease_keeps_its_claim(
    pbx: PbxUnderTest, index: Index, storage: LocalStorage
) -> None:
    name = pbx.place_call(talk_seconds=2)
    assert name is not None
    recording_id = record(
        index, NOW, recording=name, sn=pbx.serial, timestart="2024-05-01 23:59:00"
    )
    clock = Clock(NOW)
    api = pbx.client()
    client = Gate(api, hold=True)
    pool = pool_for(index, storage, client, clock, lease_s=0.6)
    try:
        async with api, Running(pool):
            await asyncio.wait_for(client.started.wait(), timeout=30)
            assert row_of(index, recording_id).claimed_until == NOW + timedelta(seconds=0.6)
            # The download goes on far past the lease it was claimed with.
            clock.advance(600)
            await until(lambda: row_of(index, recording_id).claimed_until > clock.now)
            row = row_of(index, recording_id)
            assert (row.state, row.claimed_by) == (DOWNLOADING, "pool:0")
            # So no other worker takes it while it runs.
            other = Worker(None, "other")
            assert index.jobs.claim(other, 1, now=clock.now, lease=timedelta(seconds=60)) == []
            client.release.set()
            await until(lambda: row_of(index, recording_id).state == ARCHIVED)
    finally:
        client.release.set()
    row = row_of(index, recording_id)
    archived_as_on_the_pbx(pbx, storage, row, name)
    assert (row.attempts, client.calls) == (1, 1)
    assert pool.archived == 1


@pytest.mark.parametrize("kind", kind_params())
async def test_a_stored_recording_whose_claim_was_lost_is_still_archived(
    pbx: PbxUnderTest, index: Index, storage: LocalStorage
) -> None:
    name = pbx.place_call(talk_seconds=2)
    assert name is not None
    recording_id = record(
        index, NOW, recording=name, sn=pbx.serial, timestart="2024-05-01 23:59:00"
    )
    clock = Clock(NOW)
    api = pbx.client()
    client = Gate(api, hold=True)
    pool = pool_for(index, storage, client, clock, lease_s=300.0)  # renews every 100 s
    try:
        async with api, Running(pool):
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
    row = row_of(index, recording_id)
    archived_as_on_the_pbx(pbx, storage, row, name)
    assert (row.attempts, client.calls) == (2, 1)  # claimed twice (ours, the other's), one GET
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
    assert row_of(index, recording_id).sha256 == pbx.recording_sha256(name)


async def test_a_claim_in_flight_at_shutdown_is_handed_back(
    index: Index, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim runs in a thread a cancellation cannot stop; what it claims must not stay
    # `downloading` until the lease runs out.
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
    workers = [t for t in asyncio.all_tasks() if t.get_name().startswith("callvault-worker-")]
    assert workers
    stop.set()
    # Past the grace the pool cancels its workers, mid-claim; only then may the claim
    # return (a fixed sleep raced a loaded machine: the claim came back first, once).
    await until(lambda: all(t.cancelling() or t.done() for t in workers))
    proceed.set()
    await asyncio.wait_for(task, 30)
    row = row_of(index, recording_id)
    assert (row.state, row.claimed_by, client.calls) == (PENDING, None, 0)


# -- the storage key is fixed at the first attempt -----------------------------------------


def crashes_before_indexing(index: Index, monkeypatch: pytest.MonkeyPatch) -> Index:
    """The index as a process sees it that dies right after storing the file (another
    `Index` on the same database, so `index` itself stays sound)."""
    crashing = open_index(index.engine.url.render_as_string(hide_password=False))

    def mark_archived(recording_id: int, **_kwargs: Any) -> bool:
        raise ConnectionError("the process died here")

    monkeypatch.setattr(crashing.jobs, "mark_archived", mark_archived)
    return crashing


@pytest.mark.parametrize("kind", kind_params())
async def test_a_retry_after_a_crash_between_storing_and_indexing_keeps_one_copy(
    pbx: PbxUnderTest, index: Index, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A legacy NewCdr: no serial and no usable start, so the first key uses "unknown" and
    # today's date by the clock.
    name = pbx.place_call(talk_seconds=2)
    assert name is not None
    recording_id = record(index, NOW, recording=name)
    clock = Clock(NOW)
    api = pbx.client()
    first = Gate(api)
    crashing = crashes_before_indexing(index, monkeypatch)
    try:
        async with api, Running(pool_for(crashing, storage, first, clock)):
            await until(
                lambda: first.finished == 1 and row_of(index, recording_id).state == PENDING
            )
    finally:
        crashing.close()
    [stored_key] = list(storage.list())
    assert stored_key == recording_key("", NOW.astimezone(TZ), name)
    # The CDR export fills in the serial and a start on another day; the retry runs a day on.
    index.calls.record(
        [CallDetail(callid=CALLID, recording=name, sn=pbx.serial, timestart="2024-04-30 10:00:00")],
        source="cdr",
        tz=TZ,
        now=NOW,
    )
    clock.advance(86_400)
    api = pbx.client()
    second = Gate(api)
    async with api, Running(pool_for(index, storage, second, clock)):
        await until(lambda: row_of(index, recording_id).state == ARCHIVED)
    row = row_of(index, recording_id)
    assert list(storage.list()) == [stored_key] and row.storage_key == stored_key
    archived_as_on_the_pbx(pbx, storage, row, name)
    assert row.content_type == "audio/x-wav"
    assert second.calls == 0  # the stored copy was hashed, not downloaded again


# -- outcomes by error kind -----------------------------------------------------------------


@pytest.mark.parametrize("kind", kind_params())
@pytest.mark.parametrize(("source", "final"), [("cdr", MISSING), ("event", PENDING)])
async def test_only_an_event_makes_an_old_looking_call_new(
    pbx: PbxUnderTest, index: Index, storage: LocalStorage, source: str, final: str
) -> None:
    # A month-old call queued by backfill or reconciliation whose file is gone (the PBX
    # answers "not found": S-Series and Cloud errno 20014, P-Series 60001) is missing after
    # a few answers; the same call reported by an event just now gets the whole window.
    [result] = index.calls.record(
        [CallDetail(callid=CALLID, recording=NAME, timestart="2024-04-01 10:00:00")],
        source=source,
        tz=TZ,
        now=NOW,
    )
    recording_id = result.recording_id
    assert recording_id is not None
    clock = Clock(NOW)
    api = pbx.client()
    gone = Gate(api)
    async with api, Running(pool_for(index, storage, gone, clock)):

        def attempted(count: int) -> Callable[[], bool]:
            def done() -> bool:
                row = row_of(index, recording_id)
                return row.attempts == count and row.claimed_by is None  # outcome recorded

            return done

        for attempt in range(1, FAST_POLICY.old_call_min_attempts + 1):
            if attempt > 1:
                clock.advance(1.0)  # past the not-found delay, inside missing_after_s
            await until(attempted(attempt))
    row = row_of(index, recording_id)
    assert (row.state, row.attempts) == (final, FAST_POLICY.old_call_min_attempts)
    assert "not found" in (row.last_error or "")
    assert gone.calls == FAST_POLICY.old_call_min_attempts and gone.finished == 0


@pytest.mark.parametrize("kind", kind_params())
async def test_an_unsafe_name_fails_the_job_at_once_without_asking_the_pbx(
    pbx: PbxUnderTest, index: Index, storage: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    unsafe = "a/b.wav"
    recording_id = record(index, NOW, recording=unsafe)
    api = pbx.client()
    caplog.set_level(logging.INFO, logger="callvault.archive")
    async with api, Running(pool_for(index, storage, Gate(api), Clock(NOW))):
        await until(lambda: row_of(index, recording_id).state == FAILED)
        assert not api.logged_in and pbx.pbx_logins == 0  # refused before any request
    row = row_of(index, recording_id)
    assert row.attempts == 1 and "contains a '/'" in (row.last_error or "")
    failed = [r for r in caplog.records if r.levelno == logging.ERROR and unsafe in r.getMessage()]
    assert len(failed) == 1 and "contains a '/'" in failed[0].getMessage()
    assert list(storage.list()) == []


@pytest.mark.parametrize(
    "error",
    [
        RequestRejected("the PBX rejected the request, errno 10003", errno="10003"),
        ValueError("bad input"),
    ],
    ids=["rejected", "value-error"],
)
async def test_a_permanent_error_fails_the_job_at_once_with_the_reason(
    index: Index, storage: LocalStorage, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    recording_id = record(index, NOW)
    client = Downloader(error=error)
    caplog.set_level(logging.INFO, logger="callvault.archive")
    async with Running(pool_for(index, storage, client, Clock(NOW))):
        await until(lambda: row_of(index, recording_id).state == FAILED)
    row = row_of(index, recording_id)
    assert (row.attempts, client.calls) == (1, 1)
    assert row.last_error is not None and str(error) in row.last_error
    failed = [r for r in caplog.records if r.levelno == logging.ERROR and NAME in r.getMessage()]
    assert len(failed) == 1 and str(error) in failed[0].getMessage()


class Session:
    """The pool's `PbxSession`, as far as the pool tells it anything."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.ready.set()
        self.errors: list[str] = []
        self.successes = 0

    def report_error(self, text: str) -> None:
        self.errors.append(text)

    def report_success(self) -> None:
        self.successes += 1

    def report_auth_failure(self, exc: Exception) -> None:
        raise AssertionError("not a login failure")


@pytest.mark.parametrize("kind", kind_params())
async def test_5xx_answers_back_off_and_only_pbx_trouble_reaches_the_session(
    pbx: PbxUnderTest, index: Index, storage: LocalStorage
) -> None:
    """Every request of the PBX's API answers HTTP 5xx with an HTML page: the job backs
    off (the client tries once), the session hears of it, an unsafe name's failure it does
    not; once the PBX answers again the retry archives the PBX's bytes."""
    session = Session()
    name = pbx.place_call(talk_seconds=2)
    assert name is not None
    busy = record(index, NOW, recording=name)
    unsafe = record(index, NOW, callid="1714600740.8", recording="a/b.wav")
    clock = Clock(NOW)
    api = pbx.client(max_attempts=1)
    pbx.faults.error_5xx_next = 1000
    pool = pool_for(index, storage, Gate(api), clock, session=session)
    async with api, Running(pool):
        await until(lambda: row_of(index, unsafe).state == FAILED)
        await until(lambda: row_of(index, busy).state == PENDING and row_of(index, busy).attempts)
        row = row_of(index, busy)
        assert row.next_attempt_at > clock.now and "HTML" in (row.last_error or "")
        assert session.errors and all("HTML" in text for text in session.errors)
        assert session.successes == 0
        # The PBX answers again; the retry falls due.
        pbx.faults.error_5xx_next = 0
        clock.advance(FAST_POLICY.transient_max_s * 2)
        pool.wake()
        await until(lambda: row_of(index, busy).state == ARCHIVED)
    row = row_of(index, busy)
    archived_as_on_the_pbx(pbx, storage, row, name)
    assert row.attempts == 2 and session.successes == 1
    assert all("a/b.wav" not in text for text in session.errors)


@pytest.mark.parametrize("kind", kind_params())
async def test_a_refused_login_pauses_and_hands_the_job_back(
    pbx: PbxUnderTest, index: Index, storage: LocalStorage
) -> None:
    name = pbx.place_call(talk_seconds=2)
    assert name is not None
    recording_id = record(index, NOW, recording=name)
    refused: list[Exception] = []
    api = pbx.client(secret="not-the-secret", max_attempts=1)
    pool = pool_for(index, storage, Gate(api), Clock(NOW), on_auth_failure=refused.append)
    async with api, Running(pool):
        await until(lambda: bool(refused))
        await until(lambda: row_of(index, recording_id).claimed_by is None)
    row = row_of(index, recording_id)
    assert row.state == PENDING and "paused" in (row.last_error or "")
    assert isinstance(refused[0], LoginFailed) and pbx.pbx_logins == 0
    assert list(storage.list()) == []


# -- a worker never dies from one job --------------------------------------------------------


async def test_a_job_with_times_at_the_calendars_end_does_not_end_the_worker(
    index: Index, storage: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """An index written by an earlier version may hold a call that starts in year 9999 (a
    PBX clock gone wrong). Its recording does not exist: deciding when to try again (from
    the call's end, past the calendar's) must not overflow and end the worker; the next job
    is still archived by the same worker."""
    odd = record(index, NOW, callduration=7200)
    normal = record(index, NOW, callid="1714600740.9", recording="good.wav")
    with index.engine.begin() as conn:
        conn.execute(
            update(calls)
            .where(calls.c.callid == CALLID)
            .values(start_at=datetime(9999, 12, 31, 22, 59, 59, tzinfo=UTC))
        )

    class GoneThenFine(Downloader):
        async def download_recording(
            self, name: str, dest_dir: Path, *, filename: str | None = None
        ) -> Any:
            if name == NAME:
                self.calls += 1
                raise RecordingNotFound("recording not found, errno 20014", errno="20014")
            return await super().download_recording(name, dest_dir, filename=filename)

    client = GoneThenFine()
    caplog.set_level(logging.INFO, logger="callvault.archive")
    pool = pool_for(index, storage, client, Clock(NOW), tz=UTC)
    async with Running(pool):
        await until(lambda: row_of(index, normal).state == ARCHIVED)
        await until(lambda: row_of(index, odd).state != DOWNLOADING)
        assert pool.alive == pool.configured == 1
    assert row_of(index, odd).state in (PENDING, MISSING)
    assert not [r for r in caplog.records if "died" in r.getMessage()]


async def test_a_bug_in_a_storage_backend_fails_the_job_not_the_worker(
    index: Index, storage: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    recording_id = record(index, NOW)
    normal = record(index, NOW, callid="1714600740.9", recording="good.wav")

    class Broken(LocalStorage):
        def put_file(self, key: str, src: Path, **given: Any) -> StoredObject:
            if key.endswith(NAME):
                raise KeyError("a bug in a storage backend")
            return super().put_file(key, src, **given)

    broken = Broken(storage.root)
    caplog.set_level(logging.INFO, logger="callvault.archive")
    async with Running(pool_for(index, broken, Downloader(), Clock(NOW))):
        await until(lambda: row_of(index, normal).state == ARCHIVED)
        await until(lambda: row_of(index, recording_id).state == FAILED)
    assert "KeyError" in (row_of(index, recording_id).last_error or "")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and all(NAME in r.getMessage() for r in errors)


async def test_a_storage_that_fails_is_counted_as_such_and_the_job_retried(
    index: Index, storage: LocalStorage
) -> None:
    """A put that fails (a full disk, a bucket that does not answer) is a transient failure
    of the step "store" (what /metrics counts as a storage error): tried again later."""
    recording_id = record(index, NOW)
    failures: list[tuple[str, str]] = []

    class FullOnce(LocalStorage):
        full = True

        def put_file(self, key: str, src: Path, **given: Any) -> StoredObject:
            if FullOnce.full:
                FullOnce.full = False
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().put_file(key, src, **given)

    pool = pool_for(
        index,
        FullOnce(storage.root),
        Downloader(),
        Clock(NOW),
        on_failed_attempt=lambda kind, step: failures.append((kind, step)),
    )
    async with Running(pool):
        await until(lambda: bool(failures))
        await until(lambda: row_of(index, recording_id).state == PENDING)
    assert failures == [("transient", "store")]
    assert "No space left" in (row_of(index, recording_id).last_error or "")
    metrics = ArchiverMetrics()
    metrics.failed_attempt(*failures[0])
    metrics.failed_attempt("transient", "download")
    text = metrics.exposition()[0].decode()
    assert "callvault_storage_errors_total 1.0" in text


async def test_a_worker_that_dies_anyway_is_restarted(
    index: Index,
    storage: LocalStorage,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = pool_for(index, storage, Downloader(), Clock(NOW), workers=2, restart_delays_s=(0.05,))
    real_worker = pool._worker
    deaths: list[int] = []

    async def dies_twice(number: int, stop: asyncio.Event) -> None:
        if number == 0 and len(deaths) < 2:
            deaths.append(number)
            raise RuntimeError("a bug in the worker loop")
        await real_worker(number, stop)

    monkeypatch.setattr(pool, "_worker", dies_twice)
    caplog.set_level(logging.INFO, logger="callvault.archive")
    async with Running(pool):
        await until(lambda: len(deaths) == 2 and pool.alive == 2)
        assert pool.configured == 2 and pool.restarts == 2
        recording_id = record(index, NOW)
        pool.wake()
        await until(lambda: row_of(index, recording_id).state == ARCHIVED)
    died = [r for r in caplog.records if "download worker 0 died" in r.getMessage()]
    assert [r.levelno for r in died] == [logging.ERROR, logging.ERROR]
    assert died[0].exc_info is not None and died[1].exc_info is None  # the traceback once
    assert pool.alive == 0  # stopped


async def test_a_failing_callback_is_logged_with_the_name_and_the_job_settled(
    index: Index, storage: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    recording_id = record(index, NOW)

    def callback_with_a_bug(exc: Exception) -> None:
        raise TypeError("a bug in the caller's callback")

    client = Downloader(error=LoginFailed("wrong API username or password", errno="20003"))
    pool = pool_for(index, storage, client, Clock(NOW), on_auth_failure=callback_with_a_bug)
    caplog.set_level(logging.INFO, logger="callvault.archive")
    async with Running(pool):
        await until(lambda: row_of(index, recording_id).state == FAILED)
        assert pool.alive == 1
    row = row_of(index, recording_id)
    assert "TypeError: a bug in the caller's callback" in (row.last_error or "")
    unexpected = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert len(unexpected) == 1 and NAME in unexpected[0].getMessage()
    assert unexpected[0].levelno == logging.ERROR and unexpected[0].exc_info is not None


# -- storage errors ---------------------------------------------------------------------------


class FullDisk(LocalStorage):
    def put_file(self, key: str, src: Path, **_: Any) -> StoredObject:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_full_disk_is_a_warning_then_an_error_when_the_job_gives_up(
    index: Index, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recording_id = record(index, NOW)
    full = FullDisk(tmp_path / "archive")
    policy = RetryPolicy(
        transient_base_s=0.01, transient_max_s=0.01, transient_max_attempts=3, jitter=0
    )
    caplog.set_level(logging.INFO, logger="callvault.archive")
    # The retries fall due by the real clock.
    async with Running(
        pool_for(index, full, Downloader(), lambda: datetime.now(UTC), policy=policy)
    ):
        await until(lambda: row_of(index, recording_id).state == FAILED)
    row = row_of(index, recording_id)
    assert row.attempts == 3
    assert "cannot store it: No space left on device (ENOSPC)" in (row.last_error or "")
    lines = [r for r in caplog.records if NAME in r.getMessage()]
    warnings = [r for r in lines if r.levelno == logging.WARNING]
    errors = [r for r in lines if r.levelno == logging.ERROR]
    assert len(warnings) == 2 and all("No space left" in r.getMessage() for r in warnings)
    assert len(errors) == 1 and "gave up after 3 attempts" in errors[0].getMessage()
    assert not [r for r in lines if r.levelno == logging.INFO and "No space" in r.getMessage()]


# -- staging areas: a dead process's partial downloads go, a live one's stay ----------------

CHILD = """
import sys
from pathlib import Path
from callvault.storage import LocalStorage

own = LocalStorage(Path(sys.argv[1])).open_staging("child")
(own.path / "partial.wav").write_bytes(b"RIFF" + bytes(100))
print(own.path, flush=True)
sys.stdin.read()
"""


def test_a_killed_processs_staging_area_is_removed_even_if_its_pid_is_alive(
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
    mine = []
    try:
        assert child.stdout is not None
        theirs = Path(child.stdout.readline().strip())
        assert theirs.parent == storage.staging_dir() and (theirs / "partial.wav").exists()
        # While the child runs, neither the start-up cleanup nor the age rule touches it.
        mine.append(storage.open_staging(staging_tag()))
        far_future = datetime.now(UTC) + timedelta(days=30)
        assert storage.clean_staging(timedelta(hours=1), now=far_future) == 0
        assert (theirs / "partial.wav").exists()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    # Its name says nothing about whether it lives: the lock it held does.
    mine.append(storage.open_staging(staging_tag()))
    assert not theirs.exists()
    assert sorted(storage.staging_dir().iterdir()) == sorted(area.path for area in mine)
    for area in mine:
        area.close()
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
    live = storage.open_staging(staging_tag())
    (live.path / "partial.part").write_bytes(b"x")
    os.utime(live.path / "partial.part", (old_time, old_time))
    try:
        assert storage.clean_staging(timedelta(hours=1), now=now) == 1
        assert not legacy.exists() and busy_legacy.exists()
        assert (live.path / "partial.part").exists()
    finally:
        live.close()
    assert storage.clean_staging(timedelta(hours=1), now=now + timedelta(hours=2)) == 1
    assert list(staging.iterdir()) == []


async def test_two_pbxs_without_serials_never_share_a_file(
    index: Index, storage: LocalStorage
) -> None:
    """Two PBXs that send no serial may give two recordings the same name: each is filed
    under its own PBX, never taken for a copy of the other's already stored."""
    ids = {}
    for pbx_id in (1, 2):
        call = CallDetail(callid=CALLID, recording=NAME, timestart="2024-05-01 10:00:00")
        [result] = index.calls.record([call], source="event", tz=TZ, now=NOW, pbx_id=pbx_id)
        assert result.recording_id is not None
        ids[pbx_id] = result.recording_id
    for pbx_id in (1, 2):
        pool = pool_for(index, storage, Downloader(), Clock(NOW), pbx_id=pbx_id)
        async with Running(pool):
            await until(lambda: row_of(index, ids[pbx_id]).state == ARCHIVED)  # noqa: B023
    keys = {pbx_id: row_of(index, ids[pbx_id]).storage_key for pbx_id in (1, 2)}
    assert keys[1].startswith("pbx-1/") and keys[2].startswith("pbx-2/")
    assert row_of(index, ids[2]).attempts == 1  # downloaded, not found "already stored"
