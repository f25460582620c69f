"""`index.backfills`: history to archive, asked of the node that works on a PBX.

`callvault backfill` on a PBX that a `serve` node holds does not log in itself (a second
API session may end the node's): it `submit`s a request. The node holding the PBX
`claim`s its PBX's requests one at a time (a request another node was running is taken
over: only the holder of the PBX's lease claims, so that node lost it), reads the
history with its own session, notes `progress`, and `finish`es it; one given back at a
hand-over is `release`d to wait for the next holder. The command follows it with `get`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, or_, select, update

from callvault.index._db import Database
from callvault.index.schema import backfill_requests, column_length
from callvault.times import as_utc as from_db
from callvault.times import to_utc

WAITING, RUNNING, DONE, FAILED = "waiting", "running", "done", "failed"
_BY_MAX = column_length(backfill_requests.c.requested_by)
_NODE_MAX = column_length(backfill_requests.c.node)


@dataclass(frozen=True, slots=True)
class BackfillRequest:
    """One row of `backfill_requests`."""

    id: int
    pbx_id: int
    since: datetime
    until: datetime
    requested_by: str
    requested_at: datetime
    state: str  # waiting, running, done, failed
    node: str | None
    started_at: datetime | None
    finished_at: datetime | None
    progress: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED)


class BackfillStore:
    """Rows of `backfill_requests` (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def submit(
        self, pbx_id: int, *, since: datetime, until: datetime, by: str, now: datetime
    ) -> BackfillRequest:
        t = backfill_requests
        with self._db.write() as conn:
            new_id = conn.execute(
                insert(t)
                .values(
                    pbx_id=pbx_id,
                    since=to_utc(since),
                    until=to_utc(until),
                    requested_by=by[:_BY_MAX],
                    requested_at=to_utc(now),
                    state=WAITING,
                )
                .returning(t.c.id)
            ).scalar_one()
            row = conn.execute(select(t).where(t.c.id == new_id)).one()
        return _request(row)

    def claim(self, pbx_id: int, *, node: str, now: datetime) -> BackfillRequest | None:
        """The oldest request of `pbx_id` not finished nor already this node's, now this
        node's (`running`); None if there is none. Call it only while holding the PBX's
        lease: a request another node was running is then one it gave up or died on."""
        t, node = backfill_requests, node[:_NODE_MAX]
        with self._db.write() as conn:
            found = conn.execute(
                select(t.c.id)
                .where(
                    t.c.pbx_id == pbx_id,
                    or_(t.c.state == WAITING, (t.c.state == RUNNING) & (t.c.node != node)),
                )
                .order_by(t.c.id)
                .limit(1)
            ).first()
            if found is None:
                return None
            conn.execute(
                update(t)
                .where(t.c.id == found.id, t.c.state.in_((WAITING, RUNNING)))
                .values(state=RUNNING, node=node, started_at=to_utc(now))
            )
            row = conn.execute(select(t).where(t.c.id == found.id)).one()
        return _request(row)

    def progress(self, request_id: int, progress: Mapping[str, Any]) -> None:
        """Note how far a running request got (ignored once it is finished: a late note
        never overwrites the final figures)."""
        t = backfill_requests
        with self._db.write() as conn:
            conn.execute(
                update(t)
                .where(t.c.id == request_id, t.c.state == RUNNING)
                .values(progress=json.dumps(dict(progress), sort_keys=True))
            )

    def finish(
        self,
        request_id: int,
        *,
        ok: bool,
        progress: Mapping[str, Any],
        error: str = "",
        now: datetime,
    ) -> None:
        with self._db.write() as conn:
            conn.execute(
                update(backfill_requests)
                .where(backfill_requests.c.id == request_id)
                .values(
                    state=DONE if ok else FAILED,
                    finished_at=to_utc(now),
                    progress=json.dumps(dict(progress), sort_keys=True),
                    error=error,
                )
            )

    def release(self, request_id: int, *, error: str = "") -> None:
        """Give a running request back, to wait for the PBX's next holder (`error`: why,
        when the PBX could not be read this time)."""
        t = backfill_requests
        with self._db.write() as conn:
            conn.execute(
                update(t)
                .where(t.c.id == request_id, t.c.state == RUNNING)
                .values(state=WAITING, error=error)
            )

    def get(self, request_id: int) -> BackfillRequest | None:
        with self._db.read() as conn:
            row = conn.execute(
                select(backfill_requests).where(backfill_requests.c.id == request_id)
            ).first()
        return None if row is None else _request(row)


def _request(row: Any) -> BackfillRequest:
    m = row._mapping
    try:
        progress = json.loads(m["progress"] or "{}")
    except ValueError:
        progress = {}
    since, until, requested_at = (
        from_db(m["since"]),
        from_db(m["until"]),
        from_db(m["requested_at"]),
    )
    assert since is not None and until is not None and requested_at is not None
    return BackfillRequest(
        id=int(m["id"]),
        pbx_id=int(m["pbx_id"]),
        since=since,
        until=until,
        requested_by=str(m["requested_by"]),
        requested_at=requested_at,
        state=str(m["state"]),
        node=m["node"],
        started_at=from_db(m["started_at"]),
        finished_at=from_db(m["finished_at"]),
        progress=progress if isinstance(progress, dict) else {},
        error=str(m["error"]),
    )
