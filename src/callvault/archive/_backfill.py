"""Backfill and reconciliation: the CDR export, walked in windows of at most one day.

The CDR CSV export is the only way to learn about calls whose NewCdr event was missed
(the archiver was down, the network dropped it). Every row is recorded like an event
(`source="cdr"`), and every recording not yet known is queued; known ones are left
alone, so running it again is harmless. `backfill` remembers the last completed window
in the index settings and resumes there when run again over the same range.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from callvault.index import Index
from callvault.pbx import CdrError
from callvault.pbx._types import CallDetail

log = logging.getLogger("callvault.archive")

PROGRESS_SETTING = "backfill_progress"
MAX_WINDOW = timedelta(days=1)


class CdrSource(Protocol):
    """The part of `PbxClient` that exports CDRs."""

    async def export_cdr(
        self, start: datetime, end: datetime, *, extensions: str = "all"
    ) -> list[CallDetail]: ...


@dataclass(slots=True)
class BackfillStats:
    """What a backfill or reconciliation pass did."""

    windows: int = 0
    windows_skipped: int = 0  # already done by an earlier, interrupted run
    calls: int = 0
    queued: int = 0  # recordings newly queued


def windows(
    start: datetime, end: datetime, size: timedelta = MAX_WINDOW
) -> Iterator[tuple[datetime, datetime]]:
    """Split [start, end) into consecutive windows of at most `size`."""
    if size <= timedelta(0):
        raise ValueError("the window size must be positive")
    cursor = start
    while cursor < end:
        upper = min(end, cursor + size)
        yield cursor, upper
        cursor = upper


async def ingest_window(
    client: CdrSource,
    index: Index,
    start: datetime,
    end: datetime,
    *,
    tz: ZoneInfo,
    clock: Callable[[], datetime],
) -> tuple[int, int]:
    """Export one window's CDRs and record them; returns (calls, newly queued recordings).

    `start`/`end` are aware datetimes; the PBX is asked in its local time (`tz`).
    """
    local_start = start.astimezone(tz).replace(tzinfo=None)
    # The export's end is inclusive to the second: stop just before the next window.
    local_end = (end - timedelta(seconds=1)).astimezone(tz).replace(tzinfo=None)
    try:
        rows = await client.export_cdr(local_start, max(local_start, local_end))
    except CdrError as exc:
        if exc.errno == "20021":  # no CDR in that range
            return 0, 0
        raise
    rows = [row for row in rows if row.callid]
    if not rows:
        return 0, 0
    results = await asyncio.to_thread(index.record_calls, rows, source="cdr", tz=tz, now=clock())
    return len(rows), sum(1 for r in results if r.new_recording)


async def backfill(
    client: CdrSource,
    index: Index,
    *,
    since: datetime,
    until: datetime,
    tz: ZoneInfo,
    clock: Callable[[], datetime] | None = None,
    resume: bool = True,
    on_window: Callable[[datetime, datetime, BackfillStats, int], None] | None = None,
    on_queued: Callable[[], None] | None = None,
) -> BackfillStats:
    """Record every call in [since, until) from the CDR export and queue its recording.

    Resumable: the end of the last completed window is kept in the setting
    `backfill_progress`; a new run over the same range starts there (`resume=False`
    starts over). `on_window(start, end, stats, total_windows)` is called after each
    window (progress bars); `on_queued()` after a window that queued recordings.
    """
    clock = clock or (lambda: datetime.now(UTC))
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("backfill needs timezone-aware datetimes")
    if until <= since:
        raise ValueError("--until must be after --since")
    all_windows = list(windows(since, until))
    done_until = _resume_point(index, since, until) if resume else None
    stats = BackfillStats()
    for start, end in all_windows:
        if done_until is not None and end <= done_until:
            stats.windows_skipped += 1
            if on_window is not None:
                on_window(start, end, stats, len(all_windows))
            continue
        calls, queued = await ingest_window(client, index, start, end, tz=tz, clock=clock)
        stats.windows += 1
        stats.calls += calls
        stats.queued += queued
        await asyncio.to_thread(_save_progress, index, since, until, end, clock())
        if queued and on_queued is not None:
            on_queued()
        if on_window is not None:
            on_window(start, end, stats, len(all_windows))
    return stats


async def reconcile(
    client: CdrSource,
    index: Index,
    *,
    hours: float,
    tz: ZoneInfo,
    clock: Callable[[], datetime] | None = None,
    on_queued: Callable[[], None] | None = None,
) -> BackfillStats:
    """Requeue `failed` recordings and walk the last `hours` of the CDR export."""
    clock = clock or (lambda: datetime.now(UTC))
    now = clock()
    requeued = await asyncio.to_thread(index.requeue, ["failed"], now=now)
    if requeued:
        log.info("reconcile: %d failed recordings queued again", requeued)
    stats = BackfillStats(queued=requeued)
    # One extra minute at the end: a call that just ended may carry a start a bit ahead.
    for start, end in windows(now - timedelta(hours=hours), now + timedelta(minutes=1)):
        calls, queued = await ingest_window(client, index, start, end, tz=tz, clock=clock)
        stats.windows += 1
        stats.calls += calls
        stats.queued += queued
    if stats.queued and on_queued is not None:
        on_queued()
    if stats.queued - requeued:
        log.info(
            "reconcile: %d recordings whose events were missed queued", stats.queued - requeued
        )
    return stats


def _resume_point(index: Index, since: datetime, until: datetime) -> datetime | None:
    raw = index.get_setting(PROGRESS_SETTING)
    if not raw:
        return None
    try:
        saved = json.loads(raw)
        if saved.get("since") != since.isoformat() or saved.get("until") != until.isoformat():
            return None
        return datetime.fromisoformat(saved["done_until"])
    except (ValueError, KeyError, TypeError):
        return None


def _save_progress(
    index: Index, since: datetime, until: datetime, done_until: datetime, now: datetime
) -> None:
    value = json.dumps(
        {
            "since": since.isoformat(),
            "until": until.isoformat(),
            "done_until": done_until.isoformat(),
        }
    )
    index.set_setting(PROGRESS_SETTING, value, now)


def queued_counts(index: Index, states: Sequence[str] = ("pending", "downloading")) -> int:
    """How many recordings are still waiting or being downloaded."""
    counts = index.counts_by_state()
    return sum(counts.get(state, 0) for state in states)
