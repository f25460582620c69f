"""`index.notices`: "a PBX has new download jobs", from any node to the node that owns it.

On PostgreSQL a node that commits reports for a PBX announces it (`announce`: NOTIFY on
the channel ``callvault_jobs`` with the PBX's id), and every node listens (`listen`, a
blocking loop for a thread of its own) so that the owner's workers wake at once instead of
at their next poll. A notice is only a wake-up: a lost one (a listener reconnecting) costs
at most a poll interval, since the jobs are in the database. On SQLite, an index of one
machine, both are no-ops: the node that commits is the one that downloads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import text

from callvault.index._db import Database

log = logging.getLogger("callvault.index")

CHANNEL = "callvault_jobs"
# Delays before a listener whose connection failed connects again (the last one repeats).
_RECONNECT_S = (1.0, 2.0, 5.0, 10.0)


class JobNotices:
    """Announce and hear that a PBX has new jobs (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def supported(self) -> bool:
        """Whether notices travel between processes (PostgreSQL)."""
        return self._db.dialect == "postgresql"

    def announce(self, pbx_id: int) -> None:
        """Tell every listening node that PBX `pbx_id` has new jobs."""
        if not self.supported:
            return
        with self._db.write() as conn:
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {
                    "channel": CHANNEL,
                    "payload": str(pbx_id),
                },
            )

    def listen(self, on_notice: Callable[[int], None], stop: threading.Event) -> None:
        """Call `on_notice(pbx_id)` for every announcement until `stop` is set (blocking:
        run it on a thread of its own). A broken connection is logged and made again."""
        if not self.supported:
            stop.wait()
            return
        failures = 0
        while not stop.is_set():
            try:
                self._listen_once(on_notice, stop)
                failures = 0
            except Exception as exc:
                delay = _RECONNECT_S[min(failures, len(_RECONNECT_S) - 1)]
                failures += 1
                log.warning(
                    "listening for new jobs failed (%s: %s); connecting again in %.0f s "
                    "(meanwhile the workers find new jobs by polling)",
                    type(exc).__name__,
                    " ".join(str(exc).split()),
                    delay,
                )
                stop.wait(delay)

    def _listen_once(self, on_notice: Callable[[int], None], stop: threading.Event) -> None:
        raw = self._db.engine.raw_connection()
        try:
            conn = raw.driver_connection
            assert conn is not None
            conn.rollback()
            conn.autocommit = True
            conn.execute(f"LISTEN {CHANNEL}")
            while not stop.is_set():
                for notice in conn.notifies(timeout=0.5):
                    try:
                        pbx_id = int(notice.payload)
                    except ValueError:
                        continue
                    on_notice(pbx_id)
        finally:
            raw.invalidate()  # never back to the pool still listening
