"""Plain data returned by and given to the index: jobs, recording rows, search filters."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What `Index.record_calls` did with one call detail record.

    `recording_id` is None when the call has no recording; `new_recording` is True only when
    this call created the `recordings` row (a re-sent event or a backfill finds it existing).
    """

    call_id: int
    recording_id: int | None
    new_recording: bool


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


@dataclass(frozen=True, slots=True)
class RecordingRow:
    """One row of `recordings` joined with its call; column names as in `schema.py`.

    `id` is the recording's id and `call_id` the call's. Datetimes are aware UTC.
    """

    # recordings
    id: int
    name: str
    call_id: int
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    claimed_by: str | None
    claimed_until: datetime | None
    missing_since: datetime | None
    size: int | None
    sha256: str | None
    storage_key: str | None
    content_type: str | None
    archived_at: datetime | None
    verified_at: datetime | None
    created_at: datetime
    updated_at: datetime
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


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """What `Index.search` and `Index.count` select; every field left at None matches all.

    - `since` / `until`: call start, aware datetimes; `since` inclusive, `until` exclusive.
    - `number`: part of the caller, callee or DID number (substring match).
    - `extension`: exactly the caller or the callee.
    - `direction` (Inbound/Outbound/Internal/...), `status` (ANSWERED/...), `state`
      (pending/.../archived): exact.
    - `min_talk_s`: talk time of at least that many seconds.
    - `scope`: the extension ranges a user may see, as inclusive ``(lo, hi)`` pairs; a call
      matches when its caller or callee is an all-digit number inside one of them. None means
      no restriction; an empty list matches nothing.
    """

    since: datetime | None = None
    until: datetime | None = None
    number: str | None = None
    extension: str | None = None
    direction: str | None = None
    status: str | None = None
    min_talk_s: int | None = None
    state: str | None = None
    scope: list[tuple[int, int]] | None = field(default=None)
