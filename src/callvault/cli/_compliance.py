"""``callvault audit verify`` (the tamper-evident audit log) and ``callvault verify-export``
(a signed ZIP export, checked offline).

The work is done by `callvault.ops` (`verify_audit`, `write_checkpoint`, `verify_export`);
this module parses options and prints results.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from callvault.cli._app import CONTEXT_SETTINGS, app
from callvault.cli._common import cli_actor, fail
from callvault.cli._options import PATH, archive_options, json_option, option
from callvault.cli._settings import USAGE_ERROR, SettingsError, settings_or_fail

if TYPE_CHECKING:
    from callvault.keys import PublicKey

MASTER_KEY_HELP = (
    "File of master keys (default: CALLVAULT_MASTER_KEY or CALLVAULT_MASTER_KEY_FILE); with "
    "it, the chain's head is signed as a checkpoint before it is checked."
)


@app.group("audit", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def audit_app() -> None:
    """Check the tamper-evident audit log."""


@audit_app.command("verify")
@option(
    "--public-key",
    type=PATH,
    metavar="FILE",
    help="Check the signed checkpoints with this public key (PEM, as `callvault keys show "
    "--pem` printed it and you kept it) instead of the keys kept in the index.",
)
@option("--master-key-file", type=PATH, metavar="FILE", help=MASTER_KEY_HELP)
@json_option
@archive_options
def audit_verify_command(
    public_key: Path | None,
    master_key_file: Path | None,
    json_output: bool,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Check that no audit entry, checkpoint or archived recording's hash or size was
    altered, removed, inserted or reordered behind callvault's back; name the first (exit
    1). The check is itself written to the audit log."""
    from callvault.cli._archive_cmds import open_settings_archive
    from callvault.keys import MasterKeyError
    from callvault.ops import (
        ChainBrokenError,
        record_verification,
        signer,
        verify_audit,
        write_checkpoint,
    )

    settings = settings_or_fail(config, archive=archive, db=db, master_key_file=master_key_file)
    trusted = None if public_key is None else [_read_public_key(public_key)]
    try:
        keyring = settings.optional_keyring()
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)
    now = datetime.now(UTC)
    with open_settings_archive(settings) as opened:
        index = opened.index
        if keyring is not None:
            try:
                write_checkpoint(index, signer(index, keyring, now=now, actor=cli_actor()), now=now)
            except MasterKeyError as exc:
                fail(str(exc))
            except ChainBrokenError:
                pass  # not signed; the check below names where it breaks
        report = verify_audit(index, now=now, trusted=trusted)
        record_verification(index, report, actor=cli_actor())
    if json_output:
        print(json.dumps(report.to_json()))
    else:
        for problem in report.problems:
            print(f"{problem.kind.upper():10} {problem.message}")
        if report.more_problems:
            print(f"... and {report.more_problems} more problems")
        last = (
            f"; last signed checkpoint at entry {report.last_checkpoint_seq} "
            f"({report.last_checkpoint_at:%Y-%m-%d %H:%M} UTC)"
            if report.last_checkpoint_at is not None
            else "; no signed checkpoint yet (a serve node with the master key writes them)"
        )
        print(report.summary() + last)
        if report.recordings_before_chain:
            print(
                f"{report.recordings_before_chain} recordings were archived before the chain "
                "began and are not attested by it"
            )
    if not report.ok:
        sys.stdout.flush()
        raise SystemExit(1)


@app.command("verify-export", context_settings=CONTEXT_SETTINGS)
@click.argument("path", type=PATH, metavar="FILE.zip")
@option(
    "--public-key",
    type=PATH,
    metavar="FILE",
    help="The deployment's public key (PEM, from `callvault keys show --pem` or the web "
    "app's audit page): proves who signed; without it the key inside the export is used, "
    "which proves only that nothing changed since it was signed.",
)
@json_option
def verify_export_command(path: Path, public_key: Path | None, json_output: bool) -> None:
    """Check a ZIP export offline, without callvault's database: every file against the
    manifest and SHA256SUMS, nothing missing or added, and both signed against their
    signatures; exit 1 naming what is wrong (or if the export is not signed)."""
    from callvault.keys import MasterKeyError
    from callvault.ops import ExportError, verify_export

    trusted = None
    if public_key is not None:
        trusted = _read_public_key(public_key)
    try:
        report = verify_export(path.expanduser(), trusted=trusted)
    except (ExportError, MasterKeyError) as exc:
        fail(str(exc))
    if json_output:
        print(json.dumps({**report.to_json(), "ok": report.ok}))
    else:
        for problem in report.problems:
            print(f"PROBLEM  {problem}")
        print(report.summary())
    if not report.ok:
        sys.stdout.flush()
        raise SystemExit(1)


def _read_public_key(path: Path) -> PublicKey:
    from callvault.keys import MasterKeyError
    from callvault.ops import parse_public_key

    try:
        text = path.expanduser().read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the public key {path}: {getattr(exc, 'strerror', None) or exc}")
    try:
        return parse_public_key(text, where=str(path))
    except MasterKeyError as exc:
        fail(str(exc), code=USAGE_ERROR)
