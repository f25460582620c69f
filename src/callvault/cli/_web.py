"""``callvault web``, ``callvault user ...`` and ``callvault token ...``.

``web`` serves the web app alone over an existing archive. ``user`` and ``token`` manage
who may use it; each change is written to the audit log as done by ``cli:<os user>``.
A generated password or a new API token is printed once, on stdout, and never again.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Annotated

import typer

from callvault.cli._app import app
from callvault.cli._common import Terminated, cli_actor, fail, run_service
from callvault.cli._options import (
    ArchiveOption,
    ConfigOption,
    DbOption,
    SecureCookiesOption,
    TrustedProxyOption,
)
from callvault.cli._settings import (
    ArchiveSettings,
    settings_or_fail,
)
from callvault.index import Index, audit, users

if TYPE_CHECKING:
    pass

user_app = typer.Typer(
    help="Add, list and remove the web app's users; set a new password.", no_args_is_help=True
)
token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON array, for scripts.")]


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

    return open_settings_archive(settings, create=True).index


@app.command("web")
def web(
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8080)."),
    ] = None,
    secure_cookies: SecureCookiesOption = None,
    trusted_proxy: TrustedProxyOption = None,
) -> None:
    """Serve the web app and JSON API alone over an existing archive."""
    from callvault import serving
    from callvault.cli._archive_cmds import open_settings_archive
    from callvault.web import create_app

    settings = settings_or_fail(
        config,
        archive=archive,
        db=db,
        web_listen=listen,
        secure_cookies=secure_cookies,
        trusted_proxy=trusted_proxy,
    )
    opened = open_settings_archive(settings)
    index, storage = opened.index, opened.storage
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
        application = create_app(index, storage, secure_cookies=settings.secure_cookies)
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
            raise typer.Exit(143) from None
    finally:
        sock.close()
        index.close()


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, . _ @ -).")],
    role: Annotated[str, typer.Option("--role", help="admin or listener.")],
    scope: Annotated[
        str, typer.Option("--scope", help="Extensions they may see, e.g. 1000-1099,2001.")
    ] = "",
    password_env: Annotated[
        str | None,
        typer.Option(
            "--password-env",
            help="Environment variable holding the password (default: generate one and print it).",
        ),
    ] = None,
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Add a web user. Without --password-env a password is generated and printed once."""
    try:
        users.validate_name(name)
        users.validate_role(role)
        users.parse_scope(scope)
    except users.UserError as exc:
        fail(str(exc), code=2)
    password = _password_from(password_env)
    index = _open_index(settings_or_fail(config, archive=archive, db=db))
    try:
        user = index.users.add(name, role, password, scope)
        index.audit.record(
            cli_actor(),
            audit.USER_ADD,
            user.name,
            f"role={user.role} scope={user.scope or '(all)'}",
            "local",
        )
    except users.UserError as exc:
        fail(str(exc))
    finally:
        index.close()
    scope_text = user.scope or "all extensions"
    print(f"added {user.role} {user.name} ({scope_text})")
    if password_env is None:
        print(f"password for {user.name} (shown once): {password}")


@user_app.command("passwd")
def user_passwd(
    name: Annotated[str, typer.Argument(help="User name.")],
    password_env: Annotated[
        str | None,
        typer.Option(
            "--password-env",
            help="Environment variable holding the new password (default: generate one and "
            "print it).",
        ),
    ] = None,
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
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
def user_list(
    as_json: JsonOption = False,
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
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
        print(f"{u.name:<24} {u.role:<9} {u.scope or 'all'}")


@user_app.command("remove")
def user_remove(
    name: Annotated[str, typer.Argument(help="User name.")],
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
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
def token_create(
    user: Annotated[str, typer.Option("--user", help="Whose token it is.")],
    label: Annotated[str, typer.Option("--label", help="What uses it.")] = "",
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
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
def token_list(
    as_json: JsonOption = False,
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
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
def token_revoke(
    token_id: Annotated[
        int, typer.Argument(help="Token id (see `callvault token list`).", min=1, max=2**62)
    ],
    archive: ArchiveOption = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
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
