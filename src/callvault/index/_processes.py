"""`index.processes`: the registry of callvault processes that claim download jobs.

Each process registers at start (`register`), sends a heartbeat every few seconds
(`heartbeat`) and stops cleanly (`stop`). A new start of the same node and kind supersedes
the rows of its earlier incarnations (marked stopped), and `mark_dead_local` stops rows of
this host whose pid is gone. A job claimed by a worker of a stopped process, or of one
whose heartbeat is stale, is claimable at once (see `JobStore.claim`): after a crash and a
restart, downloads in flight resume within seconds instead of when their lease runs out.
Several nodes may share one PostgreSQL index: each has its own rows, told apart by `node`.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update

from callvault.index._db import Database
from callvault.index._models import ProcessInfo
from callvault.index.schema import column_length, processes
from callvault.times import as_utc as from_db
from callvault.times import to_utc

_NODE_MAX = column_length(processes.c.node)
_KIND_MAX = column_length(processes.c.kind)
_HOSTNAME_MAX = column_length(processes.c.hostname)


class ProcessStore:
    """Rows of `processes`, as `ProcessInfo`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def register(
        self, *, node: str, kind: str, hostname: str, pid: int, workers: int, now: datetime
    ) -> ProcessInfo:
        """Add a process, alive as of `now`; every live row of the same `node` and `kind`
        (an earlier incarnation of this node) is marked stopped in the same transaction, so
        the jobs its workers held are claimable at once."""
        now = to_utc(now)
        p = processes
        node, kind = node[:_NODE_MAX], kind[:_KIND_MAX]
        with self._db.write() as conn:
            conn.execute(
                update(p)
                .where(p.c.node == node, p.c.kind == kind, p.c.stopped_at.is_(None))
                .values(stopped_at=now)
            )
            result = conn.execute(
                insert(p).values(
                    node=node,
                    kind=kind,
                    hostname=hostname[:_HOSTNAME_MAX],
                    pid=pid,
                    started_at=now,
                    heartbeat_at=now,
                    stopped_at=None,
                    workers_configured=workers,
                    workers_alive=0,
                    detail="{}",
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            row = conn.execute(select(p).where(p.c.id == key[0])).one()
        return _info(row)

    def heartbeat(
        self,
        process_id: int,
        *,
        now: datetime,
        workers_alive: int,
        detail: Mapping[str, Any] | None = None,
    ) -> bool:
        """Note that the process is alive at `now` with `workers_alive` workers (and
        `detail`, JSON-able, if given). False, changing nothing, if the row is stopped
        (superseded by a newer incarnation, or declared dead): the caller must stop
        working, its claims may already be someone else's."""
        values: dict[str, Any] = {"heartbeat_at": to_utc(now), "workers_alive": workers_alive}
        if detail is not None:
            values["detail"] = json.dumps(dict(detail), sort_keys=True)
        p = processes
        with self._db.write() as conn:
            result = conn.execute(
                update(p).where(p.c.id == process_id, p.c.stopped_at.is_(None)).values(**values)
            )
        return result.rowcount == 1

    def stop(self, process_id: int, *, now: datetime) -> None:
        """Mark a process stopped (a clean shutdown); its remaining claims are released."""
        p = processes
        with self._db.write() as conn:
            conn.execute(
                update(p)
                .where(p.c.id == process_id, p.c.stopped_at.is_(None))
                .values(stopped_at=to_utc(now), workers_alive=0)
            )

    def mark_dead_local(
        self, *, hostname: str, is_alive: Callable[[int], bool], now: datetime
    ) -> int:
        """Mark stopped every live row of `hostname` whose pid `is_alive` says is gone;
        how many. (A reused pid looks alive: then the stale heartbeat releases its claims.)"""
        now = to_utc(now)
        p = processes
        hostname = hostname[:_HOSTNAME_MAX]
        with self._db.write() as conn:
            rows = conn.execute(
                select(p.c.id, p.c.pid).where(p.c.hostname == hostname, p.c.stopped_at.is_(None))
            ).all()
            dead = [row.id for row in rows if not is_alive(int(row.pid))]
            if dead:
                conn.execute(
                    update(p)
                    .where(p.c.id.in_(dead), p.c.stopped_at.is_(None))
                    .values(stopped_at=now, workers_alive=0)
                )
        return len(dead)

    def live(self, *, now: datetime, stale_after: timedelta) -> builtins.list[ProcessInfo]:
        """Processes not stopped whose heartbeat is more recent than `stale_after`, by id."""
        p = processes
        query = (
            select(p)
            .where(p.c.stopped_at.is_(None), p.c.heartbeat_at > to_utc(now) - stale_after)
            .order_by(p.c.id)
        )
        with self._db.read() as conn:
            return [_info(row) for row in conn.execute(query)]

    def not_stopped(self, *, kind: str | None = None) -> builtins.list[ProcessInfo]:
        """Processes (of `kind`, if given) whose row is not stopped, live or silent, by id:
        however many processes a fleet runs, unlike `all`'s latest few."""
        p = processes
        query = select(p).where(p.c.stopped_at.is_(None)).order_by(p.c.id)
        if kind is not None:
            query = query.where(p.c.kind == kind)
        with self._db.read() as conn:
            return [_info(row) for row in conn.execute(query)]

    def all(self, limit: int = 50) -> builtins.list[ProcessInfo]:
        """The latest `limit` processes, stopped ones included, newest first."""
        p = processes
        with self._db.read() as conn:
            rows = conn.execute(select(p).order_by(p.c.id.desc()).limit(limit))
            return [_info(row) for row in rows]

    def prune(self, *, before: datetime) -> int:
        """Delete the rows of processes stopped before `before`; how many."""
        p = processes
        with self._db.write() as conn:
            result = conn.execute(
                delete(p).where(p.c.stopped_at.is_not(None), p.c.stopped_at < to_utc(before))
            )
        return int(result.rowcount)


def _info(row: Any) -> ProcessInfo:
    try:
        detail = json.loads(row.detail)
    except ValueError:
        detail = {}
    started_at, heartbeat_at = from_db(row.started_at), from_db(row.heartbeat_at)
    assert started_at is not None and heartbeat_at is not None
    return ProcessInfo(
        id=int(row.id),
        node=str(row.node),
        kind=str(row.kind),
        hostname=str(row.hostname),
        pid=int(row.pid),
        started_at=started_at,
        heartbeat_at=heartbeat_at,
        stopped_at=from_db(row.stopped_at),
        workers_configured=int(row.workers_configured),
        workers_alive=int(row.workers_alive),
        detail=detail if isinstance(detail, dict) else {},
    )
