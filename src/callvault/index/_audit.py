"""`index.audit`: appending to and reading the audit log (see `callvault.index.audit`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Select, func, insert, select, update

from callvault.index._db import Database, like_pattern
from callvault.index.audit import (
    ARCHIVE,
    CHAIN_START,
    CSV_HEADER,
    GENESIS,
    SYSTEM_ACTOR,
    AuditEntry,
    AuditFilter,
    Checkpoint,
    csv_safe_row,
    entry_hash,
)
from callvault.index.schema import (
    ARCHIVED,
    audit_checkpoints,
    audit_head,
    audit_log,
    column_length,
    recordings,
)

_ACTOR_MAX = column_length(audit_log.c.actor)
_ACTION_MAX = column_length(audit_log.c.action)
_TARGET_MAX = column_length(audit_log.c.target)
_REMOTE_ADDR_MAX = column_length(audit_log.c.remote_addr)


def _utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken as UTC already (SQLite returns them so)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# How long (seconds) PostgreSQL lets a transaction that holds the chain's head sit idle
# before it ends it (see `append`).
HEAD_LOCK_IDLE_S = 10.0


@dataclass(frozen=True, slots=True)
class NewEntry:
    """An entry to append (`append`); values are cut to their columns' lengths there."""

    at: datetime
    actor: str
    action: str
    target: str = ""
    detail: str = ""
    remote_addr: str = ""


@dataclass(frozen=True, slots=True)
class Attested:
    """A recording as the index says it is, and the `ARCHIVE` entry's detail about it."""

    recording_id: int
    pbx_id: int
    name: str
    storage_key: str | None
    sha256: str | None
    size: int | None
    state: str
    audit_seq: int | None
    detail: str | None


def append(conn: Connection, entries: Sequence[NewEntry]) -> list[int]:
    """Chain `entries` onto the log inside the caller's write transaction; their seqs.

    The head row is updated first, so writers on every connection and node queue on its
    lock (SQLite's BEGIN IMMEDIATE does the same) and each link is computed from the entry
    really before it. The first append ever starts the chain: entries written before the
    chain existed are chained in the order of their ids, then, if the index holds
    recordings already, a `CHAIN_START` entry says which (they were archived without an
    `ARCHIVE` entry).
    """
    if not entries:
        return []
    if conn.dialect.name == "postgresql":
        # The head's lock queues every audit write of every node: a process frozen while
        # holding it (SIGSTOP, a paused VM) must not stop them all. The server ends such
        # a transaction, and the lock with it, once it has waited this long for its
        # client; the frozen writer's commit then fails, and it retries.
        conn.exec_driver_sql(
            f"SET LOCAL idle_in_transaction_session_timeout = '{int(HEAD_LOCK_IDLE_S * 1000)}ms'"
        )
    head = _lock_head(conn)
    first: list[NewEntry] = []
    if head is None:
        head, first = _start_chain(conn, entries[0].at)
    seq, previous = head
    rows: list[dict[str, Any]] = []
    for entry in [*first, *entries]:
        seq += 1
        values = _values(entry)
        previous = entry_hash(previous, seq, **values)
        rows.append({"seq": seq, "hash": previous, **values})
    conn.execute(insert(audit_log), rows)
    conn.execute(update(audit_head).where(audit_head.c.id == 1).values(seq=seq, hash=previous))
    return [row["seq"] for row in rows[len(first) :]]


def _lock_head(conn: Connection) -> tuple[int, str] | None:
    """The head's seq and hash, its row locked until the transaction ends (None: no head
    yet). The no-op update takes the lock on every engine; a writer that waited for it
    reads the head as the one before it left it."""
    row = conn.execute(
        update(audit_head)
        .where(audit_head.c.id == 1)
        .values(seq=audit_head.c.seq)
        .returning(audit_head.c.seq, audit_head.c.hash)
    ).first()
    return None if row is None else (int(row.seq), str(row.hash))


def _values(entry: NewEntry) -> dict[str, Any]:
    return {
        "at": _utc(entry.at),
        "actor": entry.actor[:_ACTOR_MAX],
        "action": entry.action[:_ACTION_MAX],
        "target": entry.target[:_TARGET_MAX],
        "detail": entry.detail,
        "remote_addr": entry.remote_addr[:_REMOTE_ADDR_MAX],
    }


def _start_chain(conn: Connection, at: datetime) -> tuple[tuple[int, str], list[NewEntry]]:
    """Make the head row (or wait for whoever made it) and chain what came before: the
    head, and the entries to chain before the caller's (a `CHAIN_START`, if any)."""
    insert_or_not: Any
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as insert_or_not
    else:
        from sqlalchemy.dialects.postgresql import insert as insert_or_not
    conn.execute(  # if another writer made it meanwhile, the lock below waits for it
        insert_or_not(audit_head)
        .values(id=1, seq=0, hash=GENESIS, started_at=_utc(at))
        .on_conflict_do_nothing()
    )
    head = _lock_head(conn)
    assert head is not None
    seq, previous = head
    if seq:
        return head, []
    unchained = conn.execute(
        select(audit_log).where(audit_log.c.seq.is_(None)).order_by(audit_log.c.id)
    ).all()
    for row in unchained:
        seq += 1
        previous = entry_hash(
            previous,
            seq,
            _utc(row.at),
            row.actor,
            row.action,
            row.target,
            row.detail,
            row.remote_addr,
        )
        conn.execute(
            update(audit_log).where(audit_log.c.id == row.id).values(seq=seq, hash=previous)
        )
    before = conn.execute(select(func.max(recordings.c.id))).scalar() or 0
    if not before:
        return (seq, previous), []
    # An archive from before the chain: say which recordings it had.
    detail = f'{{"recordings_before":{before}}}'
    return (seq, previous), [NewEntry(_utc(at), SYSTEM_ACTOR, CHAIN_START, "audit_log", detail)]


class AuditStore:
    """The append-only audit log: `record` adds an entry, the rest read."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        actor: str,
        action: str,
        target: str = "",
        detail: str = "",
        remote_addr: str = "",
        *,
        at: datetime | None = None,
    ) -> None:
        """Append one entry to the chain (its own transaction, so it survives whatever the
        caller does next). Over-long values are cut to their column's length; `detail` is
        kept whole."""
        entry = NewEntry(at or datetime.now(UTC), actor, action, target, detail, remote_addr)
        with self._db.write() as conn:
            append(conn, [entry])

    def head(self) -> tuple[int, str]:
        """The chain's last seq and hash ((0, GENESIS) before the first entry)."""
        with self._db.read() as conn:
            row = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).first()
        return (0, GENESIS) if row is None else (int(row.seq), str(row.hash))

    def chain(self, *, after_seq: int = 0, batch: int = 2000) -> Iterator[AuditEntry]:
        """Every chained entry after `after_seq`, in chain order, read in batches."""
        while True:
            query = (
                select(audit_log)
                .where(audit_log.c.seq > after_seq)
                .order_by(audit_log.c.seq)
                .limit(batch)
            )
            with self._db.read() as conn:
                rows = [_entry(row) for row in conn.execute(query)]
            yield from rows
            if len(rows) < batch:
                return
            after_seq = rows[-1].seq or after_seq

    def unchained(self, limit: int = 100) -> list[AuditEntry]:
        """Entries without a place in the chain (written behind callvault's back)."""
        query = select(audit_log).where(audit_log.c.seq.is_(None)).order_by(audit_log.c.id)
        with self._db.read() as conn:
            return [_entry(row) for row in conn.execute(query.limit(limit))]

    def get(self, seq: int) -> AuditEntry | None:
        """The entry at `seq`, if any."""
        with self._db.read() as conn:
            row = conn.execute(select(audit_log).where(audit_log.c.seq == seq)).first()
        return None if row is None else _entry(row)

    def add_checkpoint(
        self, seq: int, chain_hash: str, at: datetime, key_id: str, signature: str
    ) -> None:
        """Keep a signed checkpoint (see `checkpoint_message`)."""
        with self._db.write() as conn:
            conn.execute(
                insert(audit_checkpoints).values(
                    seq=seq, hash=chain_hash, at=_utc(at), key_id=key_id, signature=signature
                )
            )

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, oldest first."""
        query = select(audit_checkpoints).order_by(audit_checkpoints.c.seq, audit_checkpoints.c.id)
        with self._db.read() as conn:
            return [
                Checkpoint(
                    id=int(row.id),
                    seq=int(row.seq),
                    hash=str(row.hash),
                    at=_utc(row.at),
                    key_id=str(row.key_id),
                    signature=str(row.signature),
                )
                for row in conn.execute(query)
            ]

    def attested_recordings(self, *, batch: int = 2000) -> Iterator[Attested]:
        """Every recording archived or attested, by id, with the detail of the `ARCHIVE`
        entry it points at (None if it points nowhere or at another kind of entry)."""
        r = recordings
        after = 0
        while True:
            query = (
                select(
                    r.c.id,
                    r.c.pbx_id,
                    r.c.name,
                    r.c.storage_key,
                    r.c.sha256,
                    r.c.size,
                    r.c.state,
                    r.c.audit_seq,
                    audit_log.c.action,
                    audit_log.c.detail,
                )
                .select_from(r.outerjoin(audit_log, audit_log.c.seq == r.c.audit_seq))
                .where(r.c.id > after, (r.c.state == ARCHIVED) | r.c.audit_seq.is_not(None))
                .order_by(r.c.id)
                .limit(batch)
            )
            with self._db.read() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                yield Attested(
                    recording_id=int(row.id),
                    pbx_id=int(row.pbx_id),
                    name=str(row.name),
                    storage_key=row.storage_key,
                    sha256=row.sha256,
                    size=None if row.size is None else int(row.size),
                    state=str(row.state),
                    audit_seq=None if row.audit_seq is None else int(row.audit_seq),
                    detail=str(row.detail) if row.action == ARCHIVE else None,
                )
            if len(rows) < batch:
                return
            after = int(rows[-1].id)

    def orphan_attestations(self, limit: int = 100) -> list[AuditEntry]:
        """`ARCHIVE` entries that no recording points at (its row was deleted or moved)."""
        query = (
            select(audit_log)
            .select_from(audit_log.outerjoin(recordings, recordings.c.audit_seq == audit_log.c.seq))
            .where(audit_log.c.action == ARCHIVE, recordings.c.id.is_(None))
            .order_by(audit_log.c.seq)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [_entry(row) for row in conn.execute(query)]

    def last_checkpoint_seq(self) -> int:
        """The seq of the newest checkpoint (0 if none)."""
        with self._db.read() as conn:
            value = conn.execute(select(func.max(audit_checkpoints.c.seq))).scalar()
        return int(value or 0)

    def query(
        self, where: AuditFilter | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[AuditEntry]:
        """Entries matching the filter, newest first."""
        stmt = _filtered(select(audit_log), where or AuditFilter())
        stmt = (
            stmt.order_by(audit_log.c.at.desc(), audit_log.c.id.desc()).limit(limit).offset(offset)
        )
        with self._db.read() as conn:
            return [_entry(row) for row in conn.execute(stmt)]

    def recent(
        self,
        action: str,
        *,
        since: datetime,
        remote_addr: str | None = None,
        actor: str | None = None,
        target: str | None = None,
        detail: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """The latest entries of `action` written since `since` (and after the entry
        `after_id`), newest first, those matching every value given exactly (`target`
        without regard to case, as user names are). What the web app counts across all its
        processes: failed logins for its rate limit, plays for their de-duplication."""
        query = select(audit_log).where(
            audit_log.c.action == action,
            audit_log.c.at >= _utc(since),
            audit_log.c.id > after_id,
        )
        if remote_addr is not None:
            query = query.where(audit_log.c.remote_addr == remote_addr[:_REMOTE_ADDR_MAX])
        if actor is not None:
            query = query.where(audit_log.c.actor == actor[:_ACTOR_MAX])
        if target is not None:
            query = query.where(func.lower(audit_log.c.target) == target[:_TARGET_MAX].lower())
        if detail is not None:
            query = query.where(audit_log.c.detail == detail)
        query = query.order_by(audit_log.c.at.desc(), audit_log.c.id.desc()).limit(limit)
        with self._db.read() as conn:
            return [_entry(row) for row in conn.execute(query)]

    def count(self, where: AuditFilter | None = None) -> int:
        """How many entries match the filter."""
        stmt = _filtered(select(func.count()).select_from(audit_log), where or AuditFilter())
        with self._db.read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def iter_csv(self, where: AuditFilter | None = None) -> Iterator[str]:
        """The matching entries as CSV text, oldest first, a chunk of lines at a time."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_HEADER)
        stmt = _filtered(select(audit_log), where or AuditFilter()).order_by(
            audit_log.c.at, audit_log.c.id
        )
        with self._db.read() as conn:
            result = conn.execution_options(yield_per=500).execute(stmt)
            for rows in result.partitions():
                for row in rows:
                    entry = _entry(row)
                    writer.writerow(
                        csv_safe_row(
                            (
                                entry.id,
                                entry.at.isoformat(),
                                entry.actor,
                                entry.action,
                                entry.target,
                                entry.detail,
                                entry.remote_addr,
                                entry.seq,
                                entry.hash,
                            )
                        )
                    )
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        if buffer.tell():
            yield buffer.getvalue()


def _filtered(query: Select[Any], where: AuditFilter) -> Select[Any]:
    if where.actor:
        query = query.where(audit_log.c.actor == where.actor)
    if where.not_actor:
        query = query.where(audit_log.c.actor != where.not_actor)
    if where.action:
        query = query.where(audit_log.c.action == where.action)
    if where.target:
        query = query.where(audit_log.c.target.like(like_pattern(where.target), escape="\\"))
    if where.since is not None:
        query = query.where(audit_log.c.at >= _utc(where.since))
    if where.until is not None:
        query = query.where(audit_log.c.at < _utc(where.until))
    return query


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        id=int(row.id),
        at=_utc(row.at),
        actor=str(row.actor),
        action=str(row.action),
        target=str(row.target),
        detail=str(row.detail),
        remote_addr=str(row.remote_addr),
        seq=None if row.seq is None else int(row.seq),
        hash=None if row.hash is None else str(row.hash),
    )
