"""``callvault web``, ``callvault user ...`` and ``callvault token ...``.

``web`` serves the web app alone over an existing archive. ``user`` and ``token`` manage
who may use it; each change is written to the audit log as done by ``cli:<os user>``.
A generated password or a new API token is printed once, on stdout, and never again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from callvault.cli._app import CONTEXT_SETTINGS, app
from callvault.cli._common import Terminated, cli_actor, fail, run_service
from callvault.cli._options import (
    PATH,
    archive_options,
    option,
    secure_cookies_option,
    storage_option,
    trusted_proxy_option,
)
from callvault.cli._settings import (
    ArchiveSettings,
    SettingsError,
    settings_or_fail,
)
from callvault.index import Index, audit, users


@app.group("user", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def user_app() -> None:
    """Add, change, list and remove the web app's users; set a new password."""


@app.group("token", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def token_app() -> None:
    """Create, list and revoke API tokens."""


json_array_option = click.option(
    "--json", "as_json", is_flag=True, default=False, help="One JSON array, for scripts."
)


def _password_from(password_env: str | None) -> str:
    """The password in the environment variable `password_env`, or a generated one."""
    if password_env is None:
        return users.generate_password()
    password = os.environ.get(password_env, "")
    if not password:
        fail(f"environment variable {password_env} is empty or not set", code=2)
    return password


def _open_index(settings: ArchiveSettings) -> Index:
    """The archive's index (made if the archive directory exists but has none yet)."""
    from callvault.cli._archive_cmds import open_settings_archive

    return open_settings_archive(settings, create=True, check=True).index


@app.command("web")
@archive_options
@storage_option
@option("--listen", metavar="HOST:PORT", help="Where to serve (default 127.0.0.1:8080).")
@secure_cookies_option
@trusted_proxy_option
@option(
    "--master-key-file",
    type=PATH,
    metavar="FILE",
    help="File of master keys, to seal the passwords of PBXs added in the web app "
    "(default: CALLVAULT_MASTER_KEY or CALLVAULT_MASTER_KEY_FILE; without one, PBX "
    "passwords are set with `callvault pbx`).",
)
def web(
    archive: Path | None,
    db: str | None,
    config: Path | None,
    storage: str | None,
    listen: str | None,
    secure_cookies: bool | None,
    trusted_proxy: str | None,
    master_key_file: Path | None,
) -> None:
    """Serve the web app and JSON API alone over an existing archive."""
    from callvault import serving
    from callvault.cli._archive_cmds import open_settings_archive
    from callvault.web import create_app

    settings = settings_or_fail(
        config,
        archive=archive,
        db=db,
        storage=storage,
        web_listen=listen,
        secure_cookies=secure_cookies,
        trusted_proxy=trusted_proxy,
        master_key_file=master_key_file,
    )
    try:
        keyring = settings.optional_keyring()
    except SettingsError as exc:
        fail(str(exc), code=2)
    opened = open_settings_archive(settings)
    index, store = opened.index, opened.storage
    host, port = settings.web_address()
    # Bound before anything is said: a busy port is one line, never "serving" then an error.
    try:
        sock = serving.listen(
            "the web app",
            host,
            port,
            hint="another program uses it: choose another with --listen HOST:PORT",
        )
    except serving.ListenError as exc:
        index.close()
        fail(str(exc))
    try:
        if not index.users.list():
            print("callvault: no users yet: add one with `callvault user add NAME --role admin`")
        application = create_app(
            index, store, secure_cookies=settings.secure_cookies, keyring=keyring
        )
        # The login limiter and the audit log key on the peer address: X-Forwarded-For is
        # believed from the --trusted-proxy address only, and by default never.
        server = serving.server_for(application, trusted_proxy=settings.trusted_proxy)

        def ready() -> None:
            print(
                f"callvault web: serving http://{serving.address(host, port)}/ "
                "(OpenAPI document at /api/openapi.json)",
                flush=True,
            )

        try:
            run_service(lambda stop: serving.serve_until(server, sock, stop), ready=ready)
        except Terminated:
            raise SystemExit(143) from None
    finally:
        sock.close()
        index.close()


ROLE_HELP = (
    "listener (search, play, download, export), auditor (the audit log and its "
    "verification, no recording), auditor,listener (both), or admin (everything)."
)


@user_app.command("add")
@click.argument("name")
@option("--role", required=True, metavar="ROLE", help=ROLE_HELP)
@option(
    "--scope",
    default="",
    metavar="RANGES",
    help="Extensions they may see, e.g. 1000-1099,2001 (default: all).",
)
@option(
    "--pbxs",
    default="",
    metavar="NAMES",
    help="PBXs whose calls they may see, e.g. paris,lyon (default: all).",
)
@option(
    "--password-env",
    metavar="VAR",
    help="Environment variable holding the password (default: generate one and print it).",
)
@archive_options
def user_add(
    name: str,
    role: str,
    scope: str,
    pbxs: str,
    password_env: str | None,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Add a web user. Without --password-env a password is generated and printed once."""
    try:
        users.validate_name(name)
        role = users.validate_role(role)
        users.parse_scope(scope)
        users.parse_pbxs(pbxs)
    except users.UserError as exc:
        fail(str(exc), code=2)
    password = _password_from(password_env)
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    try:
        user = index.users.add(name, role, password, scope, pbxs=pbxs)
        index.audit.record(
            cli_actor(),
            audit.USER_ADD,
            user.name,
            f"role={user.role} scope={user.scope or '(all)'} pbxs={','.join(user.pbxs) or '(all)'}",
            "local",
        )
    except users.UnknownPbx as exc:
        fail(str(exc), code=2)
    except users.UserError as exc:
        fail(str(exc))
    finally:
        index.close()
    scope_text = user.scope or "all extensions"
    if user.pbxs:
        scope_text += f" of PBX {', '.join(user.pbxs)}"
    print(f"added {user.role} {user.name} ({scope_text})")
    if password_env is None:
        print(f"password for {user.name} (shown once): {password}")


@user_app.command("edit")
@click.argument("name")
@option("--role", metavar="ROLE", help=ROLE_HELP + " (default: unchanged)")
@option(
    "--scope",
    metavar="RANGES",
    help='Extensions they may see, e.g. 1000-1099,2001; "" for all (default: unchanged).',
)
@option(
    "--pbxs",
    metavar="NAMES",
    help='PBXs whose calls they may see, e.g. paris,lyon; "" for all (default: unchanged).',
)
@archive_options
def user_edit(
    name: str,
    role: str | None,
    scope: str | None,
    pbxs: str | None,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Change a web user's role, scope or PBXs; it holds at once, in every session (never
    the last admin's role)."""
    if role is None and scope is None and pbxs is None:
        fail("say what to change: --role, --scope or --pbxs", code=2)
    try:
        role = None if role is None else users.validate_role(role)
        users.parse_scope(scope or "")
        users.parse_pbxs(pbxs or "")
    except users.UserError as exc:
        fail(str(exc), code=2)
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    try:
        before, after = index.users.edit(name, role=role, scope=scope, pbxs=pbxs)
        change = users.describe_change(before, after)
        if change:
            index.audit.record(cli_actor(), audit.USER_EDIT, name, change, "local")
    except users.UnknownPbx as exc:
        fail(str(exc), code=2)
    except users.UserError as exc:
        fail(str(exc))
    finally:
        index.close()
    print(f"changed {name}: {change}" if change else f"{name} unchanged")


@user_app.command("passwd")
@click.argument("name")
@option(
    "--password-env",
    metavar="VAR",
    help="Environment variable holding the new password (default: generate one and print it).",
)
@archive_options
def user_passwd(
    name: str, password_env: str | None, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Set a web user's password; this logs the user out everywhere. Without --password-env
    a password is generated and printed once."""
    password = _password_from(password_env)
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    try:
        if not index.users.set_password(name, password):
            fail(f"no user named {name!r}")
        index.audit.record(cli_actor(), audit.USER_PASSWORD, name, "", "local")
    except users.UserError as exc:
        fail(str(exc), code=2)
    finally:
        index.close()
    print(f"new password set for {name}; their web sessions have ended")
    if password_env is None:
        print(f"password for {name} (shown once): {password}")


@user_app.command("list")
@json_array_option
@archive_options
def user_list(as_json: bool, archive: Path | None, db: str | None, config: Path | None) -> None:
    """List the web users."""
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    try:
        found = index.users.list()
    finally:
        index.close()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "name": u.name,
                        "role": u.role,
                        "scope": u.scope,
                        "pbxs": list(u.pbxs),
                        "created_at": u.created_at.isoformat(),
                    }
                    for u in found
                ]
            )
        )
        return
    if not found:
        print("no users")
    for u in found:
        pbxs = f" (PBX {','.join(u.pbxs)})" if u.pbxs else ""
        print(f"{u.name:<24} {u.role:<16} {u.scope or 'all'}{pbxs}")


@user_app.command("remove")
@click.argument("name")
@archive_options
def user_remove(name: str, archive: Path | None, db: str | None, config: Path | None) -> None:
    """Remove a web user and their API tokens (never the last admin)."""
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    try:
        index.users.remove(name)
        index.audit.record(cli_actor(), audit.USER_REMOVE, name, "", "local")
    except users.UserError as exc:
        fail(str(exc))
    finally:
        index.close()
    print(f"removed {name}")


@token_app.command("create")
@option("--user", required=True, metavar="NAME", help="Whose token it is.")
@option("--label", default="", metavar="TEXT", help="What uses it.")
@archive_options
def token_create(
    user: str, label: str, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Create an API token (sent as Authorization: Bearer); printed once, stored hashed."""
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    actor = cli_actor()
    try:
        token, secret = index.tokens.create(user, label=label, created_by=actor)
        index.audit.record(
            actor,
            audit.TOKEN_CREATE,
            token.user_name,
            f"token id={token.id} label={token.label!r}",
            "local",
        )
    except users.UserError as exc:
        fail(str(exc))
    finally:
        index.close()
    print(f"token {token.id} for {token.user_name} (shown once): {secret}")


@token_app.command("list")
@json_array_option
@archive_options
def token_list(as_json: bool, archive: Path | None, db: str | None, config: Path | None) -> None:
    """List API tokens (never their secrets)."""
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    try:
        found = index.tokens.list()
    finally:
        index.close()
    records = [
        {
            "id": t.id,
            "user": t.user_name,
            "label": t.label,
            "created_at": t.created_at.isoformat(),
            "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
        }
        for t in found
    ]
    if as_json:
        print(json.dumps(records))
        return
    if not records:
        print("no tokens")
    for r in records:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "live"
        print(f"{r['id']:>5} {r['user']:<24} {state:<40} {r['label']}")


@token_app.command("revoke")
@click.argument("token_id", metavar="ID", type=click.IntRange(min=1, max=2**62))
@archive_options
def token_revoke(token_id: int, archive: Path | None, db: str | None, config: Path | None) -> None:
    """Revoke an API token."""
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    try:
        token = index.tokens.get(token_id)
        if token is None or not index.tokens.revoke(token_id):
            fail(f"no live token with id {token_id}")
        index.audit.record(
            cli_actor(),
            audit.TOKEN_REVOKE,
            token.user_name,
            f"token id={token_id}",
            "local",
        )
    finally:
        index.close()
    print(f"revoked token {token_id}")
