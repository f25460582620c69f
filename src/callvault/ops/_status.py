"""The archive's status: what `callvault status` prints and `GET /api/status` answers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from callvault.archive import NODE_KIND, PASSWORD_UNOPENED
from callvault.index import DEFAULT_STALE_AFTER, ProcessInfo, RecordingRow, SettingKey
from callvault.index.schema import RECORDING_STATES
from callvault.ops._archive import Archive
from callvault.ops._json import JsonResult
from callvault.storage import StorageUsage
from callvault.times import ago, iso_moment

# The process kind of `callvault serve` in the process registry.
SERVE = "serve"
# Below this share of free disk, the status says the disk is almost full.
LOW_DISK_SHARE = 0.10
# How the session's summary starts for a registered PBX no serve archives, with why: one
# leaves it out (its master keys cannot open its password, `PASSWORD_UNOPENED`), or the
# one that archived it stopped.
_NOT_ARCHIVED = "not archived: "


@dataclass(frozen=True, slots=True)
class Failure:
    """A recording given up on, or waiting for another attempt, with the reason."""

    id: int
    name: str
    state: str
    attempts: int
    error: str | None
    next_attempt_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: RecordingRow) -> Failure:
        return cls(
            row.id,
            row.name,
            row.state,
            row.attempts,
            row.last_error,
            row.next_attempt_at,
            row.updated_at,
        )


@dataclass(frozen=True, slots=True)
class PbxSessionStatus:
    """The archiver's session with the PBX, as `serve` last reported it.

    `state`: ok, connecting, degraded, error, stopped, or unknown (never reported).
    `summary` says it in words, e.g. "logged in, last contact 2 min ago".
    """

    state: str
    error: str | None
    last_contact_at: datetime | None
    reported_at: datetime | None
    summary: str


@dataclass(frozen=True, slots=True)
class PbxStatus:
    """A PBX of the registry and its session, as the serve archiving it last reported."""

    name: str
    serial: str
    session: PbxSessionStatus
    node: str | None = None  # the node that holds it (works on it) now, if any
    kind: str = "s-series"  # which API it speaks: s-series, cloud or p-series
    # The zone of its local times as registered; None: the deployment's (`pbx_timezone`).
    timezone: str | None = None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A live `serve` node (its own row in the process registry) and the PBXs it holds."""

    name: str
    hostname: str
    heartbeat_at: datetime
    pbxs: list[str]


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """A callvault process that works on the archive (serve, backfill), from its heartbeat."""

    id: int
    node: str
    kind: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    alive: bool
    workers_configured: int
    workers_alive: int


@dataclass(frozen=True, slots=True)
class WorkerCount:
    """Download workers of the live `serve` processes: how many should run, how many do."""

    configured: int
    alive: int


@dataclass(frozen=True, slots=True)
class ArchiveStatus(JsonResult):
    """Everything an operator checks first. `calls` exceeds the recordings by the calls
    that had no recording (not recorded, unanswered); `index_problems` is empty when the
    index's quick check finds nothing."""

    archive: str
    checked_at: datetime
    recordings: dict[str, int]
    recordings_total: int
    calls: int
    calls_with_recording: int
    calls_without_recording: int
    bytes_stored: int
    storage: StorageUsage | None
    failures: list[Failure]
    retrying: list[Failure]
    last_event_at: datetime | None
    # The session of the PBX (with several PBXs: the one in the worst state, named).
    pbx_session: PbxSessionStatus
    # Every PBX of the registry with its own session.
    pbxs: list[PbxStatus]
    # The live serve nodes, each with the PBXs it works on.
    nodes: list[NodeStatus]
    pbx_timezone: str | None
    workers: WorkerCount
    processes: list[ProcessStatus]
    index_problems: list[str]
    # Whether `callvault serve` works on the archive: "running", "stopped" (one ran here,
    # none is live now) or "never".
    serve: str
    # What an operator should look at, most urgent first; empty when all is well.
    attention: list[str]

    @property
    def disk_free_share(self) -> float | None:
        """The share of the disk still free, if the storage says (a bucket has no size)."""
        usage = self.storage
        if usage is None or not usage.total or usage.free is None:
            return None
        return usage.free / usage.total


def archive_status(
    archive: Archive,
    *,
    now: datetime,
    failures: int = 20,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    pbx_id: int | None = None,
) -> ArchiveStatus:
    """The archive's status now (reads the index; the quick check costs seconds on a very
    large SQLite file); with `pbx_id`, the recordings, calls, failures and session of that
    PBX only (the nodes and processes stay the deployment's)."""
    index = archive.index
    problems = index.check(quick=True)
    counts = index.recordings.counts_by_state(pbx_id=pbx_id)
    calls, recorded = index.recordings.call_totals(pbx_id=pbx_id)
    timezone = archive.saved_timezone()
    # Every live process (a fleet has one per node and one per PBX it works on), then the
    # latest of the others, up to 20 rows in all.
    live = index.processes.live(now=now, stale_after=stale_after)
    live_ids = {info.id for info in live}
    recent = [info for info in index.processes.all(limit=20) if info.id not in live_ids]
    processes = [
        _process(info, now=now, stale_after=stale_after)
        for info in sorted(live, key=lambda info: info.id, reverse=True)
        + recent[: max(0, 20 - len(live))]
    ]
    live_serves = [p for p in processes if p.kind == SERVE and p.alive]
    live_nodes = [p for p in processes if p.kind == NODE_KIND and p.alive]
    serve_known = any(p.kind in (SERVE, NODE_KIND) for p in processes)
    serve = "running" if live_serves or live_nodes else ("stopped" if serve_known else "never")
    running = bool(live_serves or live_nodes) if serve_known else None
    registered = index.pbxs.list()
    records = [r for r in registered if pbx_id is None or r.id == pbx_id]
    # Every PBX's name: the nodes' lines list all the PBXs each holds, even with `pbx_id`.
    names = {record.id: record.name for record in registered}
    holders = {
        lease.pbx_id: lease.node
        for lease in index.leases.all()
        if lease.held(now) and lease.node is not None
    }
    pbxs = [
        PbxStatus(
            record.name,
            record.serial,
            _session(record.session or None, now=now, serve_running=running, legacy=False),
            holders.get(record.id),
            record.config.kind,
            record.config.timezone or None,
        )
        for record in records
    ]
    if pbx_id is not None and pbxs and pbxs[0].timezone is not None:
        zone: str | None = pbxs[0].timezone  # that PBX's own
    else:
        zone = timezone.key if timezone is not None else None
    nodes = [
        NodeStatus(
            info.node,
            info.hostname,
            info.heartbeat_at,
            sorted(
                names.get(held, f"pbx-{held}")
                for held, node in holders.items()
                if node == info.node
            ),
        )
        for info in sorted(live_nodes, key=lambda info: info.node)
    ]
    status = ArchiveStatus(
        archive=archive.storage.describe(),
        checked_at=now,
        recordings={state: counts.get(state, 0) for state in RECORDING_STATES},
        recordings_total=sum(counts.values()),
        calls=calls,
        calls_with_recording=recorded,
        calls_without_recording=max(0, calls - recorded),
        bytes_stored=index.recordings.bytes_stored(pbx_id=pbx_id),
        storage=archive.storage.usage(),
        failures=[
            Failure.of(row) for row in index.recordings.recent_failures(failures, pbx_id=pbx_id)
        ],
        retrying=[Failure.of(row) for row in index.recordings.retrying(failures, pbx_id=pbx_id)],
        last_event_at=iso_moment(index.settings.get(SettingKey.LAST_EVENT_AT)),
        pbx_session=_overall(
            pbxs,
            _session(archive.saved_json(SettingKey.PBX_HEALTH), now=now, serve_running=running),
        ),
        pbxs=pbxs,
        nodes=nodes,
        pbx_timezone=zone,
        workers=WorkerCount(
            configured=sum(p.workers_configured for p in live_serves),
            alive=sum(p.workers_alive for p in live_serves),
        ),
        processes=processes,
        index_problems=problems,
        serve=serve,
        attention=[],
    )
    return replace(status, attention=_attention(status))


def _plural(count: int, one: str) -> str:
    return f"{count} {one if count == 1 else one + 's'}"


def _attention(status: ArchiveStatus) -> list[str]:
    """What an operator should look at, most urgent first; empty when all is well."""
    from callvault.ops._words import human_size

    notes: list[str] = []
    if status.index_problems:
        notes.append("The index is damaged: check it and restore it from a backup.")
    if status.serve == "stopped":
        notes.append("serve is not running: new calls are not archived until it is started.")
    elif status.serve == "never":
        notes.append(
            "No callvault serve has run on this archive: nothing is archived as calls happen."
        )
    elif len(status.pbxs) > 1:
        for pbx in status.pbxs:
            if pbx.session.state == "unknown":
                notes.append(
                    f"No serve reports on PBX {pbx.name}: start one for it "
                    f"(`callvault serve --only {pbx.name}`)."
                )
            elif _not_archived(pbx.session):
                notes.append(f"PBX {pbx.name} is {pbx.session.summary}.")
            elif pbx.session.state not in ("ok", "connecting"):
                notes.append(f"The session with PBX {pbx.name} is {pbx.session.summary}.")
    elif len(status.pbxs) == 1 and _not_archived(status.pbx_session):
        notes.append(f"PBX {status.pbxs[0].name} is {status.pbx_session.summary}.")
    elif status.pbx_session.state not in ("ok", "connecting"):
        notes.append(f"The PBX session is {status.pbx_session.summary}.")
    workers = status.workers
    if status.serve == "running" and workers.alive < workers.configured:
        verb = "is" if workers.alive == 1 else "are"
        notes.append(
            f"Only {workers.alive} of {workers.configured} download workers {verb} running."
        )
    given_up = status.recordings.get("failed", 0) + status.recordings.get("missing", 0)
    if given_up:
        was = "was" if given_up == 1 else "were"
        notes.append(
            f"{_plural(given_up, 'recording')} {was} given up on: the reasons are below; "
            "queue them again once the cause is fixed."
        )
    free = status.disk_free_share
    if free is not None and free < LOW_DISK_SHARE and status.storage is not None:
        notes.append(f"The disk is almost full: {human_size(status.storage.free)} free.")
    return notes


def _not_archived(session: PbxSessionStatus) -> bool:
    """Whether no serve archives the PBX, with a reason: one leaves it out (it cannot open
    its password), or the one that archived it stopped (see `_session`)."""
    return session.summary.startswith(_NOT_ARCHIVED)


def _process(info: ProcessInfo, *, now: datetime, stale_after: timedelta) -> ProcessStatus:
    alive = info.stopped_at is None and now - info.heartbeat_at <= stale_after
    return ProcessStatus(
        id=info.id,
        node=info.node,
        kind=info.kind,
        hostname=info.hostname,
        pid=info.pid,
        started_at=info.started_at,
        heartbeat_at=info.heartbeat_at,
        stopped_at=info.stopped_at,
        alive=alive,
        workers_configured=info.workers_configured,
        workers_alive=info.workers_alive if alive else 0,
    )


# From the worst to the best: the PBX whose session stands first is the one to look at.
_SESSION_ORDER = ("error", "degraded", "stopped", "unknown", "connecting", "ok")


def _overall(pbxs: list[PbxStatus], before: PbxSessionStatus) -> PbxSessionStatus:
    """The archive's PBX session in one: the only PBX's; with several, the worst one's,
    named; with none in the registry, `before` (what serve kept before there was one)."""
    if not pbxs:
        return before
    if len(pbxs) == 1:
        return pbxs[0].session

    def rank(pbx: PbxStatus) -> int:
        state = pbx.session.state
        return _SESSION_ORDER.index(state) if state in _SESSION_ORDER else 0

    worst = min(pbxs, key=rank)
    working = sum(1 for pbx in pbxs if pbx.session.state == "ok")
    session = worst.session
    summary = f"{worst.name}: {session.summary} ({working} of {len(pbxs)} PBX sessions ok)"
    return replace(session, summary=summary)


def _session(
    health: Any, *, now: datetime, serve_running: bool | None, legacy: bool = True
) -> PbxSessionStatus:
    """The PBX session from the health `serve` wrote, in words. `serve_running` is None
    when no serve has registered with this index (an archive from before process rows).
    Without `legacy` (a PBX of the registry, not the setting of before), a PBX without
    health while a serve runs is one no serve has worked on yet."""
    if not isinstance(health, dict) and not legacy and serve_running:
        return PbxSessionStatus(
            "unknown", None, None, None, "no serve has reported on it (none archives it?)"
        )
    if not isinstance(health, dict):
        if serve_running:
            return PbxSessionStatus("connecting", None, None, None, "serve is starting")
        if serve_running is False:
            return PbxSessionStatus("stopped", None, None, None, "serve is not running")
        return PbxSessionStatus(
            "unknown", None, None, None, "unknown: no callvault serve has run on this archive"
        )
    state = str(health.get("state") or "unknown")
    error = health.get("error") if isinstance(health.get("error"), str) else None
    contact = iso_moment(health.get("last_success_at"))
    reported = iso_moment(health.get("updated_at"))
    last = f"last contact {ago(contact, now)}" if contact else "no contact yet"
    if serve_running is False and state != "stopped":
        summary = f"serve is not running (its last report, {ago(reported, now)}: {state})"
        return PbxSessionStatus("stopped", error, contact, reported, summary)
    if state == "error" and health.get("reason") == PASSWORD_UNOPENED:
        # A serve node's master keys do not open its password: it leaves it out and says
        # why (`callvault.archive`); the error says which key, and how to add it.
        node = health.get("node")
        who = f"node {node}" if isinstance(node, str) and node else "serve"
        summary = f"{_NOT_ARCHIVED}{who} cannot open its password: {error}"
        return PbxSessionStatus(state, error, contact, reported, summary)
    said = error
    if state == "error" and health.get("reason") == "login-refused":
        # A refused login (serve's session, `callvault.archive._session`): when serve tries
        # again, and what to do about it.
        retry_at = iso_moment(health.get("retry_at"))
        fix = health.get("fix") if isinstance(health.get("fix"), str) else None
        if retry_at is not None:
            said = f"{said}; next login attempt {_due(retry_at, now)}"
        if fix:
            said = f"{said}; to fix it: {fix}"
    words = {
        "ok": f"logged in, {last}",
        "connecting": "logging in",
        "degraded": f"logged in, but the last request failed: {error}; {last}",
        "error": f"not working: {said}; {last}",
        # While another serve runs: the one that archived this PBX stopped.
        "stopped": f"{_NOT_ARCHIVED}the serve that archived it stopped {ago(reported, now)}; "
        f"{last}",
    }
    return PbxSessionStatus(state, error, contact, reported, words.get(state, f"{state}; {last}"))


def _due(moment: datetime, now: datetime) -> str:
    """When something serve will do is due: "in 14 min", "in under a minute", "due now"."""
    seconds = (moment - now).total_seconds()
    if seconds <= 0:
        return "due now"
    return ago(moment, now) if seconds >= 45 else "in under a minute"
