"""`index.calls`: storing call detail records and queueing their recordings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, bindparam, case, func, literal_column, select

from callvault.index import schema
from callvault.index._db import Database
from callvault.index._errors import InvalidCallDetail
from callvault.index._models import RecordResult, SubjectCall
from callvault.index._statistics import Statistics
from callvault.pbx import CallDetail
from callvault.times import (
    MAX_DURATION_S,
    PBX_FORMAT,
    as_utc,
    parse_pbx_time,
    pbx_time_problem,
    to_utc,
)

# CallDetail field -> the column it is stored in. Over-long identifiers (`IDENTITY_FIELDS`)
# are refused before anything is written; the other text fields are cut to the column's
# length, read from the schema (`field_limit`).
FIELD_COLUMNS: dict[str, Any] = {
    "callid": schema.calls.c.callid,
    "sn": schema.calls.c.pbx_serial,
    "timestart": schema.calls.c.timestart_local,
    "callfrom": schema.calls.c.call_from,
    "callto": schema.calls.c.call_to,
    "type": schema.calls.c.direction,
    "status": schema.calls.c.status,
    "srctrunkname": schema.calls.c.src_trunk,
    "dsttrunkname": schema.calls.c.dst_trunk,
    "didnumber": schema.calls.c.did,
    "pincode": schema.calls.c.pincode,
    "recording": schema.recordings.c.name,
}
IDENTITY_FIELDS = ("callid", "recording")


def field_limit(field_name: str) -> int:
    """How many characters of a CallDetail field the index stores (its column's length)."""
    return schema.column_length(FIELD_COLUMNS[field_name])


# The limits of the fields truncated rather than refused, for _call_row.
_TRUNCATED = {name: field_limit(name) for name in FIELD_COLUMNS if name not in IDENTITY_FIELDS}
_IDENTITY_LIMITS = {name: field_limit(name) for name in IDENTITY_FIELDS}

# Columns of `calls` that a later report may fill in but never blank out.
_CALL_TEXT_COLUMNS = (
    "pbx_serial",
    "timestart_local",
    "call_from",
    "call_to",
    "direction",
    "status",
    "src_trunk",
    "dst_trunk",
    "did",
    "pincode",
)
_CALL_NULLABLE_COLUMNS = ("start_at", "duration_s", "talk_s", "agent_ring_s")
_DURATION_FIELDS = ("callduration", "talkduration", "agentringtime")
_CDR_FIELDS = tuple(field.name for field in fields(CallDetail))
# Keys per IN (...) lookup: well under every engine's limit on bound parameters.
_IN_CHUNK = 500


class CallStore:
    """The `calls` table and the recordings its records queue."""

    def __init__(self, db: Database, statistics: Statistics) -> None:
        self._db = db
        self._statistics = statistics
        self._statements = _Statements(db)

    def record(
        self,
        cdrs: Sequence[CallDetail],
        *,
        source: str,
        tz: ZoneInfo,
        now: datetime,
        pbx_id: int = 0,
    ) -> list[RecordResult]:
        """Store a batch of call detail records of the PBX `pbx_id` (its id in the
        registry; by default 0, the archive's PBX given by `serve`'s flags, see
        `callvault.index.pbxs.FLAGS_PBX_ID`) in ONE transaction; queue their recordings.

        Calls are upserted by (`pbx_id`, `callid`) (a later report fills in fields, never
        blanks them; `raw` and `source` stay those of the first report).
        A call's non-empty recording name gets a `pending` recordings row due at `now`
        unless one with that name exists, which is left untouched: re-sent events and
        backfills never duplicate or reset a recording. `source` is "event" or "cdr";
        `tz` is the PBX's zone, used to read `timestart`. A text field longer than its
        column is stored truncated to it (the same on every engine: SQLite would not enforce
        the lengths itself); `raw` keeps every field whole. Raises `InvalidCallDetail`
        (a ValueError), storing nothing of the batch, on a record `call_detail_problem`
        refuses (no callid, an over-long callid or recording name, impossible times).
        """
        now = to_utc(now)
        for cdr in cdrs:
            problem = call_detail_problem(cdr, tz)
            if problem is not None:
                raise InvalidCallDetail(problem)
        if not cdrs:
            return []
        # A whole batch costs a handful of statements (executemany), not two or three per
        # record: building and running each statement costs far more than SQLite's work.
        rows = [_call_row(cdr, source=source, tz=tz, now=now, pbx_id=pbx_id) for cdr in cdrs]
        with self._db.write() as conn:
            call_ids = self._upsert_calls(conn, rows, pbx_id)
            # Each recording name is inserted once, for the first record that carries it.
            first_call: dict[str, int] = {}
            for cdr in cdrs:
                if cdr.recording:
                    first_call.setdefault(cdr.recording, call_ids[cdr.callid])
            recording_ids, created = self._insert_recordings(conn, first_call, now, pbx_id)
        self._statistics.note_growth(len(rows))
        results: list[RecordResult] = []
        for cdr in cdrs:
            name = cdr.recording
            if not name:
                results.append(RecordResult(call_ids[cdr.callid], None, False))
                continue
            new = name in created
            created.discard(name)  # a second record with the same name finds it existing
            results.append(RecordResult(call_ids[cdr.callid], recording_ids[name], new))
        return results

    def with_number_ending(self, digits: str, *, limit: int = 100_000) -> list[SubjectCall]:
        """Calls whose caller, callee or DID ends with `digits` (a data subject's number;
        read by scanning the calls: a rare request), with their recording if any, newest
        first."""
        c, r = schema.calls, schema.recordings
        pattern = "%" + digits
        query = (
            select(
                c.c.id,
                c.c.pbx_id,
                c.c.start_at,
                c.c.call_from,
                c.c.call_to,
                c.c.did,
                c.c.direction,
                c.c.status,
                r.c.id.label("recording_id"),
                r.c.name.label("recording_name"),
                r.c.state.label("recording_state"),
            )
            .select_from(c.outerjoin(r, r.c.call_id == c.c.id))
            .where(c.c.call_from.like(pattern) | c.c.call_to.like(pattern) | c.c.did.like(pattern))
            .order_by(c.c.start_at.desc(), c.c.id.desc())
            .limit(limit)
        )
        with self._db.read() as conn:
            return [
                SubjectCall(
                    call_id=int(row.id),
                    pbx_id=int(row.pbx_id),
                    start_at=as_utc(row.start_at),
                    call_from=row.call_from,
                    call_to=row.call_to,
                    did=row.did,
                    direction=row.direction,
                    status=row.status,
                    recording_id=None if row.recording_id is None else int(row.recording_id),
                    recording_name=row.recording_name,
                    recording_state=row.recording_state,
                )
                for row in conn.execute(query)
            ]

    def scrub_numbers(self, call_ids: Sequence[int]) -> int:
        """Blank the caller, callee, DID and raw fields of these calls (a data subject's
        erasure: nothing personal stays in a tombstone); how many."""
        c = schema.calls
        ids = sorted(set(call_ids))
        done = 0
        with self._db.write() as conn:
            for start in range(0, len(ids), 500):
                done += conn.execute(
                    c.update()
                    .where(c.c.id.in_(ids[start : start + 500]))
                    .values(call_from="", call_to="", did="", raw="{}")
                ).rowcount
        return int(done)

    def _upsert_calls(
        self, conn: Connection, rows: list[dict[str, Any]], pbx_id: int
    ) -> dict[str, int]:
        """Upsert `rows` (in order) by executemany; the id of every callid among them."""
        # A call reported twice in the batch is upserted in a later round than its first
        # report, so one statement never touches a row twice (PostgreSQL refuses that when
        # the driver turns executemany into one multi-row INSERT).
        rounds: list[list[dict[str, Any]]] = []
        seen: dict[str, int] = {}
        for row in rows:
            occurrence = seen.get(row["callid"], 0)
            seen[row["callid"]] = occurrence + 1
            if occurrence == len(rounds):
                rounds.append([])
            rounds[occurrence].append(row)
        for round_rows in rounds:
            conn.execute(self._statements.upsert_call, round_rows)
        return _ids_by(conn, self._statements.call_ids, list(seen), pbx_id)

    def _insert_recordings(
        self, conn: Connection, call_of: dict[str, int], now: datetime, pbx_id: int
    ) -> tuple[dict[str, int], set[str]]:
        """Insert each name of `call_of` unless it exists: (id by name, names inserted)."""
        if not call_of:
            return {}, set()
        names = list(call_of)
        existing = _ids_by(conn, self._statements.recording_ids, names, pbx_id)
        # Names already there stay untouched (re-sent events, backfills). ON CONFLICT still
        # guards against another writer inserting one since (PostgreSQL); on SQLite the
        # write lock (BEGIN IMMEDIATE) rules that out, so `created` is exact there.
        new = [name for name in names if name not in existing]
        if new:
            rows = [
                {"name": name, "call_id": call_of[name], "pbx": pbx_id, "now": now} for name in new
            ]
            conn.execute(self._statements.insert_recording, rows)
            existing.update(_ids_by(conn, self._statements.recording_ids, new, pbx_id))
        return existing, set(new)


class _Statements:
    """The hot statements, built once with bound parameters (building one costs more than
    running it on SQLite)."""

    def __init__(self, db: Database) -> None:
        table = schema.calls
        columns = [c.name for c in table.c if c.name != "id"]
        upsert = db.insert(table).values({name: bindparam(name) for name in columns})
        excluded = upsert.excluded
        updates: dict[str, Any] = {}
        for name in _CALL_TEXT_COLUMNS:
            # literal_column: the '' is part of the SQL, not one more bound parameter.
            updates[name] = case(
                (excluded[name] != literal_column("''"), excluded[name]), else_=table.c[name]
            )
        for name in _CALL_NULLABLE_COLUMNS:
            updates[name] = func.coalesce(excluded[name], table.c[name])
        # No RETURNING: run with a list of rows, it goes to the driver's executemany.
        self.upsert_call = upsert.on_conflict_do_update(
            index_elements=[table.c.pbx_id, table.c.callid], set_=updates
        )
        self.call_ids = select(table.c.callid, table.c.id).where(
            table.c.pbx_id == bindparam("pbx"),
            table.c.callid.in_(bindparam("keys", expanding=True)),
        )
        r = schema.recordings
        self.insert_recording = (
            db.insert(r)
            .values(
                name=bindparam("name"),
                call_id=bindparam("call_id"),
                pbx_id=bindparam("pbx"),
                state=schema.PENDING,
                attempts=0,
                next_attempt_at=bindparam("now", type_=r.c.next_attempt_at.type),
                created_at=bindparam("now", type_=r.c.created_at.type),
                updated_at=bindparam("now", type_=r.c.updated_at.type),
            )
            .on_conflict_do_nothing(index_elements=[r.c.pbx_id, r.c.name])
        )
        self.recording_ids = select(r.c.name, r.c.id).where(
            r.c.pbx_id == bindparam("pbx"),
            r.c.name.in_(bindparam("keys", expanding=True)),
        )


def _ids_by(conn: Connection, statement: Any, keys: list[str], pbx_id: int) -> dict[str, int]:
    """`statement` (key, id WHERE pbx = :pbx AND key IN :keys) for every key, in chunks."""
    ids: dict[str, int] = {}
    for start in range(0, len(keys), _IN_CHUNK):
        chunk = {"keys": keys[start : start + _IN_CHUNK], "pbx": pbx_id}
        for key, row_id in conn.execute(statement, chunk):
            ids[key] = int(row_id)
    return ids


def _call_row(
    cdr: CallDetail, *, source: str, tz: ZoneInfo, now: datetime, pbx_id: int
) -> dict[str, Any]:
    """The `calls` columns of one record (the parameters of `_Statements.upsert_call`).

    Text fields are cut to their column's length (slicing a shorter str returns it as is);
    `raw` keeps them whole.
    """
    limit = _TRUNCATED
    return {
        "pbx_id": pbx_id,
        "callid": cdr.callid,
        "pbx_serial": cdr.sn[: limit["sn"]],
        "start_at": parse_pbx_time(cdr.timestart, tz),
        "timestart_local": cdr.timestart[: limit["timestart"]],
        "call_from": cdr.callfrom[: limit["callfrom"]],
        "call_to": cdr.callto[: limit["callto"]],
        "duration_s": cdr.callduration,
        "talk_s": cdr.talkduration,
        "direction": cdr.type[: limit["type"]],
        "status": cdr.status[: limit["status"]],
        "src_trunk": cdr.srctrunkname[: limit["srctrunkname"]],
        "dst_trunk": cdr.dsttrunkname[: limit["dsttrunkname"]],
        "did": cdr.didnumber[: limit["didnumber"]],
        "pincode": cdr.pincode[: limit["pincode"]],
        "agent_ring_s": cdr.agentringtime,
        "source": source,
        "first_seen_at": now,
        # Every field is a str, an int or None: the same JSON as asdict() without its
        # recursive deep copy.
        "raw": json.dumps({name: getattr(cdr, name) for name in _CDR_FIELDS}, sort_keys=True),
    }


def call_detail_problem(cdr: CallDetail, tz: tzinfo) -> str | None:
    """Why the index refuses to store `cdr` (None when it stores it): the one door for
    every record, from the receiver (which answers 400 with this reason) and the CDR export.

    Refused: no callid; a callid or recording name longer than its column (they identify the
    call and the file, so they are never shortened); a `timestart` that is a date and time
    in the PBX's form but outside `callvault.times`' range in zone `tz` (year 1, year 9999:
    a broken clock, whose time cannot be stored or computed with); a duration longer than
    `callvault.times.MAX_DURATION_S`. A `timestart` that is not a time at all is stored as
    text, without a start.
    """
    if not cdr.callid:
        return "a call detail record has no callid"
    for field_name, limit in _IDENTITY_LIMITS.items():
        value = getattr(cdr, field_name)
        if value is not None and len(value) > limit:
            return f"call detail field {field_name} is longer than {limit} characters"
    if cdr.timestart and parse_pbx_time(cdr.timestart, tz) is None:
        try:
            datetime.strptime(cdr.timestart.strip(), PBX_FORMAT)
        except ValueError:
            pass  # not a time at all: kept as text, without a start
        else:
            return pbx_time_problem(cdr.timestart, tz) or "timestart is out of range"
    for field_name in _DURATION_FIELDS:
        seconds = getattr(cdr, field_name)
        if seconds is not None and not 0 <= seconds <= MAX_DURATION_S:
            years = MAX_DURATION_S // (365 * 86400)
            return (
                f"call detail field {field_name} is not a believable duration "
                f"(more than {years} years, or negative): check the PBX"
            )
    return None
