"""The command-line options every command spells the same way (click decorators).

Each option defaults to None, meaning "not given": `callvault.cli._settings.load_settings`
then takes it from the environment (``CALLVAULT_`` + its name), the ``--config`` file or the
default, so every option of every command can come from any of the three. A command passes
what it received to `settings_or_fail(config, **flags)`.

    @app.command("list")
    @json_option
    @archive_options          # --archive, --db, --config
    def list_command(json_output: bool, archive: Path | None, db: str | None, ...): ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from callvault.cli._settings import CONNECTION_OPTIONS, DEFAULT_PASSWORD_ENV

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]

PATH = click.Path(path_type=Path)


def option(*declarations: str, **settings: Any) -> Decorator[Any]:
    """A click option that is None unless given (the settings loader fills the rest).

    A required one gets no default at all: click (8.2 and later) takes an explicit
    ``default=None`` as a value given, and would hand the command None instead of saying
    which option is missing."""
    if not settings.get("required"):
        settings.setdefault("default", None)
    settings.setdefault("show_default", False)
    return click.option(*declarations, **settings)


def flag(*declarations: str, help: str) -> Decorator[Any]:
    """An on/off flag: True when given, None (not given) otherwise."""
    return click.option(*declarations, is_flag=True, default=None, help=help)


def _apply(*decorators: Decorator[Any]) -> Decorator[Any]:
    def apply(function: F) -> F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


config_option = option(
    "--config",
    type=PATH,
    metavar="FILE",
    help="TOML file with any of these options (flags and CALLVAULT_* variables win).",
)
json_option = click.option(
    "--json",
    "json_output",
    is_flag=True,
    default=False,
    help="Print JSON (the same shape as the web API's).",
)

# -- the PBX ---------------------------------------------------------------------------------

_pbx_option_list = _apply(
    option(
        "--pbx",
        metavar="URL|NAME",
        help="PBX URL, https://HOST:PORT (the web port, 8088 by default), or the NAME of a "
        "PBX registered with `callvault pbx add`, whose settings then come from the registry. "
        "Env CALLVAULT_PBX.",
    ),
    option(
        "--kind",
        # callvault.pbx.PBX_KINDS, spelled out: importing it would load the protocol
        # package for every command (tests/test_cli_archive_settings.py checks they agree).
        type=click.Choice(("s-series", "cloud", "p-series")),
        help="Which API the PBX speaks: s-series (default), cloud (the S-Series-based Yeastar "
        "Cloud PBX) or p-series (the P-Series OpenAPI: --username is its API application's "
        "Client ID, the password its Client Secret). Env CALLVAULT_KIND.",
    ),
    option("--username", metavar="NAME", help="API user name. Env CALLVAULT_USERNAME."),
    option(
        "--password-env",
        metavar="VAR",
        help="Name of the environment variable that holds the API password "
        f"(default {DEFAULT_PASSWORD_ENV}).",
    ),
    option(
        "--api-version",
        metavar="VERSION",
        help="API version path: v1.0.1, v1.1.0 or v2.0.0 (default v1.1.0).",
    ),
    option(
        "--ca-file",
        type=PATH,
        metavar="FILE",
        help="Trust the PBX certificate signed by this CA (PEM).",
    ),
    option(
        "--pin-sha256",
        metavar="HEX",
        help="Trust exactly the PBX certificate with this SHA-256 fingerprint.",
    ),
    flag(
        "--insecure",
        help="Do not check the PBX's certificate at all (anyone on the way can read the "
        "token and the recordings).",
    ),
    option(
        "--tls-min-version",
        metavar="VERSION",
        help="Lowest TLS version to accept (default 1.2; old firmware: 1.0).",
    ),
)
PBX_OPTION_NAMES = ("pbx", *CONNECTION_OPTIONS)
PbxFlags = dict[str, Any]


def pbx_options(function: F) -> F:
    """The PBX options (--pbx, --username, --password-env, --api-version and how to trust
    its certificate), handed to the command as ONE argument, `pbx_flags`, to pass on:
    ``settings_or_fail(config, **pbx_flags, ...)``."""

    @functools.wraps(function)
    def gathered(*args: Any, **kwargs: Any) -> Any:
        kwargs["pbx_flags"] = {name: kwargs.pop(name) for name in PBX_OPTION_NAMES}
        return function(*args, **kwargs)

    return cast(F, _pbx_option_list(gathered))


# -- the archive -----------------------------------------------------------------------------

archive_option = option(
    "--archive",
    type=PATH,
    metavar="DIR",
    help="Archive directory (recordings; the index too unless --db). Env CALLVAULT_ARCHIVE.",
)
db_option = option(
    "--db",
    metavar="URL",
    help="Index database: a SQLAlchemy URL (postgresql+psycopg://...) or a SQLite file "
    "(default ARCHIVE/callvault.db).",
)
archive_options = _apply(archive_option, db_option, config_option)
# Where a command that talks to one PBX finds a registered one given by --pbx NAME.
registry_options = _apply(
    option(
        "--archive",
        type=PATH,
        metavar="DIR",
        help="Archive directory whose index holds the PBX registry, for --pbx NAME. Env "
        "CALLVAULT_ARCHIVE.",
    ),
    db_option,
    option(
        "--master-key-file",
        type=PATH,
        metavar="FILE",
        help="File of master keys that open a registered PBX's secret, for --pbx NAME "
        "(default: CALLVAULT_MASTER_KEY or CALLVAULT_MASTER_KEY_FILE).",
    ),
)
storage_option = option(
    "--storage",
    metavar="URL",
    help="Where the recordings are kept: file:///DIR or s3://BUCKET/PREFIX (endpoint and "
    "credentials the AWS ways: AWS_ENDPOINT_URL, AWS_PROFILE...) (default the archive "
    "directory).",
)

timezone_option = option(
    "--timezone",
    metavar="ZONE",
    help="The PBX's time zone, e.g. Europe/Berlin (default the host's).",
)
show_timezone_option = option(
    "--timezone",
    metavar="ZONE",
    help="Time zone to show and read times in. Default: CALLVAULT_TIMEZONE or the config "
    "file's timezone, else the PBX's zone as serve/backfill saved it, else the host's.",
)

# -- the web app -----------------------------------------------------------------------------

secure_cookies_option = flag(
    "--secure-cookies",
    help="Mark the web app's cookies Secure (when TLS is terminated in front of it).",
)
trusted_proxy_option = option(
    "--trusted-proxy",
    metavar="IP",
    help="IP address of the reverse proxy in front of the web app: its X-Forwarded-For "
    "and X-Forwarded-Proto are believed, from that address only (default: none).",
)
