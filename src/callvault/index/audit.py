"""The audit log: who did what, to what, when and from where.

Append-only from the app's side: this module can add entries and read them, and has no way
to change or delete one. Every play, download, export, login (success and failure), token
and user change, and every CSV export of this log, is recorded by the web app through ``record``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Select, func, insert, select

from callvault.index._index import write_transaction
from callvault.index.schema import audit_log

LOGIN = "login"
LOGIN_FAILED = "login_failed"
LOGIN_THROTTLED = "login_throttled"
LOGOUT = "logout"
PLAY = "play"
DOWNLOAD = "download"
EXPORT = "export"
VERIFY = "verify"
USER_ADD = "user_add"
USER_REMOVE = "user_remove"
USER_PASSWORD = "user_password"  # noqa: S105 - an action name, not a password
TOKEN_CREATE = "token_create"  # noqa: S105
TOKEN_REVOKE = "token_revoke"  # noqa: S105
AUDIT_EXPORT = "audit_export"  # someone took a copy of (part of) this log
ACTIONS = (
    LOGIN,
    LOGIN_FAILED,
    LOGIN_THROTTLED,
    LOGOUT,
    PLAY,
    DOWNLOAD,
    EXPORT,
    VERIFY,
    USER_ADD,
    USER_REMOVE,
    USER_PASSWORD,
    TOKEN_CREATE,
    TOKEN_REVOKE,
    AUDIT_EXPORT,
)

CSV_HEADER = ("id", "at", "actor", "action", "target", "detail", "remote_addr")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: str
    remote_addr: str


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which entries to read; every field is optional and they combine with AND."""

    actor: str | None = None
    action: str | None = None
    target: str | None = None  # substring
    since: datetime | None = None
    until: datetime | None = None


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def record(
    engine: Engine,
    actor: str,
    action: str,
    target: str = "",
    detail: str = "",
    remote_addr: str = "",
    *,
    at: datetime | None = None,
) -> None:
    """Append one entry (its own transaction, so it survives whatever the caller does next)."""
    with write_transaction(engine) as conn:
        conn.execute(
            insert(audit_log).values(
                at=_utc(at or datetime.now(UTC)),
                actor=actor[:64],
                action=action[:32],
                target=target[:255],
                detail=detail,
                remote_addr=remote_addr[:64],
            )
        )


def _filtered(query: Select[Any], where: AuditFilter) -> Select[Any]:
    if where.actor:
        query = query.where(audit_log.c.actor == where.actor)
    if where.action:
        query = query.where(audit_log.c.action == where.action)
    if where.target:
        escaped = where.target.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(audit_log.c.target.like(f"%{escaped}%", escape="\\"))
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


def query(
    engine: Engine, where: AuditFilter | None = None, *, limit: int = 100, offset: int = 0
) -> list[AuditEntry]:
    """Entries matching the filter, newest first."""
    stmt = _filtered(select(audit_log), where or AuditFilter())
    stmt = stmt.order_by(audit_log.c.at.desc(), audit_log.c.id.desc()).limit(limit).offset(offset)
    with engine.connect() as conn:
        return [_entry(row) for row in conn.execute(stmt)]


def count(engine: Engine, where: AuditFilter | None = None) -> int:
    stmt = _filtered(select(func.count()).select_from(audit_log), where or AuditFilter())
    with engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def iter_csv(engine: Engine, where: AuditFilter | None = None) -> Iterator[str]:
    """The matching entries as CSV text, oldest first, a chunk of lines at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    stmt = _filtered(select(audit_log), where or AuditFilter()).order_by(
        audit_log.c.at, audit_log.c.id
    )
    with engine.connect() as conn:
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


# A cell starting with one of these is run as a formula by spreadsheets (a tab or carriage
# return first is dropped by some of them, leaving what follows to be read as a formula).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(text: str) -> str:
    """The cell as text a spreadsheet will not run: a leading quote when it could be read
    as a formula (the actor of a failed login, say, is whatever was typed)."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def csv_safe_row(cells: Sequence[object]) -> list[object]:
    """A CSV row with every text cell passed through ``csv_safe`` (numbers as they are)."""
    return [csv_safe(cell) if isinstance(cell, str) else cell for cell in cells]
