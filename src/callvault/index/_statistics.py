"""The planner's statistics, which the index keeps itself.

Without statistics SQLite's planner sorted the whole archive to show its newest page, and
PostgreSQL kept plans made while a table was empty (a bulk load slowed from thousands of
calls a second to hundreds). Autovacuum may be off, and lags behind a bulk load anyway. So
the index gathers them (``ANALYZE``): at open when they were never gathered or the calls
have grown by a tenth since (whoever added them), and after its own writes on the same
rule, then in a thread of its own (at ten million calls PostgreSQL takes seconds, which a
report's answer must not wait for). How many calls there were at the last ``ANALYZE`` is kept under
`SettingKey.STATISTICS_CALLS` (SQLite's own figure is a sample's estimate).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from sqlalchemy import func, select

from callvault.index import schema
from callvault.index._db import Database
from callvault.index._settings import SettingKey, SettingsStore

log = logging.getLogger("callvault.index")

# Gathered again once the calls have grown by a tenth since the last time, and by at least
# this many; SQLite reads this many rows of each index (a few milliseconds at any size).
MIN_GROWTH = 1_000
_SQLITE_ANALYSIS_LIMIT = 1_000


class Statistics:
    """When to gather the statistics again; `calls` is how many there were last time."""

    def __init__(self, db: Database, settings: SettingsStore) -> None:
        self._db = db
        self._settings = settings
        self._lock = threading.Lock()
        self.calls = 0
        self._grown = 0
        self._worker: threading.Thread | None = None

    def at_open(self) -> None:
        """Gather the statistics if they were never gathered or are a tenth out of date; a
        failure to (a user who may only read) is a warning, never the open's failure."""
        now = self._calls_now()
        known = self._settings.get(SettingKey.STATISTICS_CALLS)
        if known is None or not known.isdigit():
            if now:
                self._analyze_now(now)
            return
        self.calls = int(known)
        grown = max(0, now - self.calls)
        if self._due(grown):
            self._analyze_now(now)
        else:
            self._grown = grown

    def note_growth(self, rows: int) -> None:
        """`rows` calls were added: gather the statistics, in the background, if there are
        enough new ones (and no gathering is under way)."""
        with self._lock:
            self._grown += rows
            busy = self._worker is not None and self._worker.is_alive()
            if busy or not self._due(self._grown):
                return
            self._grown = 0
            self._worker = threading.Thread(
                target=self._analyze_now, name="callvault-statistics", daemon=True
            )
            self._worker.start()

    def _due(self, grown: int) -> bool:
        """Whether `grown` new calls make the statistics out of date: a tenth, and at least
        `MIN_GROWTH`."""
        return grown >= max(MIN_GROWTH, self.calls // 10)

    def wait(self, timeout: float | None = None) -> None:
        """Until a gathering under way has ended (`Index.close` waits for it)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def _analyze_now(self, calls: int | None = None) -> None:
        try:
            self.analyze(self._calls_now() if calls is None else calls)
        except Exception as exc:  # never fatal (a read-only user, a locked file): searches
            # only get slower, and it is tried again later
            log.warning("could not gather the planner's statistics: %s", " ".join(str(exc).split()))

    def analyze(self, calls: int) -> None:
        """Gather the statistics of every table now; `calls` is how many calls there are."""
        with self._db.write() as conn:
            if self._db.dialect == "sqlite":
                conn.exec_driver_sql(f"PRAGMA analysis_limit = {_SQLITE_ANALYSIS_LIMIT}")
            conn.exec_driver_sql("ANALYZE")
        self._settings.set(SettingKey.STATISTICS_CALLS, str(calls), datetime.now(UTC))
        self.calls = calls
        log.debug("gathered the planner's statistics (%d calls)", calls)

    def _calls_now(self) -> int:
        """About how many calls there are: the highest id (ids are never reused), read from
        the primary key's end at once where a count would read every row."""
        with self._db.read() as conn:
            return int(conn.execute(select(func.max(schema.calls.c.id))).scalar() or 0)
