"""`index.alerts`: conditions that need a person, each told once and cleared once.

A condition (an alert's `key`) is `seen` by whoever evaluates (every `serve` node does,
every half minute): the first sighting makes its row. Once it has lasted its delay, one
evaluator wins the right to tell it (`claim_firing`: a conditional update, so of several
nodes exactly one does); a condition no longer seen is `clear`ed, and whoever clears a
told one tells the all-clear. A condition seen again after it cleared starts afresh.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, select, update

from callvault.index._db import Database
from callvault.index.schema import alerts, column_length
from callvault.times import as_utc as from_db
from callvault.times import to_utc

KEY_MAX = column_length(alerts.c.key)


@dataclass(frozen=True, slots=True)
class Alert:
    """One row of `alerts`."""

    key: str
    summary: str
    detail: str
    first_seen_at: datetime
    fired_at: datetime | None
    resolved_at: datetime | None


class AlertStore:
    """Rows of `alerts` (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def seen(self, key: str, *, summary: str, detail: str, now: datetime) -> None:
        """The condition `key` holds at `now`: its row is made (or, if it had cleared,
        started afresh); its words are brought up to date."""
        key, now = key[:KEY_MAX], to_utc(now)
        t = alerts
        with self._db.write() as conn:
            conn.execute(
                self._db.insert(t)
                .values(key=key, summary=summary, detail=detail, first_seen_at=now)
                .on_conflict_do_nothing()
            )
            conn.execute(
                update(t)
                .where(t.c.key == key, t.c.resolved_at.is_not(None))
                .values(first_seen_at=now, fired_at=None, resolved_at=None)
            )
            conn.execute(
                update(t)
                .where(t.c.key == key, t.c.resolved_at.is_(None))
                .values(summary=summary, detail=detail)
            )

    def claim_firing(self, key: str, *, now: datetime, after: timedelta) -> Alert | None:
        """The alert to tell, if `key` has held for `after` and nobody told it yet (this
        caller is then the one to); else None."""
        key, now = key[:KEY_MAX], to_utc(now)
        t = alerts
        with self._db.write() as conn:
            result = conn.execute(
                update(t)
                .where(
                    t.c.key == key,
                    t.c.fired_at.is_(None),
                    t.c.resolved_at.is_(None),
                    t.c.first_seen_at <= now - after,
                )
                .values(fired_at=now)
            )
            if result.rowcount != 1:
                return None
            row = conn.execute(select(t).where(t.c.key == key)).one()
        return _alert(row)

    def unclaim(self, key: str, *, fired_at: datetime) -> None:
        """Telling failed: let the next evaluation try again."""
        t = alerts
        with self._db.write() as conn:
            conn.execute(
                update(t)
                .where(t.c.key == key[:KEY_MAX], t.c.fired_at == to_utc(fired_at))
                .values(fired_at=None)
            )

    def clear(self, key: str, *, now: datetime) -> Alert | None:
        """The condition `key` no longer holds: the cleared alert if it had been told (this
        caller tells the all-clear), else None (nothing was told, or another cleared it)."""
        key, now = key[:KEY_MAX], to_utc(now)
        t = alerts
        with self._db.write() as conn:
            row = conn.execute(select(t).where(t.c.key == key)).first()
            if row is None or row.resolved_at is not None:
                return None
            result = conn.execute(
                update(t)
                .where(and_(t.c.key == key, t.c.resolved_at.is_(None)))
                .values(resolved_at=now)
            )
            if result.rowcount != 1 or row.fired_at is None:
                return None
            done = conn.execute(select(t).where(t.c.key == key)).one()
        return _alert(done)

    def open(self) -> builtins.list[Alert]:
        """Alerts not cleared, by key."""
        t = alerts
        query = select(t).where(t.c.resolved_at.is_(None))
        with self._db.read() as conn:
            return [_alert(row) for row in conn.execute(query.order_by(t.c.key))]


def _alert(row: Any) -> Alert:
    first = from_db(row.first_seen_at)
    assert first is not None
    return Alert(
        key=str(row.key),
        summary=str(row.summary),
        detail=str(row.detail),
        first_seen_at=first,
        fired_at=from_db(row.fired_at),
        resolved_at=from_db(row.resolved_at),
    )
