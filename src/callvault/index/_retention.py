"""`index.retention`: the retention policy's versions, legal holds, and deleting
recordings (tombstones). Rules and data types: `callvault.index.retention`.

Every change here is chained into the audit log in the same transaction as the change:
a policy set, a hold placed or released, a recording deleted (its `DELETE` entry repeats
the attestation of its hash, size and key, and says why).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, insert, select, update

from callvault.index import audit, schema
from callvault.index._audit import NewEntry, append
from callvault.index._db import Database
from callvault.index.retention import (
    Deletion,
    Hold,
    RetentionError,
    RetentionPolicy,
    RetentionRule,
    call_facts,
    parse_rules,
)
from callvault.times import as_utc, to_utc

_CASE_MAX = schema.column_length(schema.holds.c.case_name)


@dataclass(frozen=True, slots=True)
class Candidate:
    """An archived recording as the retention pass weighs it."""

    recording_id: int
    pbx_id: int
    name: str
    start_at: datetime | None
    archived_at: datetime | None
    call: dict[str, Any]  # call_from, call_to, did, direction, status


def _utc(value: Any) -> datetime:
    result = as_utc(value)
    assert result is not None
    return result


def _active_hold_on(recording_id: Any) -> Any:
    """SQL: some hold not released holds the recording `recording_id`."""
    h, hr = schema.holds, schema.hold_recordings
    return exists(
        select(hr.c.hold_id)
        .join(h, h.c.id == hr.c.hold_id)
        .where(hr.c.recording_id == recording_id, h.c.released_at.is_(None))
    )


class RetentionStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- the policy --------------------------------------------------------------------

    def current(self) -> RetentionPolicy | None:
        """The policy in force (the newest version), None if none was ever set."""
        p = schema.retention_policies
        with self._db.read() as conn:
            row = conn.execute(select(p).order_by(p.c.id.desc()).limit(1)).first()
        return None if row is None else _policy(row)

    def version(self, version: int) -> RetentionPolicy | None:
        p = schema.retention_policies
        with self._db.read() as conn:
            row = conn.execute(select(p).where(p.c.id == version)).first()
        return None if row is None else _policy(row)

    def history(self) -> list[RetentionPolicy]:
        """Every version, the newest first."""
        p = schema.retention_policies
        with self._db.read() as conn:
            return [_policy(row) for row in conn.execute(select(p).order_by(p.c.id.desc()))]

    def set_policy(
        self,
        rules: Sequence[RetentionRule],
        *,
        actor: str,
        note: str,
        now: datetime,
        remote_addr: str = "",
    ) -> RetentionPolicy:
        """Make `rules` the policy in force (a new version), audited with the rules."""
        p = schema.retention_policies
        text = json.dumps([rule.to_json() for rule in rules], separators=(",", ":"))
        with self._db.write() as conn:
            version = conn.execute(
                insert(p)
                .values(rules=text, created_at=to_utc(now), created_by=actor[:64], note=note)
                .returning(p.c.id)
            ).scalar_one()
            detail = json.dumps({"version": version, "note": note, "rules": json.loads(text)})
            append(
                conn,
                [
                    NewEntry(
                        now, actor, audit.RETENTION_SET, f"policy v{version}", detail, remote_addr
                    )
                ],
            )
        return RetentionPolicy(int(version), tuple(rules), to_utc(now), actor, note)

    def expiry_for(
        self, recording_id: int, policy: RetentionPolicy | None = None
    ) -> datetime | None:
        """When the policy (in force, or `policy`) lets the recording go: None if it keeps
        it for ever, if no rule matches, or if there is no policy."""
        policy = policy or self.current()
        if policy is None:
            return None
        r, c, pbxs = schema.recordings, schema.calls, schema.pbxs
        query = (
            select(
                r.c.archived_at,
                r.c.created_at,
                c.c.start_at,
                c.c.call_from,
                c.c.call_to,
                c.c.did,
                c.c.direction,
                c.c.status,
                pbxs.c.name.label("pbx_name"),
            )
            .join(c, c.c.id == r.c.call_id)
            .outerjoin(pbxs, pbxs.c.id == r.c.pbx_id)
            .where(r.c.id == recording_id)
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        call = call_facts(row)
        rule = policy.rule_for(call, row.pbx_name or "")
        start = as_utc(row.start_at) or as_utc(row.archived_at) or as_utc(row.created_at)
        return None if rule is None or start is None else rule.keep.expiry(start)

    # -- holds -------------------------------------------------------------------------

    def add_hold(
        self,
        case: str,
        reason: str,
        recording_ids: Sequence[int],
        *,
        selection: str,
        actor: str,
        now: datetime,
        remote_addr: str = "",
    ) -> Hold:
        """Place a hold on the recordings `recording_ids` (those deleted already are left
        out: nothing is left of them to keep); audited."""
        case, reason = case.strip(), reason.strip()
        if not case or len(case) > _CASE_MAX:
            raise RetentionError(f"a hold needs a case name of 1 to {_CASE_MAX} characters")
        if not reason:
            raise RetentionError("a hold needs a reason (--reason): say why it is kept")
        h, hr, r = schema.holds, schema.hold_recordings, schema.recordings
        with self._db.write() as conn:
            hold_id = conn.execute(
                insert(h)
                .values(
                    case_name=case,
                    reason=reason,
                    selection=selection,
                    created_at=to_utc(now),
                    created_by=actor[:64],
                )
                .returning(h.c.id)
            ).scalar_one()
            kept: list[int] = []
            ids = sorted(set(recording_ids))
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                kept += [
                    int(rid)
                    for rid in conn.execute(
                        select(r.c.id).where(r.c.id.in_(batch), r.c.state != schema.DELETED)
                    ).scalars()
                ]
            if kept:
                conn.execute(
                    insert(hr), [{"hold_id": hold_id, "recording_id": rid} for rid in kept]
                )
            detail = json.dumps(
                {"hold": hold_id, "reason": reason, "selection": selection, "recordings": len(kept)}
            )
            append(conn, [NewEntry(now, actor, audit.HOLD_ADD, case, detail, remote_addr)])
        hold = self.hold(int(hold_id))
        assert hold is not None
        return hold

    def release_hold(
        self, hold_id: int, *, reason: str, actor: str, now: datetime, remote_addr: str = ""
    ) -> Hold:
        """Release a hold (its recordings fall under the policy again); audited."""
        if not reason.strip():
            raise RetentionError("releasing a hold needs a reason (--reason)")
        h = schema.holds
        with self._db.write() as conn:
            row = conn.execute(
                update(h)
                .where(h.c.id == hold_id, h.c.released_at.is_(None))
                .values(released_at=to_utc(now), released_by=actor[:64], release_reason=reason)
                .returning(h.c.case_name)
            ).first()
            if row is None:
                raise RetentionError(f"there is no hold {hold_id} in force (`callvault hold list`)")
            detail = json.dumps({"hold": hold_id, "reason": reason})
            append(
                conn, [NewEntry(now, actor, audit.HOLD_RELEASE, row.case_name, detail, remote_addr)]
            )
        hold = self.hold(hold_id)
        assert hold is not None
        return hold

    def holds(self, *, active_only: bool = False) -> list[Hold]:
        """Holds, the newest first (those in force only, if asked)."""
        h, hr = schema.holds, schema.hold_recordings
        count = select(func.count()).where(hr.c.hold_id == h.c.id).scalar_subquery().label("count")
        query = select(h, count).order_by(h.c.id.desc())
        if active_only:
            query = query.where(h.c.released_at.is_(None))
        with self._db.read() as conn:
            return [_hold(row) for row in conn.execute(query)]

    def hold(self, hold_id: int) -> Hold | None:
        return next((hold for hold in self.holds() if hold.id == hold_id), None)

    def held_recordings(self, hold_id: int) -> list[int]:
        hr = schema.hold_recordings
        with self._db.read() as conn:
            return [
                int(rid)
                for rid in conn.execute(
                    select(hr.c.recording_id)
                    .where(hr.c.hold_id == hold_id)
                    .order_by(hr.c.recording_id)
                ).scalars()
            ]

    def is_held(self, recording_id: int) -> bool:
        """Whether a hold in force keeps the recording."""
        with self._db.read() as conn:
            return bool(conn.execute(select(_active_hold_on(recording_id))).scalar())

    def holds_on(self, recording_ids: Sequence[int]) -> dict[int, list[Hold]]:
        """The holds in force on each of `recording_ids` (those without one are absent)."""
        h, hr = schema.holds, schema.hold_recordings
        found: dict[int, list[Hold]] = {}
        if not recording_ids:
            return found
        in_force = {hold.id: hold for hold in self.holds(active_only=True)}
        if not in_force:
            return found
        with self._db.read() as conn:
            for start in range(0, len(recording_ids), 500):
                batch = list(recording_ids[start : start + 500])
                query = (
                    select(hr.c.recording_id, hr.c.hold_id)
                    .join(h, h.c.id == hr.c.hold_id)
                    .where(hr.c.recording_id.in_(batch), h.c.released_at.is_(None))
                )
                for rid, hold_id in conn.execute(query):
                    found.setdefault(int(rid), []).append(in_force[int(hold_id)])
        return found

    # -- deleting ----------------------------------------------------------------------

    def candidates(self, *, after_id: int = 0, batch: int = 2000) -> list[Candidate]:
        """Archived recordings no hold in force keeps, by id, after `after_id`."""
        r, c = schema.recordings, schema.calls
        query = (
            select(
                r.c.id,
                r.c.pbx_id,
                r.c.name,
                r.c.archived_at,
                c.c.start_at,
                c.c.call_from,
                c.c.call_to,
                c.c.did,
                c.c.direction,
                c.c.status,
            )
            .join(c, c.c.id == r.c.call_id)
            .where(r.c.id > after_id, r.c.state == schema.ARCHIVED, ~_active_hold_on(r.c.id))
            .order_by(r.c.id)
            .limit(batch)
        )
        with self._db.read() as conn:
            return [
                Candidate(
                    recording_id=int(row.id),
                    pbx_id=int(row.pbx_id),
                    name=str(row.name),
                    start_at=as_utc(row.start_at),
                    archived_at=as_utc(row.archived_at),
                    call=call_facts(row),
                )
                for row in conn.execute(query)
            ]

    def delete(
        self,
        recording_id: int,
        deletion: Deletion,
        *,
        now: datetime,
        remote_addr: str = "",
        states: Sequence[str] = (schema.ARCHIVED,),
    ) -> str | None:
        """Make the recording a tombstone (state ``deleted``), unless a hold in force keeps
        it or it is in none of `states`; its storage key ("" if it has none), None if
        nothing was deleted. Chained into the audit log in the same transaction."""
        r = schema.recordings
        with self._db.write() as conn:
            row = conn.execute(
                update(r)
                .where(
                    r.c.id == recording_id,
                    r.c.state.in_(list(states)),
                    ~_active_hold_on(r.c.id),
                )
                .values(
                    state=schema.DELETED,
                    deleted_at=to_utc(now),
                    deletion=deletion.to_json(),
                    updated_at=to_utc(now),
                    claimed_by=None,
                    claimed_until=None,
                    claim_process_id=None,
                    next_attempt_at=None,
                    # An encrypted recording's key goes with it: a copy of its object
                    # (a backup, a bucket version) can no longer be read.
                    data_key=None,
                )
                .returning(r.c.id, r.c.pbx_id, r.c.name, r.c.storage_key, r.c.sha256, r.c.size)
            ).first()
            if row is None:
                return None
            detail = json.dumps(
                {
                    "attested": json.loads(
                        audit.attestation(
                            int(row.id),
                            int(row.pbx_id),
                            row.name,
                            row.storage_key or "",
                            row.sha256 or "",
                            int(row.size or 0),
                        )
                    ),
                    "deletion": json.loads(deletion.to_json()),
                },
                sort_keys=True,
                separators=(",", ":"),
            )
            append(
                conn,
                [NewEntry(now, deletion.by, audit.DELETE, row.name, detail, remote_addr)],
            )
        return str(row.storage_key or "")

    def mark_purged(self, recording_id: int, *, now: datetime) -> None:
        """The deleted recording's stored object is gone."""
        r = schema.recordings
        with self._db.write() as conn:
            conn.execute(
                update(r)
                .where(r.c.id == recording_id, r.c.state == schema.DELETED)
                .values(purged_at=to_utc(now))
            )

    def unpurged(self, limit: int = 500) -> list[tuple[int, str]]:
        """Deleted recordings whose stored object may remain: (id, storage key)."""
        r = schema.recordings
        query = (
            select(r.c.id, r.c.storage_key)
            .where(
                r.c.state == schema.DELETED,
                r.c.purged_at.is_(None),
                r.c.storage_key.is_not(None),
            )
            .order_by(r.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [(int(row.id), str(row.storage_key)) for row in conn.execute(query)]

    def iter_deleted(self, *, batch: int = 2000) -> Iterator[int]:
        """The ids of every deleted recording."""
        r = schema.recordings
        after = 0
        while True:
            with self._db.read() as conn:
                ids = [
                    int(rid)
                    for rid in conn.execute(
                        select(r.c.id)
                        .where(and_(r.c.state == schema.DELETED, r.c.id > after))
                        .order_by(r.c.id)
                        .limit(batch)
                    ).scalars()
                ]
            yield from ids
            if len(ids) < batch:
                return
            after = ids[-1]


def _policy(row: Any) -> RetentionPolicy:
    return RetentionPolicy(
        version=int(row.id),
        rules=parse_rules(json.loads(row.rules)),
        created_at=_utc(row.created_at),
        created_by=str(row.created_by),
        note=str(row.note),
    )


def _hold(row: Any) -> Hold:
    return Hold(
        id=int(row.id),
        case=str(row.case_name),
        reason=str(row.reason),
        created_at=_utc(row.created_at),
        created_by=str(row.created_by),
        selection=str(row.selection),
        recordings=int(row.count),
        released_at=as_utc(row.released_at),
        released_by=row.released_by,
        release_reason=row.release_reason,
    )
