"""Group commit: many concurrent events, one writer thread, one transaction per batch.

Each request hands its call record to `GroupCommitter.commit` and awaits it. A single
writer thread takes everything queued so far (up to `max_batch`), records it in the
index in ONE transaction, and only then wakes every waiting request, which may answer
200 to the PBX. Under load this turns thousands of tiny commits (each an fsync) into a
few large ones; when idle a lone event is committed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from callvault.index import InvalidCallDetail, SettingKey
from callvault.pbx import CallDetail

if TYPE_CHECKING:
    from callvault.index import RecordResult

log = logging.getLogger("callvault.archive")


class CallRecorder(Protocol):
    """The part of `index.calls` the committer needs."""

    def record(
        self,
        cdrs: Sequence[CallDetail],
        *,
        source: str,
        tz: ZoneInfo,
        now: datetime,
        pbx_id: int = 0,
    ) -> list[RecordResult]: ...


class SettingsWriter(Protocol):
    """The part of `index.settings` the committer needs."""

    def set(self, key: SettingKey, value: str, now: datetime) -> None: ...


class CommitTarget(Protocol):
    """The part of the `Index` the committer needs."""

    @property
    def calls(self) -> CallRecorder: ...

    @property
    def settings(self) -> SettingsWriter: ...


@dataclass(slots=True)
class _Pending:
    cdr: CallDetail
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[RecordResult]


_Outcome = tuple["asyncio.Future[RecordResult]", "RecordResult | BaseException"]

_STOP = object()


def _utcnow() -> datetime:
    return datetime.now(UTC)


class GroupCommitter:
    """Commits call records in batches from one thread; see the module docstring."""

    def __init__(
        self,
        index: CommitTarget,
        *,
        tz: ZoneInfo,
        source: str = "event",
        max_batch: int = 500,
        on_committed: Callable[[list[RecordResult]], None] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        last_event_interval_s: float = 1.0,
        pbx_id: int = 0,
    ) -> None:
        self._index = index
        self._pbx_id = pbx_id  # the PBX (registry id) whose reports these are
        self._tz = tz
        self._source = source
        self._max_batch = max_batch
        self._on_committed = on_committed
        self._clock = clock
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_event_written = 0.0
        self._last_event_interval_s = last_event_interval_s
        self.batches = 0
        self.committed = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="callvault-group-commit", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the writer thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    async def commit(self, cdr: CallDetail) -> RecordResult:
        """Queue one record and wait until the transaction holding it has committed."""
        if self._thread is None:
            raise RuntimeError("the group committer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RecordResult] = loop.create_future()
        self._queue.put(_Pending(cdr, loop, future))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Pending] = [first]  # type: ignore[list-item]
            stop_after = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            self._commit_batch(batch)
            if stop_after:
                return

    def _commit_batch(self, batch: list[_Pending]) -> None:
        # The same call may be re-sent while its first copy waits: record it once.
        unique: dict[tuple[str, str | None], CallDetail] = {}
        for item in batch:
            unique.setdefault((item.cdr.callid, item.cdr.recording), item.cdr)
        keys = list(unique)
        now = self._clock()
        try:
            results = self._index.calls.record(
                [unique[k] for k in keys],
                source=self._source,
                tz=self._tz,
                now=now,
                pbx_id=self._pbx_id,
            )
            by_key: dict[tuple[str, str | None], RecordResult | BaseException] = dict(
                zip(keys, results, strict=True)
            )
        except Exception as exc:  # a bad record must not sink the whole batch
            # A record the index refuses is the sender's to report (the receiver answers
            # 400 and logs it); anything else is worth a warning here.
            level = logging.DEBUG if isinstance(exc, InvalidCallDetail) else logging.WARNING
            log.log(level, "batch of %d events failed (%s); committing one by one", len(keys), exc)
            by_key = {}
            for key in keys:
                try:
                    by_key[key] = self._index.calls.record(
                        [unique[key]],
                        source=self._source,
                        tz=self._tz,
                        now=now,
                        pbx_id=self._pbx_id,
                    )[0]
                except InvalidCallDetail as one_exc:
                    by_key[key] = one_exc
                except Exception as one_exc:
                    log.error("event for call %.80r not stored: %s", key[0], one_exc)
                    by_key[key] = one_exc
        committed = [r for r in by_key.values() if not isinstance(r, BaseException)]
        self.batches += 1
        self.committed += len(batch)
        if committed:
            self._note_last_event(now)
            if self._on_committed is not None:
                try:
                    self._on_committed(committed)
                except Exception:
                    log.exception("on_committed callback failed")
        # One wake-up per event loop for the whole batch (not one per request: each
        # call_soon_threadsafe writes to the loop's self-pipe and wakes it).
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for item in batch:
            outcome = by_key[(item.cdr.callid, item.cdr.recording)]
            by_loop.setdefault(item.loop, []).append((item.future, outcome))
        for loop, outcomes in by_loop.items():
            # RuntimeError: the requests' loop is gone (shutdown).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve_all, outcomes)

    def _note_last_event(self, now: datetime) -> None:
        # Written at most once a second: status pages need it, throughput does not.
        mono = time.monotonic()
        if mono - self._last_event_written < self._last_event_interval_s:
            return
        self._last_event_written = mono
        try:
            self._index.settings.set(SettingKey.LAST_EVENT_AT, now.isoformat(), now)
        except Exception as exc:
            log.warning("could not note the last event time: %s", exc)


def _resolve_all(outcomes: list[_Outcome]) -> None:
    for future, outcome in outcomes:
        if future.done():  # the request was cancelled (client gone, shutdown)
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
