"""`index.jobs`: the download queue: claims, leases, outcomes, requeue."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Update,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    update,
)

from callvault.index import audit, schema
from callvault.index._audit import NewEntry, append
from callvault.index._db import Database
from callvault.index._models import ArchivedCopy, Job, Worker
from callvault.times import as_utc as from_db
from callvault.times import to_utc

# A claim whose process has not sent a heartbeat for this long is released.
DEFAULT_STALE_AFTER = timedelta(seconds=30)


class JobStore:
    """Recordings as download jobs: claimed by a `Worker`, finished by that worker only."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def claim(
        self,
        worker: Worker,
        limit: int,
        *,
        now: datetime,
        lease: timedelta,
        stale_after: timedelta = DEFAULT_STALE_AFTER,
        pbx_id: int | None = None,
    ) -> list[Job]:
        """Atomically take up to `limit` due jobs for `worker`, oldest due first (of the
        PBX `pbx_id` only, if given: its downloads go to that PBX).

        Due means `pending` with `next_attempt_at <= now`, or `downloading` under a claim
        that no one holds any more: its lease ran out (a crashed or stuck worker), or the
        process it names (`claim_process_id`) is stopped (a clean stop, or superseded by a
        restart of its node: see `processes.register`), gone, or has sent no heartbeat for
        `stale_after`. Claimed rows become `downloading` with `claimed_by=worker.name`,
        `claim_process_id=worker.process_id`, `claimed_until=now+lease` and one more
        attempt. No job is ever handed to two live workers at once.
        """
        now = to_utc(now)
        if limit <= 0:
            return []
        r, c, p = schema.recordings, schema.calls, schema.processes
        owner_alive = exists().where(
            p.c.id == r.c.claim_process_id,
            p.c.stopped_at.is_(None),
            p.c.heartbeat_at > now - stale_after,
        )
        due = or_(
            and_(
                r.c.state == schema.PENDING,
                or_(r.c.next_attempt_at.is_(None), r.c.next_attempt_at <= now),
            ),
            and_(
                r.c.state == schema.DOWNLOADING,
                or_(
                    r.c.claimed_until.is_(None),
                    r.c.claimed_until <= now,
                    and_(r.c.claim_process_id.is_not(None), ~owner_alive),
                ),
            ),
        )
        if pbx_id is not None:
            due = and_(r.c.pbx_id == pbx_id, due)
        pick = (
            select(r.c.id)
            .where(due)
            .order_by(r.c.next_attempt_at, r.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=r)
        )
        with self._db.write() as conn:
            ids = list(conn.execute(pick).scalars())
            if not ids:
                return []
            conn.execute(
                update(r)
                .where(r.c.id.in_(ids))
                .values(
                    state=schema.DOWNLOADING,
                    claimed_by=worker.name,
                    claim_process_id=worker.process_id,
                    claimed_until=now + lease,
                    attempts=r.c.attempts + 1,
                    updated_at=now,
                )
            )
            rows = conn.execute(
                select(
                    r.c.id,
                    r.c.name,
                    r.c.call_id,
                    c.c.callid,
                    c.c.pbx_serial,
                    c.c.start_at,
                    r.c.attempts,
                    r.c.missing_since,
                    c.c.timestart_local,
                    r.c.next_attempt_at,
                    r.c.created_at,
                )
                .join(c, c.c.id == r.c.call_id)
                .where(r.c.id.in_(ids))
            ).all()
        return [
            Job(
                recording_id=row.id,
                name=row.name,
                call_id=row.call_id,
                callid=row.callid,
                pbx_serial=row.pbx_serial,
                start_at=from_db(row.start_at),
                attempts=row.attempts,
                missing_since=from_db(row.missing_since),
                timestart_local=row.timestart_local,
                queued_at=from_db(row.created_at),
            )
            for row in sorted(rows, key=lambda row: (from_db(row.next_attempt_at) or now, row.id))
        ]

    def renew(self, recording_id: int, *, worker: Worker, now: datetime, lease: timedelta) -> bool:
        """Extend `worker`'s claim on a job it is still working on to `now + lease`.

        A worker renews while a download runs (every third of the lease), so a download
        longer than the lease is not claimed again by another worker. Only where the job is
        still `downloading` and claimed by `worker`; False (nothing changed) when the claim
        was lost meanwhile.
        """
        statement = (
            update(schema.recordings)
            .where(*_held_by(recording_id, worker))
            .values(claimed_until=to_utc(now) + lease)
        )
        with self._db.write() as conn:
            return bool(conn.execute(statement).rowcount == 1)

    def reserve_storage_key(self, recording_id: int, key: str) -> str | None:
        """Fix the storage key of a recording at its first attempt; return the one it has.

        The first key given for a recording wins and is kept for good (retries, requeues,
        other workers and processes all get it back), so a crash between storing the file
        and `mark_archived` leaves the file where the next attempt looks for it, even after
        the call's serial or start time were filled in by a later report. Until the
        recording is `archived` the key says where its file goes, not that it is there.
        None if there is no such recording.
        """
        return self._set_once(recording_id, "storage_key", key)

    def reserve_data_key(self, recording_id: int, sealed: str) -> str | None:
        """Fix the sealed data key of a recording to be stored encrypted, before its file
        is stored; return the one it has (the first given wins, like `reserve_storage_key`),
        so a crash between storing the file and `mark_archived` does not lose the key the
        stored file was encrypted with. None if there is no such recording."""
        return self._set_once(recording_id, "data_key", sealed)

    def _set_once(self, recording_id: int, column: str, value: str) -> str | None:
        """Set the recording's `column` to `value` unless it has one; the one it has now
        (None if there is no such recording)."""
        r = schema.recordings
        with self._db.write() as conn:
            conn.execute(
                update(r)
                .where(r.c.id == recording_id, r.c[column].is_(None))
                .values({column: value})
            )
            kept = conn.execute(
                select(r.c[column]).where(r.c.id == recording_id)
            ).scalar_one_or_none()
        return None if kept is None else str(kept)

    def reserved_data_key(self, recording_id: int) -> str | None:
        """The sealed data key reserved (or recorded) for a recording, if any."""
        r = schema.recordings
        with self._db.read() as conn:
            value = conn.execute(
                select(r.c.data_key).where(r.c.id == recording_id)
            ).scalar_one_or_none()
        return None if value is None else str(value)

    def mark_archived(
        self,
        recording_id: int,
        *,
        worker: Worker,
        size: int,
        sha256: str,
        storage_key: str,
        content_type: str,
        now: datetime,
        data_key: str | None = None,
    ) -> bool:
        """Record a durable copy. Only if `worker` still holds the claim (returns False
        otherwise, and changes nothing); clears the claim, the error and `missing_since`.
        `size` and `sha256` are the plaintext's (as the PBX sent it); `data_key`, sealed,
        is what the stored file is encrypted with (None: it is stored in clear)."""
        values = _archived(size, sha256, storage_key, content_type, to_utc(now), data_key)
        statement = (
            update(schema.recordings)
            .where(*_held_by(recording_id, worker))
            .values(**_NO_CLAIM, **values)
        )
        with self._db.write() as conn:
            return _attested(conn, statement, now) == 1

    def mark_archived_unclaimed(
        self,
        recording_id: int,
        *,
        size: int,
        sha256: str,
        storage_key: str,
        content_type: str,
        now: datetime,
        data_key: str | None = None,
    ) -> bool:
        """Record a durable copy made by a worker that lost its claim meanwhile.

        The bytes are stored, so the recording is archived unless it already is (then
        nothing changes and False is returned); whoever holds the claim now finds it
        archived and its own `mark_archived` changes nothing.
        """
        r = schema.recordings
        values = _archived(size, sha256, storage_key, content_type, to_utc(now), data_key)
        statement = (
            update(r)
            .where(r.c.id == recording_id, r.c.state != schema.ARCHIVED)
            .values(**_NO_CLAIM, **values)
        )
        with self._db.write() as conn:
            return _attested(conn, statement, now) == 1

    def mark_archived_many(self, copies: Sequence[ArchivedCopy], *, now: datetime) -> int:
        """Record many durable copies in one transaction (an import, a bulk load); recordings
        already archived are left as they are. Returns how many became archived."""
        if not copies:
            return 0
        r = schema.recordings
        values = _archived(0, "", "", "", to_utc(now))
        for name in ("size", "sha256", "storage_key", "content_type"):
            values[name] = bindparam(f"new_{name}")
        statement = (
            update(r)
            .where(r.c.id == bindparam("recording_id"), r.c.state != schema.ARCHIVED)
            .values(**_NO_CLAIM, **values)
        )
        rows = [
            {
                "recording_id": copy.recording_id,
                "new_size": copy.size,
                "new_sha256": copy.sha256,
                "new_storage_key": copy.storage_key,
                "new_content_type": copy.content_type,
            }
            for copy in copies
        ]
        r = schema.recordings
        ids = [copy.recording_id for copy in copies]
        attest = select(*_ATTESTED).where(
            r.c.id.in_(ids), r.c.audit_seq.is_(None), r.c.archived_at == values["archived_at"]
        )
        with self._db.write() as conn:
            conn.execute(statement, rows)  # (executemany: no RETURNING)
            return _attest(conn, conn.execute(attest).all(), now)

    def mark_retry(
        self,
        recording_id: int,
        *,
        worker: Worker,
        error: str,
        next_attempt_at: datetime,
        now: datetime,
        not_found: bool,
    ) -> bool:
        """Put a claimed job back to `pending`, due at `next_attempt_at`, with the error.

        `not_found` says the PBX answered "does not exist": `missing_since` is set on the
        first such answer of a run and kept after; any other error clears it.
        """
        now = to_utc(now)
        r = schema.recordings
        missing_since: Any = func.coalesce(r.c.missing_since, now) if not_found else None
        return self._finish(
            recording_id,
            worker,
            {
                "state": schema.PENDING,
                "last_error": error,
                "next_attempt_at": to_utc(next_attempt_at),
                "missing_since": missing_since,
                "updated_at": now,
            },
        )

    def mark_missing(
        self, recording_id: int, *, worker: Worker, reason: str, now: datetime
    ) -> bool:
        """Give up on a claimed job: the PBX says the file does not exist; `reason` says how
        long and what it answered. Only if `worker` still holds the claim."""
        return self._give_up(recording_id, schema.MISSING, worker, reason, now)

    def mark_failed(self, recording_id: int, *, worker: Worker, reason: str, now: datetime) -> bool:
        """Give up on a claimed job after transient errors (reconcile may `requeue` it)."""
        return self._give_up(recording_id, schema.FAILED, worker, reason, now)

    def requeue(
        self,
        states: Sequence[str],
        *,
        now: datetime,
        reset_attempts: bool = True,
        since: datetime | None = None,
        pbx_id: int | None = None,
    ) -> int:
        """Make every recording in `states` (only `failed` and/or `missing`) pending again,
        due at `now`; returns how many. The last error is kept until the next attempt.

        With `since`, only recordings the index learned of at or after it: the window is on
        the recording row's `created_at` (this machine's clock), not on the PBX's call time.
        "Does not exist" may have been a PBX still writing the file (a skewed clock, a wrong
        time zone), so recent give-ups can get another full window. With `pbx_id`, only
        that PBX's recordings.
        """
        now = to_utc(now)
        allowed = {schema.FAILED, schema.MISSING}
        if not set(states) <= allowed:
            raise ValueError(f"requeue takes only {sorted(allowed)}, not {sorted(states)}")
        if not states:
            return 0
        r = schema.recordings
        values: dict[str, Any] = {
            "state": schema.PENDING,
            "next_attempt_at": now,
            "missing_since": None,
            "updated_at": now,
            **_NO_CLAIM,
        }
        if reset_attempts:
            values["attempts"] = 0
        statement = update(r).where(r.c.state.in_(list(states)))
        if since is not None:
            statement = statement.where(r.c.created_at >= to_utc(since))
        if pbx_id is not None:
            statement = statement.where(r.c.pbx_id == pbx_id)
        with self._db.write() as conn:
            return int(conn.execute(statement.values(**values)).rowcount)

    def next_due(self, pbx_id: int | None = None) -> datetime | None:
        """When the earliest pending job (of the PBX `pbx_id`, if given) is due (None if
        there is none): a worker's nap."""
        r = schema.recordings
        query = select(func.min(r.c.next_attempt_at)).where(r.c.state == schema.PENDING)
        if pbx_id is not None:
            query = query.where(r.c.pbx_id == pbx_id)
        with self._db.read() as conn:
            value = conn.execute(query).scalar_one_or_none()
        return from_db(value)

    def _finish(self, recording_id: int, worker: Worker, values: Mapping[str, Any]) -> bool:
        statement = (
            update(schema.recordings)
            .where(*_held_by(recording_id, worker))
            .values(**_NO_CLAIM, **values)
        )
        with self._db.write() as conn:
            return bool(conn.execute(statement).rowcount == 1)

    def _give_up(
        self, recording_id: int, state: str, worker: Worker, reason: str, now: datetime
    ) -> bool:
        now = to_utc(now)
        return self._finish(
            recording_id,
            worker,
            {"state": state, "last_error": reason, "next_attempt_at": None, "updated_at": now},
        )


# The claim columns of a recording no one holds.
_NO_CLAIM: dict[str, Any] = {"claimed_by": None, "claimed_until": None, "claim_process_id": None}


def _held_by(recording_id: int, worker: Worker) -> tuple[ColumnElement[bool], ...]:
    """The recording is being downloaded under `worker`'s claim."""
    r = schema.recordings
    process = (
        r.c.claim_process_id.is_(None)
        if worker.process_id is None
        else r.c.claim_process_id == worker.process_id
    )
    return (
        r.c.id == recording_id,
        r.c.state == schema.DOWNLOADING,
        r.c.claimed_by == worker.name,
        process,
    )


# What an `ARCHIVE` audit entry attests of a recording.
_ATTESTED = (
    schema.recordings.c.id,
    schema.recordings.c.pbx_id,
    schema.recordings.c.name,
    schema.recordings.c.storage_key,
    schema.recordings.c.sha256,
    schema.recordings.c.size,
)


def _attested(conn: Connection, statement: Update, now: datetime) -> int:
    """Run `statement` (an update that archives recordings) and chain an `ARCHIVE` audit
    entry for each recording it archived; how many."""
    return _attest(conn, conn.execute(statement.returning(*_ATTESTED)).all(), now)


def _attest(conn: Connection, archived: Sequence[Any], now: datetime) -> int:
    """Chain an `ARCHIVE` entry for each of the `archived` rows (`_ATTESTED`) and point the
    recording at it; how many."""
    r = schema.recordings
    entries = [
        NewEntry(
            at=to_utc(now),
            actor=audit.SYSTEM_ACTOR,
            action=audit.ARCHIVE,
            target=str(row.name),
            detail=audit.attestation(
                int(row.id), int(row.pbx_id), row.name, row.storage_key, row.sha256, int(row.size)
            ),
        )
        for row in archived
    ]
    seqs = append(conn, entries)
    if seqs:
        conn.execute(
            update(r).where(r.c.id == bindparam("recording_id")).values(audit_seq=bindparam("seq")),
            [{"recording_id": row.id, "seq": seq} for row, seq in zip(archived, seqs, strict=True)],
        )
    return len(archived)


def _archived(
    size: int,
    sha256: str,
    storage_key: str,
    content_type: str,
    now: datetime,
    data_key: str | None = None,
) -> dict[str, Any]:
    """The column values of a recording whose durable copy is recorded at `now` (UTC)."""
    return {
        "state": schema.ARCHIVED,
        "data_key": data_key,
        "size": size,
        "sha256": sha256,
        "storage_key": storage_key,
        "content_type": content_type,
        "archived_at": now,
        "last_error": None,
        "next_attempt_at": None,
        "missing_since": None,
        "updated_at": now,
    }
