"""`index.settings`: small facts kept in the index, under the keys of `SettingKey`."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import select, update

from callvault.index import schema
from callvault.index._db import Database
from callvault.times import to_utc


class SettingKey(StrEnum):
    """Every key of the `settings` table (the values are what existing archives hold)."""

    EVENTS_SECRET_PATH = "events_secret_path"  # noqa: S105 - the receiver's URL path
    # The PBX session's health, JSON, as serve wrote it before migration 0008 (which moved
    # it to each PBX's registry entry, `pbxs.session`).
    PBX_HEALTH = "pbx_health"
    PBX_TIMEZONE = "pbx_timezone"  # the zone the PBX's local times were read in
    LAST_EVENT_AT = "last_event_at"  # when the last NewCdr was committed, ISO 8601
    WEB_SESSION_SECRET = "web_session_secret"  # noqa: S105 - the key's name, not a secret
    BACKFILL_PROGRESS = "backfill_progress"  # how far `backfill` got, JSON
    STATISTICS_CALLS = "statistics_calls"  # calls at the planner's last ANALYZE
    # Where the recordings are kept when not in the archive directory (file:///DIR or
    # s3://BUCKET/PREFIX): set by the first serve given --storage, or by `storage migrate`.
    STORAGE_URL = "storage_url"
    # The last check of the audit chain (`callvault audit verify`, the audit page), JSON.
    AUDIT_VERIFIED = "audit_verified"
    # When a serve node last began the daily retention pass (ISO 8601): one node a day.
    RETENTION_PASS_AT = "retention_pass_at"  # noqa: S105 - a time, not a password


class SettingsStore:
    """Get, set and set-once the values of `SettingKey`s."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, key: SettingKey) -> str | None:
        """The value stored under `key`, or None."""
        s = schema.settings
        with self._db.read() as conn:
            value = conn.execute(
                select(s.c.value).where(s.c.key == SettingKey(key).value)
            ).scalar_one_or_none()
        return None if value is None else str(value)

    def set(self, key: SettingKey, value: str, now: datetime) -> None:
        """Create or replace the value of `key`."""
        s = schema.settings
        insert = self._db.insert(s).values(
            key=SettingKey(key).value, value=value, updated_at=to_utc(now)
        )
        statement = insert.on_conflict_do_update(
            index_elements=[s.c.key],
            set_={"value": insert.excluded.value, "updated_at": insert.excluded.updated_at},
        )
        with self._db.write() as conn:
            conn.execute(statement)

    def setdefault(self, key: SettingKey, value: str, now: datetime) -> str:
        """Store `value` under `key` unless a value exists; return the value now stored.

        Atomic across processes, e.g. for the receiver's secret path generated once.
        """
        s = schema.settings
        name = SettingKey(key).value
        statement = (
            self._db.insert(s)
            .values(key=name, value=value, updated_at=to_utc(now))
            .on_conflict_do_nothing(index_elements=[s.c.key])
        )
        with self._db.write() as conn:
            conn.execute(statement)
            return str(conn.execute(select(s.c.value).where(s.c.key == name)).scalar_one())

    def claim_turn(self, key: SettingKey, *, now: datetime, every: timedelta) -> bool:
        """Whether this caller takes the turn stored under `key` (an ISO time): it does if
        none was taken in the last `every`, and then stores `now`. Atomic across
        processes and nodes: of several callers at once, one gets the turn."""
        s = schema.settings
        name = SettingKey(key).value
        stamp = to_utc(now).isoformat()
        previous = self.setdefault(key, "", now)
        if previous:
            try:
                if datetime.fromisoformat(previous) > to_utc(now) - every:
                    return False
            except ValueError:
                pass  # not a time: take the turn
        with self._db.write() as conn:
            taken = conn.execute(
                update(s)
                .where(s.c.key == name, s.c.value == previous)
                .values(value=stamp, updated_at=to_utc(now))
            ).rowcount
        return bool(taken == 1)
