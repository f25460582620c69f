"""``callvault retention``, ``hold``, ``delete`` and ``subject``: keeping recordings as
long as the rules say, and no longer; legal holds; data-subject requests.

The work is done by `callvault.ops` (`set_policy`, `run_retention`, `place_hold`,
`delete_now`, `find_subject`, `erase_subject`); every change is in the audit chain as
done by ``cli:<os user>``.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from callvault.cli._app import CONTEXT_SETTINGS, app
from callvault.cli._archive_cmds import _moment, display_timezone, open_settings_archive
from callvault.cli._common import cli_actor, fail, plural
from callvault.cli._options import PATH, archive_options, json_option, option
from callvault.cli._settings import USAGE_ERROR, settings_or_fail
from callvault.index.retention import RetentionError
from callvault.ops import Archive


def _now() -> datetime:
    return datetime.now(UTC)


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


@app.group("retention", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def retention_app() -> None:
    """How long recordings are kept: the policy's rules, its history, the daily pass."""


@retention_app.command("show")
@option("--version", "version", type=int, metavar="N", help="An earlier version of the policy.")
@json_option
@archive_options
def retention_show(
    version: int | None,
    json_output: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Show the retention policy in force (or version N): its rules, first match wins."""
    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings) as opened:
        index = opened.index
        policy = index.retention.current() if version is None else index.retention.version(version)
    if policy is None:
        if version is not None:
            fail(f"there is no version {version} of the policy (`callvault retention history`)")
        print("no retention policy: every recording is kept (set one: callvault retention set)")
        return
    if json_output:
        _print_json(policy.to_json())
        return
    print(
        f"retention policy v{policy.version}, set {policy.created_at:%Y-%m-%d %H:%M} UTC by "
        f"{policy.created_by}" + (f": {policy.note}" if policy.note else "")
    )
    for number, rule in enumerate(policy.rules, 1):
        conditions = [
            f"{name} {', '.join(getattr(rule, name))}"
            for name in ("pbx", "direction", "status", "numbers")
            if getattr(rule, name)
        ]
        print(f"  {number}. {rule.name}: keep {rule.keep}  ({'; '.join(conditions) or 'any call'})")
    if not policy.has_catch_all:
        print("  recordings no rule matches are kept for ever")


@retention_app.command("set")
@click.argument("path", type=PATH, metavar="FILE")
@option("--note", metavar="TEXT", help="Why the rules change (kept with the version).")
@archive_options
def retention_set(
    path: Path, note: str | None, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Make the rules in FILE (TOML [[rule]] tables, or JSON) the policy in force: a new
    version, in the audit chain. The next pass (serve's daily one, or `retention run`)
    applies it; try it first with `retention run --dry-run`."""
    from callvault.ops import parse_policy_text, set_policy

    settings = settings_or_fail(config, archive=archive, db=db)
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", code=USAGE_ERROR)
    with open_settings_archive(settings, check=True) as opened:
        try:
            rules = parse_policy_text(text, where=str(path))
            policy = set_policy(opened.index, rules, actor=cli_actor(), note=note or "", now=_now())
        except RetentionError as exc:
            fail(str(exc), code=USAGE_ERROR)
    print(f"retention policy v{policy.version} is in force: {plural(len(policy.rules), 'rule')}")
    if not policy.has_catch_all:
        print("recordings no rule matches are kept for ever (add a last rule without conditions)")


@retention_app.command("history")
@archive_options
def retention_history(archive: Path | None, db: str | None, config: Path | None) -> None:
    """Every version of the policy, newest first: when, by whom, why."""
    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings) as opened:
        versions = opened.index.retention.history()
    if not versions:
        print("no retention policy was ever set")
    for policy in versions:
        print(
            f"v{policy.version}  {policy.created_at:%Y-%m-%d %H:%M} UTC  {policy.created_by}  "
            f"{plural(len(policy.rules), 'rule')}" + (f"  {policy.note}" if policy.note else "")
        )


@retention_app.command("run")
@click.option(
    "--dry-run", is_flag=True, default=False, help="List what would be deleted; delete nothing."
)
@json_option
@archive_options
def retention_run(
    dry_run: bool, json_output: bool, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Delete now every recording whose rule's period has run out and that no hold keeps
    (serve does this once a day); the rows stay as tombstones with hash, size and why."""
    from callvault.ops import run_retention

    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings, check=not dry_run) as opened:
        report = run_retention(opened, now=_now(), actor=cli_actor(), dry_run=dry_run)
    if json_output:
        _print_json(report.to_json())
        return
    for item in report.recordings:
        verb = "would delete" if dry_run else "deleted"
        print(
            f"{verb} {item.id} {item.name}  (rule {item.rule}, expired {item.expired_at:%Y-%m-%d})"
        )
    if report.deleted > len(report.recordings):
        print(f"... and {report.deleted - len(report.recordings)} more")
    for failure in report.purge_failures:
        print(f"NOT REMOVED {failure} (tried again by the next pass)")
    print(report.summary())


@app.group("hold", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def hold_app() -> None:
    """Legal holds: recordings kept whatever the retention policy, until released."""


@hold_app.command("add")
@option("--case", "case", required=True, metavar="NAME", help="The case (matter) it is for.")
@option("--reason", required=True, metavar="TEXT", help="Why these recordings are kept.")
@option("--id", "ids", type=int, multiple=True, metavar="N", help="A recording (repeatable).")
@option("--number", metavar="DIGITS", help="Recordings of calls with this number part.")
@option("--since", metavar="TIME", help="...of calls that started from this time.")
@option("--until", metavar="TIME", help="...and before this time.")
@option("--pbx", metavar="NAME", help="...of this PBX.")
@json_option
@archive_options
def hold_add(
    case: str,
    reason: str,
    ids: tuple[int, ...],
    number: str | None,
    since: str | None,
    until: str | None,
    pbx: str | None,
    json_output: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Hold recordings for a case: by id (--id) or by a search (--number, --since,
    --until, --pbx: every recording that matches now; calls recorded later are not)."""
    from callvault.index import SearchFilters
    from callvault.ops import place_hold

    settings = settings_or_fail(config, archive=archive, db=db)
    searched = any(value is not None for value in (number, since, until, pbx))
    if not ids and not searched:
        fail("choose what to hold: --id N, or a search (--number, --since, --until, --pbx)", 2)
    with open_settings_archive(settings, check=True) as opened:
        chosen = list(ids)
        words = [f"ids {', '.join(map(str, ids))}"] if ids else []
        if searched:
            tz = display_timezone(settings, opened)
            filters = SearchFilters(
                since=_moment("--since", since, tz, end=False),
                until=_moment("--until", until, tz, end=True),
                number=number or None,
                pbx_id=_pbx_id(opened, pbx),
            )
            chosen += [row.id for row in opened.index.recordings.search(filters, limit=2**62)]
            words += [
                f"{name} {value}"
                for name, value in (
                    ("number", number),
                    ("since", since),
                    ("until", until),
                    ("pbx", pbx),
                )
                if value is not None
            ]
        try:
            hold = place_hold(
                opened,
                case,
                reason,
                chosen,
                selection="; ".join(words),
                actor=cli_actor(),
                now=_now(),
            )
        except RetentionError as exc:
            fail(str(exc), code=USAGE_ERROR)
    if json_output:
        _print_json(hold.to_json())
        return
    print(f"hold {hold.id} ({hold.case}) keeps {plural(hold.recordings, 'recording')}")


def _pbx_id(opened: Archive, name: str | None) -> int | None:
    if name is None:
        return None
    record = opened.index.pbxs.get(name)
    if record is None:
        fail(f"--pbx: no PBX named {name!r} (`callvault pbx list`)", code=USAGE_ERROR)
    return record.id


@hold_app.command("list")
@click.option("--all", "show_all", is_flag=True, default=False, help="Released holds too.")
@json_option
@archive_options
def hold_list(
    show_all: bool, json_output: bool, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """The holds in force (and released ones, with --all), newest first."""
    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings) as opened:
        holds = opened.index.retention.holds(active_only=not show_all)
    if json_output:
        _print_json([hold.to_json() for hold in holds])
        return
    if not holds:
        print("no holds in force" if not show_all else "no holds")
    for hold in holds:
        state = "in force" if hold.active else f"released {hold.released_at:%Y-%m-%d}"
        print(
            f"{hold.id}  {hold.case}  {plural(hold.recordings, 'recording')}  {state}  "
            f"(by {hold.created_by} {hold.created_at:%Y-%m-%d}: {hold.reason})"
        )


@hold_app.command("show")
@click.argument("hold_id", type=int, metavar="ID")
@json_option
@archive_options
def hold_show(
    hold_id: int, json_output: bool, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """A hold and the recordings it keeps."""
    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings) as opened:
        hold = opened.index.retention.hold(hold_id)
        if hold is None:
            fail(f"there is no hold {hold_id} (`callvault hold list --all`)")
        rows = opened.index.recordings.by_ids(opened.index.retention.held_recordings(hold_id))
    if json_output:
        _print_json({**hold.to_json(), "recording_ids": [row.id for row in rows]})
        return
    print(f"hold {hold.id}: {hold.case} ({'in force' if hold.active else 'released'})")
    print(f"  reason     {hold.reason}")
    print(f"  placed     {hold.created_at:%Y-%m-%d %H:%M} UTC by {hold.created_by}")
    if hold.selection:
        print(f"  selection  {hold.selection}")
    if not hold.active:
        print(
            f"  released   {hold.released_at:%Y-%m-%d %H:%M} UTC by {hold.released_by}: "
            f"{hold.release_reason}"
        )
    for row in rows:
        print(f"  {row.id}  {row.state}  {row.call_from} -> {row.call_to}  {row.name}")


@hold_app.command("release")
@click.argument("hold_id", type=int, metavar="ID")
@option("--reason", required=True, metavar="TEXT", help="Why the hold ends.")
@archive_options
def hold_release(
    hold_id: int, reason: str, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Release a hold: its recordings fall under the retention policy again."""
    from callvault.ops import release_hold

    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings, check=True) as opened:
        try:
            hold = release_hold(opened, hold_id, reason=reason, actor=cli_actor(), now=_now())
        except RetentionError as exc:
            fail(str(exc))
    print(f"hold {hold.id} ({hold.case}) is released: {plural(hold.recordings, 'recording')}")


@app.command("delete")
@click.argument("ids", type=int, nargs=-1, required=True, metavar="ID...")
@option("--reason", required=True, metavar="TEXT", help="Why, in words (kept in the audit log).")
@click.option("--yes", is_flag=True, default=False, help="Do not ask for confirmation.")
@archive_options
def delete_command(
    ids: tuple[int, ...],
    reason: str,
    yes: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Delete archived recordings now, outside the retention policy (with a written
    reason, audited). Held recordings are refused and named with their holds."""
    from callvault.ops import delete_now

    if not yes and not click.confirm(
        f"delete {plural(len(ids), 'recording')} for good?", default=False, err=True
    ):
        fail("nothing deleted")
    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings, check=True) as opened:
        try:
            report = delete_now(opened, ids, reason=reason, actor=cli_actor(), now=_now())
        except RetentionError as exc:
            fail(str(exc), code=USAGE_ERROR)
    for recording_id in report.deleted:
        print(f"deleted {recording_id}")
    for refused in report.refused:
        print(f"KEPT {refused.id}: {refused.reason}")
    if report.refused:
        sys.stdout.flush()
        raise SystemExit(1)


@app.group("subject", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def subject_app() -> None:
    """Data-subject requests: find, export or erase the calls of one phone number."""


def _findings(opened: Archive, number: str) -> Any:
    from callvault.ops import find_subject

    try:
        return find_subject(opened, number, actor=cli_actor(), now=_now())
    except RetentionError as exc:
        fail(str(exc), code=USAGE_ERROR)


@subject_app.command("find")
@click.argument("number")
@json_option
@archive_options
def subject_find(
    number: str, json_output: bool, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Every call and recording of NUMBER (its digits, with or without + or 0 in front)."""
    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings) as opened:
        findings = _findings(opened, number)
    if json_output:
        _print_json(findings.to_json())
        return
    if not findings.calls:
        print(f"no call of {number}")
        return
    for call in findings.calls:
        when = f"{call.start_at:%Y-%m-%d %H:%M}" if call.start_at else "-"
        recording = (
            f"recording {call.recording_id} ({call.recording_state})"
            if call.recording_id is not None
            else "no recording"
        )
        holds = f"  HELD by {', '.join(call.holds)}" if call.holds else ""
        print(f"{when}  {call.pbx}  {call.call_from} -> {call.call_to}  {recording}{holds}")
    print(
        f"{plural(len(findings.calls), 'call')}, {plural(len(findings.recording_ids), 'recording')}"
    )


@subject_app.command("export")
@click.argument("number")
@option("--out", "out", type=PATH, required=True, metavar="FILE.zip", help="The ZIP to write.")
@option("--master-key-file", type=PATH, metavar="FILE", help="Master keys (to sign the export).")
@archive_options
def subject_export(
    number: str,
    out: Path,
    master_key_file: Path | None,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Write NUMBER's archived recordings and their calls to a ZIP, signed like the web
    app's exports (check it with `callvault verify-export`)."""
    from callvault.keys import MasterKeyError
    from callvault.ops import signer, stream_export

    settings = settings_or_fail(config, archive=archive, db=db, master_key_file=master_key_file)
    keyring = settings.optional_keyring()
    target = out.expanduser()
    if target.exists():
        fail(f"{target} exists: choose a new file", code=USAGE_ERROR)
    with open_settings_archive(settings, keys=True) as opened:
        findings = _findings(opened, number)
        rows = opened.index.recordings.by_ids(findings.archived_ids)
        now = _now()
        try:
            key = None if keyring is None else signer(opened.index, keyring, now=now)
        except MasterKeyError as exc:
            fail(str(exc))
        partial = target.with_name(target.name + ".partial")
        with partial.open("wb") as sink:
            for chunk in stream_export(
                rows,
                opened.storage,
                registry=opened.index.pbxs.list(),
                key=key,
                now=now,
                keyring=opened.keyring,
            ):
                sink.write(chunk)
        partial.rename(target)
        from callvault.index import audit

        opened.index.audit.record(
            cli_actor(),
            audit.EXPORT,
            f"{len(rows)} recordings",
            "subject export; " + ("signed by key " + key.id if key else "not signed"),
            "local",
            at=now,
        )
    signed = f"signed by key {key.id}" if key else "NOT signed (no master key loaded)"
    print(f"wrote {plural(len(rows), 'recording')} of {number} to {target} ({signed})")


@subject_app.command("erase")
@click.argument("number")
@option("--reason", required=True, metavar="TEXT", help="The request (e.g. its reference).")
@click.option("--yes", is_flag=True, default=False, help="Do not ask for confirmation.")
@json_option
@archive_options
def subject_erase(
    number: str,
    reason: str,
    yes: bool,
    json_output: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Delete every recording of NUMBER and blank the number in its calls, except what a
    legal hold keeps (listed with the hold; exit 1 then). Audited without the number."""
    from callvault.ops import erase_subject

    settings = settings_or_fail(config, archive=archive, db=db)
    with open_settings_archive(settings, check=True) as opened:
        findings = _findings(opened, number)
        if not findings.calls:
            print(f"no call of {number}: nothing to erase")
            return
        if not yes and not click.confirm(
            f"erase {plural(len(findings.recording_ids), 'recording')} and the number in "
            f"{plural(len(findings.calls), 'call')} for good?",
            default=False,
            err=True,
        ):
            fail("nothing erased")
        try:
            erasure = erase_subject(opened, findings, reason=reason, actor=cli_actor(), now=_now())
        except RetentionError as exc:
            fail(str(exc), code=USAGE_ERROR)
    if json_output:
        _print_json(erasure.to_json())
    else:
        for kept in erasure.kept:
            print(f"KEPT {kept.id}: {kept.reason}")
        print(
            f"erased {plural(len(erasure.deleted), 'recording')}; blanked the number in "
            f"{plural(erasure.calls_scrubbed, 'call')}"
        )
    if erasure.kept:
        sys.stdout.flush()
        raise SystemExit(1)
