"""Datetimes in and out of the index: always aware, stored and returned as UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from callvault.times import parse_pbx_time


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
    """Turn the PBX's local "YYYY-MM-DD hh:mm:ss" into aware UTC; None if it is not that, or
    lies outside the range `callvault.times` believes (never raises)."""
    return parse_pbx_time(timestart, tz)
