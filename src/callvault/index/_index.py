"""The `Index`: every call and recording the archiver knows about, in one database.

All methods are synchronous SQLAlchemy Core, safe to call from several threads (one
connection per call from the engine's pool) and from several processes on the same
database. On SQLite every write transaction starts with ``BEGIN IMMEDIATE``, so writers
queue on the database lock (``busy_timeout``) instead of failing half-way; on PostgreSQL
workers claim jobs with ``SELECT ... FOR UPDATE SKIP LOCKED``.

Datetimes given to the index must be timezone-aware; they are stored as UTC and come back
as aware UTC datetimes on every engine.
"""

from __future__ import annotations

import json
import operator
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

from alembic.util import CommandError
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    case,
    create_engine,
    event,
    false,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.compiler import SQLCompiler

from callvault.index import schema
from callvault.index._models import Job, RecordingRow, RecordResult, SearchFilters
from callvault.pbx._types import CallDetail

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_BUSY_TIMEOUT_MS = 30_000
_TIMESTART_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIMESTART_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_LIKE_SPECIALS = re.compile(r"([\\%_])")

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


class IndexOpenError(Exception):
    """The index database cannot be opened: bad URL, missing file, unreadable, or too new."""


class IndexMissingError(IndexOpenError):
    """The SQLite file of the index does not exist (and was not asked to be created)."""


class InvalidCallDetail(ValueError):
    """A call detail record the index cannot store: no callid, or a callid or recording
    name longer than its column. Those identify the call and the file, so they are never
    shortened; every other over-long field is truncated instead (the full text stays in
    `raw`). A receiver answers it with 400: sending the same record again cannot help."""


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


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for other engines and in-memory databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


SUPPORTED_DIALECTS = ("sqlite", "postgresql")


def open_index(url: str, *, create: bool = True) -> Index:
    """Open the index at `url`, creating it and migrating it to the newest schema.

    `url` is an SQLAlchemy URL such as ``sqlite:////srv/archive/callvault.db``. With
    `create` False a missing SQLite file raises `IndexMissingError` instead of being made
    (for read-only commands such as ``callvault list``). Close the result with `close()`.
    """
    try:
        path = sqlite_path(url)
    except ArgumentError as exc:
        raise IndexOpenError(f"not a database URL: {_redact(url)}") from exc
    if path is not None and not path.exists():
        if not create:
            raise IndexMissingError(f"no index database at {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexOpenError(f"cannot create {path.parent}: {exc.strerror}") from exc
    backend = make_url(url).get_backend_name()
    if backend not in SUPPORTED_DIALECTS:
        raise IndexOpenError(f"the index needs SQLite or PostgreSQL, not {backend}: {_redact(url)}")
    try:
        engine = _make_engine(url)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise IndexOpenError(f"unsupported database URL: {_redact(url)}") from exc
    except ImportError as exc:
        raise IndexOpenError(
            f"the database driver for {_redact(url)} is not installed ({exc.name}); "
            "for PostgreSQL: pip install 'callvault[postgres]' and a postgresql+psycopg:// URL"
        ) from exc
    index = Index(engine)
    try:
        index.migrate()
    except CommandError as exc:
        engine.dispose()
        raise IndexOpenError(
            f"the index at {_redact(url)} has a schema this callvault does not know "
            f"(made by a newer version?): {exc}"
        ) from exc
    except SQLAlchemyError as exc:
        engine.dispose()
        detail = str(exc.orig) if isinstance(exc, OperationalError) else type(exc).__name__
        reason = " ".join(detail.split())  # one line, whatever the driver says
        raise IndexOpenError(f"cannot open the index at {_redact(url)}: {reason}") from exc
    except Exception:
        engine.dispose()
        raise
    return index


def write_transaction(engine: Engine) -> _WriteTransaction:
    """`with write_transaction(engine) as conn:` a write transaction that waits its turn.

    Use it instead of `engine.begin()` for every write: on SQLite a plain (deferred) BEGIN
    that reads first cannot upgrade to a writer while another connection writes and fails
    at once with "database is locked"; BEGIN IMMEDIATE queues on `busy_timeout` instead.
    """
    return _WriteTransaction(engine)


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(
        url,
        connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        # We issue BEGIN ourselves (see _on_begin), so pysqlite must not.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed event survives a power cut, which is what the 200 promises.
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("callvault_begin", "")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "immediate" else "BEGIN")

    return engine


def _like_pattern(text: str) -> str:
    return "%" + _LIKE_SPECIALS.sub(r"\\\1", text) + "%"


class Index:
    """The archive's database. Build it with `open_index`; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._statements = _Statements(self._insert)
        # record_calls on SQLite goes straight to the driver (see _SqliteBatch).
        self._sqlite_batch = (
            _SqliteBatch(self._statements, engine.dialect) if self._dialect == "sqlite" else None
        )

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for modules that keep their own tables in this database."""
        return self._engine

    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def migrate(self) -> None:
        """Bring the schema to the newest migration (done by `open_index`)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        # Holding the write lock while migrating keeps two processes from racing on it.
        with self._write() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def _write(self) -> Any:
        """A connection in a write transaction (BEGIN IMMEDIATE on SQLite)."""
        return _WriteTransaction(self._engine)

    # -- recording calls ----------------------------------------------------------------

    def record_calls(
        self, cdrs: Sequence[CallDetail], *, source: str, tz: ZoneInfo, now: datetime
    ) -> list[RecordResult]:
        """Store a batch of call detail records in ONE transaction; queue their recordings.

        Calls are upserted by `callid` (a later report fills in fields, never blanks them;
        `raw` and `source` stay those of the first report).
        A call's non-empty recording name gets a `pending` recordings row due at `now`
        unless one with that name exists, which is left untouched: re-sent events and
        backfills never duplicate or reset a recording. `source` is "event" or "cdr";
        `tz` is the PBX's zone, used to read `timestart`. A text field longer than its
        column is stored truncated to it (the same on every engine: SQLite would not enforce
        the lengths itself); `raw` keeps every field whole. Raises `InvalidCallDetail`
        (a ValueError), storing nothing of the batch, on a record without a callid or whose
        callid or recording name is longer than its column: those are never shortened.
        """
        now = to_utc(now)
        for cdr in cdrs:
            _check_identity(cdr)
        if not cdrs:
            return []
        # A whole batch costs a handful of statements, not two or three per record: building
        # and running each statement through SQLAlchemy costs far more than SQLite's work.
        rows = [_call_row(cdr, source=source, tz=tz, now=now) for cdr in cdrs]
        with self._write() as conn:
            call_ids = self._upsert_calls(conn, rows)
            # Each recording name is inserted once, for the first record that carries it.
            first_call: dict[str, int] = {}
            for cdr in cdrs:
                if cdr.recording:
                    first_call.setdefault(cdr.recording, call_ids[cdr.callid])
            recording_ids, created = self._insert_recordings(conn, first_call, now)
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

    def _upsert_calls(self, conn: Connection, rows: list[dict[str, Any]]) -> dict[str, int]:
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
        fast = self._sqlite_batch
        for round_rows in rounds:
            if fast is not None:
                fast.upsert_call.run(conn, round_rows)
            else:
                conn.execute(self._statements.upsert_call, round_rows)
        return self._ids_by(conn, self._statements.call_ids, list(seen))

    def _insert_recordings(
        self, conn: Connection, call_of: dict[str, int], now: datetime
    ) -> tuple[dict[str, int], set[str]]:
        """Insert each name of `call_of` unless it exists: (id by name, names inserted)."""
        if not call_of:
            return {}, set()
        names = list(call_of)
        existing = self._ids_by(conn, self._statements.recording_ids, names)
        # Names already there stay untouched (re-sent events, backfills). ON CONFLICT still
        # guards against another writer inserting one since (PostgreSQL); on SQLite the
        # write lock (BEGIN IMMEDIATE) rules that out, so `created` is exact there.
        new = [name for name in names if name not in existing]
        if new:
            rows = [{"name": name, "call_id": call_of[name], "now": now} for name in new]
            if self._sqlite_batch is not None:
                self._sqlite_batch.insert_recording.run(conn, rows)
            else:
                conn.execute(self._statements.insert_recording, rows)
            existing.update(self._ids_by(conn, self._statements.recording_ids, new))
        return existing, set(new)

    def _ids_by(self, conn: Connection, statement: Select[Any], keys: list[str]) -> dict[str, int]:
        """`statement` (key, id WHERE key IN :keys) for every key, in chunks."""
        ids: dict[str, int] = {}
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start : start + _IN_CHUNK]
            if self._sqlite_batch is not None:
                found = self._sqlite_batch.lookup(conn, statement, chunk)
            else:
                found = conn.execute(statement, {"keys": chunk})
            for key, row_id in found:
                ids[key] = int(row_id)
        return ids

    def _insert(self, table: Table) -> Any:
        """The dialect's INSERT that supports ON CONFLICT (SQLite and PostgreSQL)."""
        if self._dialect == "sqlite":
            return sqlite_dialect.insert(table)
        if self._dialect == "postgresql":
            return pg_dialect.insert(table)
        raise AssertionError(f"open_index refuses {self._dialect}")  # pragma: no cover

    # -- jobs -----------------------------------------------------------------------------

    def claim_jobs(
        self, worker_id: str, limit: int, *, now: datetime, lease: timedelta
    ) -> list[Job]:
        """Atomically take up to `limit` due jobs for `worker_id`, oldest due first.

        Due means `pending` with `next_attempt_at <= now`, or `downloading` whose claim ran
        out (a crashed or stuck worker). Claimed rows become `downloading` with
        `claimed_by=worker_id`, `claimed_until=now+lease` and one more attempt. No job is
        ever handed to two workers whose leases overlap.
        """
        now = to_utc(now)
        if limit <= 0:
            return []
        r, c = schema.recordings, schema.calls
        due = or_(
            and_(
                r.c.state == schema.PENDING,
                or_(r.c.next_attempt_at.is_(None), r.c.next_attempt_at <= now),
            ),
            and_(
                r.c.state == schema.DOWNLOADING,
                or_(r.c.claimed_until.is_(None), r.c.claimed_until <= now),
            ),
        )
        pick = (
            select(r.c.id)
            .where(due)
            .order_by(r.c.next_attempt_at, r.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self._write() as conn:
            ids = list(conn.execute(pick).scalars())
            if not ids:
                return []
            conn.execute(
                update(r)
                .where(r.c.id.in_(ids))
                .values(
                    state=schema.DOWNLOADING,
                    claimed_by=worker_id,
                    claimed_until=now + lease,
                    attempts=r.c.attempts + 1,
                    updated_at=now,
                )
            )
            rows = conn.execute(
                select(
                    r.c.id,
                    r.c.name,
                    r.c.call_id,
                    c.c.callid,
                    c.c.pbx_serial,
                    c.c.start_at,
                    r.c.attempts,
                    r.c.missing_since,
                    c.c.timestart_local,
                    r.c.next_attempt_at,
                )
                .join(c, c.c.id == r.c.call_id)
                .where(r.c.id.in_(ids))
            ).all()
        rows.sort(key=lambda row: (from_db(row.next_attempt_at) or now, row.id))
        return [
            Job(
                recording_id=row.id,
                name=row.name,
                call_id=row.call_id,
                callid=row.callid,
                pbx_serial=row.pbx_serial,
                start_at=from_db(row.start_at),
                attempts=row.attempts,
                missing_since=from_db(row.missing_since),
                timestart_local=row.timestart_local,
            )
            for row in rows
        ]

    def renew_claim(
        self, recording_id: int, *, worker_id: str, now: datetime, lease: timedelta
    ) -> bool:
        """Extend `worker_id`'s claim on a job it is still working on to `now + lease`.

        A worker renews while a download runs (every third of the lease), so a download
        longer than the lease is not claimed again by another worker. Only where the job is
        still `downloading` and claimed by `worker_id`; False (nothing changed) when the
        claim was lost meanwhile.
        """
        statement = (
            update(schema.recordings)
            .where(*_held_by(recording_id, worker_id))
            .values(claimed_until=to_utc(now) + lease)
        )
        with self._write() as conn:
            return bool(conn.execute(statement).rowcount == 1)

    def reserve_storage_key(self, recording_id: int, key: str) -> str | None:
        """Fix the storage key of a recording at its first attempt; return the one it has.

        The first key given for a recording wins and is kept for good (retries, requeues,
        other workers and processes all get it back), so a crash between storing the file
        and `mark_archived` leaves the file where the next attempt looks for it, even after
        the call's serial or start time were filled in by a later report. Until the
        recording is `archived` the key says where its file goes, not that it is there.
        None if there is no such recording.
        """
        r = schema.recordings
        with self._write() as conn:
            conn.execute(
                update(r)
                .where(r.c.id == recording_id, r.c.storage_key.is_(None))
                .values(storage_key=key)
            )
            value = conn.execute(
                select(r.c.storage_key).where(r.c.id == recording_id)
            ).scalar_one_or_none()
        return None if value is None else str(value)

    def _finish(self, recording_id: int, worker_id: str, values: Mapping[str, Any]) -> bool:
        statement = (
            update(schema.recordings)
            .where(*_held_by(recording_id, worker_id))
            .values(claimed_by=None, claimed_until=None, **values)
        )
        with self._write() as conn:
            return bool(conn.execute(statement).rowcount == 1)

    def mark_archived(
        self,
        recording_id: int,
        *,
        worker_id: str,
        size: int,
        sha256: str,
        storage_key: str,
        content_type: str,
        now: datetime,
    ) -> bool:
        """Record a durable copy. Only if `worker_id` still holds the claim (returns False
        otherwise, and changes nothing); clears the claim, the error and `missing_since`."""
        values = _archived(size, sha256, storage_key, content_type, to_utc(now))
        return self._finish(recording_id, worker_id, values)

    def mark_archived_unclaimed(
        self,
        recording_id: int,
        *,
        size: int,
        sha256: str,
        storage_key: str,
        content_type: str,
        now: datetime,
    ) -> bool:
        """Record a durable copy made by a worker that lost its claim meanwhile.

        The bytes are stored, so the recording is archived unless it already is (then
        nothing changes and False is returned); whoever holds the claim now finds it
        archived and its own `mark_archived` changes nothing.
        """
        r = schema.recordings
        values = _archived(size, sha256, storage_key, content_type, to_utc(now))
        statement = (
            update(r)
            .where(r.c.id == recording_id, r.c.state != schema.ARCHIVED)
            .values(claimed_by=None, claimed_until=None, **values)
        )
        with self._write() as conn:
            return bool(conn.execute(statement).rowcount == 1)

    def mark_retry(
        self,
        recording_id: int,
        *,
        worker_id: str,
        error: str,
        next_attempt_at: datetime,
        now: datetime,
        not_found: bool,
    ) -> bool:
        """Put a claimed job back to `pending`, due at `next_attempt_at`, with the error.

        `not_found` says the PBX answered "does not exist": `missing_since` is set on the
        first such answer of a run and kept after; any other error clears it.
        """
        now = to_utc(now)
        r = schema.recordings
        missing_since: Any = func.coalesce(r.c.missing_since, now) if not_found else None
        return self._finish(
            recording_id,
            worker_id,
            {
                "state": schema.PENDING,
                "last_error": error,
                "next_attempt_at": to_utc(next_attempt_at),
                "missing_since": missing_since,
                "updated_at": now,
            },
        )

    def mark_missing(
        self, recording_id: int, *, worker_id: str, reason: str, now: datetime
    ) -> bool:
        """Give up on a claimed job: the PBX says the file does not exist; `reason` says how
        long and what it answered. Only if `worker_id` still holds the claim."""
        return self._give_up(recording_id, schema.MISSING, worker_id, reason, now)

    def mark_failed(self, recording_id: int, *, worker_id: str, reason: str, now: datetime) -> bool:
        """Give up on a claimed job after transient errors (reconcile may `requeue` it)."""
        return self._give_up(recording_id, schema.FAILED, worker_id, reason, now)

    def _give_up(
        self, recording_id: int, state: str, worker_id: str, reason: str, now: datetime
    ) -> bool:
        now = to_utc(now)
        return self._finish(
            recording_id,
            worker_id,
            {"state": state, "last_error": reason, "next_attempt_at": None, "updated_at": now},
        )

    def requeue(
        self,
        states: Sequence[str],
        *,
        now: datetime,
        reset_attempts: bool = True,
        since: datetime | None = None,
    ) -> int:
        """Make every recording in `states` (only `failed` and/or `missing`) pending again,
        due at `now`; returns how many. The last error is kept until the next attempt.

        With `since`, only recordings the index learned of at or after it: the window is on
        the recording row's `created_at` (this machine's clock), not on the PBX's call time.
        "Does not exist" may have been a PBX still writing the file (a skewed clock, a wrong
        time zone), so recent give-ups can get another full window.
        """
        now = to_utc(now)
        allowed = {schema.FAILED, schema.MISSING}
        if not set(states) <= allowed:
            raise ValueError(f"requeue takes only {sorted(allowed)}, not {sorted(states)}")
        if not states:
            return 0
        r = schema.recordings
        values: dict[str, Any] = {
            "state": schema.PENDING,
            "next_attempt_at": now,
            "missing_since": None,
            "claimed_by": None,
            "claimed_until": None,
            "updated_at": now,
        }
        if reset_attempts:
            values["attempts"] = 0
        statement = update(r).where(r.c.state.in_(list(states)))
        if since is not None:
            statement = statement.where(r.c.created_at >= to_utc(since))
        with self._write() as conn:
            return int(conn.execute(statement.values(**values)).rowcount)

    def next_due(self) -> datetime | None:
        """When the earliest pending job is due (None if there is none): a worker's nap."""
        r = schema.recordings
        with self._engine.connect() as conn:
            value = conn.execute(
                select(func.min(r.c.next_attempt_at)).where(r.c.state == schema.PENDING)
            ).scalar_one_or_none()
        return from_db(value)

    # -- reporting ------------------------------------------------------------------------

    def counts_by_state(self) -> dict[str, int]:
        """How many recordings are in each state; every state is present, zeros included."""
        r = schema.recordings
        counts = dict.fromkeys(schema.RECORDING_STATES, 0)
        with self._engine.connect() as conn:
            for state, count in conn.execute(select(r.c.state, func.count()).group_by(r.c.state)):
                counts[state] = int(count)
        return counts

    def recent_failures(self, limit: int = 20) -> list[RecordingRow]:
        """The latest recordings given up on (`failed` or `missing`), newest first."""
        r = schema.recordings
        query = (
            self._joined()
            .where(r.c.state.in_([schema.FAILED, schema.MISSING]))
            .order_by(r.c.updated_at.desc(), r.c.id.desc())
            .limit(limit)
        )
        return self._rows(query)

    def retrying(self, limit: int = 20) -> list[RecordingRow]:
        """Pending recordings whose last attempt failed (they will be tried again)."""
        r = schema.recordings
        query = (
            self._joined()
            .where(r.c.state == schema.PENDING, r.c.last_error.is_not(None))
            .order_by(r.c.updated_at.desc(), r.c.id.desc())
            .limit(limit)
        )
        return self._rows(query)

    # -- settings -------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        """A small fact kept in the `settings` table, or None."""
        s = schema.settings
        with self._engine.connect() as conn:
            value = conn.execute(select(s.c.value).where(s.c.key == key)).scalar_one_or_none()
        return None if value is None else str(value)

    def set_setting(self, key: str, value: str, now: datetime) -> None:
        """Create or replace a setting (e.g. ``last_event_at``, ``pbx_health`` as JSON)."""
        now = to_utc(now)
        s = schema.settings
        insert = self._insert(s).values(key=key, value=value, updated_at=now)
        statement = insert.on_conflict_do_update(
            index_elements=[s.c.key],
            set_={"value": insert.excluded.value, "updated_at": insert.excluded.updated_at},
        )
        with self._write() as conn:
            conn.execute(statement)

    def setdefault_setting(self, key: str, value: str, now: datetime) -> str:
        """Store `value` under `key` unless a value exists; return the value now stored.

        Atomic across processes, e.g. for the receiver's secret path generated once.
        """
        now = to_utc(now)
        s = schema.settings
        statement = (
            self._insert(s)
            .values(key=key, value=value, updated_at=now)
            .on_conflict_do_nothing(index_elements=[s.c.key])
        )
        with self._write() as conn:
            conn.execute(statement)
            return str(conn.execute(select(s.c.value).where(s.c.key == key)).scalar_one())

    # -- search ---------------------------------------------------------------------------

    def search(
        self, filters: SearchFilters, *, limit: int = 100, offset: int = 0
    ) -> list[RecordingRow]:
        """Recordings with their calls matching `filters`, newest call first."""
        r, c = schema.recordings, schema.calls
        query = (
            self._joined()
            .where(*self._conditions(filters))
            .order_by(c.c.start_at.desc(), r.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return self._rows(query)

    def count(self, filters: SearchFilters) -> int:
        """How many recordings `search` would find without a limit."""
        r, c = schema.recordings, schema.calls
        query = (
            select(func.count())
            .select_from(r.join(c, c.c.id == r.c.call_id))
            .where(*self._conditions(filters))
        )
        with self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def recording_by_name(self, name: str) -> RecordingRow | None:
        """The recording with exactly this PBX name, or None."""
        rows = self._rows(self._joined().where(schema.recordings.c.name == name))
        return rows[0] if rows else None

    def recording_by_id(self, recording_id: int) -> RecordingRow | None:
        """The recording with this id, or None."""
        rows = self._rows(self._joined().where(schema.recordings.c.id == recording_id))
        return rows[0] if rows else None

    def archived_recordings(self, batch: int = 500) -> Iterator[RecordingRow]:
        """Every archived recording, by id, read in batches (no long-held transaction)."""
        r = schema.recordings
        last_id = 0
        while True:
            rows = self._rows(
                self._joined()
                .where(r.c.state == schema.ARCHIVED, r.c.id > last_id)
                .order_by(r.c.id)
                .limit(batch)
            )
            if not rows:
                return
            yield from rows
            last_id = rows[-1].id

    def mark_verified(self, recording_id: int, now: datetime) -> None:
        """Note that the archived file was re-hashed and matched at `now`."""
        now = to_utc(now)
        r = schema.recordings
        with self._write() as conn:
            conn.execute(update(r).where(r.c.id == recording_id).values(verified_at=now))

    # -- helpers --------------------------------------------------------------------------

    def _joined(self) -> Select[Any]:
        r, c = schema.recordings, schema.calls
        columns = [col for col in r.c] + [col for col in c.c if col.name != "id"]
        return select(*columns).select_from(r.join(c, c.c.id == r.c.call_id))

    def _rows(self, query: Select[Any]) -> list[RecordingRow]:
        with self._engine.connect() as conn:
            return [_recording_row(row) for row in conn.execute(query)]

    def _conditions(self, filters: SearchFilters) -> list[ColumnElement[bool]]:
        r, c = schema.recordings, schema.calls
        conditions: list[ColumnElement[bool]] = []
        if filters.since is not None:
            conditions.append(c.c.start_at >= to_utc(filters.since))
        if filters.until is not None:
            conditions.append(c.c.start_at < to_utc(filters.until))
        if filters.number:
            pattern = _like_pattern(filters.number)
            conditions.append(
                or_(
                    c.c.call_from.like(pattern, escape="\\"),
                    c.c.call_to.like(pattern, escape="\\"),
                    c.c.did.like(pattern, escape="\\"),
                )
            )
        if filters.extension:
            conditions.append(
                or_(c.c.call_from == filters.extension, c.c.call_to == filters.extension)
            )
        if filters.direction:
            conditions.append(c.c.direction == filters.direction)
        if filters.status:
            conditions.append(c.c.status == filters.status)
        if filters.min_talk_s is not None:
            conditions.append(c.c.talk_s >= filters.min_talk_s)
        if filters.state:
            conditions.append(r.c.state == filters.state)
        if filters.scope is not None:
            conditions.append(
                or_(
                    self._in_scope(c.c.call_from, filters.scope),
                    self._in_scope(c.c.call_to, filters.scope),
                )
            )
        return conditions

    def _in_scope(self, column: Any, scope: Sequence[tuple[int, int]]) -> ColumnElement[bool]:
        """`column` is an all-digit number within one of the inclusive ranges.

        Compared as text of equal length, so it works without casts on every engine: a range
        is split into sub-ranges with a fixed number of digits.
        """
        if self._dialect == "sqlite":
            all_digits: ColumnElement[bool] = column.op("NOT GLOB")("*[^0-9]*")
        else:
            all_digits = column.op("~")("^[0-9]+$")
        parts: list[ColumnElement[bool]] = []
        for lo_given, hi in scope:
            if hi < 0 or lo_given > hi:
                continue
            lo = max(lo_given, 0)
            for digits in range(len(str(lo)), len(str(hi)) + 1):
                sub_lo = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
                sub_hi = min(hi, 10**digits - 1)
                if sub_lo > sub_hi:
                    continue
                parts.append(
                    and_(
                        func.length(column) == digits,
                        column >= str(sub_lo),
                        column <= str(sub_hi),
                    )
                )
        if not parts:
            return false()
        return and_(column != "", all_digits, or_(*parts))


class _Statements:
    """The hot statements, built once with bound parameters (building one costs more than
    running it on SQLite)."""

    def __init__(self, insert: Any) -> None:
        table = schema.calls
        columns = [c.name for c in table.c if c.name != "id"]
        upsert = insert(table).values({name: bindparam(name) for name in columns})
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
            index_elements=[table.c.callid], set_=updates
        )
        self.call_ids = select(table.c.callid, table.c.id).where(
            table.c.callid.in_(bindparam("keys", expanding=True))
        )
        r = schema.recordings
        self.insert_recording = (
            insert(r)
            .values(
                name=bindparam("name"),
                call_id=bindparam("call_id"),
                state=schema.PENDING,
                attempts=0,
                next_attempt_at=bindparam("now", type_=r.c.next_attempt_at.type),
                created_at=bindparam("now", type_=r.c.created_at.type),
                updated_at=bindparam("now", type_=r.c.updated_at.type),
            )
            .on_conflict_do_nothing(index_elements=[r.c.name])
        )
        self.recording_ids = select(r.c.name, r.c.id).where(
            r.c.name.in_(bindparam("keys", expanding=True))
        )


class _DriverInsert:
    """A Core INSERT compiled once for a positional driver (sqlite3), run as executemany of
    plain tuples. Each parameter goes through its column type's own bind processor, as
    SQLAlchemy would, so the stored values are the same; what is skipped is SQLAlchemy's
    per-row, per-execution bookkeeping, which cost more than SQLite's own work."""

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        if compiled.positiontup is None:
            raise ValueError(f"{dialect.name} does not use positional parameters")
        self.sql = str(compiled)
        names = compiled.positiontup
        self._values = operator.itemgetter(*names)
        # Values the statement itself binds (`state="pending"`), not given by the rows.
        self._constants = {
            name: bind.effective_value
            for name, bind in compiled.binds.items()
            if not bind.required and name in names
        }
        # The placeholders whose type converts values (datetimes, on SQLite), by position.
        self._converted: list[tuple[int, Callable[[Any], Any]]] = []
        for position, name in enumerate(names):
            bind_type = compiled.binds[name].type
            processor = bind_type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._converted.append((position, processor))

    def run(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """executemany of `rows`, each holding the names the statement leaves to them."""
        if self._constants:
            rows = [{**self._constants, **row} for row in rows]
        if not self._converted:
            conn.exec_driver_sql(self.sql, [self._values(row) for row in rows])
            return
        # The same object recurs in a batch (its `now`): convert it once. Keyed by identity
        # (the rows keep every value alive meanwhile): equal datetimes in different zones
        # compare equal but need not convert alike.
        done: dict[tuple[int, int], Any] = {}
        parameters: list[tuple[Any, ...]] = []
        for row in rows:
            values = list(self._values(row))
            for position, processor in self._converted:
                value = values[position]
                key = (position, id(value))
                if key not in done:
                    done[key] = processor(value)
                values[position] = done[key]
            parameters.append(tuple(values))
        conn.exec_driver_sql(self.sql, parameters)


class _SqliteBatch:
    """record_calls' statements on SQLite, run through `exec_driver_sql` (see _DriverInsert).

    Built from the Core statements of `_Statements`, which stay the one definition (and what
    PostgreSQL runs). At batches of 20 this takes record_calls from ~160 to ~60 us of CPU
    per record.
    """

    def __init__(self, statements: _Statements, dialect: Dialect) -> None:
        calls, recordings = schema.calls, schema.recordings
        self.upsert_call = _DriverInsert(statements.upsert_call, dialect)
        self.insert_recording = _DriverInsert(statements.insert_recording, dialect)
        self._lookups = {
            id(statements.call_ids): (calls.name, calls.c.callid.name),
            id(statements.recording_ids): (recordings.name, recordings.c.name.name),
        }

    def lookup(self, conn: Connection, statement: Select[Any], keys: list[str]) -> Any:
        """The (key, id) rows of `statement` (one of _Statements' lookups) for `keys`."""
        table, column = self._lookups[id(statement)]
        marks = ", ".join("?" * len(keys))
        sql = f"SELECT {column}, id FROM {table} WHERE {column} IN ({marks})"  # noqa: S608 - names from the schema, values bound
        return conn.exec_driver_sql(sql, tuple(keys))


class _WriteTransaction:
    """Context manager: a connection inside a write transaction, committed on success."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        conn = self._engine.connect()
        if self._engine.dialect.name == "sqlite":
            conn.execution_options(callvault_begin="immediate")
        self._conn = conn
        conn.begin()
        return conn

    def __exit__(self, exc_type: type[BaseException] | None, *_rest: object) -> None:
        conn = self._conn
        assert conn is not None
        try:
            if exc_type is None:
                conn.commit()
            else:
                conn.rollback()
        finally:
            conn.close()


# CallDetail field -> (column, max length). Over-long identifiers (`_IDENTITY_FIELDS`)
# are refused before anything is written; the other fields are truncated to the limit.
_FIELD_LIMITS: dict[str, tuple[str, int]] = {
    "callid": ("callid", 64),
    "sn": ("pbx_serial", 64),
    "timestart": ("timestart_local", 32),
    "callfrom": ("call_from", 128),
    "callto": ("call_to", 128),
    "type": ("direction", 16),
    "status": ("status", 16),
    "srctrunkname": ("src_trunk", 128),
    "dsttrunkname": ("dst_trunk", 128),
    "didnumber": ("did", 128),
    "pincode": ("pincode", 64),
    "recording": ("name", 255),
}


_IDENTITY_FIELDS = ("callid", "recording")
# (field, limit) of the fields truncated rather than refused, for _call_row.
_TRUNCATED = {
    field_name: limit
    for field_name, (_column, limit) in _FIELD_LIMITS.items()
    if field_name not in _IDENTITY_FIELDS
}

_CDR_FIELDS = tuple(field.name for field in fields(CallDetail))
# Keys per IN (...) lookup: well under every engine's limit on bound parameters.
_IN_CHUNK = 500


def _archived(
    size: int, sha256: str, storage_key: str, content_type: str, now: datetime
) -> dict[str, Any]:
    """The column values of a recording whose durable copy is recorded at `now` (UTC)."""
    return {
        "state": schema.ARCHIVED,
        "size": size,
        "sha256": sha256,
        "storage_key": storage_key,
        "content_type": content_type,
        "archived_at": now,
        "last_error": None,
        "next_attempt_at": None,
        "missing_since": None,
        "updated_at": now,
    }


def _held_by(recording_id: int, worker_id: str) -> tuple[ColumnElement[bool], ...]:
    """The recording is being downloaded under `worker_id`'s claim."""
    r = schema.recordings
    return (
        r.c.id == recording_id,
        r.c.state == schema.DOWNLOADING,
        r.c.claimed_by == worker_id,
    )


def _call_row(cdr: CallDetail, *, source: str, tz: ZoneInfo, now: datetime) -> dict[str, Any]:
    """The `calls` columns of one record (the parameters of `_Statements.upsert_call`).

    Text fields are cut to their column's length (slicing a shorter str returns it as is);
    `raw` keeps them whole.
    """
    limit = _TRUNCATED
    return {
        "callid": cdr.callid,
        "pbx_serial": cdr.sn[: limit["sn"]],
        "start_at": parse_timestart(cdr.timestart, tz),
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


def _check_identity(cdr: CallDetail) -> None:
    if not cdr.callid:
        raise InvalidCallDetail("a call detail record has no callid")
    for field_name in _IDENTITY_FIELDS:
        value = getattr(cdr, field_name)
        limit = _FIELD_LIMITS[field_name][1]
        if value is not None and len(value) > limit:
            raise InvalidCallDetail(
                f"call detail field {field_name} is longer than {limit} characters"
            )


def _recording_row(row: Row[Any]) -> RecordingRow:
    data = dict(row._mapping)
    for key in (
        "next_attempt_at",
        "claimed_until",
        "missing_since",
        "archived_at",
        "verified_at",
        "created_at",
        "updated_at",
        "start_at",
        "first_seen_at",
    ):
        data[key] = from_db(data[key])
    return RecordingRow(**data)
