"""Times and dates: the one place that reads what people and the PBX write.

Every command option, web filter and API parameter that takes a time reads it here, with
one meaning everywhere:

* a **date** ``YYYY-MM-DD`` is a whole day: as a start it means that day's first moment,
  as an end it means *through* that day (the bound is the next day's midnight, exclusive);
* a **date and time** ``YYYY-MM-DD hh:mm[:ss]`` (a ``T`` instead of the space is fine, and
  so is an offset such as ``+01:00`` or ``Z``) is that moment; as an end it is exclusive;
* a time without an offset is in the zone the caller names (the PBX's for the CLI, UTC for
  the API, the viewer's chosen zone on the pages).

The PBX writes its own local times as ``YYYY-MM-DD hh:mm:ss`` without a zone
(`parse_pbx_time`); they are range-checked here so that a report from a PBX with a broken
clock (year 1 or 9999) is refused at the door instead of overflowing arithmetic later.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo

# How every help text, error message and page names the accepted formats.
FORMATS = "YYYY-MM-DD or YYYY-MM-DD hh:mm[:ss]"

# The PBX's local time format (NewCdr `timestart`, the CDR export, its requests).
PBX_FORMAT = "%Y-%m-%d %H:%M:%S"
_PBX_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}", re.ASCII)
_DATE_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_MOMENT_PATTERN = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[T ](?P<time>[0-9]{2}:[0-9]{2}(?::[0-9]{2})?"
    r"(?:\.[0-9]{1,6})?)(?P<offset>Z|[+-][0-9]{2}:?[0-9]{2})?",
    re.ASCII,
)

# Call times outside this range are refused: no PBX made a call before 1970, and one that
# says 9999 has a broken clock (and would overflow `start + duration`). A PBX whose clock
# fell back to 2000 after a power loss is still believed.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
# The longest call duration believed, in seconds (a PBX that says more is wrong).
MAX_DURATION_S = 10 * 366 * 24 * 3600

DAY = timedelta(days=1)


class TimeFormatError(ValueError):
    """A time that cannot be read; the message says which one and what to write instead."""


def _zone_of(offset: str) -> tzinfo:
    if offset == "Z":
        return UTC
    sign = -1 if offset[0] == "-" else 1
    digits = offset[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 23 or minutes > 59:
        raise ValueError(offset)
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def parse_moment(text: str, tz: tzinfo, *, end: bool = False, name: str = "time") -> datetime:
    """Read a start (or, with `end`, an exclusive end) as an aware datetime.

    `tz` is the zone of a time written without an offset; `name` is how the caller labels
    the field ("--since", "From"), used in the error message. Raises `TimeFormatError`.
    """
    value = text.strip()
    try:
        if _DATE_PATTERN.fullmatch(value):
            day = date.fromisoformat(value)
            if end:
                if day == date.max:
                    raise TimeFormatError(f"{value} is out of range")
                day += DAY
            return _checked(datetime.combine(day, time(), tzinfo=tz))
        match = _MOMENT_PATTERN.fullmatch(value)
        if match is None:
            raise ValueError(value)
        moment = datetime.fromisoformat(f"{match['date']}T{match['time']}")
        offset = match["offset"]
        return _checked(moment.replace(tzinfo=_zone_of(offset) if offset else tz))
    except TimeFormatError as exc:
        raise TimeFormatError(f"{name}: {exc}") from None
    except (ValueError, OverflowError):
        shown = text.strip()[:40]
        raise TimeFormatError(f"{name}: {shown!r} is not a time: use {FORMATS}") from None


def _checked(moment: datetime) -> datetime:
    try:
        utc = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise TimeFormatError("out of range") from None
    if not EARLIEST - DAY * 366 <= utc <= LATEST + DAY * 366:
        raise TimeFormatError(f"{moment.date().isoformat()} is out of range")
    return moment


def parse_pbx_time(text: str, tz: tzinfo) -> datetime | None:
    """The PBX's local ``YYYY-MM-DD hh:mm:ss`` in zone `tz` as aware UTC.

    None when the text is not that format, is not a real date, or lies outside
    [`EARLIEST`, `LATEST`) (see `pbx_time_problem` for the reason in words).
    """
    value = text.strip()
    if not _PBX_PATTERN.fullmatch(value):
        return None
    try:
        moment = datetime.fromisoformat(value).replace(tzinfo=tz).astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    if not EARLIEST <= moment < LATEST:
        return None
    return moment


def pbx_time_problem(text: str, tz: tzinfo) -> str | None:
    """Why the PBX time `text` cannot be stored (None when it can, or when it is empty)."""
    value = text.strip()
    if not value:
        return None
    if not _PBX_PATTERN.fullmatch(value):
        return "timestart is not 'YYYY-MM-DD hh:mm:ss'"
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return "timestart is not a valid date and time"
    if parse_pbx_time(value, tz) is None:
        return (
            f"timestart {value} is out of range ({EARLIEST.year} to {LATEST.year - 1}): "
            "check the PBX's clock"
        )
    return None


def pbx_local(moment: datetime, tz: tzinfo) -> str:
    """An aware datetime as the PBX writes its local times (for its requests)."""
    return to_utc(moment).astimezone(tz).strftime(PBX_FORMAT)


def to_utc(value: datetime) -> datetime:
    """An aware datetime converted to UTC; naive datetimes are refused (ValueError)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("a timezone-aware datetime is needed")
    return value.astimezone(UTC)


def iso_moment(value: object) -> datetime | None:
    """An aware moment kept as ISO 8601 text (a JSON field of the index), or None when it
    is missing, not such text, or has no offset."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def as_utc(value: datetime | None) -> datetime | None:
    """A datetime read from a database as aware UTC (SQLite gives them back naive)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def windows(
    start: datetime, end: datetime, size: timedelta = DAY
) -> Iterator[tuple[datetime, datetime]]:
    """Split [start, end) into consecutive windows of at most `size` (the CDR export's day)."""
    if size <= timedelta(0):
        raise ValueError("the window size must be positive")
    cursor = start
    while cursor < end:
        upper = min(end, cursor + size)
        yield cursor, upper
        cursor = upper


def ago(moment: datetime | None, now: datetime) -> str:
    """How long ago `moment` was, in words for people: "just now", "2 min ago", "3 h ago",
    "5 days ago" (or "in 4 min" for a moment ahead); "never" for None."""
    if moment is None:
        return "never"
    seconds = (to_utc(now) - to_utc(moment)).total_seconds()
    ahead = seconds < 0
    seconds = abs(seconds)
    if seconds < 45:
        return "just now"
    if seconds < 90 * 60:
        amount = f"{max(1, round(seconds / 60))} min"
    elif seconds < 36 * 3600:
        amount = f"{round(seconds / 3600)} h"
    else:
        days = round(seconds / 86400)
        amount = f"{days} day{'s' if days != 1 else ''}"
    return f"in {amount}" if ahead else f"{amount} ago"
