"""Recordings as people and scripts see them: one shape for `list --json` and the web API."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from callvault.index import TOTAL_CAP, Index, Position, RecordingRow, SearchFilters
from callvault.index.schema import ARCHIVED
from callvault.ops._json import JsonResult

# Offsets skip rows one by one: past the first pages, page by position (`after`).
MAX_OFFSET = 1_000


@dataclass(frozen=True, slots=True)
class RecordingView(JsonResult):
    """A recording with its call. Times are UTC; `timestart_local` is the PBX's own text.
    `audio_url` and `download_url` (paths of the web API) are set once it is archived."""

    id: int
    name: str
    state: str
    call_id: int
    callid: str
    pbx: str  # the PBX's name in the registry ("" if it has none)
    pbx_kind: str  # its kind in the registry: s-series, cloud or p-series ("" if none)
    pbx_serial: str
    start_at: datetime | None
    timestart_local: str
    call_from: str
    call_to: str
    did: str
    direction: str
    status: str
    duration_s: int | None
    talk_s: int | None
    src_trunk: str
    dst_trunk: str
    size: int | None
    sha256: str | None
    content_type: str | None
    storage_key: str | None
    archived_at: datetime | None
    verified_at: datetime | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    audio_url: str | None
    download_url: str | None

    @classmethod
    def of(
        cls,
        row: RecordingRow,
        pbx_names: Mapping[int, str] | None = None,
        pbx_kinds: Mapping[int, str] | None = None,
    ) -> RecordingView:
        """The view of `row`; `pbx_names` and `pbx_kinds` (registry id to name, and to kind,
        read from the registry once: see `search_recordings`) name its PBX and its kind."""
        archived = row.state == ARCHIVED and row.storage_key is not None
        return cls(
            id=row.id,
            name=row.name,
            state=row.state,
            call_id=row.call_id,
            callid=row.callid,
            pbx=(pbx_names or {}).get(row.pbx_id, ""),
            pbx_kind=(pbx_kinds or {}).get(row.pbx_id, ""),
            pbx_serial=row.pbx_serial,
            start_at=row.start_at,
            timestart_local=row.timestart_local,
            call_from=row.call_from,
            call_to=row.call_to,
            did=row.did,
            direction=row.direction,
            status=row.status,
            duration_s=row.duration_s,
            talk_s=row.talk_s,
            src_trunk=row.src_trunk,
            dst_trunk=row.dst_trunk,
            size=row.size,
            sha256=row.sha256,
            content_type=row.content_type,
            storage_key=row.storage_key if archived else None,
            archived_at=row.archived_at,
            verified_at=row.verified_at,
            attempts=row.attempts,
            last_error=row.last_error,
            next_attempt_at=row.next_attempt_at,
            audio_url=f"/api/recordings/{row.id}/audio" if archived else None,
            download_url=f"/api/recordings/{row.id}/download" if archived else None,
        )


def pbx_names(index: Index) -> dict[int, str]:
    """The name of every PBX of the registry, by id (a handful of rows)."""
    return {record.id: record.name for record in index.pbxs.list()}


def pbx_id_of(index: Index, name: str) -> int:
    """The registry id of the PBX named `name`; NoSuchPbx (one line) if there is none."""
    return index.pbxs.require(name).id


@dataclass(frozen=True, slots=True)
class RecordingPage(JsonResult):
    """One page of a search, newest call first.

    `total` is how many recordings match in all, counted up to 1,000 unless an exact count
    was asked for: with `total_exact` false, more than `total` match. `next` is the cursor
    of the next page (give it as `after`), None on the last page.
    """

    total: int
    total_exact: bool
    limit: int
    offset: int
    next: str | None
    items: list[RecordingView]


def search_recordings(
    index: Index,
    filters: SearchFilters,
    *,
    limit: int,
    offset: int = 0,
    after: Position | None = None,
    exact_total: bool = False,
) -> RecordingPage:
    """One page of the recordings matching `filters`, after the position `after` (or
    `offset` rows in: keep that to the first pages), with how many match in all. `limit` 0
    means every match (`callvault list --limit 0`), counted exactly."""
    # The registry is a handful of rows, read once a page: never a query per row.
    registry = index.pbxs.list()
    names = {record.id: record.name for record in registry}
    kinds = {record.id: record.config.kind for record in registry}
    if limit == 0:
        every = index.recordings.search(filters, limit=2**62, offset=offset, after=after)
        whole = after is None and offset == 0
        return RecordingPage(
            total=len(every) if whole else index.recordings.total(filters, cap=None).count,
            total_exact=True,
            limit=0,
            offset=offset,
            next=None,
            items=[RecordingView.of(row, names, kinds) for row in every],
        )
    rows, total = index.recordings.page(
        filters, limit=limit + 1, offset=offset, after=after, cap=None if exact_total else TOTAL_CAP
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return RecordingPage(
        total=total.count,
        total_exact=total.exact,
        limit=limit,
        offset=offset,
        next=rows[-1].position.token() if more and rows else None,
        items=[RecordingView.of(row, names, kinds) for row in rows],
    )
