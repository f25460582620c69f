"""`index.leases`: which node owns each PBX's API session, as leases with fencing tokens.

A PBX sends its reports to the address that logged in, and a random may only be used from
the address that asked for it: so exactly one node at a time may hold a PBX's session. A
node takes a PBX with `acquire` (when it is free, its lease has expired, or the holder is
an earlier incarnation of the same node), keeps it with `renew` before `expires_at`, and
gives it up with `release`. Every acquisition adds one to the row's `token`; `renew` and
`release` only act while the row still carries the caller's token, so a holder that was
paused or cut off past its lease learns it has lost the PBX (False) instead of taking it
back from the node that has it now.

Times are the callers' clocks (as for process heartbeats): the nodes' clocks must agree to
within a small part of the lease (NTP does).
"""

from __future__ import annotations

import builtins
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, literal_column, or_, select, tuple_, update

from callvault.index._db import Database
from callvault.index._models import Lease
from callvault.index.schema import column_length, pbx_leases, pbxs
from callvault.times import as_utc as from_db
from callvault.times import to_utc

_NODE_MAX = column_length(pbx_leases.c.node)


class LeaseStore:
    """Rows of `pbx_leases`, as `Lease`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def acquire(
        self,
        pbx_id: int,
        *,
        node: str,
        now: datetime,
        ttl: timedelta,
        dead: Collection[str] = (),
    ) -> Lease | None:
        """Take the PBX `pbx_id` for `node` until `now + ttl`, if it is free, its lease has
        expired, `node` itself holds it (a restart of the node takes its PBXs back at
        once), or a node of `dead` holds it (one the process registry knows stopped); the
        new lease, with a new fencing token, or None when another node holds it."""
        won = self.acquire_many([pbx_id], node=node, now=now, ttl=ttl, dead=dead)
        return won[0] if won else None

    def acquire_many(
        self,
        pbx_ids: Collection[int],
        *,
        node: str,
        now: datetime,
        ttl: timedelta,
        dead: Collection[str] = (),
    ) -> list[Lease]:
        """`acquire` for several PBXs in one statement: the leases won (of those free,
        expired, `node`'s own or a `dead` node's), by PBX id. A node taking over a dead
        node's PBXs on a loaded machine does it in one round trip, not one per PBX. A PBX
        no longer in the registry (`removed`) is not won, and fails none of the others."""
        if not pbx_ids:
            return []
        now, node = to_utc(now), node[:_NODE_MAX]
        holders = [node, *(name[:_NODE_MAX] for name in dead)]
        t = pbx_leases
        with self._db.write() as conn:
            # A row for each PBX still registered (one taken off the registry has none,
            # and may not get one: its registry row is gone).
            conn.execute(
                self._db.insert(t)
                .from_select(
                    ["pbx_id", "token"],
                    select(pbxs.c.id, literal_column("0")).where(pbxs.c.id.in_(list(pbx_ids))),
                )
                .on_conflict_do_nothing()
            )
            rows = conn.execute(
                update(t)
                .where(
                    t.c.pbx_id.in_(list(pbx_ids)),
                    or_(t.c.node.is_(None), t.c.expires_at <= now, t.c.node.in_(holders)),
                )
                .values(node=node, token=t.c.token + 1, acquired_at=now, expires_at=now + ttl)
                .returning(*t.c)
            ).all()
        return sorted((_lease(row) for row in rows), key=lambda lease: lease.pbx_id)

    def renew(
        self, pbx_id: int, *, node: str, token: int, now: datetime, ttl: timedelta
    ) -> datetime | None:
        """Extend `node`'s lease of `pbx_id` to `now + ttl`; the new expiry, or None if the
        lease is no longer this one (taken over: the caller must stop working on the PBX).
        A lease that expired but was not taken by another node is renewed."""
        renewed = self.renew_many({pbx_id: token}, node=node, now=now, ttl=ttl)
        return to_utc(now) + ttl if pbx_id in renewed else None

    def renew_many(
        self, tokens: Mapping[int, int], *, node: str, now: datetime, ttl: timedelta
    ) -> set[int]:
        """`renew` for several leases of `node` (PBX id -> token) in one statement; the ids
        of those renewed (the others were taken over)."""
        if not tokens:
            return set()
        until = to_utc(now) + ttl
        t = pbx_leases
        with self._db.write() as conn:
            rows = conn.execute(
                update(t)
                .where(
                    t.c.node == node[:_NODE_MAX],
                    tuple_(t.c.pbx_id, t.c.token).in_(list(tokens.items())),
                )
                .values(expires_at=until)
                .returning(t.c.pbx_id)
            )
            return {int(row.pbx_id) for row in rows}

    def removed(self, pbx_ids: Collection[int]) -> set[int]:
        """Of `pbx_ids`, the PBXs no longer in the registry (`pbx remove`): their lease
        rows went with them. A lease that cannot be renewed for that reason was not taken
        by another node."""
        if not pbx_ids:
            return set()
        with self._db.read() as conn:
            rows = conn.execute(select(pbxs.c.id).where(pbxs.c.id.in_(list(pbx_ids))))
            return set(pbx_ids) - {int(row.id) for row in rows}

    def release(self, pbx_id: int, *, node: str, token: int) -> bool:
        """Give the PBX up (a clean stop, or a rebalance), for any node to take at once;
        False if it was no longer this lease."""
        t = pbx_leases
        with self._db.write() as conn:
            result = conn.execute(
                update(t)
                .where(_ours(pbx_id, node[:_NODE_MAX], token))
                .values(node=None, expires_at=None)
            )
        return result.rowcount == 1

    def all(self) -> builtins.list[Lease]:
        """Every lease row, by PBX id."""
        with self._db.read() as conn:
            rows = conn.execute(select(pbx_leases).order_by(pbx_leases.c.pbx_id))
            return [_lease(row) for row in rows]

    def get(self, pbx_id: int) -> Lease | None:
        with self._db.read() as conn:
            row = conn.execute(select(pbx_leases).where(pbx_leases.c.pbx_id == pbx_id)).first()
        return None if row is None else _lease(row)


def _ours(pbx_id: int, node: str, token: int) -> Any:
    t = pbx_leases
    return and_(t.c.pbx_id == pbx_id, t.c.node == node, t.c.token == token)


def _lease(row: Any) -> Lease:
    return Lease(
        pbx_id=int(row.pbx_id),
        node=None if row.node is None else str(row.node),
        token=int(row.token),
        acquired_at=from_db(row.acquired_at),
        expires_at=from_db(row.expires_at),
    )
