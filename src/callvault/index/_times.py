"""Datetimes in and out of the index: always aware, stored and returned as UTC."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

_TIMESTART_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIMESTART_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


def to_utc(value: datetime) -> datetime:
    """Return an aware datetime converted to UTC; naive datetimes are refused."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("the index needs timezone-aware datetimes")
    return value.astimezone(UTC)


def from_db(value: datetime | None) -> datetime | None:
    """Make a datetime read from the database aware UTC (SQLite returns it naive)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_timestart(timestart: str, tz: ZoneInfo) -> datetime | None:
    """Turn the PBX's local "YYYY-MM-DD hh:mm:ss" into aware UTC; None if it is not that."""
    text = timestart.strip()
    try:
        if text.isascii() and _TIMESTART_PATTERN.fullmatch(text):
            local = datetime.fromisoformat(text)  # the same reading as strptime, in C
        else:
            local = datetime.strptime(text, _TIMESTART_FORMAT)
    except ValueError:
        return None
    return local.replace(tzinfo=tz).astimezone(UTC)
