"""`ArchiveSettings`: every option of the archive commands, from flags, environment and TOML.

Precedence, highest first: command-line flags, environment variables (``CALLVAULT_`` +
the option name in capitals, e.g. ``CALLVAULT_ARCHIVE``, ``CALLVAULT_WORKERS``; lists as
JSON or comma-separated), the TOML file given with ``--config`` (flat ``key = value`` with
the option names, dashes or underscores), then the defaults below.

The PBX password is never a setting: ``password_env`` names the environment variable that
holds it (default ``CALLVAULT_PASSWORD``).

The reusable Typer options for ``--archive``, ``--db`` and ``--config`` (and the PBX options
of ``serve``/``backfill``) live here too, so every command spells them the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import json
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from callvault.cli._pbxopts import (
    ApiVersionOpt,
    CaFileOpt,
    InsecureOpt,
    PasswordEnvOpt,
    PbxOptions,
    PbxUrlOpt,
    PinOpt,
    TlsMinOpt,
    UsernameOpt,
)
from callvault.pbx import normalise_pin
from callvault.pbx._types import ApiVersion

DB_FILENAME = "callvault.db"
_toml_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "callvault_toml_values", default=None
)


class SettingsError(ValueError):
    """The options cannot be used: a bad config file or a bad value. One line, for people."""


def host_timezone() -> str:
    """The host's IANA time zone name (TZ, /etc/timezone, /etc/localtime), else "UTC"."""
    candidates: list[str] = []
    env = os.environ.get("TZ", "").lstrip(":")
    if env:
        candidates.append(env)
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text(encoding="utf-8").strip())
    try:
        target = os.readlink("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            continue
        return name
    return "UTC"


def _host_port(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT, e.g. 127.0.0.1:8080")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (IPv6 in brackets) as (host, port)."""
    host, _sep, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class ArchiveSettings(BaseSettings):
    """Every option of ``callvault serve``; the other archive commands use a subset."""

    model_config = SettingsConfigDict(
        env_prefix="CALLVAULT_",
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    # The PBX
    pbx: str | None = Field(default=None, description="PBX base URL, https://HOST:PORT")
    username: str | None = Field(default=None, description="API account user name")
    password_env: str = Field(
        default="CALLVAULT_PASSWORD", description="environment variable holding the password"
    )
    api_version: ApiVersion = ApiVersion.V1_1_0
    ca_file: Path | None = None
    pin_sha256: str | None = None
    insecure: bool = False
    tls_min_version: str = "1.2"
    # The archive
    archive: Path | None = Field(default=None, description="archive directory")
    # repr=False: a PostgreSQL URL may carry a password.
    db: str | None = Field(
        default=None, description="index database URL or SQLite file", repr=False
    )
    # Services
    events_listen: str = "0.0.0.0:8260"
    events_allow: Annotated[list[str] | None, NoDecode] = None
    workers: int = Field(default=2, ge=1, le=64)
    timezone: str = Field(default_factory=host_timezone)
    web_listen: str = "127.0.0.1:8080"
    # The web app behind a TLS-terminating reverse proxy: mark cookies Secure, and believe
    # X-Forwarded-For/-Proto from the proxy's address (and from no other).
    secure_cookies: bool = False
    trusted_proxy: str | None = None
    reconcile_hours: int = Field(default=48, ge=1, le=24 * 366)
    reconcile_interval_s: int = Field(default=3600, ge=10)
    # Archiver tuning (rarely changed; tests and demos shrink them). See callvault.archive.
    job_lease_s: float = Field(default=300.0, gt=0)
    heartbeat_interval_s: float = Field(default=600.0, gt=0, le=1500)
    poll_interval_s: float = Field(default=5.0, gt=0)
    retry_schedule_s: list[float] = Field(default=[2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0])
    missing_after_s: float = Field(default=1800.0, ge=0)
    missing_min_attempts: int = Field(default=8, ge=1)
    transient_backoff_s: float = Field(default=5.0, gt=0)
    transient_backoff_max_s: float = Field(default=900.0, gt=0)
    transient_max_attempts: int = Field(default=12, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_source = InitSettingsSource(settings_cls, init_kwargs=_toml_values.get() or {})
        return (init_settings, env_settings, toml_source)

    @field_validator("pbx")
    @classmethod
    def _check_pbx(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be a URL like https://pbx.example:8088")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials (use username and password_env)")
        return value

    @field_validator("pin_sha256")
    @classmethod
    def _check_pin(cls, value: str | None) -> str | None:
        return None if value is None else normalise_pin(value)

    @field_validator("events_listen")
    @classmethod
    def _check_events_listen(cls, value: str) -> str:
        return _host_port(value, "events_listen")

    @field_validator("web_listen")
    @classmethod
    def _check_web_listen(cls, value: str) -> str:
        return _host_port(value, "web_listen")

    @field_validator("trusted_proxy")
    @classmethod
    def _check_trusted_proxy(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(
                f"{value!r:.60} is not an IP address (the reverse proxy's, e.g. 127.0.0.1)"
            ) from None

    @field_validator("events_allow", mode="before")
    @classmethod
    def _split_allow(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("events_allow")
    @classmethod
    def _check_allow(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for address in value:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(f"{address!r:.60} is not an IP address or network") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r:.60} (use e.g. Europe/Paris)") from None
        return value

    @field_validator("password_env")
    @classmethod
    def _check_password_env(cls, value: str) -> str:
        if not value or not value.replace("_", "a").isalnum():
            raise ValueError("must be the name of an environment variable")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ArchiveSettings:
        chosen = sum((self.ca_file is not None, self.pin_sha256 is not None, self.insecure))
        if chosen > 1:
            raise ValueError("choose only one of ca_file, pin_sha256 and insecure")
        return self

    # -- derived values -----------------------------------------------------------------

    @property
    def tz(self) -> ZoneInfo:
        """The PBX's time zone, to read the local times it sends."""
        return ZoneInfo(self.timezone)

    def given_timezone(self) -> str | None:
        """`timezone` if a flag, the environment (CALLVAULT_TIMEZONE) or the TOML file gave
        it; None if it is only the default (the host's zone)."""
        return self.timezone if "timezone" in self.model_fields_set else None

    def archive_dir(self) -> Path:
        """The archive directory, absolute; SettingsError if none was given."""
        if self.archive is None:
            raise SettingsError("no archive directory: give --archive DIR or set CALLVAULT_ARCHIVE")
        return self.archive.expanduser().absolute()

    def db_url(self) -> str:
        """The index URL: `db` (a URL, or a plain path meaning a SQLite file), by default the
        SQLite file ``callvault.db`` inside the archive directory."""
        if self.db:
            if "://" in self.db:
                return self.db
            return f"sqlite:///{Path(self.db).expanduser().absolute()}"
        return f"sqlite:///{self.archive_dir() / DB_FILENAME}"

    def pbx_host(self) -> str | None:
        """The host name or address in the PBX URL."""
        return urlsplit(self.pbx).hostname if self.pbx else None

    def allowed_event_sources(self) -> list[str]:
        """Addresses (or networks) allowed to post events: `events_allow`, else the PBX's
        address (resolved when the URL names a host). Empty when neither is known."""
        if self.events_allow is not None:
            return list(self.events_allow)
        host = self.pbx_host()
        if host is None:
            return []
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise SettingsError(
                f"cannot resolve the PBX host {host!r} to allow its events: {exc}; "
                "give --events-allow"
            ) from None
        return sorted({str(info[4][0]) for info in infos})

    def events_address(self) -> tuple[str, int]:
        """`events_listen` as (host, port)."""
        return split_host_port(self.events_listen)

    def web_address(self) -> tuple[str, int]:
        """`web_listen` as (host, port)."""
        return split_host_port(self.web_listen)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "password":
            raise SettingsError(
                f"config file {path}: the password goes in an environment variable "
                "(see password_env), never in a file"
            )
        if name not in ArchiveSettings.model_fields:
            raise SettingsError(f"config file {path}: unknown option {key!r}")
        values[name] = value
    return values


def _describe(error: ValidationError, config_file: Path | None) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if not location:
        return message
    if first["type"] == "extra_forbidden":
        where = f" in {config_file}" if config_file else ""
        return f"unknown option {location!r}{where}"
    return f"bad value for {location.replace('_', '-')}: {message}"


def load_settings(config_file: Path | None = None, **cli_overrides: Any) -> ArchiveSettings:
    """Build the settings from flags (`cli_overrides`; None means "not given"), the
    environment, the TOML `config_file` and the defaults. Raises `SettingsError` with one
    line saying what is wrong."""
    toml_values = _read_toml(config_file) if config_file is not None else {}
    given = {key: value for key, value in cli_overrides.items() if value is not None}
    token = _toml_values.set(toml_values)
    try:
        return ArchiveSettings(**given)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, config_file)) from None
    finally:
        _toml_values.reset(token)


# -- Typer options shared by the archive commands ----------------------------------------

ArchiveOption = Annotated[
    Path | None,
    typer.Option(
        "--archive",
        help="Archive directory (recordings; the index too unless --db). Env CALLVAULT_ARCHIVE.",
        show_default=False,
    ),
]
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Index database URL or SQLite file (default ARCHIVE/callvault.db).",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML file with any of these options.", show_default=False),
]
# The PBX options are the same for every command that talks to the PBX: defined once.
PbxOption = PbxUrlOpt
UsernameOption = UsernameOpt
PasswordEnvOption = PasswordEnvOpt
ApiVersionOption = ApiVersionOpt
CaFileOption = CaFileOpt
PinOption = PinOpt
InsecureOption = InsecureOpt
TlsMinVersionOption = TlsMinOpt
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
        help="IP address of the reverse proxy in front of the web app: its X-Forwarded-For "
        "and X-Forwarded-Proto are believed, from that address only (default: none).",
        show_default=False,
    ),
]
TimezoneOption = Annotated[
    str | None,
    typer.Option(
        "--timezone", help="The PBX's time zone (default the host's).", show_default=False
    ),
]

ShowTimezoneOption = Annotated[
    str | None,
    typer.Option(
        "--timezone",
        help="Time zone to show and read times in. Default: CALLVAULT_TIMEZONE or the config "
        "file's timezone, else the PBX's zone as serve/backfill saved it, else the host's.",
        show_default=False,
    ),
]


def pbx_options(settings: ArchiveSettings) -> PbxOptions:
    """The PBX options of the settings, to build the client, TLS options and password."""
    return PbxOptions(
        pbx=settings.pbx,
        username=settings.username,
        password_env=settings.password_env,
        api_version=settings.api_version.value,
        ca_file=settings.ca_file,
        pin_sha256=settings.pin_sha256,
        insecure=settings.insecure,
        tls_min_version=settings.tls_min_version,
    )


def settings_or_fail(config_file: Path | None = None, **cli_overrides: Any) -> ArchiveSettings:
    """`load_settings`, turning a `SettingsError` into one line on stderr and exit code 2."""
    from callvault.cli._common import fail

    try:
        return load_settings(config_file, **cli_overrides)
    except SettingsError as exc:
        fail(str(exc), code=2)
