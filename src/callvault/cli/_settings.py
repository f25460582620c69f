"""`Settings`: every option of every command, from flags, environment and TOML, one model.

Precedence, highest first: command-line flags, environment variables (``CALLVAULT_`` + the
option name in capitals, e.g. ``CALLVAULT_ARCHIVE``, ``CALLVAULT_WORKERS``; lists as JSON
or comma-separated), the TOML file given with ``--config`` (flat ``key = value`` with the
option names, dashes or underscores), then the defaults below. Every command reads its
options here, so `fetch`, `serve` and `list` spell and check them alike, and a config file
written for `serve` works for every other command.

The PBX password is never a setting: ``password_env`` names the environment variable that
holds it (default ``CALLVAULT_PASSWORD``).

``pbx`` is a URL, or the name of a PBX registered with ``callvault pbx add``: the commands
that talk to one PBX (`fetch`, `cdr`, `backfill`, `serve`) then take its URL, user, secret
(opened with the master key), kind, certificate trust and time zone from the registry
(`registered_pbx`), and refuse the connection flags, which would say otherwise.

Why not pydantic-settings: it costs about 150 ms to import, twelve times a bare
interpreter's start-up, on every command (`callvault list` must start in a fraction of a
second, bench/cli_startup.py); the rules below are plain checks of ~30 options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from callvault.archive import AlertSettings
    from callvault.index.pbxs import PbxRecord
    from callvault.keys import Keyring
    from callvault.pbx import ApiVersion, PbxClient, PSeriesClient, TlsOptions

DB_FILENAME = "callvault.db"
ENV_PREFIX = "CALLVAULT_"
DEFAULT_PASSWORD_ENV = "CALLVAULT_PASSWORD"  # noqa: S105 - a variable's name, not a password
# Bad options end a command with exit status 2, as click does for usage errors; 1 is for work
# that failed (a recording not fetched, the PBX refusing a login).
USAGE_ERROR = 2


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
        if _known_zone(name):
            return name
    return "UTC"


def _known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def split_host_port(value: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (IPv6 in brackets) as (host, port)."""
    host, _sep, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# -- how each kind of value is read (from a flag, an environment variable or TOML) ---------


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be text")
    return value.strip()


def _optional_text(value: Any) -> str | None:
    return _text(value) or None


def _integer(low: int | None = None, high: int | None = None) -> Callable[[Any], int]:
    def read(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("must be a whole number")
        try:
            number = int(value)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if (low is not None and number < low) or (high is not None and number > high):
            raise ValueError(f"must be from {low} to {high}" if high else f"must be >= {low}")
        return number

    return read


def _number(*, positive: bool = False, at_least: float | None = None) -> Callable[[Any], float]:
    def read(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("must be a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError("must be a number") from None
        if number != number or (positive and number <= 0):
            raise ValueError("must be a number above 0")
        if at_least is not None and number < at_least:
            raise ValueError(f"must be at least {at_least:g}")
        return number

    return read


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    return Path(_text(value)).expanduser()


def _optional_path(value: Any) -> Path | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _path(value)


def _items(value: Any) -> list[Any]:
    """A list from TOML or a flag, or from an environment string (JSON or comma-separated)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                import json

                value = json.loads(text)
            except ValueError:
                raise ValueError("is not a JSON list") from None
        else:
            return [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list")
    return list(value)


# callvault.index.pbxs.NAME_PATTERN, spelled out: importing it would load SQLAlchemy for
# every command (tests/test_cli_registered_pbx.py checks they agree).
PBX_NAME_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?"


def is_pbx_name(value: str) -> bool:
    """Whether a ``--pbx`` value names a registered PBX rather than giving a URL."""
    import re

    return re.fullmatch(PBX_NAME_PATTERN, value, re.ASCII) is not None


def _pbx_url(value: Any) -> str:
    from callvault.pbx import check_pbx_url

    text = _text(value)
    if is_pbx_name(text):
        return text
    try:
        return check_pbx_url(text)
    except ValueError as exc:
        if "://" in text:
            raise
        raise ValueError(f"{exc}, or the name of a registered PBX (`callvault pbx list`)") from None


def _host_port(value: Any) -> str:
    text = _text(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit():
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
    if not 0 <= int(port) < 65536:
        raise ValueError(f"port {port} is out of range (0 to 65535; 0: any free port)")
    return text


def _trusted_proxy(value: Any) -> str | None:
    text = _text(value)
    if not text:
        return None
    try:
        import ipaddress

        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(
            f"{text!r:.60} is not an IP address (the reverse proxy's, e.g. 127.0.0.1)"
        ) from None


def _storage(value: Any) -> str | None:
    text = _text(value)
    if not text:
        return None
    from callvault.storage import parse_storage_url

    parse_storage_url(text)  # ValueError, one line
    return text


def _webhook(value: Any) -> str | None:
    text = _text(value)
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r:.80} is not an http:// or https:// URL")
    return text


def _addresses(value: Any) -> list[str]:
    found = [part.strip() for item in _items(value) for part in str(item).split(",")]
    found = [address for address in found if address]
    for address in found:
        if "@" not in address or any(ch.isspace() for ch in address):
            raise ValueError(f"{address!r:.80} is not an e-mail address")
    return found


def _bind(value: Any) -> str | None:
    text = _text(value)
    if not text:
        return None
    import ipaddress

    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r:.60} is not an IP address (one of this machine's)") from None
    if address.is_unspecified:
        raise ValueError(f"{text} is every address: give one of this machine's")
    return str(address)


def _networks(value: Any) -> list[str]:
    entries = [str(item).strip() for item in _items(value)]
    for entry in entries:
        try:
            import ipaddress

            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r:.60} is not an IP address or network") from None
    return entries


def _seconds_list(value: Any) -> list[float]:
    read = _number(positive=True)
    return [read(item) for item in _items(value)]


def _timezone(value: Any) -> str:
    text = _text(value)
    if not _known_zone(text):
        raise ValueError(f"unknown time zone {text!r:.60} (use e.g. Europe/Paris)")
    return text


def _variable_name(value: Any) -> str:
    text = _text(value)
    if not text or not text.replace("_", "a").isalnum():
        raise ValueError("must be the name of an environment variable")
    return text


def _api_version(value: Any) -> ApiVersion:
    from callvault.pbx import ApiVersion

    if isinstance(value, ApiVersion):
        return value
    text = _text(value)
    try:
        return ApiVersion(text)
    except ValueError:
        raise ValueError(
            f"unknown API version {text!r:.20}: use " + ", ".join(v.value for v in ApiVersion)
        ) from None


def _kind(value: Any) -> str:
    from callvault.pbx import PBX_KINDS  # not the registry's: reading it loads the index

    text = _text(value).lower()
    if text not in PBX_KINDS:
        raise ValueError(f"unknown PBX kind {text!r:.20}: use " + ", ".join(PBX_KINDS))
    return text


def _pin(value: Any) -> str | None:
    text = _text(value)
    from callvault.pbx import normalise_pin

    return normalise_pin(text) if text else None


def _tls_version(value: Any) -> str:
    text = _text(value)
    from callvault.pbx import TlsOptions

    TlsOptions(minimum_version=text)  # ValueError naming the versions there are
    return text


def _node(value: Any) -> str | None:
    text = _text(value)
    if not text:
        return None
    if len(text) > 64 or not all(ch.isalnum() or ch in "._-" for ch in text):
        raise ValueError("must be at most 64 letters, digits, dots, dashes or underscores")
    return text


# Every option: how to read it, and its default (a value, or a function giving one).
_READERS: dict[str, Callable[[Any], Any]] = {
    # The PBX
    "pbx": _pbx_url,
    "kind": _kind,
    "username": _optional_text,
    "password_env": _variable_name,
    "api_version": _api_version,
    "ca_file": _optional_path,
    "pin_sha256": _pin,
    "insecure": _boolean,
    "tls_min_version": _tls_version,
    # The archive
    "archive": _optional_path,
    "db": _optional_text,
    "storage": _storage,
    "master_key_file": _optional_path,
    "encrypt": _boolean,
    # Services
    "node": _node,
    "bind": _bind,
    "events_listen": _host_port,
    "events_allow": _networks,
    "workers": _integer(1, 64),
    "timezone": _timezone,
    "web_listen": _host_port,
    "secure_cookies": _boolean,
    "trusted_proxy": _trusted_proxy,
    "reconcile_hours": _integer(1, 24 * 366),
    "reconcile_interval_s": _integer(10),
    # Archiver tuning (rarely changed; tests and demos shrink them). See callvault.archive.
    "job_lease_s": _number(positive=True),
    "heartbeat_interval_s": _number(positive=True),
    "poll_interval_s": _number(positive=True),
    "retry_schedule_s": _seconds_list,
    "missing_after_s": _number(at_least=0),
    "missing_min_attempts": _integer(1),
    "transient_backoff_s": _number(positive=True),
    "transient_backoff_max_s": _number(positive=True),
    "transient_max_attempts": _integer(1),
    "lease_ttl_s": _number(positive=True),
    "lease_renew_s": _number(positive=True),
    "registry_poll_s": _number(positive=True),
    # Alerts (serve)
    "alert_webhook": _webhook,
    "alert_smtp": _host_port,
    "alert_smtp_starttls": _boolean,
    "alert_smtp_user": _optional_text,
    "alert_smtp_password_env": _variable_name,
    "alert_email_from": _optional_text,
    "alert_email_to": _addresses,
    "alert_pbx_down_minutes": _number(at_least=0),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option of every command; each command uses the ones it needs."""

    # The PBX
    pbx: str | None = None
    kind: str = "s-series"  # s-series, cloud or p-series (`callvault.index.pbxs.KINDS`)
    username: str | None = None
    password_env: str = DEFAULT_PASSWORD_ENV
    # None: not given, v1.1.0 (see `api`); the reader makes any spelling an `ApiVersion`.
    api_version: ApiVersion | None = None
    ca_file: Path | None = None
    pin_sha256: str | None = None
    insecure: bool = False
    tls_min_version: str = "1.2"
    # The archive
    archive: Path | None = None
    db: str | None = field(default=None, repr=False)  # a PostgreSQL URL may carry a password
    # Where the recordings are kept: file:///DIR or s3://BUCKET/PREFIX; None: the archive
    # directory itself (which holds the staging area of downloads in any case).
    storage: str | None = None
    # The file of master keys that seal the registered PBXs' passwords (callvault.keys);
    # CALLVAULT_MASTER_KEY, holding a key itself, takes precedence.
    master_key_file: Path | None = None
    # Encryption at rest: archive every recording encrypted under its own data key, sealed
    # with the master keys (which must then be set). Recordings already stored stay as
    # they are; reading either kind needs no setting (only the keys, for encrypted ones).
    encrypt: bool = False
    # Services
    node: str | None = None  # this machine's name among several (default: the host name)
    # This node's address: its connections to the PBXs leave from it, and its listeners
    # listen on it unless told another host (see `events_address`, `web_address`).
    bind: str | None = None
    events_listen: str = "0.0.0.0:8260"  # all addresses: the PBX must reach it
    events_allow: list[str] | None = None
    workers: int = 2
    timezone: str = field(default_factory=host_timezone)
    web_listen: str = "127.0.0.1:8080"
    # The web app behind a TLS-terminating reverse proxy: mark cookies Secure, and believe
    # X-Forwarded-For/-Proto from the proxy's address (and from no other).
    secure_cookies: bool = False
    trusted_proxy: str | None = None
    reconcile_hours: int = 48
    reconcile_interval_s: int = 3600
    job_lease_s: float = 300.0
    heartbeat_interval_s: float = 600.0
    poll_interval_s: float = 5.0
    retry_schedule_s: list[float] = field(
        default_factory=lambda: [2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0]
    )
    missing_after_s: float = 1800.0
    missing_min_attempts: int = 8
    transient_backoff_s: float = 5.0
    transient_backoff_max_s: float = 900.0
    transient_max_attempts: int = 12
    # Several nodes: how long a node's hold on a PBX lasts, and how often it is renewed.
    lease_ttl_s: float = 15.0
    lease_renew_s: float = 5.0
    registry_poll_s: float = 15.0
    # Alerts: a webhook URL and/or e-mail through an SMTP server (HOST:PORT); the SMTP
    # password is read from the environment variable alert_smtp_password_env names.
    alert_webhook: str | None = field(default=None, repr=False)  # its path may be a secret
    alert_smtp: str | None = None
    alert_smtp_starttls: bool = False
    alert_smtp_user: str | None = None
    alert_smtp_password_env: str = "CALLVAULT_SMTP_PASSWORD"  # noqa: S105 - a variable's name
    alert_email_from: str | None = None
    alert_email_to: list[str] | None = None
    alert_pbx_down_minutes: float = 10.0
    # Which options a flag, the environment or the config file gave (not a default).
    given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    # -- derived values -----------------------------------------------------------------

    @property
    def tz(self) -> ZoneInfo:
        """The PBX's time zone, to read the local times it sends."""
        return ZoneInfo(self.timezone)

    def given_timezone(self) -> str | None:
        """`timezone` if a flag, the environment (CALLVAULT_TIMEZONE) or the TOML file gave
        it; None if it is only the default (the host's zone)."""
        return self.timezone if "timezone" in self.given else None

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

    @property
    def pbx_name(self) -> str | None:
        """The registered PBX `pbx` names, when it is a name and not a URL."""
        return self.pbx if self.pbx is not None and is_pbx_name(self.pbx) else None

    @property
    def pbx_url(self) -> str | None:
        """The PBX URL `pbx` gives, when it is a URL and not a registered PBX's name."""
        return self.pbx if self.pbx is not None and not is_pbx_name(self.pbx) else None

    def pbx_host(self) -> str | None:
        """The host name or address in the PBX URL."""
        return urlsplit(self.pbx_url).hostname if self.pbx_url else None

    def allowed_event_sources(self) -> list[str]:
        """Addresses (or networks) allowed to post events: `events_allow`, else the PBX's
        address (resolved when the URL names a host). Empty when neither is known."""
        if self.events_allow is not None:
            return list(self.events_allow)
        host = self.pbx_host()
        if host is None:
            return []
        try:
            import ipaddress

            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        try:
            import socket

            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise SettingsError(
                f"cannot resolve the PBX host {host!r} to allow its events: {exc}; "
                "give --events-allow"
            ) from None
        return sorted({str(info[4][0]) for info in infos})

    def events_address(self) -> tuple[str, int]:
        """`events_listen` as (host, port); with `bind` and no `events_listen` given, the
        host is that address."""
        host, port = split_host_port(self.events_listen)
        if self.bind is not None and "events_listen" not in self.given:
            host = self.bind
        return host, port

    def web_address(self) -> tuple[str, int]:
        """`web_listen` as (host, port); with `bind` and no `web_listen` given, the host
        is that address."""
        host, port = split_host_port(self.web_listen)
        if self.bind is not None and "web_listen" not in self.given:
            host = self.bind
        return host, port

    # -- the PBX ------------------------------------------------------------------------

    def require_pbx(self) -> tuple[str, str]:
        """The PBX URL and the user name, which every PBX command needs."""
        if not self.pbx_url:
            raise SettingsError(
                "no PBX given: pass --pbx https://HOST:8088 (or the name of a registered PBX) "
                "or set CALLVAULT_PBX"
            )
        if not self.username:
            raise SettingsError(
                "no API user name given: pass --username (a P-Series PBX's Client ID) or "
                "set CALLVAULT_USERNAME"
            )
        return self.pbx_url, self.username

    def registered_pbx(self, name: str | None = None) -> PbxRecord:
        """The registered PBX `name` (by default the one `pbx` names), read from the index
        (`db_url`); SettingsError (one line) when the index cannot be opened or has no such
        PBX."""
        from callvault.index import IndexFailure, open_index
        from callvault.index.pbxs import PbxRegistryError

        wanted = name or self.pbx_name
        if wanted is None:
            raise SettingsError("no registered PBX named: give --pbx NAME")
        try:
            url = self.db_url()
        except SettingsError as exc:
            raise SettingsError(
                f"PBX {wanted} is a registered name, read from the archive's index: {exc}"
            ) from None
        try:
            with open_index(url) as index:
                return index.pbxs.require(wanted)
        except (IndexFailure, PbxRegistryError) as exc:
            raise SettingsError(str(exc)) from None

    def pbx_zone(self, record: PbxRecord | None) -> ZoneInfo:
        """The time zone of a PBX: the registered PBX's own when it has one, else `tz`."""
        if record is not None and record.config.timezone:
            return ZoneInfo(record.config.timezone)
        return self.tz

    def keyring(self) -> Keyring:
        """The master keys (CALLVAULT_MASTER_KEY, else `master_key_file`); SettingsError
        saying how to make one when there is none or it cannot be used."""
        from callvault.keys import MasterKeyError, require_keyring

        try:
            return require_keyring(self.master_key_file)
        except MasterKeyError as exc:
            raise SettingsError(str(exc)) from None

    def optional_keyring(self) -> Keyring | None:
        """The master keys if any are set (None if not); SettingsError for keys that are
        set but cannot be used (a missing or open file, a damaged key)."""
        from callvault.keys import MasterKeyError, load_keyring

        try:
            return load_keyring(self.master_key_file)
        except MasterKeyError as exc:
            raise SettingsError(str(exc)) from None

    def encryption(self) -> Keyring | None:
        """The master keys that seal the data keys of new recordings when `encrypt` is on
        (SettingsError, one line, when it is on without a usable master key); None when
        it is off."""
        if not self.encrypt:
            return None
        keyring = self.optional_keyring()
        if keyring is None:
            raise SettingsError(
                "encryption at rest (encrypt) needs a master key: set CALLVAULT_MASTER_KEY or "
                "master_key_file (make one with `callvault keys create --file FILE`)"
            )
        return keyring

    def alert_settings(self) -> AlertSettings | None:
        """Where alerts go, or None when none is configured. SettingsError (one line) for
        e-mail without recipients, or recipients without a server."""
        from callvault.archive import AlertSettings

        to = tuple(self.alert_email_to or ())
        if bool(self.alert_smtp) != bool(to):
            raise SettingsError(
                "alert e-mail needs both alert_smtp (the server, HOST:PORT) and "
                "alert_email_to (the recipients)"
            )
        if not self.alert_webhook and not to:
            return None
        host, port = split_host_port(self.alert_smtp) if self.alert_smtp else (None, 25)
        return AlertSettings(
            webhook_url=self.alert_webhook,
            smtp_host=host,
            smtp_port=port,
            smtp_starttls=self.alert_smtp_starttls,
            smtp_user=self.alert_smtp_user,
            smtp_password=os.environ.get(self.alert_smtp_password_env) or None,
            email_from=self.alert_email_from or "callvault@localhost",
            email_to=to,
            pbx_down_after_s=self.alert_pbx_down_minutes * 60,
        )

    def password(self) -> str:
        """The API password, from the environment variable `password_env` names."""
        value = os.environ.get(self.password_env)
        if not value:
            raise SettingsError(
                f"the API password is not set: put it in the environment variable "
                f"{self.password_env} (or name another variable with --password-env)"
            )
        return value

    @property
    def api(self) -> ApiVersion:
        """The API version to speak: `api_version`, by default v1.1.0."""
        from callvault.pbx import ApiVersion

        return self.api_version or ApiVersion.V1_1_0

    def tls_options(self) -> TlsOptions:
        """How to trust the PBX's certificate; SettingsError (one line) if the CA file is
        missing or unreadable. Warns on stderr that --insecure checks nothing."""
        if self.ca_file is not None and not self.ca_file.is_file():
            raise SettingsError(f"--ca-file {self.ca_file}: no such file")
        import ssl

        from callvault.pbx import TlsOptions

        tls = TlsOptions(
            ca_file=self.ca_file,
            pin_sha256=self.pin_sha256,
            insecure=self.insecure,
            minimum_version=self.tls_min_version,
        )
        try:
            tls.ssl_context()  # a CA file that is not PEM, or unreadable, fails here
        except ssl.SSLError:
            raise SettingsError(f"--ca-file {self.ca_file}: not a PEM certificate file") from None
        except OSError as exc:
            reason = exc.strerror or exc
            raise SettingsError(f"--ca-file {self.ca_file}: cannot read it ({reason})") from None
        if self.insecure:
            print(
                "callvault: warning: --insecure: the PBX's certificate is not checked; anyone "
                "on the network path can pose as the PBX and read the token and recordings",
                file=sys.stderr,
            )
        return tls

    def pbx_client(
        self, record: PbxRecord | None = None, **client_kwargs: Any
    ) -> PbxClient | PSeriesClient:
        """A client for the PBX these settings name (of its `kind`): `record`, a registered
        PBX (its secret opened with the master keys), else the one `pbx` names, else the one
        of the flags; SettingsError for what is missing. Warns on stderr when the PBX URL
        is plain http."""
        from callvault.pbx import PbxClient, PSeriesClient

        if record is None and self.pbx_name is not None:
            record = self.registered_pbx()
        if record is not None:
            from callvault.keys import MasterKeyError
            from callvault.ops import pbx_client, require_kept_password

            try:
                require_kept_password(record)  # before asking for keys it needs none of
                return self._warn_plain(pbx_client(record, self.keyring(), **client_kwargs))
            except MasterKeyError as exc:
                raise SettingsError(str(exc)) from None
            except SettingsError as exc:
                raise SettingsError(f"PBX {record.name}: its secret is sealed: {exc}") from None
        pbx, username = self.require_pbx()
        tls = self.tls_options()
        password = self.password()
        client: PbxClient | PSeriesClient
        try:
            if self.kind == "p-series":
                client_kwargs.pop("events_port", None)
                client = PSeriesClient(pbx, username, password, tls=tls, **client_kwargs)
            else:
                client = PbxClient(
                    pbx, username, password, api_version=self.api, tls=tls, **client_kwargs
                )
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return self._warn_plain(client)

    @staticmethod
    def _warn_plain(client: PbxClient | PSeriesClient) -> PbxClient | PSeriesClient:
        if client.base_url.startswith("http://"):
            print(
                "callvault: warning: the PBX URL is plain http: the password hash, the token "
                "and every recording cross the network unencrypted; use https",
                file=sys.stderr,
            )
        return client


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Settings)) - {"given"}


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

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
        if name not in FIELD_NAMES:
            raise SettingsError(f"config file {path}: unknown option {key!r}")
        values[name] = value
    return values


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """CALLVAULT_<OPTION> variables (any case); others, e.g. CALLVAULT_PASSWORD, are not
    options and are left alone."""
    values: dict[str, str] = {}
    for key, value in environ.items():
        upper = key.upper()
        if upper.startswith(ENV_PREFIX):
            name = upper[len(ENV_PREFIX) :].lower()
            if name in FIELD_NAMES:
                values[name] = value
    return values


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build the settings from flags (None means "not given"), the environment, the TOML
    `config_file` and the defaults. Raises `SettingsError` with one line saying what is
    wrong (the option as it is spelled on the command line, and why)."""
    unknown = set(flags) - FIELD_NAMES
    if unknown:
        raise TypeError(f"not options: {sorted(unknown)}")
    layers: list[tuple[dict[str, Any], Callable[[str], str]]] = [
        (
            _read_toml(config_file) if config_file is not None else {},
            lambda name: f"in {config_file}",
        ),
        (_from_environment(os.environ), lambda name: f"from {ENV_PREFIX}{name.upper()}"),
        (
            {name: value for name, value in flags.items() if value is not None},
            lambda name: "given as --" + name.replace("_", "-"),
        ),
    ]
    merged: dict[str, tuple[Any, str]] = {}
    for layer, origin_of in layers:
        merged.update({name: (value, origin_of(name)) for name, value in layer.items()})
    values: dict[str, Any] = {}
    for name, (raw, origin) in merged.items():
        try:
            values[name] = _READERS[name](raw)
        except ValueError as exc:
            raise SettingsError(
                f"bad value for {name.replace('_', '-')} ({origin}): {exc}"
            ) from None
    settings = Settings(**values, given=frozenset(values))
    chosen = [
        flag
        for flag, on in (
            ("--ca-file", settings.ca_file is not None),
            ("--pin-sha256", settings.pin_sha256 is not None),
            ("--insecure", settings.insecure),
        )
        if on
    ]
    if len(chosen) > 1:
        raise SettingsError(
            f"choose only one of --ca-file, --pin-sha256 and --insecure, not {' and '.join(chosen)}"
        )
    if settings.pbx_name is not None:
        _refuse_connection_flags(settings.pbx_name, flags)
    return settings


# How to reach a PBX (the options beside --pbx, `cli._options.pbx_options`): a registered
# PBX has its own (`callvault pbx edit` changes them).
CONNECTION_OPTIONS = (
    "kind",
    "username",
    "password_env",
    "api_version",
    "ca_file",
    "pin_sha256",
    "insecure",
    "tls_min_version",
)


def _refuse_connection_flags(name: str, flags: Mapping[str, Any]) -> None:
    """A registered PBX's connection settings and time zone come from the registry: a flag
    giving one too would be ignored, so it is refused (the environment's and a config
    file's are left unused: they serve the commands given a URL; a registered PBX without
    a zone of its own is in the deployment's, which they may give)."""
    given = [
        f"--{o.replace('_', '-')}"
        for o in (*CONNECTION_OPTIONS, "timezone")
        if flags.get(o) not in (None, False)
    ]
    if given:
        raise SettingsError(
            f"--pbx {name} is a registered PBX, whose settings come from the registry: leave "
            f"out {' and '.join(given)} (change its settings with `callvault pbx edit {name}`), "
            "or give --pbx a URL"
        )


def settings_or_fail(config_file: Path | None = None, **flags: Any) -> Settings:
    """`load_settings`, turning a `SettingsError` into one line on stderr and exit code 2."""
    from callvault.cli._common import fail

    try:
        return load_settings(config_file, **flags)
    except SettingsError as exc:
        fail(str(exc), code=USAGE_ERROR)


# The name the archive commands have always used.
ArchiveSettings = Settings
