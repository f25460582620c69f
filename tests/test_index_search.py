"""search/count: filters, extension scopes, ordering, paging, archived iteration."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from callvault.index import Index, SearchFilters, open_index
from callvault.index.schema import ARCHIVED, PENDING
from callvault.pbx._types import CallDetail

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
def index(tmp_path: Path) -> Iterator[Index]:
    idx = open_index(f"sqlite:///{tmp_path / 'callvault.db'}")
    idx.record_calls(
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
    yield idx
    idx.close()


def callids(index: Index, **filters: object) -> list[str]:
    return [row.callid for row in index.search(SearchFilters(**filters))]  # type: ignore[arg-type]


def test_newest_first_and_paging(index: Index) -> None:
    assert callids(index) == ["1.6", "1.5", "1.4", "1.3", "1.2", "1.1"]
    page = index.search(SearchFilters(), limit=2, offset=2)
    assert [r.callid for r in page] == ["1.4", "1.3"]
    assert index.count(SearchFilters()) == 6


def test_time_range_is_aware(index: Index) -> None:
    since = datetime(2024, 4, 2, 10, 0, tzinfo=BERLIN)  # exactly call 1.2's start
    until = datetime(2024, 4, 4, 10, 0, tzinfo=UTC)  # 12:00 Berlin: call 1.4 starts then
    assert callids(index, since=since, until=until) == ["1.3", "1.2"]
    assert index.count(SearchFilters(since=since, until=until)) == 2


def test_number_is_a_substring_of_from_to_or_did_with_wildcards_escaped(index: Index) -> None:
    assert callids(index, number="4930") == ["1.3", "1.2"]
    assert callids(index, number="0301") == ["1.2"]
    assert callids(index, number="%") == ["1.6"]
    assert callids(index, number="_") == ["1.6"]


def test_exact_fields(index: Index) -> None:
    assert callids(index, extension="1002") == ["1.1"]
    assert callids(index, extension="100") == []
    assert callids(index, direction="Inbound") == ["1.2"]
    assert callids(index, status="BUSY") == ["1.5"]
    assert callids(index, min_talk_s=30) == ["1.4", "1.1"]
    assert callids(index, state=PENDING) == ["1.6", "1.5", "1.4", "1.3", "1.2", "1.1"]
    assert callids(index, state=ARCHIVED) == []


def test_extension_scope(index: Index) -> None:
    assert callids(index, scope=[(1000, 1099)]) == ["1.2", "1.1"]
    assert callids(index, scope=[(2001, 2001)]) == ["1.3"]
    # Ranges spanning digit counts: 99 and 150 are in 50-1999; "10a1" never is.
    assert callids(index, scope=[(50, 1999)]) == ["1.4", "1.2", "1.1"]
    assert callids(index, scope=[]) == []
    assert callids(index, scope=[(5, 1)]) == []
    assert callids(index, scope=[(1000, 1001), (150, 150)]) == ["1.4", "1.1"]


def test_lookup_and_archived_iteration(index: Index) -> None:
    row = index.recording_by_name("rec-1.2.wav")
    assert row is not None and row.callid == "1.2" and row.call_from == "+4930123456"
    assert row.start_at == datetime(2024, 4, 2, 8, 0, tzinfo=UTC)
    assert index.recording_by_name("nope.wav") is None
    assert index.recording_by_id(row.id) == row
    jobs = index.claim_jobs("w", 10, now=NOW, lease=timedelta(minutes=1))
    for job in jobs[:4]:
        index.mark_archived(
            job.recording_id,
            worker_id="w",
            size=1,
            sha256="c" * 64,
            storage_key="k",
            content_type="audio/wav",
            now=NOW,
        )
    archived = list(index.archived_recordings(batch=3))
    assert sorted(r.id for r in archived) == sorted(j.recording_id for j in jobs[:4])
    index.mark_verified(archived[0].id, NOW + timedelta(hours=1))
    again = index.recording_by_id(archived[0].id)
    assert again is not None and again.verified_at == NOW + timedelta(hours=1)
