"""Read-only queries the web app needs beyond `Index`: archive totals and calls per day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Date, Engine, cast, func, select

from callvault.index import schema


@dataclass(frozen=True, slots=True)
class DayCount:
    day: date
    calls: int


def bytes_stored(engine: Engine) -> int:
    """Total size of every archived recording, in bytes."""
    r = schema.recordings
    with engine.connect() as conn:
        value = conn.execute(
            select(func.coalesce(func.sum(r.c.size), 0)).where(r.c.state == schema.ARCHIVED)
        ).scalar_one()
    return int(value)


def calls_per_day(engine: Engine, *, days: int, today: date) -> list[DayCount]:
    """Calls started on each of the last `days` days up to `today` (UTC), zeros included."""
    c = schema.calls
    first = today - timedelta(days=days - 1)
    since = datetime(first.year, first.month, first.day, tzinfo=UTC)
    until = since + timedelta(days=days)
    day_of: ColumnElement[Any]
    if engine.dialect.name == "sqlite":
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
    with engine.connect() as conn:
        for row in conn.execute(query):
            day = row.day if isinstance(row.day, date) else date.fromisoformat(str(row.day))
            counts[day] = int(row.calls)
    return [
        DayCount(first + timedelta(days=n), counts.get(first + timedelta(days=n), 0))
        for n in range(days)
    ]
