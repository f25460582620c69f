"""``callvault list``, ``status``, ``verify`` and ``requeue``: the archive for people and
scripts.

Each is a thin layer over `callvault.ops`; ``--json`` prints the result's JSON, the same
shape the web API answers (``list --json`` is a page like ``GET /api/recordings``,
``status --json`` is ``GET /api/status``).

Exit codes: 0 fine; 1 ``verify`` found mismatched or missing files, or the archive or its
index is missing, unreadable or damaged; 2 bad options.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import click

from callvault.cli._app import CONTEXT_SETTINGS, app
from callvault.cli._common import cli_actor, counting_bar, fail, plural
from callvault.cli._options import (
    PATH,
    archive_options,
    flag,
    json_option,
    option,
    show_timezone_option,
    storage_option,
)
from callvault.cli._settings import (
    USAGE_ERROR,
    Settings,
    SettingsError,
    host_timezone,
    settings_or_fail,
)
from callvault.index import Position, SearchFilters
from callvault.index.schema import RECORDING_STATES
from callvault.ops import Archive, ArchiveError, open_archive

if TYPE_CHECKING:
    from callvault.index.pbxs import PbxRecord
    from callvault.ops import ArchiveStatus
from callvault.times import FORMATS, TimeFormatError, parse_moment


def open_settings_archive(
    settings: Settings, *, create: bool = False, check: bool = False, keys: bool = False
) -> Archive:
    """The archive the settings name, or exit with one clear line.

    With `keys`, the master keys (if any are set) are loaded into it: they open encrypted
    recordings (`verify`, exports); keys that are set but unusable end it with one line.

    With `check`, the index's quick check runs first (seconds on a very large SQLite file):
    commands that change the index (requeue, users, tokens) must not report success on a
    damaged one whose damage their own statements happen not to touch.
    """
    try:
        directory = settings.archive_dir()
        url = settings.db_url()
        keyring = settings.optional_keyring() if keys else None
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)
    try:
        opened = open_archive(
            directory, url, create=create, storage_url=settings.storage, keyring=keyring
        )
    except ArchiveError as exc:
        fail(str(exc))
    if check:
        problems = opened.index.check(quick=True)
        if problems:
            opened.close()
            fail(damaged_message(url, problems))
    return opened


def damaged_message(url: str, problems: list[str]) -> str:
    """One line: the index is damaged, what SQLite said, what to do."""
    from callvault.index import sqlite_path

    path = sqlite_path(url)
    where = f"sqlite3 {path} 'PRAGMA integrity_check'" if path else "the database's own checks"
    said = "; ".join(problems)[:200]
    return f"the index is damaged ({said}): check it with `{where}` and restore it from a backup"


def display_timezone(settings: Settings, archive: Archive) -> ZoneInfo:
    """The zone to show and read call times in: --timezone, CALLVAULT_TIMEZONE or the
    config file if given; else the PBX's zone as serve/backfill saved it; else the host's."""
    given = settings.given_timezone()
    if given:
        return ZoneInfo(given)
    return archive.saved_timezone() or ZoneInfo(host_timezone())


def _moment(flag: str, value: str | None, tz: ZoneInfo, *, end: bool) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_moment(value, tz, end=end, name=flag)
    except TimeFormatError as exc:
        fail(str(exc), code=USAGE_ERROR)


def _located(archive: Archive, key: str | None) -> str:
    """Where a stored object is, for people (a file path); "-" when there is no key."""
    if not key:
        return "-"
    try:
        return archive.storage.locate(key)
    except ValueError:  # a key that is not valid: show it as it is
        return key


def _print_json(value: dict[str, Any]) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


@app.command("list")
@json_option
@option("--since", metavar="TIME", help=f"Calls that started from this time: {FORMATS}.")
@option("--until", metavar="TIME", help="...and before this time (a date: through that day).")
@option("--number", metavar="DIGITS", help="Part of the caller, callee or DID number.")
@option("--state", metavar="STATE", help=f"Only this state: {', '.join(RECORDING_STATES)}.")
@option("--pbx", metavar="NAME", help="Only this PBX of the registry (`callvault pbx list`).")
@option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    metavar="N",
    show_default=True,
    help="At most this many (0: all).",
)
@option(
    "--after",
    metavar="CURSOR",
    help="The page after this cursor (the `next` of `list --json`, or the one printed).",
)
@show_timezone_option
@archive_options
def list_command(
    json_output: bool,
    since: str | None,
    until: str | None,
    number: str | None,
    state: str | None,
    pbx: str | None,
    limit: int,
    after: str | None,
    timezone: str | None,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """List recordings, newest call first (with their PBX when the registry has several).

    Times are shown and read in the PBX's zone as serve/backfill saved it (the host's if
    none was saved), or in --timezone.
    """
    settings = settings_or_fail(config, archive=archive, db=db, timezone=timezone)
    if state is not None and state not in RECORDING_STATES:
        fail(f"unknown state {state!r}: use one of {', '.join(RECORDING_STATES)}", code=2)
    position = None
    if after:
        try:
            position = Position.parse(after)
        except ValueError:
            fail(
                "--after: not a cursor of a search: give the `next` of `list --json`, or "
                "the cursor `list` printed",
                code=2,
            )
    with open_settings_archive(settings) as opened:
        tz = display_timezone(settings, opened)
        registered = opened.index.pbxs.list()
        names = {record.id: record.name for record in registered}
        kinds = {record.id: record.config.kind for record in registered}
        pbx_id = None
        if pbx is not None:
            pbx_id = next((key for key, name in names.items() if name == pbx), None)
            if pbx_id is None:
                known = ", ".join(sorted(names.values())) or "none is registered"
                fail(f"--pbx: no PBX named {pbx!r} ({known})", code=2)
        filters = SearchFilters(
            since=_moment("--since", since, tz, end=False),
            until=_moment("--until", until, tz, end=True),
            number=number or None,
            state=state,
            pbx_id=pbx_id,
        )
        if json_output:  # scripts get the total and the next page's cursor, as from the API
            from callvault.ops import search_recordings

            page = search_recordings(opened.index, filters, limit=limit, after=position)
            _print_json(page.to_json())
            return
        # One row more than shown says whether there are more, without counting them.
        rows = opened.index.recordings.search(
            filters, limit=limit + 1 if limit else 2**62, after=position
        )
        more = bool(limit) and len(rows) > limit
        rows = rows[:limit] if limit else rows
    if not rows:
        print("no recordings match")
        return
    several = len(names) > 1
    table = [
        [f"{names.get(row.pbx_id, '')} ({kinds.get(row.pbx_id, '?')})"] * several
        + [
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
    headers = ["PBX"] * several + [
        f"START ({tz.key})",
        "STATE",
        "FROM",
        "TO",
        "TYPE",
        "STATUS",
        "SIZE",
        "RECORDING",
    ]
    print(_table(headers, table))
    if more:
        print(
            f"(more match: the next {len(rows)} with --after {rows[-1].position.token()}; "
            "or use --limit N, --limit 0 for all)"
        )


@app.command("status")
@option("--pbx", metavar="NAME", help="Only this PBX's recordings, calls and session.")
@json_option
@archive_options
@storage_option
def status_command(
    pbx: str | None,
    json_output: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
    storage: str | None,
) -> None:
    """The archive at a glance: recordings by state, failures with reasons, the PBX
    session, the workers of serve, the last event, disk use and the index's health."""
    settings = settings_or_fail(config, archive=archive, db=db, storage=storage)
    with open_settings_archive(settings) as opened:
        from callvault.ops import archive_status

        record = _pbx_named(opened, pbx)
        status = archive_status(
            opened, now=datetime.now(UTC), pbx_id=None if record is None else record.id
        )
    if json_output:
        _print_json(status.to_json())
    else:
        print_status(status)
    if status.index_problems:
        raise SystemExit(1)


def print_status(status: ArchiveStatus) -> None:
    """The status as lines for people."""
    from callvault.ops import human_size
    from callvault.times import ago

    now = status.checked_at
    counts = status.recordings
    print(f"archive: {status.archive}")
    if status.attention:
        print("needs attention:")
        for note in status.attention:
            print(f"  - {note}")
    print(
        "recordings: "
        + ", ".join(f"{state} {counts[state]}" for state in RECORDING_STATES)
        + f" (total {status.recordings_total})"
    )
    print(
        f"calls: {status.calls} ({status.calls_with_recording} with a recording, "
        f"{status.calls_without_recording} without: not recorded or not answered)"
    )
    several_nodes = len(status.nodes) > 1
    if len(status.pbxs) > 1:
        print("PBX sessions:")
        for pbx in status.pbxs:
            where = f" (on {pbx.node})" if several_nodes and pbx.node else ""
            print(f"  {pbx.name:<16} {pbx.kind:<9} {pbx.session.summary}{where}")
    else:
        print(f"PBX session: {status.pbx_session.summary}")
    if several_nodes:
        print("nodes:")
        for node in status.nodes:
            held = ", ".join(node.pbxs) or "no PBX"
            beat = ago(node.heartbeat_at, now)
            print(f"  {node.name:<16} {node.hostname}, heartbeat {beat}: {held}")
    workers = status.workers
    if status.serve == "running":
        print(f"download workers: {workers.alive} of {workers.configured} running")
    last_event = status.last_event_at
    print(f"last event: {ago(last_event, now) if last_event else 'none received yet'}")
    saved = status.pbx_timezone or "not saved yet (serve or backfill saves it)"
    if len(status.pbxs) > 1:
        zones = ", ".join(f"{pbx.name} {pbx.timezone or saved}" for pbx in status.pbxs)
        print(f"PBX time zones: {zones}")
    else:
        print(f"PBX time zone: {saved}")
    print(f"stored: {human_size(status.bytes_stored)}" + _disk(status))
    if status.index_problems:
        print(f"INDEX DAMAGED: {'; '.join(status.index_problems)[:300]}")
        print("  check it with `sqlite3 FILE 'PRAGMA integrity_check'`; restore it from a backup")
    else:
        print("index: ok (quick check)")
    for title, rows in (("given up", status.failures), ("retrying", status.retrying)):
        if rows:
            print(f"{title}:")
            for row in rows:
                print(f"  {row.state:<8} {row.name}  attempts={row.attempts}  {row.error}")


def _disk(status: ArchiveStatus) -> str:
    usage = status.storage
    if usage is None or usage.free is None:
        return ""
    from callvault.ops import human_size

    return f" ({human_size(usage.free)} free on its disk)"


def _pbx_named(opened: Archive, name: str | None) -> PbxRecord | None:
    """The registered PBX `--pbx` names (None without one); exits 2 for a name it lacks."""
    if name is None:
        return None
    from callvault.index.pbxs import NoSuchPbx

    try:
        return opened.index.pbxs.require(name)
    except NoSuchPbx as exc:
        fail(f"--pbx: {exc}", code=2)


@app.command("verify")
@option("--pbx", metavar="NAME", help="Only this PBX's recordings (`callvault pbx list`).")
@flag(
    "--deep",
    help="Read every recording back and hash it, also where the storage recorded its "
    "checksum at upload (an S3 bucket; without --deep that record is compared, nothing "
    "is downloaded).",
)
@flag(
    "--relock",
    help="Where the bucket's Object Lock disagrees with the retention policy or the "
    "holds, set it right (a retention date extended, a legal hold placed or lifted).",
)
@option(
    "--master-key-file",
    type=PATH,
    metavar="FILE",
    help="Master keys: they open encrypted recordings (default: CALLVAULT_MASTER_KEY or "
    "CALLVAULT_MASTER_KEY_FILE).",
)
@json_option
@archive_options
@storage_option
def verify_command(
    pbx: str | None,
    deep: bool | None,
    relock: bool | None,
    master_key_file: Path | None,
    json_output: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
    storage: str | None,
) -> None:
    """Check every archived recording against the index (its bytes re-hashed, or in a
    bucket the checksum recorded at upload unless --deep) and, in a bucket with Object
    Lock, its lock against the retention policy and holds; report mismatched, missing or
    wrongly locked ones (exit 1 if any) and files the index does not know. Encrypted
    recordings are always read back, decrypted and their plaintext hashed."""
    settings = settings_or_fail(
        config, archive=archive, db=db, storage=storage, master_key_file=master_key_file
    )
    with open_settings_archive(settings, keys=True) as opened:
        from callvault.ops import verify_archive

        record = _pbx_named(opened, pbx)
        report = verify_archive(
            opened, now=datetime.now(UTC), pbx=record, deep=bool(deep), relock=bool(relock)
        )
    if json_output:
        _print_json(report.to_json())
    else:
        for item in report.mismatched:
            if item.unreadable:
                print(f"MISMATCH {item.name}  {_located(opened, item.storage_key)}  ({item.error})")
                continue
            print(
                f"MISMATCH {item.name}  {_located(opened, item.storage_key)}  "
                f"expected sha256 {item.expected_sha256} size {item.expected_size}, "
                f"found sha256 {item.actual_sha256} size {item.actual_size}"
            )
        for item in report.missing:
            print(f"MISSING  {item.name}  {_located(opened, item.storage_key)}  ({item.error})")
        for lock in report.locks:
            state = "FIXED   " if lock.fixed else "LOCK    "
            print(f"{state} {lock.name}  {_located(opened, lock.storage_key)}  {lock.problem}")
        for key in report.unindexed:
            where = _located(opened, key)
            print(f"UNINDEXED {where}  (a file no archived recording points to; kept)")
        print(
            f"verified {report.checked} archived recordings: {report.ok} ok, "
            f"{len(report.mismatched)} mismatched, {len(report.missing)} missing"
            + (f", {plural(len(report.locks), 'lock problem')}" if report.locks else "")
            + (f"; {plural(len(report.unindexed), 'unindexed file')}" if report.unindexed else "")
        )
    if report.problems:
        sys.stdout.flush()
        raise SystemExit(1)


@app.command("requeue")
@option(
    "--state",
    multiple=True,
    metavar="STATE",
    help="Which give-ups to queue again: failed, missing (repeatable; default both).",
)
@option(
    "--since",
    metavar="TIME",
    help="Only recordings first queued from this time (in the PBX's zone as "
    f"serve/backfill saved it, or CALLVAULT_TIMEZONE): {FORMATS}.",
)
@option("--pbx", metavar="NAME", help="Only this PBX's recordings (`callvault pbx list`).")
@json_option
@archive_options
def requeue_command(
    state: tuple[str, ...],
    since: str | None,
    pbx: str | None,
    json_output: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Queue given-up recordings again (after fixing --timezone, the PBX, the network...).

    `failed` ones are also queued again by serve's hourly reconciliation; `missing` ones
    (the PBX kept saying the file does not exist) only by this command. A running
    `callvault serve` downloads them at once, each with a fresh run of attempts.
    """
    settings = settings_or_fail(config, archive=archive, db=db)
    from callvault.ops import REQUEUE_STATES, requeue

    states = list(dict.fromkeys(state or REQUEUE_STATES))
    unknown = [s for s in states if s not in REQUEUE_STATES]
    if unknown:
        fail(f"--state {unknown[0]!r}: only failed and missing can be queued again", code=2)
    with open_settings_archive(settings, check=True) as opened:
        tz = display_timezone(settings, opened)
        first = _moment("--since", since, tz, end=False)
        record = _pbx_named(opened, pbx)
        result = requeue(
            opened,
            states,
            now=datetime.now(UTC),
            since=first,
            pbx_id=record.id if record is not None else None,
        )
        from callvault.index import audit

        counts = ", ".join(f"{state}={count}" for state, count in result.requeued.items())
        if record is not None:
            counts += f" pbx={record.name}"
        opened.index.audit.record(cli_actor(), audit.REQUEUE, "recordings", counts, "local")
        serving = serve_is_running(opened)
    if json_output:
        _print_json(result.to_json())
        return
    what = ", ".join(f"{result.requeued[s]} {s}" for s in states)
    when = (
        "a running `callvault serve` downloads them now"
        if serving
        else ("no `callvault serve` is running: it downloads them once started")
    )
    print(f"queued again: {what}; {when}")


def serve_is_running(archive: Archive) -> bool:
    """Whether a `callvault serve` process has a recent heartbeat on this archive."""
    from callvault.index import DEFAULT_STALE_AFTER

    live = archive.index.processes.live(now=datetime.now(UTC), stale_after=DEFAULT_STALE_AFTER)
    return any(process.kind == "serve" for process in live)


@app.group("storage", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def storage_app() -> None:
    """Where the recordings are kept."""


@storage_app.command("migrate")
@option(
    "--to",
    "target_url",
    required=True,
    metavar="URL",
    help="Where to copy the recordings: s3://BUCKET/PREFIX (or file:///DIR).",
)
@json_option
@archive_options
@storage_option
def storage_migrate_command(
    target_url: str,
    json_output: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
    storage: str | None,
) -> None:
    """Copy every archived recording to another storage, checking each copy against the
    index, then switch the index over to it (every command and node then uses it). Run it
    again to resume; the recordings already copied are skipped. Stop serve first; the
    source is left as it was."""

    from callvault.archive import same_place
    from callvault.index import SettingKey
    from callvault.ops import ArchiveError, migrate_storage
    from callvault.storage import open_storage_url, parse_storage_url

    try:
        parse_storage_url(target_url)
    except ValueError as exc:
        fail(f"--to: {exc}", code=USAGE_ERROR)
    settings = settings_or_fail(config, archive=archive, db=db, storage=storage)
    with open_settings_archive(settings, check=True) as opened:
        directory = settings.archive_dir()
        current = opened.index.settings.get(SettingKey.STORAGE_URL)
        if same_place(target_url, current, directory):
            fail(f"the recordings are in {opened.storage.describe()} already", code=USAGE_ERROR)
        try:
            target = open_storage_url(target_url, directory)
        except (ValueError, OSError) as exc:
            fail(f"--to: {exc}", code=USAGE_ERROR)
        problem = target.check()
        if problem is not None:
            fail(f"cannot store in {target.describe()}: {problem}")
        with counting_bar(quiet=json_output) as bar:
            task = bar.add_task("copying recordings", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            try:
                report = migrate_storage(
                    opened,
                    target,
                    target_url,
                    actor=cli_actor(),
                    now=lambda: datetime.now(UTC),
                    progress=progress,
                )
            except ArchiveError as exc:
                fail(str(exc))
    if json_output:
        _print_json(report.to_json())
    else:
        for failure in report.failed:
            print(f"FAILED {failure.name}  {failure.storage_key}: {failure.error}")
        print(
            f"{report.recordings} recordings: {report.copied} copied, "
            f"{report.already_there} already in {report.target}, {len(report.failed)} failed"
        )
        if report.switched:
            print(
                f"switched: the recordings are now read and written in {report.target}; "
                f"the copies in {report.source} are kept (remove them once you are sure)"
            )
        else:
            print("not switched: fix what failed and run it again (what was copied stays)")
    raise SystemExit(0 if report.switched else 1)


@app.group("index", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def index_app() -> None:
    """The archive's database as a whole."""


@index_app.command("copy")
@option(
    "--to",
    "target_url",
    required=True,
    metavar="URL",
    help="The new, empty database, e.g. postgresql+psycopg://callvault@dbhost/callvault.",
)
@json_option
@archive_options
def index_copy_command(
    target_url: str, json_output: bool, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Copy the whole index (calls, recordings, PBXs, users, audit log...) into another,
    empty database, e.g. from SQLite to PostgreSQL to run several nodes; then check every
    table's row count. The source is left as it was; give every command and node the new
    URL afterwards (--db, CALLVAULT_DB). Stop serve first."""

    from callvault.index import IndexCopyError, IndexFailure, open_index, redact
    from callvault.ops import ArchiveError, copy_index

    settings = settings_or_fail(config, archive=archive, db=db)
    if settings.db_url() == target_url:
        fail("--to names the index being copied: give a new, empty database", code=USAGE_ERROR)
    with open_settings_archive(settings, check=True) as opened:
        try:
            target = open_index(target_url)
        except IndexFailure as exc:
            fail(f"--to: {exc}")
        try:
            with counting_bar(quiet=json_output) as bar:
                task = bar.add_task("copying the index", total=None)

                def progress(table: str, done: int, total: int) -> None:
                    bar.update(task, description=f"copying {table}", completed=done, total=total)

                try:
                    report = copy_index(
                        opened,
                        target,
                        target_url,
                        actor=cli_actor(),
                        now=lambda: datetime.now(UTC),
                        progress=progress,
                    )
                except (ArchiveError, IndexCopyError) as exc:
                    fail(str(exc))
        finally:
            target.close()
    if json_output:
        _print_json(report.to_json())
        return
    for table, rows in report.rows.items():
        if rows:
            print(f"{table:<20} {rows:>10} rows")
    print(
        f"copied {sum(report.rows.values())} rows into {redact(target_url)}, each table "
        "checked; use it from now on (--db, or db in the config file) on every node"
    )
