"""``callvault pbx ...`` (the registry of PBXs) and ``callvault keys ...`` (master keys).

The work is done by `callvault.ops` (add, edit, remove, test) and `callvault.keys`; each
change is written to the audit log as done by ``cli:<os user>``. A PBX's password is read
from the environment variable ``--password-env`` names, a P-Series PBX's webhook secret
from the one ``--webhook-secret-env`` names; neither is ever printed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from callvault.cli._app import CONTEXT_SETTINGS, app
from callvault.cli._common import cli_actor, fail, run_terminable
from callvault.cli._options import PATH, Decorator, archive_options, flag, option
from callvault.cli._settings import USAGE_ERROR, Settings, SettingsError, settings_or_fail
from callvault.index import Index
from callvault.index.pbxs import (
    DEFAULT_MAX_DOWNLOADS,
    KINDS,
    NoSuchPbx,
    PbxConfig,
    PbxRegistryError,
)

MASTER_KEY_FILE_HELP = (
    "File of master keys that seal the PBX passwords (default: CALLVAULT_MASTER_KEY, "
    "which holds a key itself, or CALLVAULT_MASTER_KEY_FILE)."
)


@app.group("pbx", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def pbx_app() -> None:
    """Register the PBXs to archive: add, list, show, edit, remove and test them."""


@app.group("keys", context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def keys_app() -> None:
    """Make and show the master keys that seal the secrets kept in the index."""


master_key_file_option = option(
    "--master-key-file", type=PATH, metavar="FILE", help=MASTER_KEY_FILE_HELP
)
json_flag = click.option(
    "--json", "as_json", is_flag=True, default=False, help="Print JSON, for scripts."
)


def _connection_options(*, adding: bool) -> Decorator[Any]:
    """The settings of a PBX, as `pbx add` (some required) and `pbx edit` take them."""
    decorators: list[Decorator[Any]] = [
        option(
            "--url",
            metavar="URL",
            required=adding,
            help="The PBX's URL, https://HOST:PORT (its web port, 8088 by default).",
        ),
        option(
            "--kind",
            type=click.Choice(KINDS),
            help="Which API it speaks: s-series, cloud (the S-Series-based Yeastar Cloud "
            "PBX) or p-series (the P-Series OpenAPI)" + (" (default s-series)." if adding else "."),
        ),
        option("--username", metavar="NAME", help="Its API user name (S-Series, Cloud)."),
        option(
            "--password-env",
            metavar="VAR",
            help="Name of the environment variable holding its API password (S-Series, Cloud).",
        ),
        option(
            "--client-id",
            metavar="ID",
            help="The Client ID of its API application (P-Series: Integrations > API).",
        ),
        option(
            "--secret-env",
            metavar="VAR",
            help="Name of the environment variable holding that application's Client Secret "
            "(P-Series).",
        ),
        option(
            "--webhook-secret-env",
            metavar="VAR",
            help="Name of the environment variable holding the Secret of the PBX's webhook "
            "(P-Series: Integrations > API > Webhook Event Push): its signed webhooks are "
            "taken beside the WebSocket.",
        ),
        option(
            "--api-version",
            metavar="VERSION",
            help="API version: v1.0.1, v1.1.0 or v2.0.0"
            + (" (default v1.1.0)." if adding else "."),
        ),
        option(
            "--ca-file",
            type=PATH,
            metavar="FILE",
            help="Trust its certificate when signed by this CA (PEM).",
        ),
        option(
            "--pin-sha256",
            metavar="HEX",
            help="Trust exactly the certificate with this SHA-256 fingerprint.",
        ),
        flag(
            "--insecure",
            help="Do not check its certificate at all (anyone on the way can read the token "
            "and the recordings).",
        ),
        option("--tls-min-version", metavar="VERSION", help="Lowest TLS version (1.2 by default)."),
        option(
            "--timezone",
            metavar="ZONE",
            help="The zone its local times are in, e.g. Europe/Paris (default: the "
            "deployment's --timezone).",
        ),
        option(
            "--max-downloads",
            type=int,
            metavar="N",
            help=f"Downloads from it at once, 1 to 16 (default {DEFAULT_MAX_DOWNLOADS}: a PBX "
            "is a small embedded box).",
        ),
        option(
            "--events-allow",
            metavar="ADDRESSES",
            help="Addresses or networks allowed to post its reports, comma-separated "
            "(default: the PBX's own address).",
        ),
        option(
            "--tcp-report-port",
            type=int,
            metavar="PORT",
            help="S-Series API v2.0.0 with Report Method = TCP on its API page: the port "
            "to connect to for its reports" + ("." if adding else "; 0 for HTTP reports again."),
        ),
        option(
            "--report-url",
            metavar="HOST:PORT",
            help="Where it posts its reports, e.g. a load balancer before several nodes "
            "(its secret path is added; API v1.1.0 or later)"
            + (
                " (default: the node that logged in)."
                if adding
                else "; '' for the node that logged in again."
            ),
        ),
    ]
    if not adding:
        decorators.append(
            flag(
                "--trust-system",
                help="Trust its certificate by the system's CAs again (drops --ca-file, "
                "--pin-sha256 and --insecure).",
            )
        )
        decorators.append(
            flag(
                "--drop-webhook-secret",
                help="Forget its webhook secret: its webhooks are refused from then on.",
            )
        )
    decorators += [master_key_file_option, archive_options]

    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def _secret_env(given: dict[str, Any]) -> str | None:
    """The variable --password-env or --secret-env names (taken out of `given`)."""
    password_env, secret_env = given.pop("password_env", None), given.pop("secret_env", None)
    if password_env is not None and secret_env is not None:
        fail("give --secret-env (P-Series) or --password-env, not both", code=USAGE_ERROR)
    chosen = password_env if password_env is not None else secret_env
    return None if chosen is None else str(chosen)


def _webhook_secret(given: dict[str, Any], kind: str | None) -> str | None:
    """The webhook secret in the variable --webhook-secret-env names (taken out of
    `given`); refused in one line for a PBX known (`kind`) not to be P-Series."""
    variable = given.pop("webhook_secret_env", None)
    if variable is None:
        return None
    if kind is not None and kind != "p-series":
        fail(
            f"--webhook-secret-env: only a P-Series PBX signs webhooks; this one is {kind}",
            code=USAGE_ERROR,
        )
    return _password(str(variable))


def _webhook_url(settings: Settings, events_path: str) -> str:
    """Where the PBX's webhook is to point: the events listener of a serve node, with the
    PBX's secret path (NODE: that node's address as the PBX reaches it)."""
    try:
        host, port = settings.events_address()
    except (SettingsError, ValueError):
        host, port = "0.0.0.0", 8260  # noqa: S104 - only shown, never bound
    if host in ("", "0.0.0.0", "::"):  # noqa: S104
        host = "NODE"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/{events_path}"


def _tell_webhook(settings: Settings, name: str, events_path: str) -> None:
    print(
        f"PBX {name}'s webhook URL (Integrations > API > Webhook Event Push, method POST): "
        f"{_webhook_url(settings, events_path)} (NODE: a serve node's address the PBX "
        "reaches; keep the URL to yourself)"
    )


def _password(variable: str) -> str:
    value = os.environ.get(variable, "")
    if not value:
        fail(f"environment variable {variable} is empty or not set", code=USAGE_ERROR)
    return value


def _ca_file(path: Path) -> str:
    """The CA file as an absolute path, checked to be a readable PEM file here and now."""
    import ssl

    absolute = path.expanduser().absolute()
    if not absolute.is_file():
        fail(f"--ca-file {absolute}: no such file", code=USAGE_ERROR)
    try:
        ssl.create_default_context(cafile=str(absolute))
    except ssl.SSLError:
        fail(f"--ca-file {absolute}: not a PEM certificate file", code=USAGE_ERROR)
    except OSError as exc:
        fail(f"--ca-file {absolute}: cannot read it ({exc.strerror or exc})", code=USAGE_ERROR)
    return str(absolute)


def _changes(given: dict[str, Any]) -> dict[str, Any]:
    """The `PbxConfig` fields the options given set (None: not given)."""
    changes: dict[str, Any] = {}
    for name in ("kind", "url", "username", "api_version", "tls_min_version", "timezone"):
        if given.get(name) is not None:
            changes[name] = given[name]
    if given.get("client_id") is not None:
        if given.get("username") is not None:
            fail("give --client-id (P-Series) or --username, not both", code=USAGE_ERROR)
        changes["username"] = given["client_id"]
    if given.get("max_downloads") is not None:
        changes["max_downloads"] = given["max_downloads"]
    if given.get("events_allow") is not None:
        changes["events_allow"] = tuple(given["events_allow"].split(","))
    if given.get("report_url") is not None:
        changes["report_url"] = given["report_url"].strip() or None
    if given.get("tcp_report_port") is not None:
        changes["tcp_report_port"] = given["tcp_report_port"] or None
    trust = [
        ("ca_file", given.get("ca_file")),
        ("pin_sha256", given.get("pin_sha256")),
        ("insecure", given.get("insecure")),
    ]
    chosen = [name for name, value in trust if value]
    if given.get("trust_system"):
        chosen.append("trust_system")
    if len(chosen) > 1:
        flags = " and ".join("--" + name.replace("_", "-") for name in chosen)
        options = "--ca-file, --pin-sha256" + (
            ", --insecure and --trust-system" if "trust_system" in given else " and --insecure"
        )
        fail(f"choose only one of {options}, not {flags}", code=USAGE_ERROR)
    if chosen:
        changes.update(ca_file=None, pin_sha256=None, insecure=False)
        if chosen[0] == "ca_file":
            changes["ca_file"] = _ca_file(given["ca_file"])
        elif chosen[0] == "pin_sha256":
            changes["pin_sha256"] = given["pin_sha256"]
        elif chosen[0] == "insecure":
            changes["insecure"] = True
    return changes


def _settings(config: Path | None, archive: Path | None, db: str | None, **more: Any) -> Settings:
    return settings_or_fail(config, archive=archive, db=db, **more)


def _settings_of(given: dict[str, Any]) -> Settings:
    """The settings of `pbx add`/`edit`, taking their options out of `given`."""
    return _settings(
        given.pop("config"),
        given.pop("archive"),
        given.pop("db"),
        master_key_file=given.pop("master_key_file"),
    )


def _index(settings: Settings) -> Index:
    from callvault.cli._archive_cmds import open_settings_archive

    return open_settings_archive(settings, create=True, check=True).index


def _keyring(settings: Settings) -> Any:
    try:
        return settings.keyring()
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)


def _now() -> datetime:
    return datetime.now(UTC)


def _warn_insecure(config: PbxConfig) -> None:
    import sys

    if config.url.startswith("http://"):
        print(
            "callvault: warning: the PBX URL is plain http: the password hash, the token and "
            "every recording cross the network unencrypted; use https",
            file=sys.stderr,
        )
    elif config.insecure:
        print(
            "callvault: warning: --insecure: the PBX's certificate is not checked; anyone on "
            "the network path can pose as the PBX and read the token and recordings",
            file=sys.stderr,
        )


@pbx_app.command("add")
@click.argument("name")
@_connection_options(adding=True)
def pbx_add(name: str, **given: Any) -> None:
    """Register a PBX to archive. Its password is sealed with the master key."""
    from callvault.ops import add_pbx

    settings = _settings_of(given)
    kind = given.get("kind") or "s-series"
    if kind != "p-series":
        for flag, key in (("--client-id", "client_id"), ("--secret-env", "secret_env")):
            if given.get(key) is not None:
                fail(
                    f"{flag} is for --kind p-series (a P-Series PBX's API application); "
                    f"this {kind} PBX takes --username and --password-env",
                    code=USAGE_ERROR,
                )
    else:
        for flag, key in (("--username", "username"), ("--password-env", "password_env")):
            if given.get(key) is not None:
                fail(
                    f"{flag} is for an API user of the S-Series API; a p-series PBX takes "
                    "its API application's --client-id and --secret-env",
                    code=USAGE_ERROR,
                )
    changes = _changes(given)
    user_flag, secret_flag = (
        ("--client-id", "--secret-env") if kind == "p-series" else ("--username", "--password-env")
    )
    if changes.get("url") is None:
        fail("missing option --url", code=USAGE_ERROR)
    if changes.get("username") is None:
        fail(f"missing option {user_flag}", code=USAGE_ERROR)
    secret_env = _secret_env(given)
    if secret_env is None:
        fail(f"missing option {secret_flag}", code=USAGE_ERROR)
    webhook_secret = _webhook_secret(given, kind)
    keyring = _keyring(settings)
    password = _password(secret_env)
    config = PbxConfig(
        url=changes.pop("url"),
        username=changes.pop("username"),
        **changes,
    )
    index = _index(settings)
    try:
        record = add_pbx(
            index,
            keyring,
            name,
            config,
            password,
            webhook_secret=webhook_secret,
            actor=cli_actor(),
            remote_addr="local",
            now=_now(),
        )
    except PbxRegistryError as exc:
        fail(str(exc), code=USAGE_ERROR)
    finally:
        index.close()
    _warn_insecure(record.config)
    api = "OpenAPI" if record.config.kind == "p-series" else f"API {record.config.api_version}"
    print(
        f"added PBX {record.name} ({record.config.kind}, {record.config.url}, {api}); "
        f"check it with `callvault pbx test {record.name}`"
    )
    if record.has_webhook_secret:
        _tell_webhook(settings, record.name, record.events_path)


@pbx_app.command("edit")
@click.argument("name")
@_connection_options(adding=False)
def pbx_edit(name: str, **given: Any) -> None:
    """Change a registered PBX's settings or password (only the options given change)."""
    from callvault.ops import edit_pbx

    settings = _settings_of(given)
    password_env = _secret_env(given)
    drop_webhook = bool(given.pop("drop_webhook_secret", False))
    webhook_secret = _webhook_secret(given, given.get("kind"))
    if webhook_secret is not None and drop_webhook:
        fail("give --webhook-secret-env or --drop-webhook-secret, not both", code=USAGE_ERROR)
    sealing = password_env is not None or webhook_secret is not None
    keyring = _keyring(settings) if sealing else None
    password = _password(password_env) if password_env is not None else None
    changes = _changes(given)
    index = _index(settings)
    try:
        if not changes and password is None and webhook_secret is None and not drop_webhook:
            index.pbxs.require(name)  # a name the registry has not is the first thing wrong
            fail("nothing to change: give the options to change, e.g. --url", code=USAGE_ERROR)
        edited = edit_pbx(
            index,
            name,
            changes,
            password=password,
            webhook_secret=webhook_secret,
            drop_webhook_secret=drop_webhook,
            keyring=keyring,
            actor=cli_actor(),
            remote_addr="local",
            now=_now(),
        )
    except PbxRegistryError as exc:
        fail(str(exc), code=USAGE_ERROR)
    finally:
        index.close()
    _warn_insecure(edited.record.config)
    words = _PSERIES_WORDS if edited.record.config.kind == "p-series" else {}
    what = (
        ", ".join(words.get(w, w).replace("_", "-") for w in edited.changed)
        or "nothing (as it was)"
    )
    print(f"changed PBX {name}: {what}")
    if webhook_secret is not None:
        _tell_webhook(settings, name, edited.record.events_path)


@pbx_app.command("list")
@json_flag
@archive_options
def pbx_list(as_json: bool, archive: Path | None, db: str | None, config: Path | None) -> None:
    """List the registered PBXs."""
    from callvault.ops import pbx_view

    index = _index(_settings(config, archive, db))
    try:
        views = [pbx_view(record) for record in index.pbxs.list()]
    finally:
        index.close()
    if as_json:
        print(json.dumps([view.to_json() for view in views]))
        return
    if not views:
        print("no PBXs registered: add one with `callvault pbx add NAME --url ...`")
        return
    print(f"{'NAME':<16} {'KIND':<9} {'URL':<36} {'API':<7} {'TLS':<10} {'SERIAL':<16} LAST TEST")
    for view in views:
        test = view.last_test
        last = (
            "never"
            if not test
            else ("ok " if test.get("ok") else "FAILED ") + str(test.get("tested_at", ""))[:16]
        )
        print(
            f"{view.name:<16} {view.kind:<9} {view.url:<36} "
            f"{view.api_version:<7} {view.tls:<10} "
            f"{view.serial or '-':<16} {last}"
        )


# How a P-Series PBX's registry fields are called in its own terms, and the fields that
# mean nothing for it (its events come over its WebSocket, or as signed webhooks from the
# addresses `events_allow` lets in).
_PSERIES_WORDS = {"username": "client_id", "password": "client_secret"}
_SSERIES_ONLY = ("report_url", "tcp_report_port")


@pbx_app.command("show")
@click.argument("name")
@json_flag
@archive_options
def pbx_show(
    name: str, as_json: bool, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Show one registered PBX (never its password nor its webhook secret).

    For a P-Series PBX, also the URL to give its webhook (it holds the PBX's secret path:
    keep it to yourself)."""
    from callvault.ops import pbx_view

    settings = _settings(config, archive, db)
    index = _index(settings)
    try:
        record = index.pbxs.require(name)
        view = pbx_view(record)
    except NoSuchPbx as exc:
        fail(str(exc), code=USAGE_ERROR)
    except PbxRegistryError as exc:
        fail(str(exc))
    finally:
        index.close()
    if as_json:
        print(json.dumps(view.to_json()))
        return
    data = view.to_json()
    pseries = view.kind == "p-series"
    for key, value in data.items():
        if key == "last_test" or (pseries and key in _SSERIES_ONLY):
            continue
        shown = ", ".join(value) if isinstance(value, list) else value
        if key == "events_allow" and not value:
            shown = "its own address"
        if key == "report_url" and not value:
            shown = "the node that logged in"
        if key == "webhook_secret":
            if view.kind != "p-series":
                continue
            shown = "set" if value else "none (its webhooks are refused)"
        if key == "given_by_flags":
            shown = "yes (serve's --pbx; its password is not kept)" if value else "no"
        label = (_PSERIES_WORDS.get(key, key) if pseries else key).replace("_", " ")
        print(f"{label:<16} {'-' if shown in (None, '') else shown}")
        if key == "webhook_secret":
            print(f"{'webhook url':<16} {_webhook_url(settings, record.events_path)}")
    test = view.last_test
    if not test:
        print(f"{'last test':<16} never (run `callvault pbx test {name}`)")
    elif test.get("ok"):
        print(f"{'last test':<16} ok at {test.get('tested_at')}")
    else:
        print(f"{'last test':<16} FAILED at {test.get('tested_at')}: {test.get('error')}")


@pbx_app.command("remove")
@click.argument("name")
@archive_options
def pbx_remove(name: str, archive: Path | None, db: str | None, config: Path | None) -> None:
    """Take a PBX off the registry (refused while calls of it are archived: they are known
    by it)."""
    from callvault.ops import remove_pbx

    index = _index(_settings(config, archive, db))
    try:
        remove_pbx(index, name, actor=cli_actor(), remote_addr="local")
    except NoSuchPbx as exc:
        fail(str(exc), code=USAGE_ERROR)
    except PbxRegistryError as exc:  # calls of it are archived
        fail(str(exc))
    finally:
        index.close()
    print(f"removed PBX {name}; its recordings stay in the archive")


@pbx_app.command("test")
@click.argument("name")
@json_flag
@master_key_file_option
@archive_options
def pbx_test(
    name: str,
    as_json: bool,
    master_key_file: Path | None,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Log in to a registered PBX once and say what it found; exit 1 if the login failed,
    or if the PBX answers like another kind than registered (a Yeastar Cloud PBX as
    s-series, or the reverse: the line gives the `pbx edit` that fixes it).

    Asks the PBX for no reports, so a running `serve` keeps receiving them. A wrong
    password is tried once only: five would lock this host out of the PBX for ten minutes.
    """
    from callvault.keys import MasterKeyError
    from callvault.ops import test_pbx

    settings = _settings(config, archive, db, master_key_file=master_key_file)
    index = _index(settings)
    # The client logs a refused login at ERROR for serve's log; here the result says it,
    # in one line of its own.
    logging.getLogger("callvault.pbx").setLevel(logging.CRITICAL)
    from callvault.ops import RefusedRecently

    try:
        record = index.pbxs.require(name)  # an unknown name first, before a missing key
        keyring = _keyring(settings)
        result = run_terminable(test_pbx(index, record, keyring, now=_now()))
    except NoSuchPbx as exc:
        fail(str(exc), code=USAGE_ERROR)
    except RefusedRecently as exc:
        if not as_json:
            fail(str(exc))
        result = exc.test
    except (PbxRegistryError, MasterKeyError) as exc:
        fail(str(exc))
    finally:
        index.close()
    if as_json:
        print(json.dumps(result.to_json()))
        raise SystemExit(0 if result.ok else 1)
    if not result.ok:
        fail(f"PBX {name}: {result.error}")
    print(f"PBX {name}: logged in to {record.config.url} in {result.seconds:.1f} s")
    print(f"  kind              {result.kind}")
    print(f"  API version       {result.api_version}")
    transport = result.report_transport or "HTTP (the PBX did not say; v1 has HTTP only)"
    print(f"  reports           {transport}")
    print(f"  calls, last 24 h  {result.calls_last_day}")
    print(f"  serial            {result.serial or 'not known yet (its reports will say)'}")


@keys_app.command("create")
@option("--file", "path", type=PATH, required=True, metavar="FILE", help="The new key file.")
def keys_create(path: Path) -> None:
    """Make a new master key in a new file readable by you only (never replacing one)."""
    from callvault.keys import MasterKeyError, create_key_file

    absolute = path.expanduser().absolute()
    try:
        key = create_key_file(absolute)
    except MasterKeyError as exc:
        fail(str(exc))
    print(f"wrote master key {key.id} to {absolute} (readable by you only)")
    print(
        "keep a copy somewhere safe: without it the PBX passwords sealed with it cannot be "
        "read; name it with --master-key-file, CALLVAULT_MASTER_KEY_FILE or master_key_file "
        "in the config file"
    )


@keys_app.command("show")
@click.option(
    "--pem",
    is_flag=True,
    default=False,
    help="Print only the signing key's public key, PEM, for `> deployment.pem`.",
)
@master_key_file_option
@archive_options
def keys_show(
    pem: bool,
    master_key_file: Path | None,
    archive: Path | None,
    db: str | None,
    config: Path | None,
) -> None:
    """Show which master keys are loaded, by id (never the keys), and the deployment's
    signing keys: the public keys that check its audit checkpoints and signed exports
    (the first is made now, if the master key is loaded and there is none yet)."""
    from callvault.keys import MasterKeyError
    from callvault.ops import public_keys, signer

    settings = _settings(config, archive, db, master_key_file=master_key_file)
    try:
        keyring = settings.optional_keyring()
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)
    try:
        settings.db_url()
    except SettingsError:  # no archive given: the master keys only
        index = None
    else:
        index = _index(settings)
    keys = []
    try:
        if index is not None and keyring is not None:
            signer(index, keyring, now=_now(), actor=cli_actor())
        keys = [] if index is None else public_keys(index)
    except MasterKeyError as exc:
        fail(str(exc))
    finally:
        if index is not None:
            index.close()
    if pem:
        active = next((key for key in keys if key.active), None)
        if active is None:
            fail("no signing key yet: load the master key (--master-key-file) to make one")
        print(active.pem, end="")
        return
    if keyring is None:
        print("master keys: none loaded (--master-key-file, CALLVAULT_MASTER_KEY_FILE)")
    else:
        ids = keyring.ids()
        print(f"master keys from {keyring.source}: {ids[0]} (seals new secrets)", end="")
        print(
            "".join(f", {key_id}" for key_id in ids[1:]) + ("" if len(ids) == 1 else " (open only)")
        )
    if index is None:
        print("signing keys: kept in the index (give --archive or --db to see them)")
    elif not keys:
        print("signing keys: none yet (made when the master key is loaded)")
    for key in keys:
        state = "signs" if key.active else f"retired {key.retired_at:%Y-%m-%d}"
        print(f"signing key {key.id} ({state}, made {key.created_at:%Y-%m-%d %H:%M} UTC)")
        print(f"  fingerprint sha256:{key.fingerprint}")
        if key.active:
            print("  " + key.pem.strip().replace("\n", "\n  "))


@keys_app.command("rotate")
@master_key_file_option
@archive_options
def keys_rotate(
    master_key_file: Path | None, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Re-seal under the primary master key (the first in the key file) everything older
    keys sealed: encrypted recordings' data keys (the audio is not re-encrypted), the PBX
    passwords and the signing keys. Resumable: run it again after an interruption. When
    it reports nothing left, the old keys can be removed from the key file."""
    from callvault.cli._common import counting_bar, plural
    from callvault.ops import rotate_master_keys

    settings = _settings(config, archive, db, master_key_file=master_key_file)
    keyring = _keyring(settings)
    index = _index(settings)
    try:
        with counting_bar() as bar:
            task = bar.add_task("re-sealing recordings' data keys", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            report = rotate_master_keys(
                index, keyring, now=_now(), actor=cli_actor(), progress=progress
            )
    finally:
        index.close()
    print(
        f"re-sealed under master key {report.primary}: {plural(report.recordings, 'data key')} "
        f"of recordings, {plural(report.pbx_passwords, 'PBX password')}, "
        f"{plural(report.webhook_secrets, 'webhook secret')}, "
        f"{plural(report.pbx_tokens, 'P-Series token set')}, "
        f"{plural(report.signing_keys, 'signing key')}"
    )
    for message in report.failed:
        print(f"NOT RE-SEALED {message}", file=sys.stderr)
    if report.failures or report.remaining:
        fail(
            f"{report.failures} sealed values did not open and {report.remaining} remain under "
            "other keys: keep the old keys until they are re-sealed (add the missing key and "
            "run `callvault keys rotate` again)"
        )
    print("nothing is sealed under another key now: the old keys can be removed")


@keys_app.command("rotate-signing")
@master_key_file_option
@archive_options
def keys_rotate_signing(
    master_key_file: Path | None, archive: Path | None, db: str | None, config: Path | None
) -> None:
    """Make a new signing key for audit checkpoints and exports; the old ones are retired
    (kept, so that what they signed can still be checked)."""
    from callvault.keys import MasterKeyError
    from callvault.ops import rotate_signing_key

    settings = _settings(config, archive, db, master_key_file=master_key_file)
    keyring = _keyring(settings)
    index = _index(settings)
    try:
        key = rotate_signing_key(index, keyring, now=_now(), actor=cli_actor())
    except MasterKeyError as exc:
        fail(str(exc))
    finally:
        index.close()
    print(f"signing key {key.id} now signs (fingerprint sha256:{key.public.fingerprint})")
    print("publish its public key (`callvault keys show --pem`) where auditors will find it")
