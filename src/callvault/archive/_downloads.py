"""Downloads as `serve` and `backfill` both run them: a registered process, its staging
area, its supervised worker pool and its heartbeat; and `drain`, backfill's "download what
is due, then stop".

`Downloads` is the one way a pool is built and run: it opens this process's staging area
(`storage.open_staging`), registers the process (`ProcessRegistration`), starts the
`WorkerPool` with workers that claim as that process, and sends the heartbeat (with how
many workers are alive) every `heartbeat_s` seconds. A heartbeat the index refuses fences
the pool: it stops downloading at once, and `fenced` is set for the owner to stop too. At
the end it lets in-flight downloads finish (or hands them back), marks the process
stopped and removes the staging area.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from types import TracebackType

from callvault.archive._policy import RetryPolicy
from callvault.archive._process import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_STALE_AFTER_S,
    Fenced,
    ProcessRegistration,
    backfill_node,
)
from callvault.archive._session import PbxSession
from callvault.archive._workers import (
    DEFAULT_RESTART_DELAYS_S,
    Archived,
    Downloader,
    WorkerPool,
    staging_tag,
)
from callvault.index import Index
from callvault.keys import Keyring
from callvault.storage import StagingArea, Storage

log = logging.getLogger("callvault.archive")

# How long backfill waits for a job whose next attempt is not yet due.
DEFAULT_PATIENCE_S = 60.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """How a process's download workers work (the CLI builds it from the settings)."""

    workers: int = 2
    lease_s: float = 300.0  # a claim's lease: the last resort when its process cannot be told
    poll_interval_s: float = 5.0  # the longest an idle worker sleeps before looking again
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    heartbeat_s: float = DEFAULT_HEARTBEAT_S  # how often the process row is refreshed
    stale_after_s: float = DEFAULT_STALE_AFTER_S  # a silent process's claims are released
    grace_s: float = 20.0  # at shutdown: how long downloads in flight may finish
    # The PBX (registry id) whose jobs the workers take; None: every job (a library user).
    pbx_id: int | None = None
    label: str = ""  # the PBX's name in log lines; "" when the process archives only one
    # Encryption at rest: `keyring` opens (and with `encrypt`, seals) recordings' data keys.
    keyring: Keyring | None = field(default=None, repr=False)
    encrypt: bool = False


class Downloads:
    """A registered process's download workers (see the module docstring).

    Use as ``async with Downloads(...) as pool:`` or with `start()` / `stop()`.
    """

    def __init__(
        self,
        index: Index,
        storage: Storage,
        client: Downloader,
        *,
        tz: tzinfo,
        kind: str,
        node: str,
        options: PoolOptions | None = None,
        session: PbxSession | None = None,
        on_archived: Callable[[Archived], None] | None = None,
        on_auth_failure: Callable[[Exception], None] | None = None,
        on_failed_attempt: Callable[[str, str], None] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        restart_delays_s: Sequence[float] | None = None,
    ) -> None:
        self._index = index
        self._storage = storage
        self._client = client
        self._tz = tz
        self._kind = kind
        self._node = node
        self.options = options or PoolOptions()
        self._session = session
        self._on_archived = on_archived
        self._on_auth_failure = on_auth_failure
        self._on_failed_attempt = on_failed_attempt
        self._clock = clock
        self._restart_delays_s = restart_delays_s
        self._staging: StagingArea | None = None
        self.registration: ProcessRegistration | None = None
        self.pool: WorkerPool | None = None
        self._stop = asyncio.Event()
        self._pool_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

    @property
    def fenced(self) -> asyncio.Event:
        """Set when the pool was fenced (its registration ended by another process)."""
        if self.pool is None:
            raise RuntimeError("the downloads are not started")
        return self.pool.fenced

    def fenced_error(self) -> Fenced:
        """The one-line error of a fenced pool."""
        reason = self.pool.fenced_reason if self.pool is not None else None
        return Fenced(reason or "this process's registration was ended by another process")

    async def start(self) -> WorkerPool:
        """Open the staging area, register the process, start the workers and heartbeat."""
        options = self.options
        self._staging = await asyncio.to_thread(self._storage.open_staging, staging_tag())
        try:
            self.registration = await asyncio.to_thread(
                ProcessRegistration.register,
                self._index,
                node=self._node,
                kind=self._kind,
                workers=options.workers,
                clock=self._clock,
            )
        except BaseException:
            await asyncio.to_thread(self._staging.close)
            raise
        pool = WorkerPool(
            index=self._index,
            storage=self._storage,
            client=self._client,
            session=self._session,
            tz=self._tz,
            policy=options.policy,
            workers=options.workers,
            lease_s=options.lease_s,
            poll_interval_s=options.poll_interval_s,
            stale_after_s=options.stale_after_s,
            process_id=self.registration.process_id,
            clock=self._clock,
            on_archived=self._on_archived,
            on_auth_failure=self._on_auth_failure,
            on_failed_attempt=self._on_failed_attempt,
            pbx_id=options.pbx_id,
            staging=self._staging,
            restart_delays_s=self._restart_delays_s or DEFAULT_RESTART_DELAYS_S,
            label=options.label,
            keyring=options.keyring,
            encrypt=options.encrypt,
        )
        self.pool = pool
        self._pool_task = asyncio.create_task(
            pool.run(self._stop, grace_s=options.grace_s), name="callvault-workers"
        )
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="callvault-heartbeat")
        return pool

    async def stop(self) -> None:
        """Let in-flight downloads finish for up to `grace_s` (or hand them back), stop the
        heartbeat, mark the process stopped and remove the staging area. Runs to its end
        even when the calling task is being cancelled (SIGTERM in backfill)."""
        self._stop.set()
        try:
            if self._pool_task is not None:
                await _finish(self._pool_task, "the download workers")
        finally:
            if self._heartbeat_task is not None:
                self._heartbeat_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._heartbeat_task
            if self.registration is not None:
                try:
                    await asyncio.to_thread(self.registration.stop)
                except Exception as exc:
                    log.warning("could not mark this process stopped in the index: %s", exc)
            if self._staging is not None:
                await asyncio.to_thread(self._staging.close)

    async def __aenter__(self) -> WorkerPool:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _heartbeats(self) -> None:
        """Refresh the process row until stopped; fence the pool if the index refuses."""
        registration, pool = self.registration, self.pool
        assert registration is not None and pool is not None
        # The first soon, so that status shows the workers alive within a second or so.
        interval = min(1.0, self.options.heartbeat_s)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
                return
            interval = self.options.heartbeat_s
            detail = {"archived": pool.archived, "busy": pool.in_flight, "restarts": pool.restarts}
            try:
                alive = await asyncio.to_thread(
                    registration.heartbeat, workers_alive=pool.alive, detail=detail
                )
            except Exception as exc:
                log.warning("cannot record this process's heartbeat in the index: %s", exc)
                continue
            if not alive:
                reason = registration.fenced_reason()
                log.error("%s", reason)
                registration.stopped = True  # stopped by another: nothing left to stop
                pool.fence(reason)
                return


async def _finish(task: asyncio.Task[None], what: str) -> None:
    """Await `task` to its end even if the caller is cancelled meanwhile (the cancellation
    is passed on once the task has ended); log a failure of the task."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                cancelled = True  # the caller is being cancelled: the task ends on its own
        except Exception:
            break
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("%s ended with an error: %s", what, exc, exc_info=exc)
    if cancelled:
        raise asyncio.CancelledError


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What `drain` did: recordings archived, and why it stopped early (None: drained)."""

    archived: int
    stopped: str | None = None


def queued_counts(
    index: Index,
    states: Sequence[str] = ("pending", "downloading"),
    *,
    pbx_id: int | None = None,
) -> int:
    """How many recordings (of the PBX `pbx_id`, if given) are waiting or being
    downloaded."""
    counts = index.recordings.counts_by_state(list(states), pbx_id=pbx_id)
    return sum(counts.get(state, 0) for state in states)


async def drain(
    index: Index,
    storage: Storage,
    client: Downloader,
    *,
    tz: tzinfo,
    node: str | None = None,
    options: PoolOptions | None = None,
    patience_s: float = DEFAULT_PATIENCE_S,
    on_progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], datetime] = _utcnow,
) -> DrainResult:
    """Download what is due until nothing more is due within `patience_s` seconds.

    Runs a registered ``backfill`` process (node `backfill_node(node)`, of this run alone)
    whose workers archive every due job, and stops once none is in flight and the next
    attempt of every job left is more than `patience_s` away: a job that cannot progress
    (a recording not written yet, a PBX that keeps failing) is left pending for `serve` or
    the next run instead of being waited for. Jobs another process holds are not waited
    for either. Stops early on a refused login or when fenced (`DrainResult.stopped` says
    why); when cancelled (SIGTERM, Ctrl-C) the downloads in flight get `options.grace_s` to
    finish and the rest are handed back. `on_progress(done, total)` follows the queue.
    """
    options = options or PoolOptions()
    patience = timedelta(seconds=patience_s)
    refused: list[str] = []
    stop_early = asyncio.Event()

    def auth_failed(exc: Exception) -> None:
        refused.append(str(exc))
        stop_early.set()

    downloads = Downloads(
        index,
        storage,
        client,
        tz=tz,
        kind="backfill",
        node=backfill_node(node),
        options=options,
        on_auth_failure=auth_failed,
        clock=clock,
    )
    async with downloads as pool:
        total = await asyncio.to_thread(queued_counts, index, pbx_id=options.pbx_id)
        while True:
            left = await asyncio.to_thread(queued_counts, index, pbx_id=options.pbx_id)
            if on_progress is not None:
                on_progress(max(0, total - left), total)
            if stop_early.is_set() or pool.fenced.is_set():
                break
            if not pool.busy:
                due = await asyncio.to_thread(index.jobs.next_due, options.pbx_id)
                if not pool.busy and (due is None or due > clock() + patience):
                    break
                if due is not None and due <= clock():
                    pool.wake()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_early.wait(), timeout=0.5)
    if pool.fenced.is_set():
        return DrainResult(pool.archived, str(downloads.fenced_error()))
    return DrainResult(pool.archived, refused[0] if refused else None)
