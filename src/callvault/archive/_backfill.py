"""Backfill and reconciliation: the CDR export, walked in windows of at most one day
(`callvault.times.windows`; the client asks the PBX for each in its local time).

The CDR CSV export is the only way to learn about calls whose NewCdr event was missed
(the archiver was down, the network dropped it). Every row is recorded like an event
(`source="cdr"`), and every recording not yet known is queued; known ones are left
alone, so running it again is harmless. A row the index refuses as invalid (e.g. a callid
or recording name it cannot store) is logged and skipped: one bad row never stops a walk.
`backfill` remembers how far it got in the index settings and resumes there when run
again from the same start on the same PBX.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Protocol
from zoneinfo import ZoneInfo

from callvault.index import Index, RecordResult, SettingKey
from callvault.pbx import CallDetail
from callvault.times import windows

log = logging.getLogger("callvault.archive")


class CdrSource(Protocol):
    """The part of `PbxClient` that exports CDRs."""

    async def export_cdr_range(
        self, start: datetime, end: datetime, tz: tzinfo, *, extensions: str = "all"
    ) -> list[CallDetail]: ...


@dataclass(slots=True)
class BackfillStats:
    """What a backfill or reconciliation pass did."""

    windows: int = 0
    windows_skipped: int = 0  # already done by an earlier, interrupted run
    calls: int = 0
    queued: int = 0  # recordings newly queued
    skipped: int = 0  # rows the index refused as invalid (logged, not recorded)


async def ingest_window(
    client: CdrSource,
    index: Index,
    start: datetime,
    end: datetime,
    *,
    tz: ZoneInfo,
    clock: Callable[[], datetime],
    pbx_id: int = 0,
) -> tuple[int, int, int]:
    """Export the CDRs of calls started in [start, end) and record them as the PBX
    `pbx_id`'s; returns (calls recorded, newly queued recordings, rows skipped because the
    index refused them).

    `start`/`end` are aware datetimes, at most a day apart (one request to the PBX, which is
    asked in its local time, `tz`).
    """
    rows = await client.export_cdr_range(start, end, tz)
    rows = [row for row in rows if row.callid]
    if not rows:
        return 0, 0, 0
    results, skipped = await asyncio.to_thread(_record_valid, index, rows, tz, clock(), pbx_id)
    return len(results), sum(1 for r in results if r.new_recording), skipped


def _record_valid(
    index: Index, rows: Sequence[CallDetail], tz: ZoneInfo, now: datetime, pbx_id: int
) -> tuple[list[RecordResult], int]:
    """Record `rows` in one transaction; when the index refuses the batch as invalid
    (ValueError), split it until the refused rows are alone, log and skip them.

    Returns the results of the rows recorded and how many were skipped. A batch without
    a bad row costs one transaction; each bad row adds about log2(len(rows)) more.
    """
    try:
        return index.calls.record(rows, source="cdr", tz=tz, now=now, pbx_id=pbx_id), 0
    except ValueError as exc:
        if len(rows) == 1:
            row = rows[0]
            log.warning(
                "CDR row of call %.80r (recording %.80r) skipped: %.200s",
                row.callid,
                row.recording,
                exc,
            )
            return [], 1
    middle = len(rows) // 2
    first, skipped_first = _record_valid(index, rows[:middle], tz, now, pbx_id)
    second, skipped_second = _record_valid(index, rows[middle:], tz, now, pbx_id)
    return first + second, skipped_first + skipped_second


async def backfill(
    client: CdrSource,
    index: Index,
    *,
    since: datetime,
    until: datetime,
    tz: ZoneInfo,
    pbx: str = "",
    pbx_id: int = 0,
    clock: Callable[[], datetime] | None = None,
    resume: bool = True,
    on_window: Callable[[datetime, datetime, BackfillStats, int], None] | None = None,
    on_queued: Callable[[], None] | None = None,
) -> BackfillStats:
    """Record every call in [since, until) from the CDR export and queue its recording.

    Resumable: how far a run got (the end of its last completed window) is kept in the
    setting `backfill_progress` with its `since` and `pbx` (the PBX's URL). A new run from
    the same `since` on the same PBX starts there if that is not past its own `until`,
    whatever `until` the earlier run had (the default "now" differs on every run);
    `resume=False` starts over. `on_window(start, end, stats, total_windows)` is called
    after each window (progress bars); `on_queued()` after a window that queued recordings.
    """
    clock = clock or (lambda: datetime.now(UTC))
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("backfill needs timezone-aware datetimes")
    if until <= since:
        raise ValueError("--until must be after --since")
    done_until = _resume_point(index, since, until, pbx) if resume else None
    stats = BackfillStats()
    first = since
    if done_until is not None:
        stats.windows_skipped = sum(1 for _ in windows(since, done_until))
        first = done_until
    todo = list(windows(first, until))
    total = stats.windows_skipped + len(todo)
    for start, end in todo:
        calls, queued, skipped = await ingest_window(
            client, index, start, end, tz=tz, clock=clock, pbx_id=pbx_id
        )
        stats.windows += 1
        stats.calls += calls
        stats.queued += queued
        stats.skipped += skipped
        await asyncio.to_thread(_save_progress, index, since, until, end, pbx, clock())
        if queued and on_queued is not None:
            on_queued()
        if on_window is not None:
            on_window(start, end, stats, total)
    if not todo and on_window is not None:
        on_window(since, until, stats, total)
    return stats


async def reconcile(
    client: CdrSource,
    index: Index,
    *,
    hours: float,
    tz: ZoneInfo,
    clock: Callable[[], datetime] | None = None,
    on_queued: Callable[[], None] | None = None,
    cdr_export: bool = True,
    pbx_id: int = 0,
    label: str = "",
) -> BackfillStats:
    """Requeue `failed` recordings and walk the last `hours` of the CDR export.

    Rows the index refuses as invalid are logged and skipped; the walk goes on with the
    rest of their window and with the later windows. Without `cdr_export` (API v1.0.1 has
    none) only the requeue is done.
    """
    clock = clock or (lambda: datetime.now(UTC))
    now = clock()
    requeued = await asyncio.to_thread(index.jobs.requeue, ["failed"], now=now, pbx_id=pbx_id)
    what = f"reconcile of {label}" if label else "reconcile"
    if requeued:
        log.info("%s: %s queued again", what, _recordings(requeued, "failed "))
    stats = BackfillStats(queued=requeued)
    if not cdr_export:
        if requeued and on_queued is not None:
            on_queued()
        return stats
    # One extra minute at the end: a call that just ended may carry a start a bit ahead.
    for start, end in windows(now - timedelta(hours=hours), now + timedelta(minutes=1)):
        calls, queued, skipped = await ingest_window(
            client, index, start, end, tz=tz, clock=clock, pbx_id=pbx_id
        )
        stats.windows += 1
        stats.calls += calls
        stats.queued += queued
        stats.skipped += skipped
    if stats.queued and on_queued is not None:
        on_queued()
    if stats.queued - requeued:
        missed = stats.queued - requeued
        log.info("%s: %s whose events were missed queued", what, _recordings(missed))
    if stats.skipped:
        rows = "1 CDR row" if stats.skipped == 1 else f"{stats.skipped} CDR rows"
        log.warning("%s: %s the index refused skipped", what, rows)
    return stats


def _resume_point(index: Index, since: datetime, until: datetime, pbx: str) -> datetime | None:
    """Where an earlier run from `since` on `pbx` stopped, if within (since, until]."""
    raw = index.settings.get(SettingKey.BACKFILL_PROGRESS)
    if not raw:
        return None
    try:
        saved = json.loads(raw)
        if saved.get("since") != since.isoformat() or saved.get("pbx", "") != pbx:
            return None
        done_until = datetime.fromisoformat(saved["done_until"])
        if done_until.tzinfo is None or not since < done_until <= until:
            return None
        return done_until
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _save_progress(
    index: Index,
    since: datetime,
    until: datetime,
    done_until: datetime,
    pbx: str,
    now: datetime,
) -> None:
    value = json.dumps(
        {
            "pbx": pbx,
            "since": since.isoformat(),
            "until": until.isoformat(),
            "done_until": done_until.isoformat(),
        }
    )
    index.settings.set(SettingKey.BACKFILL_PROGRESS, value, now)


def _recordings(count: int, what: str = "") -> str:
    """ "1 recording", "3 failed recordings": a count in words for the log."""
    return f"{count} {what}recording" + ("" if count == 1 else "s")
