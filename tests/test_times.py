"""callvault.times: the one reading of dates and times, for people and for the PBX."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callvault.times import (
    EARLIEST,
    FORMATS,
    LATEST,
    TimeFormatError,
    ago,
    parse_moment,
    parse_pbx_time,
    pbx_local,
    pbx_time_problem,
    windows,
)

BERLIN = ZoneInfo("Europe/Berlin")


def test_a_date_is_a_whole_day_as_start_and_as_end() -> None:
    assert parse_moment("2026-03-29", BERLIN) == datetime(2026, 3, 29, tzinfo=BERLIN)
    # As an end, through that day: the bound is the next midnight (a 23-hour day here).
    end = parse_moment("2026-03-29", BERLIN, end=True)
    assert end == datetime(2026, 3, 30, tzinfo=BERLIN)
    start = parse_moment("2026-03-29", BERLIN)
    assert end.astimezone(UTC) - start.astimezone(UTC) == timedelta(hours=23)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01 12:30", datetime(2026, 11, 1, 12, 30, tzinfo=BERLIN)),
        ("2026-11-01 12:30:05", datetime(2026, 11, 1, 12, 30, 5, tzinfo=BERLIN)),
        ("2026-11-01T12:30:05", datetime(2026, 11, 1, 12, 30, 5, tzinfo=BERLIN)),
        ("  2026-11-01T12:30:05Z ", datetime(2026, 11, 1, 12, 30, 5, tzinfo=UTC)),
        (
            "2026-11-01T12:30:05+05:30",
            datetime(2026, 11, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        ),
        (
            "2026-11-01 12:30-0200",
            datetime(2026, 11, 1, 12, 30, tzinfo=timezone(-timedelta(hours=2))),
        ),
    ],
)
def test_a_date_and_time_is_that_moment_in_the_given_zone_unless_it_names_one(
    text: str, expected: datetime
) -> None:
    assert parse_moment(text, BERLIN) == expected
    assert parse_moment(text, BERLIN, end=True) == expected  # an end moment is exclusive


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "2026-13-01", "2026-02-30", "01.11.2026", "2026-11-01 25:00", "2026-1-1"],
)
def test_anything_else_is_one_line_naming_the_field_and_the_formats(text: str) -> None:
    with pytest.raises(TimeFormatError) as caught:
        parse_moment(text, BERLIN, name="From")
    message = str(caught.value)
    assert message.startswith("From: ")
    assert FORMATS in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["0001-01-01", "9999-12-31", "0001-01-01 00:00:00"])
def test_far_away_dates_are_out_of_range_not_an_overflow(text: str) -> None:
    for end in (False, True):
        with pytest.raises(TimeFormatError, match=r"--until: .*out of range"):
            parse_moment(text, BERLIN, end=end, name="--until")


def test_the_pbx_time_is_read_in_its_zone_and_range_checked() -> None:
    assert parse_pbx_time("2026-07-01 10:00:00", BERLIN) == datetime(2026, 7, 1, 8, tzinfo=UTC)
    assert parse_pbx_time("2000-01-01 00:00:00", BERLIN) is not None  # a reset clock: believed
    for text in ("9999-12-31 23:59:59", "0001-01-01 00:00:00", "1969-12-31 23:00:00"):
        assert parse_pbx_time(text, BERLIN) is None
        assert "out of range" in str(pbx_time_problem(text, BERLIN))
    assert parse_pbx_time("2026-02-30 00:00:00", BERLIN) is None
    assert (
        pbx_time_problem("2026-02-30 00:00:00", BERLIN) == "timestart is not a valid date and time"
    )
    assert pbx_time_problem("2026/07/01 10:00", BERLIN) == "timestart is not 'YYYY-MM-DD hh:mm:ss'"
    assert pbx_time_problem("", BERLIN) is None
    assert pbx_time_problem("2026-07-01 10:00:00", BERLIN) is None


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2199, 12, 30)))
def test_pbx_local_and_parse_pbx_time_round_trip(moment: datetime) -> None:
    aware = moment.replace(microsecond=0, tzinfo=UTC)
    assert parse_pbx_time(pbx_local(aware, UTC), UTC) == aware


def test_range_bounds_are_the_documented_ones() -> None:
    assert (EARLIEST.year, LATEST.year) == (1970, 2200)


def test_windows_cover_the_range_once_in_order() -> None:
    start = datetime(2026, 1, 1, 6, tzinfo=UTC)
    end = start + timedelta(days=2, hours=3)
    parts = list(windows(start, end))
    assert parts[0][0] == start and parts[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    assert [b - a for a, b in parts] == [timedelta(days=1), timedelta(days=1), timedelta(hours=3)]
    assert list(windows(end, start)) == []
    with pytest.raises(ValueError, match="positive"):
        list(windows(start, end, timedelta(0)))


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (5, "just now"),
        (120, "2 min ago"),
        (3 * 3600, "3 h ago"),
        (5 * 86400, "5 days ago"),
        (86400 * 1.6, "2 days ago"),
        (-240, "in 4 min"),
    ],
)
def test_ago_says_how_long_ago_in_words(seconds: float, words: str) -> None:
    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    assert ago(now - timedelta(seconds=seconds), now) == words
    assert ago(None, now) == "never"
