"""`index.recordings`: reading recordings with their calls: search, lookups, totals."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Date,
    Row,
    Select,
    and_,
    cast,
    false,
    func,
    or_,
    select,
    update,
)

from callvault.index import schema
from callvault.index._db import Database, like_pattern
from callvault.index._models import DayCount, RecordingRow, SearchFilters
from callvault.times import as_utc as from_db
from callvault.times import to_utc

_DATETIME_FIELDS = (
    "next_attempt_at",
    "claimed_until",
    "missing_since",
    "archived_at",
    "verified_at",
    "created_at",
    "updated_at",
    "start_at",
    "first_seen_at",
)


class RecordingStore:
    """Recordings joined with their calls, as `RecordingRow`s."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def search(
        self, filters: SearchFilters, *, limit: int = 100, offset: int = 0
    ) -> list[RecordingRow]:
        """Recordings with their calls matching `filters`, newest call first."""
        r, c = schema.recordings, schema.calls
        query = (
            _joined()
            .where(*self._conditions(filters))
            .order_by(c.c.start_at.desc(), r.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return self._rows(query)

    def count(self, filters: SearchFilters) -> int:
        """How many recordings `search` would find without a limit."""
        r, c = schema.recordings, schema.calls
        query = (
            select(func.count())
            .select_from(r.join(c, c.c.id == r.c.call_id))
            .where(*self._conditions(filters))
        )
        with self._db.read() as conn:
            return int(conn.execute(query).scalar_one())

    def by_name(self, name: str) -> RecordingRow | None:
        """The recording with exactly this PBX name, or None."""
        rows = self._rows(_joined().where(schema.recordings.c.name == name))
        return rows[0] if rows else None

    def by_id(self, recording_id: int) -> RecordingRow | None:
        """The recording with this id, or None."""
        rows = self._rows(_joined().where(schema.recordings.c.id == recording_id))
        return rows[0] if rows else None

    def archived(self, batch: int = 500) -> Iterator[RecordingRow]:
        """Every archived recording, by id, read in batches (no long-held transaction)."""
        r = schema.recordings
        last_id = 0
        while True:
            rows = self._rows(
                _joined()
                .where(r.c.state == schema.ARCHIVED, r.c.id > last_id)
                .order_by(r.c.id)
                .limit(batch)
            )
            if not rows:
                return
            yield from rows
            last_id = rows[-1].id

    def mark_verified(self, recording_id: int, now: datetime) -> None:
        """Note that the archived file was re-hashed and matched at `now`."""
        now = to_utc(now)
        r = schema.recordings
        with self._db.write() as conn:
            conn.execute(update(r).where(r.c.id == recording_id).values(verified_at=now))

    def counts_by_state(self) -> dict[str, int]:
        """How many recordings are in each state; every state is present, zeros included."""
        r = schema.recordings
        counts = dict.fromkeys(schema.RECORDING_STATES, 0)
        with self._db.read() as conn:
            for state, count in conn.execute(select(r.c.state, func.count()).group_by(r.c.state)):
                counts[state] = int(count)
        return counts

    def recent_failures(self, limit: int = 20) -> list[RecordingRow]:
        """The latest recordings given up on (`failed` or `missing`), newest first."""
        r = schema.recordings
        query = (
            _joined()
            .where(r.c.state.in_([schema.FAILED, schema.MISSING]))
            .order_by(r.c.updated_at.desc(), r.c.id.desc())
            .limit(limit)
        )
        return self._rows(query)

    def retrying(self, limit: int = 20) -> list[RecordingRow]:
        """Pending recordings whose last attempt failed (they will be tried again)."""
        r = schema.recordings
        query = (
            _joined()
            .where(r.c.state == schema.PENDING, r.c.last_error.is_not(None))
            .order_by(r.c.updated_at.desc(), r.c.id.desc())
            .limit(limit)
        )
        return self._rows(query)

    def bytes_stored(self) -> int:
        """Total size of every archived recording, in bytes."""
        r = schema.recordings
        with self._db.read() as conn:
            value = conn.execute(
                select(func.coalesce(func.sum(r.c.size), 0)).where(r.c.state == schema.ARCHIVED)
            ).scalar_one()
        return int(value)

    def call_totals(self) -> tuple[int, int]:
        """(calls, calls with a recording): why there are more calls than recordings."""
        c, r = schema.calls, schema.recordings
        with_recording = select(func.count(func.distinct(r.c.call_id))).scalar_subquery()
        with self._db.read() as conn:
            calls, recorded = conn.execute(select(func.count(c.c.id), with_recording)).one()
        return int(calls), int(recorded)

    def calls_per_day(self, *, days: int, today: date) -> list[DayCount]:
        """Calls started on each of the last `days` days up to `today` (UTC), zeros included."""
        c = schema.calls
        first = today - timedelta(days=days - 1)
        since = datetime(first.year, first.month, first.day, tzinfo=UTC)
        until = since + timedelta(days=days)
        day_of: ColumnElement[Any]
        if self._db.dialect == "sqlite":
            # SQLite keeps the UTC wall clock as text: its first ten characters are the day.
            day_of = func.substr(c.c.start_at, 1, 10)
        else:
            day_of = cast(func.timezone("UTC", c.c.start_at), Date)
        query = (
            select(day_of.label("day"), func.count().label("calls"))
            .where(c.c.start_at >= since, c.c.start_at < until)
            .group_by(day_of)
        )
        counts: dict[date, int] = {}
        with self._db.read() as conn:
            for row in conn.execute(query):
                day = row.day if isinstance(row.day, date) else date.fromisoformat(str(row.day))
                counts[day] = int(row.calls)
        return [
            DayCount(first + timedelta(days=n), counts.get(first + timedelta(days=n), 0))
            for n in range(days)
        ]

    def _rows(self, query: Select[Any]) -> list[RecordingRow]:
        with self._db.read() as conn:
            return [_recording_row(row) for row in conn.execute(query)]

    def _conditions(self, filters: SearchFilters) -> list[ColumnElement[bool]]:
        r, c = schema.recordings, schema.calls
        conditions: list[ColumnElement[bool]] = []
        if filters.since is not None:
            conditions.append(c.c.start_at >= to_utc(filters.since))
        if filters.until is not None:
            conditions.append(c.c.start_at < to_utc(filters.until))
        if filters.number:
            pattern = like_pattern(filters.number)
            conditions.append(
                or_(
                    c.c.call_from.like(pattern, escape="\\"),
                    c.c.call_to.like(pattern, escape="\\"),
                    c.c.did.like(pattern, escape="\\"),
                )
            )
        if filters.extension:
            conditions.append(
                or_(c.c.call_from == filters.extension, c.c.call_to == filters.extension)
            )
        if filters.direction:
            conditions.append(c.c.direction == filters.direction)
        if filters.status:
            conditions.append(c.c.status == filters.status)
        if filters.min_talk_s is not None:
            conditions.append(c.c.talk_s >= filters.min_talk_s)
        if filters.state:
            conditions.append(r.c.state == filters.state)
        if filters.scope is not None:
            conditions.append(
                or_(
                    self._in_scope(c.c.call_from, filters.scope),
                    self._in_scope(c.c.call_to, filters.scope),
                )
            )
        return conditions

    def _in_scope(self, column: Any, scope: Sequence[tuple[int, int]]) -> ColumnElement[bool]:
        """`column` is an all-digit number within one of the inclusive ranges (the meaning
        of `users.in_scope`: no leading zero, "0" itself excepted).

        Compared as text of equal length, so it works without casts on every engine: a range
        is split into sub-ranges with a fixed number of digits.
        """
        if self._db.dialect == "sqlite":
            all_digits: ColumnElement[bool] = column.op("NOT GLOB")("*[^0-9]*")
        else:
            all_digits = column.op("~")("^[0-9]+$")
        parts: list[ColumnElement[bool]] = []
        for lo_given, hi in scope:
            if hi < 0 or lo_given > hi:
                continue
            lo = max(lo_given, 0)
            for digits in range(len(str(lo)), len(str(hi)) + 1):
                sub_lo = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
                sub_hi = min(hi, 10**digits - 1)
                if sub_lo > sub_hi:
                    continue
                parts.append(
                    and_(
                        func.length(column) == digits,
                        column >= str(sub_lo),
                        column <= str(sub_hi),
                    )
                )
        if not parts:
            return false()
        return and_(column != "", all_digits, or_(*parts))


def _joined() -> Select[Any]:
    r, c = schema.recordings, schema.calls
    columns = [col for col in r.c] + [col for col in c.c if col.name != "id"]
    return select(*columns).select_from(r.join(c, c.c.id == r.c.call_id))


def _recording_row(row: Row[Any]) -> RecordingRow:
    data = dict(row._mapping)
    for key in _DATETIME_FIELDS:
        data[key] = from_db(data[key])
    return RecordingRow(**data)
