"""index.recordings for big archives: paging by position, totals that stop counting, the
trigram number search, SQLite's choice between starting from candidates and walking the
calls newest first, the planner's statistics and the query plans; on SQLite and
PostgreSQL, against a reference computed here in Python from the same data.

The plan tests run on a small seeded index with statistics: they check the shape of each
plan (an index serves every main search, none reads a whole table), not its speed, which
bench/search.py measures at a million calls.
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event, insert, select, text
from sqlalchemy.exc import OperationalError

from callvault.index import (
    ArchivedCopy,
    Index,
    Position,
    RecordingRow,
    SearchFilters,
    SettingKey,
    Total,
    open_index,
    schema,
)
from callvault.index import _recordings as recordings_module
from callvault.index._statistics import Statistics
from callvault.index.users import in_scope, parse_scope
from callvault.pbx import CallDetail
from support.databases import PgDatabases

UTC_ZONE = ZoneInfo("UTC")
NOW = datetime(2026, 12, 1, tzinfo=UTC)
WEEK = (datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 6, 8, tzinfo=UTC))


def seeded_calls(count: int, seed: int = 3) -> list[CallDetail]:
    """Calls of a small call centre over a year: 40 extensions, external numbers, a few
    with the same start second, a few whose start is not a time (stored without one), a
    caller named in letters; most with a recording."""
    rng = random.Random(seed)
    externals = [f"0{rng.randrange(10**8, 10**9)}" for _ in range(60)] + ["Anna Berg"]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    details = []
    for n in range(count):
        when = start + timedelta(minutes=rng.randrange(0, 365 * 24 * 60))
        if n % 50 == 7:
            when = start + timedelta(days=150)  # a second shared by several calls
        extension = str(100 + rng.randrange(40))
        kind = rng.choice(["Inbound", "Outbound", "Internal"])
        other = str(100 + rng.randrange(40)) if kind == "Internal" else rng.choice(externals)
        call_from, call_to = (other, extension) if kind == "Inbound" else (extension, other)
        details.append(
            CallDetail(
                callid=f"{n}.1",
                timestart="not a time" if n % 97 == 5 else when.strftime("%Y-%m-%d %H:%M:%S"),
                callfrom=call_from,
                callto=call_to,
                didnumber="0301234500" if kind == "Inbound" else "",
                type=kind,
                status="ANSWERED",
                talkduration=rng.randrange(0, 300),
                recording="" if n % 10 == 3 else f"r-{n}.wav",
            )
        )
    return details


def seed(index: Index, count: int = 600) -> list[RecordingRow]:
    """Store the seeded calls (archiving every other recording); every recording row."""
    details = seeded_calls(count)
    results = index.calls.record(details, source="cdr", tz=UTC_ZONE, now=NOW)
    copies = [
        ArchivedCopy(result.recording_id, 1000, "0" * 64, f"k/{result.recording_id}", "audio/wav")
        for result in results[::2]
        if result.recording_id is not None
    ]
    assert index.jobs.mark_archived_many(copies, now=NOW) == len(copies)
    rows = [index.recordings.by_name(d.recording) for d in details if d.recording]
    assert all(row is not None for row in rows)
    return [row for row in rows if row is not None]


def _order(row: RecordingRow) -> tuple[bool, float, int]:
    start = row.start_at.timestamp() if row.start_at else 0.0
    return (row.start_at is None, -start, -row.id)


def reference(rows: list[RecordingRow], filters: SearchFilters) -> list[int]:
    """The ids `search` must answer, in its order, worked out without SQL."""

    def matches(row: RecordingRow) -> bool:
        start = row.start_at
        if filters.since and (start is None or start < filters.since):
            return False
        if filters.until and (start is None or start >= filters.until):
            return False
        if filters.number:
            wanted = filters.number.lower()
            if not any(wanted in n.lower() for n in (row.call_from, row.call_to, row.did)):
                return False
        if filters.extension and filters.extension not in (row.call_from, row.call_to):
            return False
        if filters.direction and row.direction != filters.direction:
            return False
        if filters.state and row.state != filters.state:
            return False
        return filters.scope is None or in_scope(filters.scope, row.call_from, row.call_to)

    return [row.id for row in sorted(filter(matches, rows), key=_order)]


SEARCHES: dict[str, SearchFilters] = {
    "newest": SearchFilters(),
    "number": SearchFilters(number="0301"),
    "number, letters in any case": SearchFilters(number="ANNA b"),
    "short number": SearchFilters(number="12"),
    "no such number": SearchFilters(number="999999999"),
    "extension": SearchFilters(extension="117"),
    "week": SearchFilters(since=WEEK[0], until=WEEK[1]),
    "week, inbound": SearchFilters(since=WEEK[0], until=WEEK[1], direction="Inbound"),
    "archived": SearchFilters(state="archived"),
    "scope": SearchFilters(scope=parse_scope("100-104,130")),
    "scope and number": SearchFilters(scope=parse_scope("100-119"), number="0301"),
    "scope and extension": SearchFilters(scope=parse_scope("100-139"), extension="120"),
    "empty scope": SearchFilters(scope=[]),
    # More terms than PostgreSQL's count splits (`_SPLIT_TERMS`): counted through the OR.
    "scope of many extensions": SearchFilters(scope=[(n, n) for n in range(100, 120)]),
}

# The plans: as chosen; on SQLite, always walking the calls newest first, or always
# starting from the candidates; on PostgreSQL, a number's calls read three at a time. All
# must find the same rows.
PLANS: dict[str, dict[str, Any]] = {
    "chosen": {},
    "walk": {"_DRIVER_LIMIT": 0, "_FEW": -1},
    "candidates": {"_DRIVER_LIMIT": 10**9, "_walk_above": lambda *_: float("inf")},
    "small slices": {"_SLICE": 3, "_SLICE_FACTOR": 0},
}


def paged(index: Index, filters: SearchFilters, limit: int) -> list[int]:
    """Every row of a search, read a page at a time by position."""
    ids: list[int] = []
    after: Position | None = None
    while True:
        page = index.recordings.search(filters, limit=limit, after=after)
        ids += [row.id for row in page]
        if len(page) < limit:
            return ids
        # Through its text form, as the API and the CLI pass it on.
        after = Position.parse(page[-1].position.token())


@pytest.mark.parametrize("plan", PLANS)
def test_every_search_and_every_page_matches_the_reference(
    index: Index, plan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in PLANS[plan].items():
        monkeypatch.setattr(recordings_module, name, value)
    rows = seed(index)
    assert any(row.start_at is None for row in rows)
    for name, filters in SEARCHES.items():
        expected = reference(rows, filters)
        found = [row.id for row in index.recordings.search(filters, limit=10_000)]
        assert found == expected, name
        assert paged(index, filters, limit=7) == expected, name
        offset = [row.id for row in index.recordings.search(filters, limit=5, offset=12)]
        assert offset == expected[12:17], name
        # A cursor and an offset together: that many rows further on from the cursor, from
        # anywhere in the order (the calls without a start included).
        by_id = {row.id: row for row in rows}
        for at in range(0, len(expected), max(1, len(expected) // 9)):
            after = by_id[expected[at]].position
            further = index.recordings.search(filters, limit=3, offset=2, after=after)
            assert [row.id for row in further] == expected[at + 3 : at + 6], (name, at)
        assert index.recordings.total(filters, cap=None) == Total(len(expected), True), name
        capped = index.recordings.total(filters, cap=20)
        assert capped == Total(min(len(expected), 20), len(expected) <= 20), name
    assert len(reference(rows, SEARCHES["newest"])) > 20  # the cap was reached at least once


def test_both_engines_answer_every_search_alike(tmp_path: Any, pg_databases: PgDatabases) -> None:
    answers: list[dict[str, list[tuple[str, str]]]] = []
    for url in (f"sqlite:///{tmp_path / 'callvault.db'}", pg_databases.create()):
        with open_index(url) as index:
            seed(index)
            answers.append(
                {
                    name: [
                        (row.callid, row.name) for row in index.recordings.search(filters, limit=50)
                    ]
                    + [("total", str(index.recordings.total(filters, cap=30)))]
                    for name, filters in SEARCHES.items()
                }
            )
    sqlite_answers, postgresql_answers = answers
    assert sqlite_answers == postgresql_answers


def test_number_search_follows_changed_numbers(index: Index) -> None:
    """The trigram index is kept in step with the calls: a number filled in later by a
    second report is found, the number it replaced no longer."""
    first = CallDetail(callid="9.1", callfrom="01637052211", callto="201", recording="a.wav")
    index.calls.record([first], source="event", tz=UTC_ZONE, now=NOW)
    assert [r.name for r in index.recordings.search(SearchFilters(number="37052"))] == ["a.wav"]
    again = CallDetail(callid="9.1", callfrom="0555123", callto="201", recording="a.wav")
    index.calls.record([again], source="cdr", tz=UTC_ZONE, now=NOW)
    assert index.recordings.search(SearchFilters(number="37052")) == []
    assert [r.name for r in index.recordings.search(SearchFilters(number="55512"))] == ["a.wav"]


def test_positions_read_back_and_refuse_anything_else() -> None:
    moment = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
    for position in (Position(moment, 42), Position(None, 7)):
        assert Position.parse(position.token()) == position

    def token(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    never = [
        "|99999999999999999999",  # ids no engine holds
        "|3000000000",
        "|0",
        "0001-01-01T00:00:00+01:00|5",  # times no engine stores
        "9999-12-31T23:59:59-05:00|5",
        "2026-01-01T00:00:00|5",  # no offset
    ]
    bad_texts = ["", "abc", "!!", Position(moment, 1).token()[:-3] + "x", "MjAyNi0wMy0wMXwx"]
    for bad in [*bad_texts, *map(token, never)]:
        with pytest.raises(ValueError, match="not a position"):
            Position.parse(bad)


def _gathered(index: Index) -> int | None:
    """How many calls the planner's statistics count (None: never gathered)."""
    with index.engine.connect() as conn:
        if index.dialect == "sqlite":
            if conn.execute(text("SELECT 1 FROM sqlite_master WHERE name='sqlite_stat1'")).first():
                stat = conn.execute(
                    text("SELECT stat FROM sqlite_stat1 WHERE tbl = 'calls' LIMIT 1")
                ).scalar()
                return None if stat is None else int(str(stat).split()[0])
            return None
        tuples = conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = 'calls'"))
        value = float(tuples.scalar_one())
        return None if value < 0 else int(value)


def test_statistics_are_gathered_at_open_and_as_the_calls_grow(db_url: str) -> None:
    def calls(p: str, count: int) -> list[CallDetail]:
        return [
            CallDetail(callid=f"{p}.{n}", callfrom="100", callto="200", recording=f"{p}{n}.wav")
            for n in range(count)
        ]

    def known(index: Index) -> str | None:
        return index.settings.get(SettingKey.STATISTICS_CALLS)

    with open_index(db_url) as index:
        index.calls.record(calls("a", 300), source="cdr", tz=UTC_ZONE, now=NOW)
        assert known(index) is None and _gathered(index) is None  # fewer than 1,000 yet
    with open_index(db_url) as index:  # never gathered: at open
        assert known(index) == "300" and _gathered(index) == 300
        index.calls.record(calls("b", 600), source="cdr", tz=UTC_ZONE, now=NOW)
        assert known(index) == "300"  # grown by fewer than 1,000 calls: not yet
        index.calls.record(calls("c", 600), source="cdr", tz=UTC_ZONE, now=NOW)
        index.statistics.wait(timeout=60)  # gathered in the background
        assert known(index) == "1500"
        # Gathered again: about 1,500 (SQLite samples, so its count is an estimate).
        gathered = _gathered(index)
        assert gathered is not None and gathered > 900
        # An older callvault (or any other writer) adds calls without gathering them.
        older = [
            {"pbx_id": 0, "callid": f"old.{n}", "first_seen_at": NOW, "raw": "{}"}
            for n in range(1_000)
        ]
        with index.engine.begin() as conn:
            conn.execute(insert(schema.calls), older)
        assert known(index) == "1500"
    with open_index(db_url) as index:  # the next open sees the growth
        assert known(index) == "2500"


def test_an_index_whose_statistics_cannot_be_gathered_still_opens(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with open_index(db_url) as index:
        index.calls.record(seeded_calls(300), source="cdr", tz=UTC_ZONE, now=NOW)

    def refused(_self: object, _calls: int) -> None:
        raise OperationalError("ANALYZE", {}, Exception("attempt to write a readonly database"))

    monkeypatch.setattr(Statistics, "analyze", refused)
    with open_index(db_url) as index:  # as a user who may only read
        assert len(index.recordings.search(SearchFilters(), limit=5)) == 5
        assert index.settings.get(SettingKey.STATISTICS_CALLS) is None
    assert "could not gather the planner's statistics" in caplog.text
    assert "readonly database" in caplog.text


# -- query plans --------------------------------------------------------------------------

# Part of one external number: a number search that few calls match.
RARE = next(d.callfrom for d in seeded_calls(3_000) if d.type == "Inbound")[2:7]

START = "ix_calls_start_at"
NUMBERS = ("ix_calls_call_from", "ix_calls_call_to")
TRIGRAMS = ("calls_numbers", "ix_calls_call_from_trgm")  # SQLite's, PostgreSQL's
PLAN_SEARCHES: dict[str, tuple[SearchFilters, tuple[str, ...]]] = {
    # name: (filters, the index, one of which must serve the page)
    "newest": (SearchFilters(), (START,)),
    "number": (SearchFilters(number=RARE), TRIGRAMS),
    "common number": (SearchFilters(number="0301"), (START, *TRIGRAMS)),
    "extension": (SearchFilters(extension="117"), NUMBERS),
    "week": (SearchFilters(since=WEEK[0], until=WEEK[1]), (START,)),
    "week, inbound": (SearchFilters(since=WEEK[0], until=WEEK[1], direction="Inbound"), (START,)),
    "listener, newest": (SearchFilters(scope=parse_scope("100-139")), (START, *NUMBERS)),
    "listener, number": (
        SearchFilters(scope=parse_scope("100-139"), number=RARE),
        (*TRIGRAMS, *NUMBERS),
    ),
    "listener, one extension": (SearchFilters(scope=parse_scope("117")), NUMBERS),
}


@pytest.fixture
def planned(index: Index) -> Iterator[Index]:
    """The index of `index`, seeded with 3,000 calls (statistics gathered as it grew)."""
    seed(index, 3_000)
    yield index


def _statements(index: Index, run: Any) -> list[tuple[str, Any]]:
    """The SELECTs `run()` sends to the database, with their parameters."""
    sent: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    event.listen(index.engine, "before_cursor_execute", capture)
    try:
        run()
    finally:
        event.remove(index.engine, "before_cursor_execute", capture)
    return sent


def _sqlite_plan(index: Index, statement: str, parameters: Any) -> list[str]:
    with index.engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
        return [str(row[3]) for row in rows]


def _postgresql_plan(
    index: Index, statement: str, parameters: Any, *, bitmap_only: bool = False
) -> str:
    """The plan, with sequential scans priced out (one still chosen has no alternative);
    with `bitmap_only`, plain index scans too: what a filter's own index can do."""
    with index.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        if bitmap_only:
            conn.exec_driver_sql("SET enable_indexscan = off")
            conn.exec_driver_sql("SET enable_indexonlyscan = off")
        rows = conn.exec_driver_sql("EXPLAIN " + statement, parameters)
        return "\n".join(str(row[0]) for row in rows)


def _whole_table_scans(plan: str, tables: str = "calls|recordings") -> list[str]:
    """The scans of `tables` in a PostgreSQL plan that read the whole table: no condition
    on their index, and not the walk of the start-time index (which the LIMIT above it
    stops)."""
    found = []
    lines = plan.splitlines()
    for n, line in enumerate(lines):
        node = re.search(rf"(Seq Scan|Index Scan|Index Only Scan)\b.* on ({tables})\b", line)
        if node is None:
            continue
        details = []
        for detail in lines[n + 1 :]:
            if "->" in detail:
                break
            details.append(detail)
        conditioned = any("Index Cond" in d for d in details)
        if node.group(1) == "Seq Scan" or not (conditioned or "ix_calls_start_at" in line):
            found.append(line.strip())
    return found


@pytest.mark.parametrize("name", PLAN_SEARCHES)
def test_an_index_serves_every_main_search(planned: Index, name: str) -> None:
    filters, serving = PLAN_SEARCHES[name]
    rows = planned.recordings.search(filters, limit=50)
    middle = rows[len(rows) // 2].position if rows else None

    def run() -> None:
        planned.recordings.search(filters, limit=50)
        planned.recordings.search(filters, limit=50, after=middle)
        planned.recordings.total(filters)

    statements = _statements(planned, run)
    assert statements
    for statement, parameters in statements:
        page = "ORDER BY" in statement and "calls.start_at DESC" in statement
        # A whole-table scan only under a LIMIT that stops it (the capped count).
        limited = "LIMIT" in statement.upper() and "count(" in statement
        if planned.dialect == "sqlite":
            plan = _sqlite_plan(planned, statement, parameters)
            full_scans = [step for step in plan if re.fullmatch(r"SCAN (calls|recordings)", step)]
            assert not full_scans or limited, (name, plan)
            if page:
                assert any(index in step for step in plan for index in serving), (name, plan)
                # The newest-first walk never sorts the whole archive.
                if any(START in step for step in plan):
                    assert "USE TEMP B-TREE FOR ORDER BY" not in plan, (name, plan)
            continue
        # On a small table PostgreSQL rightly prefers reading it all, or a bitmap of
        # `start_at IS NOT NULL` (as much), to a trigram index, and may merge-join the
        # recordings whole: its choices at scale show in bench/search.py. What must hold
        # here: the calls are read along the start-time index, not whole, and the filters'
        # conditions are ones their indexes can serve (below).
        if page and serving == (START,):
            plan_text = _postgresql_plan(planned, statement, parameters)
            assert START in plan_text, (name, plan_text)
            assert not _whole_table_scans(plan_text, "calls"), (name, plan_text)
    if planned.dialect == "postgresql" and serving != (START,):
        conditions = planned.recordings._conditions(filters)
        compiled = select(schema.calls.c.id).where(*conditions).compile(planned.engine)
        plan_text = _postgresql_plan(planned, str(compiled), compiled.params, bitmap_only=True)
        assert any(index in plan_text for index in serving), (name, plan_text)
        assert "Seq Scan" not in plan_text, (name, plan_text)


def test_the_number_search_uses_the_trigram_index(planned: Index) -> None:
    statements = _statements(planned, lambda: planned.recordings.total(SearchFilters(number=RARE)))
    if planned.dialect == "sqlite":
        steps = [step for s, p in statements for step in _sqlite_plan(planned, s, p)]
        assert any("calls_numbers VIRTUAL TABLE" in step for step in steps), steps
    else:
        plans = [_postgresql_plan(planned, s, p, bitmap_only=True) for s, p in statements]
        assert any("Bitmap Index Scan on ix_calls_call_from_trgm" in p for p in plans), plans


# PostgreSQL only: SQLite's counts are planned by the probe (test above).
@pytest.mark.parametrize("db_url", [pytest.param("postgresql", id="postgresql")], indirect=True)
@pytest.mark.parametrize("name", ["extension", "listener, newest", "listener, one extension"])
def test_a_capped_count_on_postgresql_goes_one_index_term_at_a_time(
    planned: Index, name: str
) -> None:
    # Through one OR, PostgreSQL gathered every match before counting to 1,001 (86 ms for a
    # listener's 115,000 calls at ten million): the count is a UNION ALL of the terms, each
    # served by its column's index and stopped by the LIMIT above them.
    assert planned.dialect == "postgresql"
    filters, _ = PLAN_SEARCHES[name]
    counts = [
        (statement, parameters)
        for statement, parameters in _statements(planned, lambda: planned.recordings.total(filters))
        if "count(" in statement
    ]
    assert len(counts) == 1, counts
    statement, parameters = counts[0]
    # An extension: the caller's column, then the callee's; a scope: its terms.
    scope_terms = planned.recordings._scope_terms(filters.scope or [])
    terms = 2 if filters.extension else len(scope_terms)
    assert statement.count("UNION ALL") == terms - 1, statement
    assert terms <= recordings_module._SPLIT_TERMS
    plan_text = _postgresql_plan(planned, statement, parameters)
    assert "Append" in plan_text and "BitmapOr" not in plan_text, plan_text
    # The calls through their number indexes; the recordings of 3,000 calls it may rightly
    # read whole for a hash join.
    assert not _whole_table_scans(plan_text, "calls"), plan_text
    assert any(index in plan_text for index in NUMBERS), plan_text
