"""`index.recordings`: reading recordings with their calls: search, lookups, totals."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Date,
    Integer,
    Row,
    Select,
    and_,
    any_,
    bindparam,
    cast,
    false,
    func,
    literal_column,
    not_,
    or_,
    select,
    table,
    text,
    union_all,
    update,
)
from sqlalchemy.sql.util import find_tables

from callvault.index import schema
from callvault.index._db import Database, like_pattern
from callvault.index._models import DayCount, Position, RecordingRow, SearchFilters, Total
from callvault.index._statistics import Statistics
from callvault.times import as_utc as from_db
from callvault.times import to_utc

_DATETIME_FIELDS = (
    "next_attempt_at",
    "claimed_until",
    "missing_since",
    "archived_at",
    "verified_at",
    "deleted_at",
    "purged_at",
    "created_at",
    "updated_at",
    "start_at",
    "first_seen_at",
)

# A search counts its matches no further than this: "more than 1,000" is all a person
# needs to narrow it down, and counting costs a row read per match (a million took longer
# than finding the page; ten thousand, 130 ms at ten million calls on PostgreSQL).
TOTAL_CAP = 1_000
# SQLite: a filter whose index finds at most this many candidate calls drives the search
# (for a page, fewer: see `_walk_above`); a probe stops counting them there, or at once below
# `_FEW`.
_DRIVER_LIMIT = 20_000
_FEW = 1_000
# The shortest number part a trigram index can find; shorter ones match many calls.
_TRIGRAM = 3
# PostgreSQL: a count splits an OR of at most this many index terms (`_split`); each term
# repeats the ones before it, negated, so a scope of many separate extensions would make a
# query that took longer to plan than the OR takes to run (100 extensions: 440 ms).
_SPLIT_TERMS = 12
# PostgreSQL, a number part: a page is read among this many of its newest calls at first
# (at least; a few times the rows wanted), twice as many each time after.
_SLICE = 200
_SLICE_FACTOR = 4


class RecordingStore:
    """Recordings joined with their calls, as `RecordingRow`s."""

    def __init__(self, db: Database, statistics: Statistics) -> None:
        self._db = db
        self._statistics = statistics

    def search(
        self,
        filters: SearchFilters,
        *,
        limit: int = 100,
        offset: int = 0,
        after: Position | None = None,
    ) -> list[RecordingRow]:
        """Recordings with their calls matching `filters`, newest call first (calls without
        a start time last; by recording id, newest first, among equals).

        `after` pages by position (keyset): the rows after that one, at the same cost at any
        depth. `offset` skips rows one by one: keep it to the first pages.
        """
        with self._db.read() as conn:
            plan = self._probe(conn, filters).plan(limit)
            return _search(conn, plan, limit=limit, offset=offset, after=after)

    def total(self, filters: SearchFilters, *, cap: int | None = TOTAL_CAP) -> Total:
        """How many recordings `search` would find, counting no further than `cap` (None:
        count them all, however long that takes)."""
        with self._db.read() as conn:
            return _total(conn, self._probe(conn, filters).plan(None), cap)

    def page(
        self,
        filters: SearchFilters,
        *,
        limit: int,
        offset: int = 0,
        after: Position | None = None,
        cap: int | None = TOTAL_CAP,
    ) -> tuple[list[RecordingRow], Total]:
        """`search` and `total` at once, learning what they share only once."""
        with self._db.read() as conn:
            probe = self._probe(conn, filters)
            rows = _search(conn, probe.plan(limit), limit=limit, offset=offset, after=after)
            return rows, _total(conn, probe.plan(None), cap)

    def by_name(self, name: str, pbx_id: int | None = None) -> RecordingRow | None:
        """The recording with exactly this name on the PBX `pbx_id` (by default: on any
        PBX, the first one's), or None."""
        r = schema.recordings
        query = _joined().where(r.c.name == name)
        if pbx_id is not None:
            query = query.where(r.c.pbx_id == pbx_id)
        rows = self._rows(query.order_by(r.c.id).limit(1))
        return rows[0] if rows else None

    def by_id(self, recording_id: int) -> RecordingRow | None:
        """The recording with this id, or None."""
        rows = self._rows(_joined().where(schema.recordings.c.id == recording_id))
        return rows[0] if rows else None

    def by_ids(self, recording_ids: Sequence[int]) -> list[RecordingRow]:
        """The recordings with these ids (those that exist), by id."""
        ids = sorted(set(recording_ids))
        rows: list[RecordingRow] = []
        for start in range(0, len(ids), 500):
            batch = ids[start : start + 500]
            rows += self._rows(_joined().where(schema.recordings.c.id.in_(batch)))
        return sorted(rows, key=lambda row: row.id)

    def archived(self, batch: int = 500, *, pbx_id: int | None = None) -> Iterator[RecordingRow]:
        """Every archived recording (of the PBX `pbx_id`, if given), by id, read in batches
        (no long-held transaction)."""
        r = schema.recordings
        last_id = 0
        where = [r.c.state == schema.ARCHIVED]
        if pbx_id is not None:
            where.append(r.c.pbx_id == pbx_id)
        while True:
            rows = self._rows(
                _joined().where(*where, r.c.id > last_id).order_by(r.c.id).limit(batch)
            )
            if not rows:
                return
            yield from rows
            last_id = rows[-1].id

    def sealed_data_keys(
        self, *, not_under: str, after_id: int = 0, limit: int = 500
    ) -> list[tuple[int, str]]:
        """(id, sealed data key) of recordings whose data key is sealed with a master key
        other than `not_under` (a key id), by id from after `after_id`: what `callvault keys
        rotate` re-seals, a batch at a time."""
        r = schema.recordings
        query = (
            select(r.c.id, r.c.data_key)
            .where(
                r.c.id > after_id,
                r.c.data_key.is_not(None),
                not_(r.c.data_key.startswith(f"v1.{not_under}.", autoescape=True)),
            )
            .order_by(r.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [(int(row.id), str(row.data_key)) for row in conn.execute(query)]

    def count_sealed_data_keys(self, *, not_under: str | None = None) -> int:
        """How many recordings have a data key (sealed with another key than `not_under`)."""
        r = schema.recordings
        query = select(func.count()).select_from(r).where(r.c.data_key.is_not(None))
        if not_under is not None:
            query = query.where(not_(r.c.data_key.startswith(f"v1.{not_under}.", autoescape=True)))
        with self._db.read() as conn:
            return int(conn.execute(query).scalar_one())

    def reseal_data_keys(self, changes: Sequence[tuple[int, str, str]]) -> int:
        """Replace sealed data keys: (id, old sealed value, new sealed value) each, only
        where the row still holds the old value (a concurrent change wins); how many."""
        r = schema.recordings
        done = 0
        with self._db.write() as conn:
            for recording_id, old, new in changes:
                result = conn.execute(
                    update(r)
                    .where(r.c.id == recording_id, r.c.data_key == old)
                    .values(data_key=new)
                )
                done += result.rowcount or 0
        return done

    def mark_verified(self, recording_id: int, now: datetime) -> None:
        """Note that the archived file was re-hashed and matched at `now`."""
        now = to_utc(now)
        r = schema.recordings
        with self._db.write() as conn:
            conn.execute(update(r).where(r.c.id == recording_id).values(verified_at=now))

    def counts_by_state(
        self, states: Sequence[str] | None = None, *, pbx_id: int | None = None
    ) -> dict[str, int]:
        """How many recordings (of the PBX `pbx_id`, if given) are in each state (or in
        each of `states`: a few small ones are counted from the state index without
        reading the archived millions); every state asked for is present, zeros included."""
        r = schema.recordings
        wanted = list(states) if states is not None else list(schema.RECORDING_STATES)
        counts = dict.fromkeys(wanted, 0)
        query = select(r.c.state, func.count()).group_by(r.c.state)
        if states is not None:
            query = query.where(r.c.state.in_(wanted))
        if pbx_id is not None:
            query = query.where(r.c.pbx_id == pbx_id)
        with self._db.read() as conn:
            for state, count in conn.execute(query):
                counts[state] = int(count)
        return counts

    def waiting_by_pbx(self) -> dict[tuple[int, str], int]:
        """Recordings not archived, per (PBX id, state), from the state index."""
        r = schema.recordings
        query = (
            select(r.c.pbx_id, r.c.state, func.count())
            .where(r.c.state.in_(schema.WAITING_STATES))
            .group_by(r.c.pbx_id, r.c.state)
        )
        with self._db.read() as conn:
            return {(int(pbx), str(state)): int(n) for pbx, state, n in conn.execute(query)}

    def oldest_due(self, now: datetime) -> datetime | None:
        """When the oldest recording that is due for a download now was queued (None if
        none is): how far the downloads lag behind."""
        r = schema.recordings
        query = select(func.min(r.c.created_at)).where(
            r.c.state == schema.PENDING,
            or_(r.c.next_attempt_at.is_(None), r.c.next_attempt_at <= to_utc(now)),
        )
        with self._db.read() as conn:
            return from_db(conn.execute(query).scalar())

    def recent_failures(self, limit: int = 20, *, pbx_id: int | None = None) -> list[RecordingRow]:
        """The latest recordings given up on (`failed` or `missing`), newest first (of the
        PBX `pbx_id`, if given)."""
        r = schema.recordings
        query = _joined().where(r.c.state.in_([schema.FAILED, schema.MISSING]))
        if pbx_id is not None:
            query = query.where(r.c.pbx_id == pbx_id)
        return self._rows(query.order_by(r.c.updated_at.desc(), r.c.id.desc()).limit(limit))

    def retrying(self, limit: int = 20, *, pbx_id: int | None = None) -> list[RecordingRow]:
        """Pending recordings whose last attempt failed (they will be tried again)."""
        r = schema.recordings
        query = _joined().where(r.c.state == schema.PENDING, r.c.last_error.is_not(None))
        if pbx_id is not None:
            query = query.where(r.c.pbx_id == pbx_id)
        return self._rows(query.order_by(r.c.updated_at.desc(), r.c.id.desc()).limit(limit))

    def bytes_stored(self, *, pbx_id: int | None = None) -> int:
        """Total size of every archived recording (of the PBX `pbx_id`), in bytes."""
        r = schema.recordings
        query = select(func.coalesce(func.sum(r.c.size), 0)).where(r.c.state == schema.ARCHIVED)
        if pbx_id is not None:
            query = query.where(r.c.pbx_id == pbx_id)
        with self._db.read() as conn:
            return int(conn.execute(query).scalar_one())

    def call_totals(self, *, pbx_id: int | None = None) -> tuple[int, int]:
        """(calls, calls with a recording): why there are more calls than recordings."""
        c, r = schema.calls, schema.recordings
        recorded_query = select(func.count(func.distinct(r.c.call_id)))
        calls_query = select(func.count(c.c.id))
        if pbx_id is not None:
            recorded_query = recorded_query.where(r.c.pbx_id == pbx_id)
            calls_query = calls_query.where(c.c.pbx_id == pbx_id)
        with_recording = recorded_query.scalar_subquery()
        with self._db.read() as conn:
            calls, recorded = conn.execute(calls_query.add_columns(with_recording)).one()
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

    def _conditions(
        self, filters: SearchFilters, *, walk: bool = False
    ) -> list[ColumnElement[bool]]:
        """The conditions of `filters`; with `walk` (SQLite) written so that no index of the
        number columns can serve them, leaving the planner the walk by start time."""
        r, c = schema.recordings, schema.calls
        conditions: list[ColumnElement[bool]] = []
        if filters.since is not None:
            conditions.append(c.c.start_at >= to_utc(filters.since))
        if filters.until is not None:
            conditions.append(c.c.start_at < to_utc(filters.until))
        if filters.number:
            conditions.append(self._number_matches(filters.number))
        if filters.extension:
            call_from, call_to = _numbers(walk)
            conditions.append(or_(call_from == filters.extension, call_to == filters.extension))
        if filters.direction:
            conditions.append(c.c.direction == filters.direction)
        if filters.status:
            conditions.append(c.c.status == filters.status)
        if filters.min_talk_s is not None:
            conditions.append(c.c.talk_s >= filters.min_talk_s)
        if filters.state:
            conditions.append(r.c.state == filters.state)
        if filters.pbx_id is not None:
            conditions.append(r.c.pbx_id == filters.pbx_id)
        if filters.pbx_scope is not None:
            conditions.append(r.c.pbx_id.in_(filters.pbx_scope) if filters.pbx_scope else false())
        if filters.scope is not None:
            conditions.append(self._scope_matches(filters.scope, walk=walk))
        return conditions

    def _probe(self, conn: Connection, filters: SearchFilters) -> _Probe:
        """The conditions of `filters`, and what the index can learn cheaply of how many
        calls they match, to choose how a search goes about them (`_Probe.plan`).

        A search for a number, an extension or a listener's scope may match a few calls or
        very many. A few: start from the calls an index finds for the filter (the trigram
        index for a number, the number indexes otherwise) and sort them. Very many: walk the
        calls newest first, which meets a page of matches soon. The probe counts the
        candidates of each such filter, stopping past `_DRIVER_LIMIT`.

        SQLite's planner cannot tell a few from many and is told. PostgreSQL's tells from
        its statistics, except for a number part, whose matches it guesses (14,000 for the
        4,700 of ``3705`` at ten million calls, and walked 114,000 calls for a page): the
        calls that match (every condition on the call checked on the rows the trigram index
        finds) are fetched with their start times, newest first, and when few, a page is
        read from the newest of them (`_Plan.matched`). Its counts of an extension or a
        scope go one index term at a time (`_split`).
        """
        conditions = self._conditions(filters)
        c = schema.calls
        if self._db.dialect != "sqlite":
            if not filters.number or len(filters.number) < _TRIGRAM:
                return _Probe(conditions, split=self._split(filters))
            # Every condition on the call, checked on the rows the trigram index finds;
            # sorted by the server, newest first (the order of `search`).
            on_calls = self._conditions(replace(filters, state=None))
            found = select(c.c.start_at, c.c.id).where(*on_calls).limit(_DRIVER_LIMIT + 1)
            first = found.subquery()
            newest = select(first.c.start_at, first.c.id).order_by(
                first.c.start_at.desc().nulls_last(), first.c.id.desc()
            )
            rows = conn.execute(newest).all()
            if len(rows) > _DRIVER_LIMIT:
                return _Probe(conditions, split=self._split(filters))
            matched = [(start, call_id) for start, call_id in rows]
            # These are exactly the calls that match: what is left is the recording's state.
            return _Probe(self._conditions(SearchFilters(state=filters.state)), matched=matched)
        fewest: tuple[int, Select[Any] | None] | None = None
        for candidates_query, needs_in in self._candidates(filters):
            count = _count(conn, [], source=candidates_query, limit=_DRIVER_LIMIT + 1)
            if fewest is None or count < fewest[0]:
                fewest = (count, candidates_query if needs_in else None)
            if count <= _FEW:
                break
        if fewest is None:
            return _Probe(conditions)
        count, driver = fewest
        walk = self._conditions(filters, walk=True)
        # Only the trigram candidates, not another filter's index, lead the planner.
        start = conditions if driver is None else [*walk, c.c.id.in_(driver)]
        return _Probe(start, walk=walk, candidates=count, calls=self._statistics.calls)

    def _candidates(self, filters: SearchFilters) -> Iterator[tuple[Select[Any], bool]]:
        """SQLite: queries of call ids, a superset of the calls each filter matches that an
        index serves, in the order they are worth trying; with whether the search needs it
        as an ``IN`` (the trigram table) or finds the index from the filter itself."""
        c = schema.calls
        if filters.extension:
            yield (
                select(c.c.id).where(
                    or_(c.c.call_from == filters.extension, c.c.call_to == filters.extension)
                ),
                False,
            )
        if filters.number and len(filters.number) >= _TRIGRAM:
            phrase = '"' + filters.number.replace('"', '""') + '"'
            query: Select[Any] = (
                select(literal_column("rowid"))
                .select_from(table(schema.NUMBER_SEARCH_TABLE))
                .where(text(f"{schema.NUMBER_SEARCH_TABLE} MATCH :phrase"))
                .params(phrase=phrase)
            )
            yield query, True
        if filters.scope is not None:
            yield select(c.c.id).where(self._scope_matches(filters.scope)), False

    def _split(self, filters: SearchFilters) -> _Split | None:
        """PostgreSQL: the extension's or else the scope's condition (an OR of index terms),
        and the same as terms that exclude each other, for counting (`_Plan.count`).

        A capped count through the OR built a bitmap of every match first (115,000 calls of
        a listener's five extensions at ten million calls: 86 ms to count to 1,001); one
        index scan per term, one after the other, stops as soon as enough are found.
        """
        c = schema.calls
        terms: list[ColumnElement[bool]]
        if filters.extension:
            terms = [c.c.call_from == filters.extension, c.c.call_to == filters.extension]
            rest = replace(filters, extension=None)
        elif filters.scope:
            terms = self._scope_terms(filters.scope)
            rest = replace(filters, scope=None)
        else:
            return None
        if not 2 <= len(terms) <= _SPLIT_TERMS:
            return None
        branches = [
            and_(term, not_(or_(*terms[:n]))) if n else term for n, term in enumerate(terms)
        ]
        return _Split(self._conditions(rest), branches)

    def _number_matches(self, number: str) -> ColumnElement[bool]:
        """`number` is part of the caller, callee or DID, letters in any case (SQLite's LIKE
        ignores the case of ASCII letters; PostgreSQL's ILIKE does the same)."""
        c = schema.calls
        pattern = like_pattern(number)
        columns = (c.c.call_from, c.c.call_to, c.c.did)
        if self._db.dialect == "sqlite":
            return or_(*(column.like(pattern, escape="\\") for column in columns))
        return or_(*(column.ilike(pattern, escape="\\") for column in columns))

    def _scope_matches(
        self, scope: Sequence[tuple[int, int]], *, walk: bool = False
    ) -> ColumnElement[bool]:
        """The caller or the callee is within `scope`: one flat OR of ranges, each of which
        an index on its column can serve (unless `walk`: see `_conditions`)."""
        terms = self._scope_terms(scope, walk=walk)
        return or_(*terms) if terms else false()

    def _scope_terms(
        self, scope: Sequence[tuple[int, int]], *, walk: bool = False
    ) -> list[ColumnElement[bool]]:
        """The terms of `_scope_matches`, the caller's first."""
        call_from, call_to = _numbers(walk)
        return [*self._in_scope(call_from, scope), *self._in_scope(call_to, scope)]

    def _in_scope(self, column: Any, scope: Sequence[tuple[int, int]]) -> list[ColumnElement[bool]]:
        """Conditions, any of which means `column` is an all-digit number within one of the
        inclusive ranges (the meaning of `users.in_scope`: no leading zero, "0" itself
        excepted).

        Compared as text of equal length, so it works without casts on every engine: a range
        is split into sub-ranges with a fixed number of digits, each a range of the column's
        index.
        """
        if self._db.dialect == "sqlite":
            all_digits: ColumnElement[bool] = column.op("NOT GLOB")("*[^0-9]*")
        else:
            all_digits = column.op("~")("^[0-9]+$")
        terms: list[ColumnElement[bool]] = []
        for lo_given, hi in scope:
            if hi < 0 or lo_given > hi:
                continue
            lo = max(lo_given, 0)
            for digits in range(len(str(lo)), len(str(hi)) + 1):
                sub_lo = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
                sub_hi = min(hi, 10**digits - 1)
                if sub_lo > sub_hi:
                    continue
                if sub_lo == sub_hi:
                    terms.append(column == str(sub_lo))
                    continue
                terms.append(
                    and_(
                        column >= str(sub_lo),
                        column <= str(sub_hi),
                        func.length(column) == digits,
                        all_digits,
                    )
                )
        return terms


def _search(
    conn: Connection, plan: _Plan, *, limit: int, offset: int, after: Position | None
) -> list[RecordingRow]:
    """`RecordingStore.search` along `plan`: the calls with a start time, then (on the last
    page) those without."""
    r, c = schema.recordings, schema.calls
    timed: list[ColumnElement[bool]] = [c.c.start_at.is_not(None)]  # and `plan.where`
    timed_among = untimed_among = None
    if plan.matched is not None:
        timed_among = [m for m in plan.matched if m[0] is not None]
        untimed_among = [m for m in plan.matched if m[0] is None]
    rows: list[Row[Any]] = []
    if after is None or after.start_at is not None:
        if after is not None and after.start_at is not None:
            moment = to_utc(after.start_at)
            # `<=` lets the planner start its walk of the start-time index there.
            timed.append(c.c.start_at <= moment)
            timed.append(not_(and_(c.c.start_at == moment, r.c.id >= after.recording_id)))
            if timed_among is not None:
                timed_among = [m for m in timed_among if m[0] is not None and m[0] <= moment]
        order = (c.c.start_at.desc(), r.c.id.desc())
        rows = plan.page(
            conn, [*plan.where, *timed], order, limit=limit, offset=offset, among=timed_among
        )
    if len(rows) < limit:
        untimed = [*plan.where, c.c.start_at.is_(None)]
        if after is not None and after.start_at is None:
            untimed.append(r.c.id < after.recording_id)
        skip = 0
        if offset and after is not None and after.start_at is None:
            skip = offset  # the cursor is among the calls without a start: skip from it
        elif offset and not rows:
            skip = max(0, offset - plan.count(conn, timed, among=timed_among))
        newest_id = (r.c.id.desc(),)
        rows += plan.page(
            conn, untimed, newest_id, limit=limit - len(rows), offset=skip, among=untimed_among
        )
    return [_recording_row(row) for row in rows]


def _total(conn: Connection, plan: _Plan, cap: int | None) -> Total:
    if cap is None:
        return Total(plan.count(conn), exact=True)
    found = plan.count(conn, limit=cap + 1)
    return Total(min(found, cap), exact=found <= cap)


def _count(
    conn: Connection,
    where: Sequence[ColumnElement[bool]],
    *,
    source: Select[Any],
    limit: int | None = None,
) -> int:
    """How many rows `source` finds with `where`, up to `limit`."""
    inner = source.where(*where)
    if limit is not None:
        inner = inner.limit(limit)
    return int(conn.execute(select(func.count()).select_from(inner.subquery())).scalar_one())


def _walk_above(limit: int | None, calls: int) -> float:
    """How many candidates make walking the calls newest first the better plan (SQLite).

    Starting from the candidates sorts all of them; the walk reads about limit * calls /
    candidates rows before it has a page: equal at sqrt(limit * calls). A count (`limit`
    None) walks until past the cap, so it starts from the candidates up to `_DRIVER_LIMIT`.
    """
    if limit is None:
        return _DRIVER_LIMIT
    return min(math.sqrt(limit * max(calls, 1)), _DRIVER_LIMIT)


def _numbers(walk: bool) -> tuple[ColumnElement[str], ColumnElement[str]]:
    """`calls.call_from` and `calls.call_to`; for a walk, as expressions (``|| ''``) that no
    index serves, so that SQLite's planner walks the start-time index instead."""
    c = schema.calls
    if walk:
        return c.c.call_from.concat(literal_column("''")), c.c.call_to.concat(literal_column("''"))
    return c.c.call_from, c.c.call_to


@dataclass(frozen=True, slots=True)
class _Probe:
    """What `RecordingStore._probe` learnt: the conditions as they start from the candidates
    (`start`) and, on SQLite, as a walk of the calls newest first (`walk`)."""

    start: list[ColumnElement[bool]]
    walk: list[ColumnElement[bool]] | None = None
    candidates: int = 0
    calls: int = 0
    matched: list[_Matched] | None = None
    split: _Split | None = None

    def plan(self, limit: int | None) -> _Plan:
        """The conditions for a page of `limit` rows, or for a count (`limit` None)."""
        if self.walk is not None and self.candidates > _walk_above(limit, self.calls):
            return _Plan(self.walk)
        return _Plan(self.start, self.matched, self.split)


@dataclass(frozen=True, slots=True)
class _Split:
    """A search's conditions but one OR (`rest`), and that OR as `branches` that exclude
    each other: counted one after the other, they find each match once."""

    rest: list[ColumnElement[bool]]
    branches: list[ColumnElement[bool]]


@dataclass(frozen=True, slots=True)
class _Plan:
    """A search's conditions, and how to read a page and a count with them.

    `matched` (PostgreSQL, a number part matching few calls): those calls, newest first;
    the search reads only among them, from the newest, a slice at a time, instead of
    joining every one of them to its recordings to sort them all.
    """

    where: list[ColumnElement[bool]]
    matched: list[_Matched] | None = None
    split: _Split | None = None

    def page(
        self,
        conn: Connection,
        where: Sequence[ColumnElement[bool]],
        order: Sequence[ColumnElement[Any]],
        *,
        limit: int,
        offset: int,
        among: Sequence[_Matched] | None = None,
    ) -> list[Row[Any]]:
        """The rows of one page (`among` these calls only, if given, newest first). The
        order is found on the ids alone, then the whole rows of the page are read: sorting
        thousands of whole rows (`raw` and all) cost more."""
        r, c = schema.recordings, schema.calls
        ids = (
            select(r.c.id)
            .select_from(r.join(c, c.c.id == r.c.call_id))
            .where(*where)
            .order_by(*order)
        )
        if among is None:
            page = list(conn.execute(ids.limit(limit).offset(offset)).scalars())
        else:
            page = _newest_among(conn, ids, among, offset + limit)[offset:]
        if not page:
            return []
        rank = {row_id: n for n, row_id in enumerate(page)}
        rows = conn.execute(_joined().where(r.c.id.in_(page)))
        return sorted(rows, key=lambda row: rank[row.id])

    def count(
        self,
        conn: Connection,
        extra: Sequence[ColumnElement[bool]] = (),
        *,
        limit: int | None = None,
        among: Sequence[_Matched] | None = None,
    ) -> int:
        """How many rows match the plan's conditions and `extra`, up to `limit`."""
        r, c = schema.recordings, schema.calls
        source: Select[Any] = select(literal_column("1")).select_from(
            r.join(c, c.c.id == r.c.call_id)
        )
        where = [*self.where, *extra]
        if among is None and self.matched is not None:
            among = self.matched
        if among is None and self.split is not None:
            rest = [*self.split.rest, *extra]
            branches = union_all(*(source.where(*rest, b) for b in self.split.branches))
            inner = branches if limit is None else branches.limit(limit)
            counted = select(func.count()).select_from(inner.subquery())
            return int(conn.execute(counted).scalar_one())
        if among is None:
            return _count(conn, where, source=source, limit=limit)
        call_id = c.c.id
        if not extra and all(find_tables(cond, check_columns=True) == [r] for cond in where):
            # The calls are the matches and what is left is on the recording alone: the
            # recordings are counted without reading the calls again.
            source, call_id = select(literal_column("1")).select_from(r), r.c.call_id
        if limit is not None and len(among) > 2 * limit:
            # Most calls have a recording: the newest 2 * limit of them are likely enough.
            newest = _call_id_in([m[1] for m in among[: 2 * limit]], call_id)
            found = _count(conn, [*where, newest], source=source, limit=limit)
            if found >= limit:
                return found
        every = _call_id_in([m[1] for m in among], call_id)
        return _count(conn, [*where, every], source=source, limit=limit)


# (start, call id) of a call a number matched.
_Matched = tuple[datetime | None, int]


def _call_id_in(
    ids: Sequence[int], column: ColumnElement[int] | None = None
) -> ColumnElement[bool]:
    """`column` (`calls.id` unless given) is one of `ids`: one array parameter, whatever
    their number."""
    target = schema.calls.c.id if column is None else column
    return target == any_(bindparam("call_ids", list(ids), type_=ARRAY(Integer)))


def _newest_among(
    conn: Connection, ids: Select[Any], among: Sequence[_Matched], wanted: int
) -> list[int]:
    """The first `wanted` recording ids of the ordered query `ids`, read among the calls
    `among` (newest first) a slice at a time: a slice's rows all come before the next
    slice's, as a slice never ends inside a run of calls that started at the same time."""
    found: list[int] = []
    start, size = 0, max(_SLICE_FACTOR * wanted, _SLICE)
    while start < len(among) and len(found) < wanted:
        end = min(len(among), start + size)
        while end < len(among) and among[end][0] == among[end - 1][0]:
            end += 1
        chunk = [call_id for _, call_id in among[start:end]]
        query = ids.where(_call_id_in(chunk)).limit(wanted - len(found))
        rows = list(conn.execute(query).scalars())
        found += rows
        # The next slice: enough, at the density of matches seen so far, for what is still
        # wanted, twice over; all the rest when the other filters leave almost nothing.
        density = len(found) / end
        missing = wanted - len(found)
        size = len(among) if density < 0.01 else max(size, int(2 * missing / density))
        start = end
    return found


def _joined() -> Select[Any]:
    r, c = schema.recordings, schema.calls
    # The call's id and PBX are the recording's call_id and pbx_id.
    columns = [col for col in r.c] + [col for col in c.c if col.name not in ("id", "pbx_id")]
    return select(*columns).select_from(r.join(c, c.c.id == r.c.call_id))


def _recording_row(row: Row[Any]) -> RecordingRow:
    data = dict(row._mapping)
    for key in _DATETIME_FIELDS:
        data[key] = from_db(data[key])
    return RecordingRow(**data)
