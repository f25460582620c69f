"""Plain data returned by and given to the index: jobs, workers, processes, recording rows,
search filters."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

# The extension ranges a user may see, as inclusive ``(lo, hi)`` pairs. None means every
# call; a list means only calls within one of its ranges, so an EMPTY list means none. The
# same meaning in SQL search (`SearchFilters.scope`) and in `users.in_scope`.
Scope = list[tuple[int, int]] | None


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What `index.calls.record` did with one call detail record.

    `recording_id` is None when the call has no recording; `new_recording` is True only when
    this call created the `recordings` row (a re-sent event or a backfill finds it existing).
    """

    call_id: int
    recording_id: int | None
    new_recording: bool


@dataclass(frozen=True, slots=True)
class ArchivedCopy:
    """A durable copy of a recording made outside the download queue (an import from
    another archive, a bulk load): what `index.jobs.mark_archived_many` records."""

    recording_id: int
    size: int
    sha256: str
    storage_key: str
    content_type: str


@dataclass(frozen=True, slots=True)
class Worker:
    """Who claims jobs: a worker `name` (unique among live workers, e.g. "p12:w0"; kept in
    `recordings.claimed_by`) of the registered process `process_id` (see
    `index.processes.register`). With `process_id` None (a library user, no registered
    process) only the lease protects the claim; with a process, the claim is also released
    as soon as that process is stopped, superseded by a restart, or its heartbeat is stale.
    """

    process_id: int | None
    name: str


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One row of `processes`: a running (or stopped) callvault process and its heartbeat."""

    id: int
    node: str
    kind: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    workers_configured: int
    workers_alive: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Lease:
    """One row of `pbx_leases`: the node that owns a PBX's API session, until when, and
    the fencing token of that ownership (see `index.leases`)."""

    pbx_id: int
    node: str | None  # None: released, free for any node
    token: int
    acquired_at: datetime | None
    expires_at: datetime | None

    def held(self, now: datetime) -> bool:
        """Whether some node holds it at `now` (not released, not expired)."""
        return self.node is not None and self.expires_at is not None and self.expires_at > now


@dataclass(frozen=True, slots=True)
class DayCount:
    """Calls started on one day (UTC)."""

    day: date
    calls: int


@dataclass(frozen=True, slots=True)
class Job:
    """A recording a worker has claimed and must download, then report with `mark_*`.

    `attempts` already counts this attempt. `start_at` is the call start, aware UTC (None
    when the PBX sent no usable `timestart`); `timestart_local` is the PBX's own text.
    """

    recording_id: int
    name: str
    call_id: int
    callid: str
    pbx_serial: str
    start_at: datetime | None
    attempts: int
    missing_since: datetime | None
    timestart_local: str = ""
    queued_at: datetime | None = None  # when the index learned of the recording


@dataclass(frozen=True, slots=True)
class RecordingRow:
    """One row of `recordings` joined with its call; column names as in `schema.py`.

    `id` is the recording's id and `call_id` the call's. Datetimes are aware UTC.
    """

    # recordings
    id: int
    name: str
    call_id: int
    pbx_id: int  # the PBX of the registry it came from (0: none)
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    claimed_by: str | None
    claimed_until: datetime | None
    claim_process_id: int | None
    missing_since: datetime | None
    size: int | None
    sha256: str | None
    storage_key: str | None
    content_type: str | None
    archived_at: datetime | None
    verified_at: datetime | None
    created_at: datetime
    updated_at: datetime
    audit_seq: int | None  # the audit chain's entry attesting it (see `index.audit`)
    deleted_at: datetime | None  # deleted (state "deleted"): when, and `deletion` why (JSON)
    purged_at: datetime | None  # ...and when its stored object was removed
    deletion: str | None
    # The data key the stored file is encrypted with, sealed (see `callvault.cipher` and
    # `callvault.keys`); None: stored in clear. Never logged or shown.
    data_key: str | None = field(repr=False)
    # calls
    callid: str
    pbx_serial: str
    start_at: datetime | None
    timestart_local: str
    call_from: str
    call_to: str
    duration_s: int | None
    talk_s: int | None
    direction: str
    status: str
    src_trunk: str
    dst_trunk: str
    did: str
    pincode: str
    agent_ring_s: int | None
    source: str
    first_seen_at: datetime
    raw: str

    @property
    def position(self) -> Position:
        """Where this row stands in a search's order: a cursor for the page after it."""
        return Position(self.start_at, self.id)


# The largest id a row can have on every engine (PostgreSQL's integer).
_MAX_ID = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a search's order (newest call first; calls without a start last; by
    recording id among equals): `index.recordings.search(..., after=position)` answers the
    page after it, as quickly at the millionth row as at the first (keyset paging).

    `token()` is its opaque text form for URLs; `Position.parse` reads it back.
    """

    start_at: datetime | None
    recording_id: int

    def token(self) -> str:
        when = "" if self.start_at is None else self.start_at.astimezone(UTC).isoformat()
        text = f"{when}|{self.recording_id}".encode()
        return base64.urlsafe_b64encode(text).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str) -> Position:
        """The position of a `token()`; ValueError for any other text, including one whose
        time or id no search could have answered."""
        try:
            text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            when, _, number = text.partition("|")
            moment = datetime.fromisoformat(when) if when else None
            if moment is not None and moment.tzinfo is None:
                raise ValueError("no offset")
            start_at = None if moment is None else moment.astimezone(UTC)
            recording_id = int(number)
        except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
            raise ValueError("not a position from a search") from None
        if not 0 < recording_id <= _MAX_ID:
            raise ValueError("not a position from a search")
        return cls(start_at, recording_id)


@dataclass(frozen=True, slots=True)
class Total:
    """How many recordings a search matches: `count` exactly when `exact`; otherwise more
    than `count` match (counting stops there, so that no page pays for counting millions)."""

    count: int
    exact: bool


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """What `index.recordings.search` and `.total` select; a field left at None matches all.

    - `since` / `until`: call start, aware datetimes; `since` inclusive, `until` exclusive.
    - `number`: part of the caller, callee or DID number (substring match, letters in any
      case).
    - `extension`: exactly the caller or the callee.
    - `direction` (Inbound/Outbound/Internal/...), `status` (ANSWERED/...), `state`
      (pending/.../archived): exact.
    - `min_talk_s`: talk time of at least that many seconds.
    - `scope`: the extension ranges a user may see (see `Scope`); a call matches when its
      caller or callee is an all-digit number inside one of them (no leading zero). None
      means no restriction; an empty list matches nothing.
    - `pbx_id`: the recordings of that PBX of the registry only.
    - `pbx_scope`: the PBXs (registry ids) a user may see; None means every PBX, an empty
      list none.
    """

    since: datetime | None = None
    until: datetime | None = None
    number: str | None = None
    extension: str | None = None
    direction: str | None = None
    status: str | None = None
    min_talk_s: int | None = None
    state: str | None = None
    scope: Scope = field(default=None)
    pbx_id: int | None = None
    pbx_scope: list[int] | None = None


@dataclass(frozen=True, slots=True)
class SubjectCall:
    """A call of a data subject's number, with its recording if it has one."""

    call_id: int
    pbx_id: int
    start_at: datetime | None
    call_from: str
    call_to: str
    did: str
    direction: str
    status: str
    recording_id: int | None
    recording_name: str | None
    recording_state: str | None
