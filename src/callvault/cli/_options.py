"""The command-line options every command spells the same way (Typer `Annotated` types).

Each option defaults to None, meaning "not given": `callvault.cli._settings.load_settings`
then takes it from the environment (``CALLVAULT_`` + its name), the ``--config`` file or the
default, so every option of every command can come from any of the three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from callvault.cli._settings import DEFAULT_PASSWORD_ENV

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="TOML file with any of these options (flags and CALLVAULT_* variables win).",
        show_default=False,
    ),
]

# -- the PBX ---------------------------------------------------------------------------------

PbxOption = Annotated[
    str | None,
    typer.Option(
        "--pbx",
        metavar="URL",
        help="PBX URL, https://HOST:PORT (the web port, 8088 by default). Env CALLVAULT_PBX.",
        show_default=False,
    ),
]
UsernameOption = Annotated[
    str | None,
    typer.Option(
        "--username",
        metavar="NAME",
        help="API user name. Env CALLVAULT_USERNAME.",
        show_default=False,
    ),
]
PasswordEnvOption = Annotated[
    str | None,
    typer.Option(
        "--password-env",
        metavar="VAR",
        help="Name of the environment variable that holds the API password "
        f"(default {DEFAULT_PASSWORD_ENV}).",
        show_default=False,
    ),
]
ApiVersionOption = Annotated[
    str | None,
    typer.Option(
        "--api-version",
        metavar="VERSION",
        help="API version path: v1.0.1, v1.1.0 or v2.0.0 (default v1.1.0).",
        show_default=False,
    ),
]
CaFileOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        metavar="FILE",
        help="Trust the PBX certificate signed by this CA (PEM).",
        show_default=False,
    ),
]
PinOption = Annotated[
    str | None,
    typer.Option(
        "--pin-sha256",
        metavar="HEX",
        help="Trust exactly the PBX certificate with this SHA-256 fingerprint.",
        show_default=False,
    ),
]
InsecureOption = Annotated[
    bool | None,
    typer.Option(
        "--insecure",
        help="Do not check the PBX's certificate at all (anyone on the way can read the "
        "token and the recordings).",
        show_default=False,
    ),
]
TlsMinVersionOption = Annotated[
    str | None,
    typer.Option(
        "--tls-min-version",
        metavar="VERSION",
        help="Lowest TLS version to accept (default 1.2; old firmware: 1.0).",
        show_default=False,
    ),
]

# -- the archive -----------------------------------------------------------------------------

ArchiveOption = Annotated[
    Path | None,
    typer.Option(
        "--archive",
        metavar="DIR",
        help="Archive directory (recordings; the index too unless --db). Env CALLVAULT_ARCHIVE.",
        show_default=False,
    ),
]
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        help="Index database: a SQLAlchemy URL (postgresql+psycopg://...) or a SQLite file "
        "(default ARCHIVE/callvault.db).",
        show_default=False,
    ),
]
TimezoneOption = Annotated[
    str | None,
    typer.Option(
        "--timezone",
        metavar="ZONE",
        help="The PBX's time zone, e.g. Europe/Berlin (default the host's).",
        show_default=False,
    ),
]
ShowTimezoneOption = Annotated[
    str | None,
    typer.Option(
        "--timezone",
        metavar="ZONE",
        help="Time zone to show and read times in. Default: CALLVAULT_TIMEZONE or the config "
        "file's timezone, else the PBX's zone as serve/backfill saved it, else the host's.",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (the same shape as the web API's).")
]

# -- the web app -----------------------------------------------------------------------------

SecureCookiesOption = Annotated[
    bool | None,
    typer.Option(
        "--secure-cookies",
        help="Mark the web app's cookies Secure (when TLS is terminated in front of it).",
        show_default=False,
    ),
]
TrustedProxyOption = Annotated[
    str | None,
    typer.Option(
        "--trusted-proxy",
        metavar="IP",
        help="IP address of the reverse proxy in front of the web app: its X-Forwarded-For "
        "and X-Forwarded-Proto are believed, from that address only (default: none).",
        show_default=False,
    ),
]
