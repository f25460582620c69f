"""`index.audit`: appending to and reading the audit log (see `callvault.index.audit`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, func, insert, select

from callvault.index._db import Database, like_pattern
from callvault.index.audit import CSV_HEADER, AuditEntry, AuditFilter, csv_safe_row
from callvault.index.schema import audit_log, column_length

_ACTOR_MAX = column_length(audit_log.c.actor)
_ACTION_MAX = column_length(audit_log.c.action)
_TARGET_MAX = column_length(audit_log.c.target)
_REMOTE_ADDR_MAX = column_length(audit_log.c.remote_addr)


def _utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken as UTC already (SQLite returns them so)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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
        """Append one entry (its own transaction, so it survives whatever the caller does
        next). Over-long values are cut to their column's length; `detail` is kept whole."""
        with self._db.write() as conn:
            conn.execute(
                insert(audit_log).values(
                    at=_utc(at or datetime.now(UTC)),
                    actor=actor[:_ACTOR_MAX],
                    action=action[:_ACTION_MAX],
                    target=target[:_TARGET_MAX],
                    detail=detail,
                    remote_addr=remote_addr[:_REMOTE_ADDR_MAX],
                )
            )

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
    )
