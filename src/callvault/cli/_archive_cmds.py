"""``callvault list``, ``status``, ``verify`` and ``requeue``: the archive for people and
scripts.

Each is a thin layer over the index and the storage. ``--json`` output:

- ``list --json``: ONE JSON array, one object per line, newest call first.
- ``status --json`` and ``verify --json``: one JSON object. ``verify`` lists ``mismatched``
  and ``missing`` archived recordings (these make it exit 1) and ``unindexed`` files
  (present in the archive but not known to the index as archived: reported, not an error).

Exit codes: 0 fine; 1 ``verify`` found mismatched or missing files, or the archive or its
index is missing or unreadable; 2 bad options.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer

from callvault.cli._app import app
from callvault.cli._common import fail
from callvault.cli._options import (
    ArchiveOption,
    ConfigOption,
    DbOption,
    ShowTimezoneOption,
)
from callvault.cli._settings import (
    ArchiveSettings,
    SettingsError,
    host_timezone,
    settings_or_fail,
)
from callvault.index import (
    Index,
    IndexFailure,
    IndexMissingError,
    RecordingRow,
    SearchFilters,
    SettingKey,
    open_index,
)
from callvault.index.schema import ARCHIVED, FAILED, MISSING, RECORDING_STATES
from callvault.storage import LocalStorage, UnsafeNameError


def open_archive(
    settings: ArchiveSettings, *, create_index: bool = False
) -> tuple[Index, LocalStorage]:
    """Open an EXISTING archive's index and storage, or exit with one clear line.

    With `create_index` an archive directory without an index yet gets an empty one
    (the user commands may run before anything is archived).
    """
    try:
        archive = settings.archive_dir()
        url = settings.db_url()
    except SettingsError as exc:
        fail(str(exc), code=2)
    if not archive.is_dir():
        fail(f"archive directory {archive} does not exist (check --archive)")
    try:
        index = open_index(url, create=create_index)
    except IndexMissingError as exc:
        fail(f"{exc}: nothing archived yet (run `callvault serve` or `callvault backfill`)")
    except IndexFailure as exc:
        fail(str(exc))
    return index, LocalStorage(archive)


def _saved_timezone(index: Index) -> str | None:
    """The PBX time zone serve/backfill saved in the index, if any (and a known zone)."""
    name = index.settings.get(SettingKey.PBX_TIMEZONE)
    if not name:
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return name


def display_timezone(settings: ArchiveSettings, index: Index) -> ZoneInfo:
    """The zone to show and read call times in: --timezone, CALLVAULT_TIMEZONE or the
    config file if given; else the PBX's zone as serve/backfill saved it; else the host's."""
    return ZoneInfo(settings.given_timezone() or _saved_timezone(index) or host_timezone())


def _parse_when(value: str, tz: ZoneInfo, *, end_of_day: bool) -> datetime:
    """A date (whole day, in zone `tz`) or an ISO date-time (naive = in zone `tz`)."""
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            if end_of_day:
                day += timedelta(days=1)
            return datetime.combine(day, time(), tzinfo=tz)
        moment = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        fail(f"bad date {value!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]", code=2)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)


def _iso(value: datetime | None, tz: ZoneInfo | None = None) -> str | None:
    if value is None:
        return None
    return (value.astimezone(tz) if tz else value.astimezone(UTC)).isoformat()


def _path_of(storage: LocalStorage, row: RecordingRow) -> str | None:
    """Where the archived file is; None until it is archived (the key of a pending
    recording names where it will go, not a file)."""
    if row.state != ARCHIVED or not row.storage_key:
        return None
    try:
        return str(storage.local_path(row.storage_key))
    except UnsafeNameError:
        return None


def _list_object(row: RecordingRow, storage: LocalStorage, tz: ZoneInfo) -> dict[str, Any]:
    return {
        "recording": row.name,
        "callid": row.callid,
        "state": row.state,
        "sha256": row.sha256,
        "size": row.size,
        "path": _path_of(storage, row),
        "start": _iso(row.start_at, tz),
        "from": row.call_from,
        "to": row.call_to,
        "type": row.direction,
        "status": row.status,
        "duration_s": row.duration_s,
        "talk_s": row.talk_s,
        "did": row.did,
        "pbx_serial": row.pbx_serial,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "archived_at": _iso(row.archived_at),
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


@app.command("list")
def list_command(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
    since: Annotated[
        str | None,
        typer.Option(help="Calls from this date or time, in the zone the times are shown in."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Calls up to this date (inclusive) or before this time (same zone)."),
    ] = None,
    number: Annotated[
        str | None, typer.Option(help="Part of the caller, callee or DID number.")
    ] = None,
    state: Annotated[
        str | None, typer.Option(help=f"Only this state: {', '.join(RECORDING_STATES)}.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many (0: all).", min=0)] = 100,
    timezone: ShowTimezoneOption = None,
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """List recordings, newest call first. Times are shown and read in the PBX's zone as
    serve/backfill saved it (the host's if none was saved), or in --timezone."""
    settings = settings_or_fail(config, archive=archive, db=db, timezone=timezone)
    if state is not None and state not in RECORDING_STATES:
        fail(f"unknown state {state!r}: use one of {', '.join(RECORDING_STATES)}", code=2)
    index, storage = open_archive(settings)
    with index:
        tz = display_timezone(settings, index)
        filters = SearchFilters(
            since=_parse_when(since, tz, end_of_day=False) if since else None,
            until=_parse_when(until, tz, end_of_day=True) if until else None,
            number=number or None,
            state=state,
        )
        rows = index.recordings.search(filters, limit=limit or 2**62)
        total = index.recordings.count(filters) if not json_output else len(rows)
    if json_output:
        objects = [json.dumps(_list_object(row, storage, tz), ensure_ascii=False) for row in rows]
        print("[" + ",\n".join(objects) + "]")
        return
    if not rows:
        print("no recordings match")
        return
    table = [
        [
            row.start_at.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")
            if row.start_at
            else row.timestart_local,
            row.state,
            row.call_from,
            row.call_to,
            row.direction,
            row.status,
            "" if row.size is None else str(row.size),
            row.name,
        ]
        for row in rows
    ]
    headers = [f"START ({tz.key})", "STATE", "FROM", "TO", "TYPE", "STATUS", "SIZE", "RECORDING"]
    print(_table(headers, table))
    if total > len(rows):
        print(f"({len(rows)} of {total}; use --limit 0 for all)")


def _failure_object(row: RecordingRow) -> dict[str, Any]:
    return {
        "recording": row.name,
        "callid": row.callid,
        "state": row.state,
        "attempts": row.attempts,
        "error": row.last_error,
        "next_attempt_at": _iso(row.next_attempt_at),
        "updated_at": _iso(row.updated_at),
    }


@app.command("status")
def status_command(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Counts by state, failures with reasons, last event time, PBX session health."""
    settings = settings_or_fail(config, archive=archive, db=db)
    index, _storage = open_archive(settings)
    with index:
        counts = index.recordings.counts_by_state()
        failures = index.recordings.recent_failures(20)
        retrying = index.recordings.retrying(20)
        last_event = index.settings.get(SettingKey.LAST_EVENT_AT)
        health_text = index.settings.get(SettingKey.PBX_HEALTH)
        pbx_timezone = _saved_timezone(index)
    health: Any = None
    if health_text is not None:
        try:
            health = json.loads(health_text)
        except ValueError:
            health = health_text
    report = {
        "archive": str(settings.archive_dir()),
        "counts": counts,
        "total": sum(counts.values()),
        "failures": [_failure_object(row) for row in failures],
        "retrying": [_failure_object(row) for row in retrying],
        "last_event_at": last_event,
        "pbx_health": health,
        "pbx_timezone": pbx_timezone,
    }
    if json_output:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return
    print(f"archive: {report['archive']}")
    print(
        "recordings: "
        + ", ".join(f"{state} {counts[state]}" for state in RECORDING_STATES)
        + f" (total {report['total']})"
    )
    print(f"last event: {last_event or 'none received yet'}")
    print(f"PBX time zone: {pbx_timezone or 'not saved yet (serve or backfill saves it)'}")
    if health is None:
        print("PBX session: unknown (serve has not reported yet)")
    elif isinstance(health, dict):
        print(f"PBX session: {_describe_health(health)}")
    else:
        print(f"PBX session: {health}")
    for title, rows in (("given up", failures), ("retrying", retrying)):
        if rows:
            print(f"{title}:")
            for row in rows:
                print(f"  {row.state:<8} {row.name}  attempts={row.attempts}  {row.last_error}")


def _describe_health(health: dict[str, Any]) -> str:
    """`{"state": "ok", "last_success_at": ...}` as a line for people."""
    words = str(health.get("state", "unknown"))
    if health.get("error"):
        words += f": {health['error']}"
    if health.get("last_success_at"):
        words += f" (last answer from the PBX {health['last_success_at']})"
    if health.get("updated_at"):
        words += f", reported {health['updated_at']}"
    return words


def _verify(index: Index, storage: LocalStorage, now: datetime) -> dict[str, Any]:
    checked = ok = 0
    mismatched: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    known: set[str] = set()
    for row in index.recordings.archived():
        if row.state != ARCHIVED:
            continue
        checked += 1
        if row.storage_key:
            known.add(row.storage_key)
        path = _path_of(storage, row)
        if row.storage_key is None or path is None:
            missing.append({"recording": row.name, "path": None, "reason": "no valid storage key"})
            continue
        try:
            stored = storage.checksum(row.storage_key)
        except FileNotFoundError:
            missing.append({"recording": row.name, "path": path, "reason": "file not found"})
            continue
        except OSError as exc:
            missing.append({"recording": row.name, "path": path, "reason": exc.strerror})
            continue
        if stored.sha256 != row.sha256 or stored.size != row.size:
            mismatched.append(
                {
                    "recording": row.name,
                    "path": path,
                    "expected_sha256": row.sha256,
                    "actual_sha256": stored.sha256,
                    "expected_size": row.size,
                    "actual_size": stored.size,
                }
            )
            continue
        index.recordings.mark_verified(row.id, now)
        ok += 1
    # Files no archived recording points to: harmless (e.g. a crash between the durable
    # write and the index update; the next attempt finds the same bytes), but worth seeing.
    unindexed = [str(storage.local_path(key)) for key in storage.list() if key not in known]
    return {
        "checked": checked,
        "ok": ok,
        "mismatched": mismatched,
        "missing": missing,
        "unindexed": unindexed,
    }


@app.command("verify")
def verify_command(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Re-hash every archived file; report mismatched or missing ones (exit 1 if any) and
    files the index does not know."""
    settings = settings_or_fail(config, archive=archive, db=db)
    index, storage = open_archive(settings)
    with index:
        report = _verify(index, storage, datetime.now(UTC))
    problems = len(report["mismatched"]) + len(report["missing"])
    if json_output:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        for item in report["mismatched"]:
            print(
                f"MISMATCH {item['recording']}  {item['path']}  "
                f"expected sha256 {item['expected_sha256']} size {item['expected_size']}, "
                f"found sha256 {item['actual_sha256']} size {item['actual_size']}"
            )
        for item in report["missing"]:
            print(f"MISSING  {item['recording']}  {item['path'] or '-'}  ({item['reason']})")
        for path in report["unindexed"]:
            print(f"UNINDEXED {path}  (a file no archived recording points to; kept)")
        print(
            f"verified {report['checked']} archived recordings: {report['ok']} ok, "
            f"{len(report['mismatched'])} mismatched, {len(report['missing'])} missing"
            + (f"; {len(report['unindexed'])} unindexed files" if report["unindexed"] else "")
        )
    if problems:
        sys.stdout.flush()
        raise typer.Exit(1)


_REQUEUE_STATES = (FAILED, MISSING)


@app.command("requeue")
def requeue_command(
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="Which give-ups to queue again: failed, missing (repeatable; default both).",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only recordings first queued on or after this date or time (in the PBX's "
            "zone as serve/backfill saved it, or CALLVAULT_TIMEZONE)."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Queue given-up recordings again (after fixing --timezone, the PBX, the network...).

    `failed` ones are also queued again by serve's hourly reconciliation; `missing` ones
    (the PBX kept saying the file does not exist) only by this command. A running
    `callvault serve` downloads them at once, each with a fresh run of attempts.
    """
    settings = settings_or_fail(config, archive=archive, db=db)
    states = list(dict.fromkeys(state or _REQUEUE_STATES))
    unknown = [s for s in states if s not in _REQUEUE_STATES]
    if unknown:
        fail(f"--state {unknown[0]!r}: only failed and missing can be queued again", code=2)
    index, _storage = open_archive(settings)
    now = datetime.now(UTC)
    with index:
        tz = display_timezone(settings, index)
        first = _parse_when(since, tz, end_of_day=False) if since else None
        counts = {s: index.jobs.requeue([s], now=now, since=first) for s in states}
    if json_output:
        print(json.dumps({"requeued": counts, "since": _iso(first)}))
        return
    what = ", ".join(f"{counts[s]} {s}" for s in states)
    print(f"queued again: {what}; a running `callvault serve` downloads them now")
