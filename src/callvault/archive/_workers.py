"""The worker pool: claim a job, download the recording, store it, mark it archived.

Concurrency is bounded (default 2: the PBX is a small embedded box that closes every
connection). Jobs are claimed from the index with a lease, so a crashed process leaves
them claimable again once the lease runs out. A worker sleeps until it is woken (a new
recording was queued), until the next retry is due, or for `poll_interval_s` at most.

For each job:

0. its storage key is fixed in the index at its first attempt (`jobs.reserve_storage_key`) and
   never changes, even when a later report fills in the call's serial or start; if a file
   is already there (a crash after step 2 last time), it is hashed and archived as is;
1. `client.download_recording` into the storage's hidden staging directory (the client
   checks RIFF/WAVE, size, fsyncs and renames; no partial file is ever left);
2. `storage.put_file` moves it into place atomically under that key;
3. `index.jobs.mark_archived` with size and SHA-256, only then is it archived.

While a job runs its claim is renewed every third of the lease, so a download longer than
the lease is not handed to another worker. If the claim was lost anyway (the index was
unreachable for a whole lease) but the file got stored, the recording is still archived
unless someone else archived it meanwhile.

Failures go through `callvault.archive._policy`: retry later, or `missing` / `failed`
with the reason. LoginFailed / LoginLockedOut pause every worker (see `PbxSession`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

from callvault.archive._policy import (
    GIVE_UP_FAILED,
    GIVE_UP_MISSING,
    Decision,
    RetryPolicy,
    after_not_found,
    after_transient,
)
from callvault.archive._session import PbxSession
from callvault.index import Index, Job, Worker
from callvault.pbx import (
    AuthError,
    DownloadResult,
    LoginFailed,
    LoginLockedOut,
    PbxError,
    RandomInvalid,
    RecordingNotFound,
)
from callvault.storage import LocalStorage, StoredObject, recording_key

log = logging.getLogger("callvault.archive")

# 20012 means "file does not exist" on 2017 firmware and "random invalid" later; the
# client retries it with fresh randoms, so one surviving that is treated as not found.
_NOT_FOUND_ERRNOS = {"20012", "20014", "20018"}


class Downloader(Protocol):
    """The part of `PbxClient` the workers use."""

    async def download_recording(
        self, name: str, dest_dir: Path, *, filename: str | None = None
    ) -> DownloadResult: ...


@dataclass(frozen=True, slots=True)
class Archived:
    """One recording the pool archived (for logs, tests, benchmarks)."""

    recording_id: int
    name: str
    storage_key: str
    size: int
    sha256: str
    at: datetime


def default_worker_prefix() -> str:
    """Unique per process: a restarted process never mistakes an old claim for its own."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# Lock descriptors of this process's staging directories, held until `remove_staging_dir`.
_STAGING_LOCKS: dict[Path, int] = {}
_STAGING_LOCKS_GUARD = threading.Lock()


def process_staging_dir(storage: LocalStorage) -> Path:
    """A staging directory of this process's own, after removing those of dead processes.

    Downloads in progress live in the storage's hidden staging area; a process killed
    mid-download (SIGKILL, power loss) leaves its partial file there. Each process works
    in ``proc-<host>-<pid>-<random>`` and holds a `flock` on the lock file in it while it
    runs; a directory whose lock can be taken is a dead process's, whatever its pid means
    now (pids are reused; in a container `serve` is often pid 1), and is removed.
    """
    for name in storage.remove_abandoned_staging_dirs():
        log.info("removed the partial downloads of a stopped process (%s)", name)
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    own, fd = storage.new_process_staging_dir(f"{host}-{os.getpid()}")
    with _STAGING_LOCKS_GUARD:
        _STAGING_LOCKS[own] = fd
    return own


def remove_staging_dir(path: Path) -> None:
    """Remove this process's staging directory at a clean exit, then let go of its lock."""
    shutil.rmtree(path, ignore_errors=True)
    with _STAGING_LOCKS_GUARD:
        fd = _STAGING_LOCKS.pop(path, None)
    if fd is not None:
        os.close(fd)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WorkerPool:
    """`workers` concurrent download loops over the index's job queue."""

    def __init__(
        self,
        *,
        index: Index,
        storage: LocalStorage,
        client: Downloader,
        session: PbxSession | None,
        tz: ZoneInfo,
        policy: RetryPolicy | None = None,
        workers: int = 2,
        lease_s: float = 300.0,
        poll_interval_s: float = 5.0,
        worker_prefix: str | None = None,
        clock: Callable[[], datetime] = _utcnow,
        on_archived: Callable[[Archived], None] | None = None,
        on_auth_failure: Callable[[AuthError], None] | None = None,
        rng: random.Random | None = None,
        staging_dir: Path | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker is needed")
        self._index = index
        self._storage = storage
        self._client = client
        self._session = session
        self._tz = tz
        self._policy = policy or RetryPolicy()
        self._workers = workers
        self._lease = timedelta(seconds=lease_s)
        self._poll_interval_s = poll_interval_s
        self._prefix = worker_prefix or default_worker_prefix()
        self._clock = clock
        self._on_archived = on_archived
        self._on_auth_failure = on_auth_failure
        self._staging_dir = staging_dir
        self._rng = rng or random.Random()
        self._wakes = [asyncio.Event() for _ in range(workers)]
        self._busy = [False] * workers
        self.archived = 0

    def wake(self) -> None:
        """New work may be due: every idle worker looks at once (call from the loop)."""
        for event in self._wakes:
            event.set()

    @property
    def busy(self) -> bool:
        return any(self._busy)

    async def run(self, stop: asyncio.Event, *, grace_s: float = 20.0) -> None:
        """Run the workers until `stop` is set; then let in-flight jobs finish for up to
        `grace_s` seconds and release the rest (they are due again at once)."""
        tasks = [
            asyncio.create_task(self._worker(n, stop), name=f"callvault-worker-{n}")
            for n in range(self._workers)
        ]
        await stop.wait()
        self.wake()
        _done, still = await asyncio.wait(tasks, timeout=grace_s)
        for task in still:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _worker(self, number: int, stop: asyncio.Event) -> None:
        # No registered process yet: only the lease protects these claims.
        worker = Worker(process_id=None, name=f"{self._prefix}:{number}")
        wake = self._wakes[number]
        while not stop.is_set():
            if self._session is not None and not self._session.ready.is_set():
                await _first_of(stop, self._session.ready, seconds=self._poll_interval_s)
                continue
            wake.clear()
            try:
                jobs = await self._claim(worker)
            except Exception as exc:
                log.error("cannot claim jobs from the index: %s", exc)
                await _first_of(stop, wake, seconds=self._poll_interval_s)
                continue
            if not jobs:
                await _first_of(stop, wake, seconds=await self._nap())
                continue
            self._busy[number] = True
            try:
                await self._process(jobs[0], worker)
            finally:
                self._busy[number] = False

    async def _claim(self, worker: Worker) -> list[Job]:
        """Claim the next due job, if any.

        The claim runs in a thread that a cancellation cannot stop: if this task is
        cancelled meanwhile (shutdown), whatever the thread claimed is handed back at once
        instead of sitting in `downloading` until its lease runs out.
        """
        claim = asyncio.ensure_future(
            asyncio.to_thread(
                self._index.jobs.claim, worker, 1, now=self._clock(), lease=self._lease
            )
        )
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                for job in await claim:
                    await self._release(job, worker, "interrupted by shutdown")
            raise

    async def _nap(self) -> float:
        """Seconds until the next retry is due, at most `poll_interval_s`."""
        try:
            due = await asyncio.to_thread(self._index.jobs.next_due)
        except Exception:
            return self._poll_interval_s
        if due is None:
            return self._poll_interval_s
        seconds = (due - self._clock()).total_seconds()
        return min(self._poll_interval_s, max(0.05, seconds))

    async def _process(self, job: Job, worker: Worker) -> None:
        renewer = asyncio.create_task(
            self._keep_claim(job, worker), name=f"callvault-lease-{job.recording_id}"
        )
        try:
            await self._attempt(job, worker)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _keep_claim(self, job: Job, worker: Worker) -> None:
        """Renew the claim on `job` every third of the lease until cancelled."""
        interval = max(self._lease.total_seconds() / 3, 0.01)
        while True:
            await asyncio.sleep(interval)
            try:
                held = await asyncio.to_thread(
                    self._index.jobs.renew,
                    job.recording_id,
                    worker=worker,
                    now=self._clock(),
                    lease=self._lease,
                )
            except Exception as exc:  # try again next time; the lease has some left
                log.warning("%s: cannot renew the claim: %s", job.name, exc)
                continue
            if not held:
                log.warning("%s: the claim was lost while working on it", job.name)
                return

    async def _attempt(self, job: Job, worker: Worker) -> None:
        staging = self._staging_dir or self._storage.staging_dir()
        # Keep the extension: the client insists on RIFF/WAVE for a .wav target.
        filename = f"{job.recording_id}-{uuid.uuid4().hex[:12]}{_extension(job.name)}"
        staged = staging / filename
        try:
            key = await self._storage_key(job)
            stored = await asyncio.to_thread(self._already_stored, key)
            if stored is not None and stored.sha256 is not None:
                log.info("%s: already stored as %s; archiving that copy", job.name, key)
                digest = stored.sha256
                content_type = await asyncio.to_thread(self._sniff, key)
            else:
                result = await self._client.download_recording(job.name, staging, filename=filename)
                content_type = result.content_type
                stored = await asyncio.to_thread(
                    self._storage.put_file, key, result.path, sha256=result.sha256
                )
                digest = stored.sha256 or result.sha256
            now = self._clock()
            still_ours = await asyncio.to_thread(
                self._index.jobs.mark_archived,
                job.recording_id,
                worker=worker,
                size=stored.size,
                sha256=digest,
                storage_key=key,
                content_type=content_type,
                now=now,
            )
            if not still_ours:
                # The claim ran out meanwhile, but the bytes are stored: archived unless
                # another worker archived it first.
                still_ours = await asyncio.to_thread(
                    self._index.jobs.mark_archived_unclaimed,
                    job.recording_id,
                    size=stored.size,
                    sha256=digest,
                    storage_key=key,
                    content_type=content_type,
                    now=now,
                )
        except asyncio.CancelledError:
            await self._release(job, worker, "interrupted by shutdown")
            raise
        except (LoginFailed, LoginLockedOut) as exc:
            if self._on_auth_failure is not None:
                self._on_auth_failure(exc)
            if self._session is not None:
                self._session.report_auth_failure(exc)
            await self._retry_now(job, worker, f"paused: {exc}")
            return
        except Exception as exc:
            await self._failed_attempt(job, worker, exc)
            return
        finally:
            with contextlib.suppress(OSError):
                staged.unlink(missing_ok=True)
        if self._session is not None:
            self._session.report_success()
        if not still_ours:
            log.warning("%s: stored, but archived by another worker meanwhile", job.name)
            return
        self.archived += 1
        log.info("archived %s (%d bytes, sha256 %s) as %s", job.name, stored.size, digest, key)
        if self._on_archived is not None:
            self._on_archived(Archived(job.recording_id, job.name, key, stored.size, digest, now))

    async def _storage_key(self, job: Job) -> str:
        """The key fixed for this recording at its first attempt (fixed now if this is it)."""
        wanted = recording_key(job.pbx_serial, self._start_local(job), job.name)
        key = await asyncio.to_thread(
            self._index.jobs.reserve_storage_key, job.recording_id, wanted
        )
        return key or wanted

    def _already_stored(self, key: str) -> StoredObject | None:
        """Size and SHA-256 of the file already under `key` (a crash after storing it last
        time), or None if there is none."""
        if self._storage.stat(key) is None:
            return None
        try:
            return self._storage.checksum(key)
        except FileNotFoundError:
            return None

    def _sniff(self, key: str) -> str:
        with self._storage.open(key) as handle:
            head = handle.read(12)
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            return "audio/x-wav"
        return "application/octet-stream"

    def _start_local(self, job: Job) -> datetime:
        start = job.start_at or self._clock()
        return start.astimezone(self._tz)

    async def _failed_attempt(self, job: Job, worker: Worker, exc: Exception) -> None:
        now = self._clock()
        error = _describe(exc)
        if _is_not_found(exc):
            call_end, queued_at = await self._call_end_and_queued(job)
            decision = after_not_found(
                self._policy,
                error=error,
                attempts=job.attempts,
                missing_since=job.missing_since,
                call_ended_at=call_end,
                queued_at=queued_at,
                now=now,
            )
        else:
            if isinstance(exc, PbxError) and self._session is not None:
                self._session.report_error(error)
            decision = after_transient(
                self._policy, error=error, attempts=job.attempts, now=now, rng=self._rng
            )
        await self._apply(job, worker, decision, not_found=_is_not_found(exc), now=now)

    async def _apply(
        self, job: Job, worker: Worker, decision: Decision, *, not_found: bool, now: datetime
    ) -> None:
        try:
            if decision.action == GIVE_UP_MISSING:
                log.error("%s: missing: %s", job.name, decision.reason)
                await asyncio.to_thread(
                    self._index.jobs.mark_missing,
                    job.recording_id,
                    worker=worker,
                    reason=decision.reason,
                    now=now,
                )
            elif decision.action == GIVE_UP_FAILED:
                log.error("%s: failed: %s", job.name, decision.reason)
                await asyncio.to_thread(
                    self._index.jobs.mark_failed,
                    job.recording_id,
                    worker=worker,
                    reason=decision.reason,
                    now=now,
                )
            else:
                assert decision.next_attempt_at is not None
                wait = (decision.next_attempt_at - now).total_seconds()
                log.info(
                    "%s: attempt %d: %s; next attempt in %.0f s",
                    job.name,
                    job.attempts,
                    decision.reason,
                    wait,
                )
                await asyncio.to_thread(
                    self._index.jobs.mark_retry,
                    job.recording_id,
                    worker=worker,
                    error=decision.reason,
                    next_attempt_at=decision.next_attempt_at,
                    now=now,
                    not_found=not_found,
                )
        except Exception as exc:  # the lease runs out and the job is claimable again
            log.error("%s: cannot record the outcome in the index: %s", job.name, exc)

    async def _call_end_and_queued(self, job: Job) -> tuple[datetime | None, datetime | None]:
        """When the call ended (by the PBX's clock) and, for a call reported by its NewCdr
        event, when the index learned of the recording (by ours); None where unknown.

        Only an event means "this call just ended": a recording queued by the CDR export
        (backfill, reconciliation) is judged by its call's end alone, so a month-old
        recording that is gone becomes `missing` after a few attempts, not 30 minutes.
        """
        try:
            row = await asyncio.to_thread(self._index.recordings.by_id, job.recording_id)
        except Exception:
            return None, None
        if row is None:
            return None, None
        queued_at = row.created_at if row.source == "event" else None
        if job.start_at is None:
            return None, queued_at
        return job.start_at + timedelta(seconds=row.duration_s or 0), queued_at

    async def _retry_now(self, job: Job, worker: Worker, error: str) -> None:
        now = self._clock()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(
                self._index.jobs.mark_retry,
                job.recording_id,
                worker=worker,
                error=error,
                next_attempt_at=now,
                now=now,
                not_found=False,
            )

    async def _release(self, job: Job, worker: Worker, error: str) -> None:
        # Shielded: the release must reach the index even while we are being cancelled.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(self._retry_now(job, worker, error))


def _extension(name: str) -> str:
    match = re.search(r"\.[A-Za-z0-9]{1,8}$", name)
    return match.group(0).lower() if match else ""


def _is_not_found(exc: Exception) -> bool:
    if isinstance(exc, RecordingNotFound):
        return True
    return isinstance(exc, RandomInvalid) and exc.errno in _NOT_FOUND_ERRNOS


def _describe(exc: Exception) -> str:
    if isinstance(exc, PbxError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


async def _first_of(stop: asyncio.Event, other: asyncio.Event, *, seconds: float) -> None:
    """Wait until `stop` or `other` is set, or `seconds` pass."""
    if stop.is_set() or other.is_set():
        return
    waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(other.wait())}
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
