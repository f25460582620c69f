"""The PBX connection options every command spells the same way, and the client they build.

    --pbx URL              (env CALLVAULT_PBX)       https://HOST:PORT of the PBX web server
    --username U           (env CALLVAULT_USERNAME)  the API account
    --password-env VAR     name of the environment variable holding the password
                           (default CALLVAULT_PASSWORD; the password itself is never a flag)
    --api-version V        v1.0.1, v1.1.0 (default) or v2.0.0
    --ca-file F | --pin-sha256 HEX | --insecure      how to trust the PBX's certificate
    --tls-min-version V    1.2 unless the PBX runs old firmware

Every command that talks to the PBX (fetch, cdr, serve, backfill) declares the options with
these Annotated types; `PbxOptions` turns them into a client, TLS options and the password,
each bad option ending the command with one line (exit status 2).
"""

from __future__ import annotations

import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from callvault.cli._common import fail
from callvault.pbx import ApiVersion, PbxClient, TlsOptions

DEFAULT_PASSWORD_ENV = "CALLVAULT_PASSWORD"  # noqa: S105 (a variable name, not a password)

PbxUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--pbx",
        envvar="CALLVAULT_PBX",
        help="PBX URL, https://HOST:PORT (the web port, 8088 by default).",
        show_default=False,
    ),
]
UsernameOpt = Annotated[
    str | None,
    typer.Option(
        "--username", envvar="CALLVAULT_USERNAME", help="API user name.", show_default=False
    ),
]
PasswordEnvOpt = Annotated[
    str | None,
    typer.Option(
        "--password-env",
        metavar="VAR",
        help="Name of the environment variable that holds the API password "
        f"(default {DEFAULT_PASSWORD_ENV}).",
        show_default=False,
    ),
]
ApiVersionOpt = Annotated[
    str | None,
    typer.Option(
        "--api-version",
        help="API version path: v1.0.1, v1.1.0 or v2.0.0 (default v1.1.0).",
        show_default=False,
    ),
]
CaFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-file", help="Trust the PBX certificate signed by this CA (PEM).", show_default=False
    ),
]
PinOpt = Annotated[
    str | None,
    typer.Option(
        "--pin-sha256",
        metavar="HEX",
        help="Trust exactly the PBX certificate with this SHA-256 fingerprint.",
        show_default=False,
    ),
]
InsecureOpt = Annotated[
    bool | None,
    typer.Option(
        "--insecure",
        help="Do not check the PBX's certificate at all (anyone on the way can read the "
        "token and the recordings).",
        show_default=False,
    ),
]
TlsMinOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-min-version",
        help="Lowest TLS version to accept (default 1.2; old firmware: 1.0).",
        show_default=False,
    ),
]

# Bad options end a command with exit status 2, as Click does for usage errors; 1 is for
# work that failed (a recording not fetched, the PBX refusing a login).
USAGE_ERROR = 2


@dataclass(frozen=True)
class PbxOptions:
    """The PBX options as given on the command line."""

    pbx: str | None
    username: str | None
    password_env: str | None = None  # None: DEFAULT_PASSWORD_ENV
    api_version: str | None = None  # None: v1.1.0
    ca_file: Path | None = None
    pin_sha256: str | None = None
    insecure: bool | None = None
    tls_min_version: str | None = None  # None: 1.2

    def tls_options(self) -> TlsOptions:
        chosen = [
            flag
            for flag, given in (
                ("--ca-file", self.ca_file is not None),
                ("--pin-sha256", self.pin_sha256 is not None),
                ("--insecure", self.insecure),
            )
            if given
        ]
        if len(chosen) > 1:
            fail(
                f"choose one of --ca-file, --pin-sha256 and --insecure, not {' and '.join(chosen)}",
                USAGE_ERROR,
            )
        if self.ca_file is not None and not self.ca_file.is_file():
            fail(f"--ca-file {self.ca_file}: no such file", USAGE_ERROR)
        try:
            tls = TlsOptions(
                ca_file=self.ca_file,
                pin_sha256=self.pin_sha256,
                insecure=bool(self.insecure),
                minimum_version=self.tls_min_version or "1.2",
            )
            tls.ssl_context()  # a CA file that is not PEM fails here, with one line
        except ssl.SSLError:
            fail(f"--ca-file {self.ca_file}: not a PEM certificate file", USAGE_ERROR)
        except OSError as exc:  # unreadable: permissions, I/O error
            fail(f"--ca-file {self.ca_file}: cannot read it ({exc.strerror or exc})", USAGE_ERROR)
        except ValueError as exc:
            fail(str(exc), USAGE_ERROR)
        if self.insecure:
            print(
                "callvault: warning: --insecure: the PBX's certificate is not checked; anyone "
                "on the network path can pose as the PBX and read the token and recordings",
                file=sys.stderr,
            )
        return tls

    def api_version_value(self) -> ApiVersion:
        text = (self.api_version or ApiVersion.V1_1_0.value).strip()
        try:
            return ApiVersion(text)
        except ValueError:
            fail(
                f"unknown --api-version {text!r}: use " + ", ".join(v.value for v in ApiVersion),
                USAGE_ERROR,
            )

    def require(self) -> tuple[str, str]:
        """The PBX URL and the user name, which every PBX command needs."""
        if not self.pbx:
            fail("no PBX given: pass --pbx https://HOST:8088 or set CALLVAULT_PBX", USAGE_ERROR)
        if not self.username:
            fail("no API user name given: pass --username or set CALLVAULT_USERNAME", USAGE_ERROR)
        return self.pbx, self.username

    def password(self) -> str:
        var = (self.password_env or DEFAULT_PASSWORD_ENV).strip()
        if not var:
            fail("--password-env needs the name of an environment variable", USAGE_ERROR)
        value = os.environ.get(var)
        if not value:
            fail(
                f"the API password is not set: put it in the environment variable {var} "
                "(or name another variable with --password-env)",
                USAGE_ERROR,
            )
        return value

    def build_client(self, **client_kwargs: Any) -> PbxClient:
        """A PbxClient for these options; every bad option ends the command with one line."""
        pbx, username = self.require()
        api_version = self.api_version_value()
        tls = self.tls_options()
        password = self.password()
        try:
            client = PbxClient(
                pbx, username, password, api_version=api_version, tls=tls, **client_kwargs
            )
        except ValueError as exc:
            fail(str(exc), USAGE_ERROR)
        if client.base_url.startswith("http://"):
            print(
                "callvault: warning: the PBX URL is plain http: the password hash, the token "
                "and every recording cross the network unencrypted; use https",
                file=sys.stderr,
            )
        return client
