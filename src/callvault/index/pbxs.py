"""The registry of PBXs: its rules and rows (the store is `index.pbxs`).

A registered PBX is everything the archiver needs to reach and trust one PBX: its URL, API
user, password (sealed with the master key by the caller: the index never sees it in
clear), API version, how its certificate is trusted, its time zone, how many downloads it
may serve at once, and where its reports are posted. `check_config` holds the rules for
every field, for the command line and the web app alike.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from callvault.pbx import PBX_KINDS
from callvault.times import iso_moment

NAME_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?", re.ASCII)
MAX_DOWNLOADS_LIMIT = 16
# The registry id of the archive's PBX given by `serve`'s flags (the one-PBX shorthand):
# the calls recorded without naming a PBX (`index.calls.record`'s default) are its.
FLAGS_PBX_ID = 0
DEFAULT_MAX_DOWNLOADS = 2  # each PBX is a small embedded box

KINDS = PBX_KINDS
"""Which API a PBX speaks: the S-Series API (`username` and password: the API user), the
S-Series-based Yeastar Cloud PBX (the same, with refresh tokens), or the P-Series OpenAPI
(`username` and password: the API application's Client ID and Secret)."""


class PbxRegistryError(ValueError):
    """A PBX that cannot be registered or changed as asked: one line for a person."""


class NoSuchPbx(PbxRegistryError):
    """No PBX of that name is registered."""


def unknown_pbx(name: str, registered: Iterable[str]) -> str:
    """The words for a PBX name the registry has not, with the names it has."""
    known = ", ".join(sorted(registered)) or "none is registered yet"
    return f"no PBX named {name!r} ({known})"


class PbxInUse(PbxRegistryError):
    """The PBX cannot be taken off the registry: calls of it are archived."""


def validate_name(name: str) -> str:
    """`name` if it is a short slug (1 to 32 lowercase letters, digits and inner dashes)."""
    if not NAME_PATTERN.fullmatch(name):
        raise PbxRegistryError(
            f"{name!r:.40} is not a PBX name: use 1 to 32 lowercase letters, digits and "
            "dashes, e.g. paris or branch-2"
        )
    return name


@dataclass(frozen=True, slots=True)
class PbxConfig:
    """How to reach and trust one PBX: the fields a person sets (`pbx add`, `pbx edit`)."""

    url: str
    username: str
    api_version: str = "v1.1.0"
    ca_file: str | None = None
    pin_sha256: str | None = None
    insecure: bool = False
    tls_min_version: str = "1.2"
    timezone: str | None = None
    max_downloads: int = DEFAULT_MAX_DOWNLOADS
    events_allow: tuple[str, ...] = ()
    # HOST:PORT it posts its reports to (login's urltag=1: an address that reaches any
    # node, e.g. a load balancer); None: the address of the node that logged in.
    report_url: str | None = None
    kind: str = "s-series"  # one of KINDS
    # An S-Series v2 PBX whose Report Method is TCP: the port on it to connect to for its
    # reports (its API page shows it). None: it posts its reports over HTTP.
    tcp_report_port: int | None = None


CONFIG_FIELDS = tuple(f.name for f in fields(PbxConfig))


def check_config(config: PbxConfig) -> PbxConfig:
    """`config` in canonical form (the URL as the client reads it, the pin as lowercase
    hex, ...); PbxRegistryError naming the first field that is wrong and why."""
    from callvault.pbx import ApiVersion, TlsOptions, check_pbx_url, normalise_pin

    kind = config.kind.strip().lower()
    if kind not in KINDS:
        raise PbxRegistryError(
            f"--kind: unknown PBX kind {config.kind!r:.20}: use {', '.join(KINDS)}"
        )
    try:
        url = check_pbx_url(config.url.strip())
    except ValueError as exc:
        raise PbxRegistryError(f"--url: {exc}") from None
    username = config.username.strip()
    if not username or len(username) > 64:
        if kind == "p-series":
            raise PbxRegistryError(
                "--client-id: the Client ID of the PBX's API application, 1 to 64 characters"
            )
        raise PbxRegistryError("--username: the PBX's API user name, 1 to 64 characters")
    try:
        api_version = ApiVersion(config.api_version.strip()).value
    except ValueError:
        versions = ", ".join(v.value for v in ApiVersion)
        raise PbxRegistryError(
            f"--api-version: unknown API version {config.api_version!r:.20}: use {versions}"
        ) from None
    chosen = [
        flag
        for flag, on in (
            ("--ca-file", config.ca_file is not None),
            ("--pin-sha256", config.pin_sha256 is not None),
            ("--insecure", config.insecure),
        )
        if on
    ]
    if len(chosen) > 1:
        raise PbxRegistryError(
            f"choose only one of --ca-file, --pin-sha256 and --insecure, not {' and '.join(chosen)}"
        )
    pin = None
    if config.pin_sha256 is not None:
        try:
            pin = normalise_pin(config.pin_sha256)
        except ValueError as exc:
            raise PbxRegistryError(f"--pin-sha256: {exc}") from None
    try:
        TlsOptions(minimum_version=config.tls_min_version)
    except ValueError as exc:
        raise PbxRegistryError(f"--tls-min-version: {exc}") from None
    if config.timezone is not None:
        try:
            ZoneInfo(config.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise PbxRegistryError(
                f"--timezone: unknown time zone {config.timezone!r:.60} (use e.g. Europe/Paris)"
            ) from None
    if not 1 <= config.max_downloads <= MAX_DOWNLOADS_LIMIT:
        raise PbxRegistryError(
            f"--max-downloads: from 1 to {MAX_DOWNLOADS_LIMIT} (a PBX is a small embedded box; "
            f"{DEFAULT_MAX_DOWNLOADS} by default)"
        )
    allow = tuple(entry.strip() for entry in config.events_allow if entry.strip())
    for entry in allow:
        import ipaddress

        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise PbxRegistryError(
                f"--events-allow: {entry!r:.60} is not an IP address or network"
            ) from None
    report_url = None
    if config.report_url is not None and config.report_url.strip():
        if kind == "p-series":
            raise PbxRegistryError(
                "--report-url: a P-Series PBX is not told where to post its events: callvault "
                "subscribes to them over a WebSocket; leave --report-url out"
            )
        report_url = check_report_url(config.report_url)
        if api_version == ApiVersion.V1_0_1.value:
            raise PbxRegistryError(
                "--report-url: API v1.0.1 only takes a path for its reports, not an address: "
                "use v1.1.0 or later, or leave --report-url out"
            )
    tcp_port = config.tcp_report_port
    if tcp_port is not None:
        if not 0 < tcp_port < 65536:
            raise PbxRegistryError("--tcp-report-port: a TCP port, 1 to 65535")
        if kind != "s-series":
            raise PbxRegistryError(
                f"--tcp-report-port: only an S-Series PBX reports over TCP; a {kind} PBX "
                "does not: leave --tcp-report-port out"
            )
        if api_version != ApiVersion.V2_0_0.value:
            raise PbxRegistryError(
                "--tcp-report-port: only an S-Series PBX on API v2.0.0 reports over TCP; "
                "give --api-version v2.0.0, or leave --tcp-report-port out"
            )
    return PbxConfig(
        url=url,
        username=username,
        api_version=api_version,
        ca_file=config.ca_file,
        pin_sha256=pin,
        insecure=config.insecure,
        tls_min_version=config.tls_min_version,
        timezone=config.timezone,
        max_downloads=config.max_downloads,
        events_allow=allow,
        report_url=report_url,
        kind=kind,
        tcp_report_port=tcp_port,
    )


def check_report_url(value: str) -> str:
    """`value` (``HOST:PORT``, or ``http://HOST:PORT``) as ``HOST:PORT``, the form the
    PBX is given; PbxRegistryError saying what is wrong. The PBX posts its reports in
    plain HTTP, to this address followed by the PBX's secret path."""
    from urllib.parse import urlsplit

    text = value.strip()
    hint = "give HOST:PORT, e.g. balancer.example.com:8260, where the PBX can reach a node"
    if "://" in text and not text.lower().startswith("http://"):
        raise PbxRegistryError(f"--report-url: the PBX posts its reports in plain HTTP; {hint}")
    try:
        parts = urlsplit(text if "://" in text else f"http://{text}")
        port = parts.port
    except ValueError:
        raise PbxRegistryError(f"--report-url: {text!r:.60} is not an address; {hint}") from None
    if not parts.hostname or port is None or port == 0:
        raise PbxRegistryError(f"--report-url: {text!r:.60} names no host and port; {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise PbxRegistryError(
            f"--report-url: {text!r:.60} has more than a host and port (the PBX's secret "
            f"path is added to it); {hint}"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


# What a `pbx test` keeps beside its result in `PbxRecord.detail` (not shown as part of
# it): the login it tried (`PbxRecord.login_tag`) and whether the PBX refused it.
TEST_LOGIN_TAG = "password_tag"
TEST_REFUSED = "password_refused"
# What begins the fix a refused test's error ends with ("; set the right password with
# `callvault pbx edit ...`").
TEST_FIX = "; set the right "


@dataclass(frozen=True, slots=True)
class RefusedLogin:
    """A refused login of the last `pbx test`: when, and the refusal in words."""

    at: datetime
    error: str


@dataclass(frozen=True, slots=True)
class PbxRecord:
    """One registered PBX, as the index keeps it.

    `password_sealed` is the password sealed with the master key (`callvault.keys`), to be
    opened with the context `password_context(name)`; "" for the PBX given by `serve`'s
    flags, whose password is given at each start (`given_by_flags`). `serial` is "" until
    a report names it; `detail` is what `pbx test` found last. `webhook_secret_sealed` is a
    P-Series PBX's webhook Secret, sealed likewise (context `webhook_secret_context(name)`),
    or None: its webhooks are refused.
    """

    id: int
    name: str
    config: PbxConfig
    password_sealed: str = field(repr=False)
    events_path: str = field(repr=False)  # the receiver's secret path for its reports
    serial: str
    detail: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    session: dict[str, Any] = field(default_factory=dict)  # as its serve last reported it
    webhook_secret_sealed: str | None = field(default=None, repr=False)

    @property
    def revision(self) -> str:
        """Changes when the settings, the password or the webhook secret do, and only
        then (not when its serial is noted or it is tested): what a running archiver
        compares."""
        settings = json.dumps([getattr(self.config, name) for name in CONFIG_FIELDS], default=str)
        digested = f"{settings}\n{self.password_sealed}"
        if self.webhook_secret_sealed is not None:
            digested += f"\n{self.webhook_secret_sealed}"
        return hashlib.sha256(digested.encode()).hexdigest()

    @property
    def login_tag(self) -> str:
        """Tells one login (URL, user, sealed password: each seal is different) from
        another, revealing nothing: a test's result names the login it tried."""
        login = f"{self.config.url}\0{self.config.username}\0{self.password_sealed}"
        return hashlib.sha256(login.encode()).hexdigest()[:16]

    @property
    def test_refusal(self) -> RefusedLogin | None:
        """When and how the PBX refused its login as registered now to the last `pbx test`
        (a wrong password or secret, a lockout), or None. A refusal of a login since
        changed does not count."""
        last = self.detail
        if not last.get(TEST_REFUSED) or last.get(TEST_LOGIN_TAG) != self.login_tag:
            return None
        at = iso_moment(last.get("tested_at"))
        if at is None:
            return None
        # The error kept ends with its fix (TEST_FIX ...): the refusal alone.
        return RefusedLogin(at, str(last.get("error") or "refused").split(TEST_FIX)[0])

    @property
    def has_webhook_secret(self) -> bool:
        """Whether a webhook secret is kept for it (P-Series: its webhooks are taken)."""
        return self.webhook_secret_sealed is not None

    @property
    def given_by_flags(self) -> bool:
        """Whether this is the archive's PBX given by `serve`'s flags (no sealed password)."""
        return self.id == FLAGS_PBX_ID and not self.password_sealed


def password_context(name: str) -> str:
    """What a PBX's sealed password is bound to: it opens for this PBX's row only."""
    return f"pbx:{name}:password"


def webhook_secret_context(name: str) -> str:
    """What a P-Series PBX's sealed webhook secret (`pbxs.webhook_secret_sealed`) is bound
    to: it opens for this PBX's row only, and never as its password."""
    return f"pbx:{name}:webhook"


def tokens_context(name: str) -> str:
    """What a P-Series PBX's sealed tokens (`pbxs.tokens_sealed`) are bound to."""
    return f"pbx:{name}:tokens"
