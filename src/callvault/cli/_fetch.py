"""`callvault fetch` (download recordings by name) and `callvault cdr` (print the CDR export)."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import logging
import sys
import time
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from callvault.cli._app import app
from callvault.cli._common import Terminated, fail, run_terminable
from callvault.cli._options import (
    PATH,
    PbxFlags,
    config_option,
    option,
    pbx_options,
    registry_options,
    timezone_option,
)
from callvault.cli._settings import USAGE_ERROR, Settings, SettingsError, settings_or_fail
from callvault.pbx import (
    CSV_COLUMNS,
    AuthError,
    CallDetail,
    DownloadResult,
    PbxBusy,
    PbxClient,
    PbxError,
    PbxTlsError,
    PbxTransportError,
    PbxUnreachable,
    PSeriesClient,
    TokenError,
    UnsafeRecordingName,
    call_detail_row,
    check_recording_name,
)
from callvault.times import FORMATS, TimeFormatError, parse_moment, parse_pbx_time

if TYPE_CHECKING:
    from callvault.index.pbxs import PbxRecord

# Failures after which trying the remaining names is pointless (and, for logins, harmful).
_FATAL = (PbxTlsError, PbxUnreachable)


def _quiet_library_logs() -> None:
    """The commands say what happened in one line each; the client's own log lines (retries,
    refused logins) would repeat it. Without this, Python prints warnings to stderr."""
    logging.getLogger("callvault.pbx").addHandler(logging.NullHandler())


def _is_fatal(exc: PbxError) -> bool:
    return isinstance(exc, _FATAL) or (
        isinstance(exc, AuthError) and not isinstance(exc, TokenError)
    )


def _login_refused(exc: PbxError) -> bool:
    """A login failure that the next name's login would only repeat (and that the PBX may
    count towards its lockout): anything but a network failure or a busy PBX."""
    if isinstance(exc, PbxTlsError):
        return True
    return not isinstance(exc, PbxTransportError | PbxBusy)


def _without_context(message: str, name: str) -> str:
    prefix = f"recording {name}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


async def fetch_recordings(
    client: PbxClient | PSeriesClient,
    names: list[str],
    out: Path,
    *,
    show_progress: bool,
    as_json: bool = False,
) -> int:
    """Download each name into `out`; print one line per result. Returns the exit code.

    The client logs in before the first download, so each recording's ``seconds`` is its
    transfer alone: get_random, connection and TLS handshake, GET, checks, fsync and rename.
    """
    failures = 0
    progress: Progress | None = None
    if show_progress:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        progress.start()
    try:
        async with client:
            for position, name in enumerate(names):
                try:
                    check_recording_name(name)
                except UnsafeRecordingName as exc:
                    print(f"callvault: error: {name}: {exc}", file=sys.stderr)
                    failures += 1
                    continue
                if not client.logged_in:
                    try:
                        await client.login()
                    except PbxError as exc:
                        if _login_refused(exc):
                            _print_fatal(exc, len(names) - position)
                            return 1
                        # Transient: the download logs in again, with retries.
                task: TaskID | None = None
                if progress is not None:
                    task = progress.add_task(name, total=None)

                def advance(done: int, total: int | None, task: TaskID | None = task) -> None:
                    if progress is not None and task is not None:
                        progress.update(task, completed=done, total=total)

                started = time.perf_counter()
                try:
                    result = await client.download_recording(
                        name, out, progress=advance if progress is not None else None
                    )
                except PbxError as exc:
                    if _is_fatal(exc):
                        _print_fatal(exc, len(names) - position)
                        return 1
                    print(
                        f"callvault: error: {name}: {_without_context(str(exc), name)}",
                        file=sys.stderr,
                    )
                    failures += 1
                    continue
                except OSError as exc:
                    print(
                        f"callvault: error: {name}: cannot write to {out}: {exc.strerror or exc}",
                        file=sys.stderr,
                    )
                    failures += 1
                    continue
                finally:
                    if progress is not None and task is not None:
                        progress.remove_task(task)
                _print_saved(result, time.perf_counter() - started, as_json=as_json)
    finally:
        if progress is not None:
            progress.stop()
    return 1 if failures else 0


def _print_fatal(exc: PbxError, left: int) -> None:
    more = f" ({left} recording(s) not fetched)" if left > 1 else ""
    print(f"callvault: error: {exc}{more}", file=sys.stderr)


def _print_saved(result: DownloadResult, seconds: float, *, as_json: bool) -> None:
    if as_json:
        line = {
            "name": result.name,
            "path": str(result.path),
            "size": result.size,
            "sha256": result.sha256,
            "seconds": round(seconds, 6),
        }
        print(json.dumps(line, ensure_ascii=False), flush=True)
    else:
        print(f"{result.path}\t{result.size} bytes\tsha256 {result.sha256}", flush=True)


@app.command("fetch")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@pbx_options
@registry_options
@config_option
@option(
    "--out",
    type=PATH,
    default=Path("."),
    metavar="DIR",
    help="Directory to save the recordings in (default: here).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    help="For each recording saved, print one JSON object per line: name, path, size, "
    "sha256 and seconds (the download alone: get_random, TLS handshake, GET, checks, fsync "
    "and rename; the login is done before the first one).",
)
def fetch(
    names: tuple[str, ...],
    pbx_flags: PbxFlags,
    archive: Path | None,
    db: str | None,
    master_key_file: Path | None,
    config: Path | None,
    out: Path,
    as_json: bool,
) -> None:
    """Download recordings from the PBX and save each as OUT/NAME, verified.

    The PBX is a registered one (--pbx NAME), or the one --pbx URL gives with --username,
    --password-env and the others. Prints one line per recording saved (with --json, one
    JSON object per line); each failure goes to stderr as one line. Exit status 0 only if
    every recording was saved.
    """
    settings = settings_or_fail(
        config, **pbx_flags, archive=archive, db=db, master_key_file=master_key_file
    )
    client = _client(settings)
    _quiet_library_logs()
    try:
        code = run_terminable(
            fetch_recordings(
                client, list(names), out, show_progress=sys.stderr.isatty(), as_json=as_json
            )
        )
    except KeyboardInterrupt:
        print("callvault: interrupted; no partial file was kept", file=sys.stderr)
        raise SystemExit(130) from None
    except Terminated:
        print("callvault: terminated; no partial file was kept", file=sys.stderr)
        raise SystemExit(143) from None
    raise SystemExit(code)


# ------------------------------------------------------------------------ cdr


def _client(settings: Settings, record: PbxRecord | None = None) -> PbxClient | PSeriesClient:
    """The PBX client the settings name (`record`, if read already), or exit 2 with one
    line saying what is missing."""
    try:
        return settings.pbx_client(record)
    except SettingsError as exc:
        fail(str(exc), USAGE_ERROR)


def _time_option(flag: str, value: str, tz: tzinfo, *, end: bool) -> datetime:
    try:
        return parse_moment(value, tz, end=end, name=flag)
    except TimeFormatError as exc:
        fail(str(exc), USAGE_ERROR)


async def export_range(
    client: PbxClient | PSeriesClient,
    start: datetime,
    end: datetime,
    tz: tzinfo,
    extensions: str,
) -> list[CallDetail]:
    """Every CDR row of calls that started in [start, end), each call once, oldest first
    (the S-Series export gives them in the order the PBX wrote them: by when they ended)."""
    async with client:
        rows = await client.export_cdr_range(start, end, tz, extensions=extensions)

    def started(row: CallDetail) -> tuple[int, datetime, str]:
        moment = parse_pbx_time(row.timestart, tz)
        return (0, moment, "") if moment is not None else (1, start, row.timestart)

    return sorted(rows, key=started)


def _print_table(rows: list[CallDetail]) -> None:
    table = Table(show_edge=False, pad_edge=False)
    for column in ("start", "from", "to", "type", "status", "talk s", "recording"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row.timestart,
            row.callfrom,
            row.callto,
            row.type,
            row.status,
            "" if row.talkduration is None else str(row.talkduration),
            row.recording or "",
        )
    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
    console.print(table)
    console.print(f"{len(rows)} call(s)")


@app.command("cdr")
@option(
    "--since",
    required=True,
    metavar="TIME",
    help=f"Calls that started from this time, in the PBX's zone: {FORMATS}.",
)
@option(
    "--until",
    metavar="TIME",
    help=f"...and before this time (a date: through that day): {FORMATS}. Default: now.",
)
@pbx_options
@registry_options
@timezone_option
@config_option
@option(
    "--extensions",
    default="all",
    metavar="LIST",
    help="'all' (the default), or extensions like 1000,1001.",
)
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON.")
@click.option("--csv", "as_csv", is_flag=True, default=False, help="Print CSV.")
def cdr(
    since: str,
    until: str | None,
    pbx_flags: PbxFlags,
    archive: Path | None,
    db: str | None,
    master_key_file: Path | None,
    timezone: str | None,
    config: Path | None,
    extensions: str,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Print the PBX's call detail records of a time range, with their recording names.

    The PBX is the one --pbx URL gives, or a registered one (--pbx NAME), whose times are
    read in its own registered zone."""
    if as_json and as_csv:
        fail("choose one of --json and --csv", USAGE_ERROR)
    settings = settings_or_fail(
        config,
        **pbx_flags,
        archive=archive,
        db=db,
        master_key_file=master_key_file,
        timezone=timezone,
    )
    record = None
    if settings.pbx_name is not None:
        try:
            record = settings.registered_pbx()
        except SettingsError as exc:
            fail(str(exc), USAGE_ERROR)
    tz = settings.pbx_zone(record)
    start = _time_option("--since", since, tz, end=False)
    if until is None:
        end = datetime.now(tz).replace(microsecond=0) + timedelta(seconds=1)
    else:
        end = _time_option("--until", until, tz, end=True)
    if end <= start:
        fail(
            "--since is in the future" if until is None else "--until must be after --since",
            USAGE_ERROR,
        )
    client = _client(settings, record)
    _quiet_library_logs()
    try:
        rows = asyncio.run(export_range(client, start, end, tz, extensions))
    except PbxError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2, ensure_ascii=False))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(call_detail_row(row))
    else:
        _print_table(rows)
