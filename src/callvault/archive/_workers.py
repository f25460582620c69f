"""The worker pool: claim a job, download the recording, store it, mark it archived.

Concurrency is bounded (default 2: the PBX is a small embedded box that closes every
connection). Jobs are claimed from the index as a `Worker` of this process's registered
row (see `callvault.archive._process`), so a crashed process's jobs are claimable again
within seconds; the lease is the last resort. A worker sleeps until it is woken (a new
recording was queued), until the next retry is due, or for `poll_interval_s` at most.

For each job:

0. its storage key is fixed in the index at its first attempt (`jobs.reserve_storage_key`) and
   never changes, even when a later report fills in the call's serial or start; if a file
   is already there (a crash after step 2 last time), it is hashed and archived as is;
1. `client.download_recording` into this process's staging area (the client checks
   RIFF/WAVE, size, fsyncs and renames; no partial file is ever left);
2. `storage.put_file` moves it into place atomically under that key;
3. `index.jobs.mark_archived` with size and SHA-256, only then is it archived.

With encryption at rest (`encrypt`, serve's ``--encrypt``), the recording's data key is
made, sealed with the master keyring and fixed in the index first (`jobs.reserve_data_key`:
a crash after storing the file never loses the key it was encrypted with); step 1 then
writes the body encrypted as it arrives (`callvault.cipher`, through the client's
`transform`: the plaintext never reaches the disk), while the client's checks, size and
SHA-256 are the plaintext's. The ciphertext is stored; the index gets the plaintext's size
and SHA-256 (as the PBX sent it) and the sealed data key. A file already stored under a
reserved data key is decrypted (every segment authenticated) to learn its plaintext's hash.

While a job runs its claim is renewed every third of the lease, so a download longer than
the lease is not handed to another worker. If the claim was lost anyway (the index was
unreachable for a whole lease) but the file got stored, the recording is still archived
unless someone else archived it meanwhile.

Failures are classified once, by `callvault.pbx.error_kind`, and decided by
`callvault.archive._policy`: permanent (an unsafe name, a request the PBX rejects) ->
`failed` at once with the reason; not found -> the not-found schedule, then `missing`;
transient (network, a busy PBX, a full disk) -> backoff, then `failed`; login refused ->
every worker pauses (see `PbxSession`). A worker never dies from one job: anything that
goes wrong while handling a job is logged at ERROR with the recording's name and the job is
failed or backed off; a worker task that dies anyway is restarted by its supervisor, and
the pool tells how many workers are `alive` against how many are `configured`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errnos
import hashlib
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Protocol

from callvault import cipher
from callvault.archive._policy import (
    GIVE_UP_FAILED,
    GIVE_UP_MISSING,
    Decision,
    RetryPolicy,
    after_not_found,
    after_permanent,
    after_transient,
)
from callvault.archive._process import DEFAULT_STALE_AFTER_S
from callvault.archive._session import PbxSession
from callvault.index import Index, Job, Worker
from callvault.keys import Keyring, recording_context
from callvault.pbx import (
    DownloadResult,
    ErrorKind,
    PbxError,
    SessionWithdrawn,
    StreamTransform,
    error_kind,
)
from callvault.storage import StagingArea, Storage, StoredObject, recording_key
from callvault.times import MAX_DURATION_S

log = logging.getLogger("callvault.archive")

# Delays before restarting a worker task that died (the last one repeats).
DEFAULT_RESTART_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 5.0, 15.0, 30.0)
# A worker that ran this long before dying starts again from the first delay.
_HEALTHY_RUN_S = 60.0


class Downloader(Protocol):
    """The part of `PbxClient` the workers use."""

    async def download_recording(
        self,
        name: str,
        dest_dir: Path,
        *,
        filename: str | None = None,
        transform: Callable[[], StreamTransform] | None = None,
        hash_stored: bool = True,
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
    seconds: float = 0.0  # the successful attempt's duration
    queued_at: datetime | None = None  # when the index learned of the recording


def default_worker_prefix() -> str:
    """Unique per process: a restarted process never mistakes an old claim for its own."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def staging_tag() -> str:
    """How this process's staging area is named for people: host and pid."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WorkerPool:
    """`workers` concurrent download loops over the index's job queue, each supervised.

    With `process_id` (a registered process, see `ProcessRegistration`) worker n claims as
    ``p<id>:w<n>`` and its claims are released as soon as the process is gone; without
    one (a library user) only the lease protects them. Without `staging`, `run` opens a
    staging area of its own from `storage` and closes it at the end.
    """

    def __init__(
        self,
        *,
        index: Index,
        storage: Storage,
        client: Downloader,
        session: PbxSession | None,
        tz: tzinfo,
        policy: RetryPolicy | None = None,
        workers: int = 2,
        lease_s: float = 300.0,
        poll_interval_s: float = 5.0,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        process_id: int | None = None,
        worker_prefix: str | None = None,
        clock: Callable[[], datetime] = _utcnow,
        on_archived: Callable[[Archived], None] | None = None,
        on_auth_failure: Callable[[Exception], None] | None = None,
        on_failed_attempt: Callable[[str, str], None] | None = None,
        pbx_id: int | None = None,
        rng: random.Random | None = None,
        staging: StagingArea | None = None,
        restart_delays_s: Sequence[float] = DEFAULT_RESTART_DELAYS_S,
        label: str = "",
        keyring: Keyring | None = None,
        encrypt: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker is needed")
        if encrypt and keyring is None:
            raise ValueError("encryption at rest needs a master key")
        self._keyring = keyring  # opens (and with `encrypt`, seals) recordings' data keys
        self._encrypt = encrypt
        self._index = index
        self._label = label  # the PBX's name, for log lines; "" when it is the only one
        self._storage = storage
        self._client = client
        self._session = session
        self._tz = tz
        self._policy = policy or RetryPolicy()
        self._workers = workers
        self._lease = timedelta(seconds=lease_s)
        self._poll_interval_s = poll_interval_s
        self._stale_after = timedelta(seconds=stale_after_s)
        self._process_id = process_id
        self._prefix = worker_prefix or default_worker_prefix()
        self._clock = clock
        self._on_archived = on_archived
        self._on_auth_failure = on_auth_failure
        self._on_failed_attempt = on_failed_attempt
        self._pbx_id = pbx_id
        self._staging = staging
        self._staging_path: Path | None = staging.path if staging is not None else None
        self._rng = rng or random.Random()
        self._restart_delays = tuple(restart_delays_s) or (1.0,)
        self._wakes = [asyncio.Event() for _ in range(workers)]
        self._busy = [False] * workers
        self._alive = [False] * workers
        self._fenced = asyncio.Event()
        self.fenced_reason: str | None = None
        self.archived = 0
        self.restarts = 0

    # -- for the owner -------------------------------------------------------------------

    def wake(self) -> None:
        """New work may be due: every idle worker looks at once (call from the loop)."""
        for event in self._wakes:
            event.set()

    @property
    def configured(self) -> int:
        """How many workers this pool runs."""
        return self._workers

    @property
    def alive(self) -> int:
        """How many workers are running now (not dead and waiting to be restarted)."""
        return sum(self._alive)

    @property
    def busy(self) -> bool:
        """Whether a worker is claiming or working on a job."""
        return any(self._busy)

    @property
    def in_flight(self) -> int:
        """How many workers are claiming or working on a job."""
        return sum(self._busy)

    @property
    def fenced(self) -> asyncio.Event:
        """Set once `fence` was called: the pool stopped downloading."""
        return self._fenced

    def worker(self, number: int) -> Worker:
        """The identity worker `number` claims jobs as."""
        if self._process_id is not None:
            return Worker(process_id=self._process_id, name=f"p{self._process_id}:w{number}")
        return Worker(process_id=None, name=f"{self._prefix}:{number}")

    def _job(self, job: Job) -> str:
        """How log lines name a recording: with its PBX when the process has several."""
        return f"{job.name} (PBX {self._label})" if self._label else job.name

    def fence(self, reason: str) -> None:
        """Stop downloading at once: this process's claims may be another's already
        (its registration was ended by someone else). `run` cancels the jobs in flight."""
        if not self._fenced.is_set():
            self.fenced_reason = reason
            self._fenced.set()
            self.wake()

    async def run(self, stop: asyncio.Event, *, grace_s: float = 20.0) -> None:
        """Run the workers until `stop` is set; then let in-flight jobs finish for up to
        `grace_s` seconds and release the rest (they are due again at once). After `fence`,
        in-flight jobs are cancelled at once."""
        own_staging: StagingArea | None = None
        if self._staging_path is None:
            own_staging = await asyncio.to_thread(self._storage.open_staging, staging_tag())
            self._staging_path = own_staging.path
        slots = [
            asyncio.create_task(self._supervise(n, stop), name=f"callvault-worker-{n}")
            for n in range(self._workers)
        ]
        try:
            await _first_of(stop, self._fenced, seconds=None)
            self.wake()
            grace = 0.0 if self._fenced.is_set() else grace_s
            if grace > 0:
                await asyncio.wait(slots, timeout=grace)
        finally:
            for slot in slots:
                slot.cancel()
            # Every slot's outcome is retrieved here: none ends unnoticed.
            for outcome in await asyncio.gather(*slots, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.error("a download worker failed at shutdown: %s", _describe(outcome))
            if own_staging is not None:
                await asyncio.to_thread(own_staging.close)
                self._staging_path = None

    # -- the workers ---------------------------------------------------------------------

    def _stopping(self, stop: asyncio.Event) -> bool:
        return stop.is_set() or self._fenced.is_set()

    async def _supervise(self, number: int, stop: asyncio.Event) -> None:
        """Run worker `number`; restart it (after a short, growing delay) if it dies."""
        loop = asyncio.get_running_loop()
        deaths = 0
        while not self._stopping(stop):
            started = loop.time()
            self._alive[number] = True
            try:
                await self._worker(number, stop)
                return
            except Exception as exc:
                if loop.time() - started >= _HEALTHY_RUN_S:
                    deaths = 0
                delay = self._restart_delays[min(deaths, len(self._restart_delays) - 1)]
                deaths += 1
                self.restarts += 1
                if deaths == 1:
                    log.error(
                        "download worker %d died: %s; restarting it in %.0f s",
                        number,
                        _describe(exc),
                        delay,
                        exc_info=exc,
                    )
                else:
                    log.error(
                        "download worker %d died again: %s; restarting it in %.0f s",
                        number,
                        _describe(exc),
                        delay,
                    )
            finally:
                self._alive[number] = False
                self._busy[number] = False
            await _first_of(stop, self._fenced, seconds=delay)

    async def _worker(self, number: int, stop: asyncio.Event) -> None:
        worker = self.worker(number)
        wake = self._wakes[number]
        while not self._stopping(stop):
            if self._session is not None and not self._session.ready.is_set():
                await _first_of(stop, self._session.ready, seconds=self._poll_interval_s)
                continue
            wake.clear()
            # Busy from the claim on: whoever waits for the pool to be idle (backfill's
            # drain) never takes a job being claimed for "nothing to do".
            self._busy[number] = True
            try:
                try:
                    jobs = await self._claim(worker)
                except Exception as exc:
                    log.error("cannot claim jobs from the index: %s", _describe(exc))
                    jobs = None
                if jobs:
                    await self._process(jobs[0], worker)
                    continue
            finally:
                self._busy[number] = False
            nap = self._poll_interval_s if jobs is None else await self._nap()
            await _first_of(stop, wake, seconds=nap)

    async def _claim(self, worker: Worker) -> list[Job]:
        """Claim the next due job, if any.

        The claim runs in a thread that a cancellation cannot stop: if this task is
        cancelled meanwhile (shutdown), whatever the thread claimed is handed back at once
        instead of sitting in `downloading` until its lease runs out.
        """
        claim = asyncio.ensure_future(
            asyncio.to_thread(
                self._index.jobs.claim,
                worker,
                1,
                now=self._clock(),
                lease=self._lease,
                stale_after=self._stale_after,
                pbx_id=self._pbx_id,
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
            due = await asyncio.to_thread(self._index.jobs.next_due, self._pbx_id)
            if due is None:
                return self._poll_interval_s
            seconds = (due - self._clock()).total_seconds()
        except Exception:
            return self._poll_interval_s
        return min(self._poll_interval_s, max(0.05, seconds))

    async def _process(self, job: Job, worker: Worker) -> None:
        """One job, whatever happens: its outcome is recorded, the worker goes on."""
        renewer = asyncio.create_task(
            self._keep_claim(job, worker), name=f"callvault-lease-{job.recording_id}"
        )
        try:
            await self._attempt(job, worker)
        except Exception as exc:  # a fault in handling the job itself, not in the download
            log.error(
                "%s: unexpected error while archiving it: %s",
                job.name,
                _describe(exc),
                exc_info=exc,
            )
            await self._settle_after_fault(job, worker, exc)
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
                log.warning("%s: cannot renew the claim: %s", self._job(job), _describe(exc))
                continue
            if not held:
                log.warning("%s: the claim was lost while working on it", self._job(job))
                return

    def _store(self, job: Job, key: str, path: Path, sha256: str | None) -> StoredObject:
        """Put the verified download in storage; where the storage locks (a bucket with
        Object Lock), until its retention policy lets it go, and under the storage's
        legal hold if a hold already keeps it."""
        until = None
        if self._storage.locks:
            until = self._index.retention.expiry_for(job.recording_id)
        stored = self._storage.put_file(key, path, sha256=sha256, retain_until=until)
        if self._storage.locks and self._index.retention.is_held(job.recording_id):
            self._storage.legal_hold(key, True)
        return stored

    async def _attempt(self, job: Job, worker: Worker) -> None:
        staging = self._staging_path
        if staging is None:
            raise RuntimeError("the worker pool has no staging area (call run())")
        # Keep the extension: the client insists on RIFF/WAVE for a .wav target.
        filename = f"{job.recording_id}-{uuid.uuid4().hex[:12]}{_extension(job.name)}"
        staged = staging / filename
        step = "download"
        started = time.monotonic()
        try:
            key = await self._storage_key(job)
            stored = await asyncio.to_thread(self._already_stored, key)
            data_key: str | None = None
            if stored is not None and stored.sha256 is not None:
                log.info("%s: already stored as %s; archiving that copy", self._job(job), key)
                digest, size, content_type, data_key = await asyncio.to_thread(
                    self._stored_copy, job, key, stored.sha256, stored.size
                )
            elif self._encrypt:
                data_key, open_key = await asyncio.to_thread(self._data_key, job)
                associated = cipher.recording_associated_data(job.recording_id)

                def sealer() -> cipher.Encryptor:
                    return cipher.Encryptor(open_key, associated)

                # Encrypted as it arrives: the plaintext never reaches the disk.
                # The ciphertext's own SHA-256 (a second hash over every byte) only for a
                # storage that keeps it; the segments' tags protect the ciphertext anyway.
                result = await self._client.download_recording(
                    job.name,
                    staging,
                    filename=filename,
                    transform=sealer,
                    hash_stored=self._storage.keeps_sha256,
                )
                content_type = result.content_type
                step = "store"
                stored = await asyncio.to_thread(
                    self._store, job, key, result.path, result.stored_sha256
                )
                digest, size = result.sha256, result.size
            else:
                result = await self._client.download_recording(job.name, staging, filename=filename)
                content_type = result.content_type
                step = "store"
                stored = await asyncio.to_thread(self._store, job, key, result.path, result.sha256)
                digest, size = stored.sha256 or result.sha256, stored.size
            step = "index"
            now = self._clock()
            still_ours = await asyncio.to_thread(
                self._index.jobs.mark_archived,
                job.recording_id,
                worker=worker,
                size=size,
                sha256=digest,
                storage_key=key,
                content_type=content_type,
                now=now,
                data_key=data_key,
            )
            if not still_ours:
                # The claim ran out meanwhile, but the bytes are stored: archived unless
                # another worker archived it first.
                still_ours = await asyncio.to_thread(
                    self._index.jobs.mark_archived_unclaimed,
                    job.recording_id,
                    size=size,
                    sha256=digest,
                    storage_key=key,
                    content_type=content_type,
                    now=now,
                    data_key=data_key,
                )
        except asyncio.CancelledError:
            await self._release(job, worker, "interrupted by shutdown")
            raise
        except Exception as exc:
            await self._failed_attempt(job, worker, exc, step)
            return
        finally:
            with contextlib.suppress(OSError):
                staged.unlink(missing_ok=True)
        if self._session is not None:
            self._session.report_success()
        if not still_ours:
            log.warning("%s: stored, but archived by another worker meanwhile", self._job(job))
            return
        self.archived += 1
        log.info(
            "archived %s (%d bytes, sha256 %s) as %s%s",
            self._job(job),
            size,
            digest,
            key,
            " (encrypted)" if data_key is not None else "",
        )
        if self._on_archived is not None:
            try:
                self._on_archived(
                    Archived(
                        job.recording_id,
                        job.name,
                        key,
                        size,
                        digest,
                        now,
                        seconds=time.monotonic() - started,
                        queued_at=job.queued_at,
                    )
                )
            except Exception as exc:
                log.error("%s: the on_archived callback failed: %s", self._job(job), _describe(exc))

    async def _storage_key(self, job: Job) -> str:
        """The key fixed for this recording at its first attempt (fixed now if this is it).

        A call without a serial is filed under ``unknown``, or, for a registered PBX other
        than the archive's own of serve's flags, under ``pbx-<its id>``: two PBXs without
        serials may give two recordings the same name, and the second would otherwise be
        taken for a copy of the first already stored."""
        serial = job.pbx_serial or (f"pbx-{self._pbx_id}" if self._pbx_id else "")
        wanted = recording_key(serial, self._start_local(job), job.name)
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

    def _data_key(self, job: Job) -> tuple[str, bytes]:
        """The recording's data key, sealed and open: the one reserved for it in the index
        (an earlier attempt's), else a new one, reserved now, before anything is stored."""
        keyring = self._keyring
        assert keyring is not None
        context = recording_context(job.recording_id)
        sealed = self._index.jobs.reserve_data_key(
            job.recording_id, keyring.seal(cipher.new_data_key(), context)
        )
        if sealed is None:
            raise RuntimeError("the recording is no longer in the index")
        return sealed, keyring.open(sealed, context)  # MasterKeyError: one line

    def _stored_copy(
        self, job: Job, key: str, sha256: str, size: int
    ) -> tuple[str, int, str, str | None]:
        """SHA-256, size, type and sealed data key of the plaintext of the file already
        stored under `key`: the file as it is, or, if the index holds a data key reserved
        for it and the file is not a plain RIFF file, the file decrypted with that key."""
        sealed = self._index.jobs.reserved_data_key(job.recording_id)
        if sealed is None:
            return sha256, size, self._sniff(key), None
        with self._storage.open(key) as handle:
            head = handle.read(4)
        if head == b"RIFF":  # stored in clear after all (encryption was turned off)
            return sha256, size, self._sniff(key), None
        if self._keyring is None:
            raise cipher.CipherError(
                f"{key} is stored encrypted: a master key is needed to archive it "
                "(set CALLVAULT_MASTER_KEY or master_key_file)"
            )
        data_key = self._keyring.open(sealed, recording_context(job.recording_id))
        digest = hashlib.sha256()
        plain = 0
        first = b""
        with self._storage.open(key) as handle:
            for chunk in cipher.decrypt_file(
                data_key, handle, size, cipher.recording_associated_data(job.recording_id)
            ):
                if not first:
                    first = bytes(chunk[:12])
                digest.update(chunk)
                plain += len(chunk)
        return digest.hexdigest(), plain, _sniffed(first), sealed

    def _sniff(self, key: str) -> str:
        with self._storage.open(key) as handle:
            head = handle.read(12)
        return _sniffed(head)

    def _start_local(self, job: Job) -> datetime:
        """The call's start in the PBX's zone (for the storage key's date); now if unknown
        or if it cannot be expressed in that zone (a start at the calendar's edge)."""
        for start in (job.start_at, self._clock()):
            if start is None:
                continue
            with contextlib.suppress(OverflowError, ValueError):
                return start.astimezone(self._tz)
        return self._clock()

    async def _failed_attempt(self, job: Job, worker: Worker, exc: Exception, step: str) -> None:
        """Decide and record what follows a failed attempt (see the module docstring)."""
        if isinstance(exc, SessionWithdrawn):
            # This node may no longer talk to the PBX (another holds it now): hand the job
            # back for whoever holds the PBX, and stop claiming.
            await self._release(job, worker, str(exc))
            self.fence(str(exc))
            return
        kind = error_kind(exc)
        error = _describe(exc, step)
        if self._on_failed_attempt is not None:
            with contextlib.suppress(Exception):
                self._on_failed_attempt(kind.value, step)
        if kind is ErrorKind.LOGIN_REFUSED:
            if self._on_auth_failure is not None:
                self._on_auth_failure(exc)
            if self._session is not None:
                self._session.report_auth_failure(exc)
            await self._retry_now(job, worker, f"paused: {error}")
            return
        now = self._clock()
        if kind is ErrorKind.NOT_FOUND:
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
        elif kind is ErrorKind.PERMANENT:
            decision = after_permanent(error=error)
        else:
            if isinstance(exc, PbxError) and self._session is not None:
                self._session.report_error(error)  # trouble with the PBX, not with this job
            decision = after_transient(
                self._policy, error=error, attempts=job.attempts, now=now, rng=self._rng
            )
        await self._apply(job, worker, decision, not_found=kind is ErrorKind.NOT_FOUND, now=now)

    async def _settle_after_fault(self, job: Job, worker: Worker, exc: Exception) -> None:
        """After an unexpected fault in handling `job`: fail it if the fault is permanent
        (the same job would hit it again), else back off; never raises."""
        try:
            now = self._clock()
            error = f"callvault could not handle it: {_describe(exc)}"
            if error_kind(exc) is ErrorKind.PERMANENT:
                decision = after_permanent(error=error)
            else:
                decision = after_transient(
                    self._policy, error=error, attempts=job.attempts, now=now, rng=self._rng
                )
            await self._apply(job, worker, decision, not_found=False, now=now)
        except Exception as second:  # the lease runs out and the job is claimable again
            log.error("%s: cannot record the outcome: %s", self._job(job), _describe(second))

    async def _apply(
        self, job: Job, worker: Worker, decision: Decision, *, not_found: bool, now: datetime
    ) -> None:
        try:
            if decision.action == GIVE_UP_MISSING:
                log.error("%s: missing: %s", self._job(job), decision.reason)
                await asyncio.to_thread(
                    self._index.jobs.mark_missing,
                    job.recording_id,
                    worker=worker,
                    reason=decision.reason,
                    now=now,
                )
            elif decision.action == GIVE_UP_FAILED:
                log.error("%s: failed: %s", self._job(job), decision.reason)
                await asyncio.to_thread(
                    self._index.jobs.mark_failed,
                    job.recording_id,
                    worker=worker,
                    reason=decision.reason,
                    now=now,
                )
            else:
                next_attempt_at = decision.next_attempt_at or now
                wait = (next_attempt_at - now).total_seconds()
                # "Not there yet" is normal right after a call; anything else is trouble.
                level = logging.INFO if not_found else logging.WARNING
                log.log(
                    level,
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
                    next_attempt_at=next_attempt_at,
                    now=now,
                    not_found=not_found,
                )
        except Exception as exc:  # the lease runs out and the job is claimable again
            log.error(
                "%s: cannot record the outcome in the index: %s", self._job(job), _describe(exc)
            )

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
        duration = min(max(row.duration_s or 0, 0), MAX_DURATION_S)
        try:
            return job.start_at + timedelta(seconds=duration), queued_at
        except OverflowError:  # a start at the calendar's end (an index of an older version)
            return None, queued_at

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


def _sniffed(head: bytes) -> str:
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/x-wav"
    return "application/octet-stream"


def _extension(name: str) -> str:
    match = re.search(r"\.[A-Za-z0-9]{1,8}$", name)
    return match.group(0).lower() if match else ""


def _describe(exc: BaseException, step: str = "") -> str:
    """`exc` in one line for the log and the job's last error, saying which step failed
    where that is not obvious (storing it, recording it in the index)."""
    if isinstance(exc, PbxError):
        return str(exc)
    if isinstance(exc, OSError):
        code = errnos.errorcode.get(exc.errno or 0)
        text = f"{exc.strerror or exc}" + (f" ({code})" if code else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())[:500]
    if step == "store":
        return f"cannot store it: {text}"
    if step == "index":
        return f"cannot record it in the index: {text}"
    return text


async def _first_of(stop: asyncio.Event, other: asyncio.Event, *, seconds: float | None) -> None:
    """Wait until `stop` or `other` is set, or `seconds` pass (None: no time limit)."""
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
