"""index.recordings: search filters, extension scopes (one meaning with users.in_scope),
ordering, paging, lookups, archived iteration and totals; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from callvault.index import DayCount, Index, SearchFilters, Total, Worker, open_index
from callvault.index.schema import ARCHIVED, PENDING
from callvault.index.users import in_scope
from callvault.pbx._types import CallDetail
from support.index_data import archive as archive_job

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

CALLS = [
    # callid, start (Berlin), from, to, did, type, status, talk
    ("1.1", "2024-04-01 09:00:00", "1001", "1002", "", "Internal", "ANSWERED", 30),
    ("1.2", "2024-04-02 10:00:00", "+4930123456", "1050", "0301234", "Inbound", "ANSWERED", 5),
    ("1.3", "2024-04-03 11:00:00", "2001", "004930999", "", "Outbound", "NO ANSWER", 0),
    ("1.4", "2024-04-04 12:00:00", "99", "150", "", "Internal", "ANSWERED", 100),
    ("1.5", "2024-04-05 13:00:00", "10a1", "abc", "", "Internal", "BUSY", 0),
    ("1.6", "2024-04-06 14:00:00", "1%1", "x_y", "", "Internal", "ANSWERED", 1),
]


@pytest.fixture
def calls(db_url: str) -> Iterator[Index]:
    """An index holding CALLS, each with a pending recording ``rec-<callid>.wav``."""
    with open_index(db_url) as index:
        index.calls.record(
            [
                CallDetail(
                    callid=callid,
                    timestart=start,
                    callfrom=src,
                    callto=dst,
                    didnumber=did,
                    type=kind,
                    status=status,
                    talkduration=talk,
                    recording=f"rec-{callid}.wav",
                )
                for callid, start, src, dst, did, kind, status, talk in CALLS
            ],
            source="cdr",
            tz=BERLIN,
            now=NOW,
        )
        yield index


def callids(index: Index, **filters: object) -> list[str]:
    return [row.callid for row in index.recordings.search(SearchFilters(**filters))]  # type: ignore[arg-type]


def test_newest_first_and_paging(calls: Index) -> None:
    assert callids(calls) == ["1.6", "1.5", "1.4", "1.3", "1.2", "1.1"]
    page = calls.recordings.search(SearchFilters(), limit=2, offset=2)
    assert [r.callid for r in page] == ["1.4", "1.3"]
    assert calls.recordings.total(SearchFilters()) == Total(6, exact=True)


def test_time_range_is_aware(calls: Index) -> None:
    since = datetime(2024, 4, 2, 10, 0, tzinfo=BERLIN)  # exactly call 1.2's start
    until = datetime(2024, 4, 4, 10, 0, tzinfo=UTC)  # 12:00 Berlin: call 1.4 starts then
    assert callids(calls, since=since, until=until) == ["1.3", "1.2"]
    assert calls.recordings.total(SearchFilters(since=since, until=until)) == Total(2, exact=True)


def test_number_is_a_substring_of_from_to_or_did_with_wildcards_escaped(calls: Index) -> None:
    assert callids(calls, number="4930") == ["1.3", "1.2"]
    assert callids(calls, number="0301") == ["1.2"]
    assert callids(calls, number="%") == ["1.6"]
    assert callids(calls, number="_") == ["1.6"]
    assert calls.recordings.total(SearchFilters(number="_")) == Total(1, exact=True)


def test_exact_fields(calls: Index) -> None:
    assert callids(calls, extension="1002") == ["1.1"]
    assert callids(calls, extension="100") == []
    assert callids(calls, direction="Inbound") == ["1.2"]
    assert callids(calls, status="BUSY") == ["1.5"]
    assert callids(calls, min_talk_s=30) == ["1.4", "1.1"]
    assert callids(calls, state=PENDING) == ["1.6", "1.5", "1.4", "1.3", "1.2", "1.1"]
    assert callids(calls, state=ARCHIVED) == []


def test_extension_scope(calls: Index) -> None:
    assert callids(calls, scope=[(1000, 1099)]) == ["1.2", "1.1"]
    assert callids(calls, scope=[(2001, 2001)]) == ["1.3"]
    # Ranges spanning digit counts: 99 and 150 are in 50-1999; "10a1" never is.
    assert callids(calls, scope=[(50, 1999)]) == ["1.4", "1.2", "1.1"]
    assert callids(calls, scope=[(5, 1)]) == []
    assert callids(calls, scope=[(1000, 1001), (150, 150)]) == ["1.4", "1.1"]
    # One meaning of a scope: None is every call, an empty list none.
    assert callids(calls, scope=None) == callids(calls)
    assert callids(calls, scope=[]) == []
    assert calls.recordings.total(SearchFilters(scope=[])) == Total(0, exact=True)


NUMBERS = ["0", "00", "7", "07", "99", "100", "0100", "1000", "1099", "1100", "99999", "", "1a"]
SCOPES: list[list[tuple[int, int]] | None] = [
    None,
    [],
    [(0, 0)],
    [(0, 9)],
    [(7, 7)],
    [(50, 1099)],
    [(100, 100), (99999, 99999)],
    [(1, 99_999_999)],
]


@pytest.mark.parametrize("scope", SCOPES, ids=str)
def test_sql_scope_agrees_with_in_scope(index: Index, scope: list[tuple[int, int]] | None) -> None:
    index.calls.record(
        [
            CallDetail(callid=f"5.{n}", callfrom=number, callto="x", recording=f"s-{n}.wav")
            for n, number in enumerate(NUMBERS)
        ],
        source="cdr",
        tz=BERLIN,
        now=NOW,
    )
    found = {row.call_from for row in index.recordings.search(SearchFilters(scope=scope))}
    assert found == {number for number in NUMBERS if in_scope(scope, number, "x")}


def test_lookup_and_archived_iteration(calls: Index) -> None:
    row = calls.recordings.by_name("rec-1.2.wav")
    assert row is not None and row.callid == "1.2" and row.call_from == "+4930123456"
    assert row.start_at == datetime(2024, 4, 2, 8, 0, tzinfo=UTC)
    assert calls.recordings.by_name("nope.wav") is None
    assert calls.recordings.by_id(row.id) == row
    assert calls.recordings.by_id(row.id + 1000) is None
    worker = Worker(process_id=None, name="w")
    jobs = calls.jobs.claim(worker, 10, now=NOW, lease=timedelta(minutes=1))
    for job in jobs[:4]:
        assert archive_job(calls, job.recording_id, worker)
    archived = list(calls.recordings.archived(batch=3))
    assert [r.id for r in archived] == sorted(j.recording_id for j in jobs[:4])
    assert calls.recordings.bytes_stored() == 4 * 1234
    calls.recordings.mark_verified(archived[0].id, NOW + timedelta(hours=1))
    again = calls.recordings.by_id(archived[0].id)
    assert again is not None and again.verified_at == NOW + timedelta(hours=1)


def test_calls_per_day_counts_utc_days_with_zeros(calls: Index) -> None:
    # Berlin is UTC+2 in April: 1.1 starts 07:00 UTC on 04-01 ... 1.6 12:00 UTC on 04-06.
    per_day = calls.recordings.calls_per_day(days=8, today=date(2024, 4, 7))
    assert per_day[0] == DayCount(date(2024, 3, 31), 0)
    assert [d.calls for d in per_day] == [0, 1, 1, 1, 1, 1, 1, 0]
    assert per_day[-1].day == date(2024, 4, 7)
    assert [d.calls for d in calls.recordings.calls_per_day(days=1, today=date(2024, 4, 3))] == [1]


def test_totals_of_an_empty_index(index: Index) -> None:
    assert index.recordings.counts_by_state() == dict.fromkeys(
        ["pending", "downloading", "archived", "failed", "missing", "deleted"], 0
    )
    assert index.recordings.bytes_stored() == 0
    assert index.recordings.recent_failures() == [] and index.recordings.retrying() == []
    assert index.jobs.next_due() is None
    assert list(index.recordings.archived()) == []
