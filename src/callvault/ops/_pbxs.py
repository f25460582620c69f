"""The registry of PBXs as people use it: add, change, remove, show and test a PBX.

The command line (`callvault pbx ...`) and the web app call these. The password, and a
P-Series PBX's webhook secret, are sealed here with the deployment's master key
(`callvault.keys`) before the index sees them, opened only to build a client or to check
a webhook's signature, and never part of a view, a message or the audit log.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from callvault.index import Index, audit
from callvault.index.pbxs import (
    TEST_FIX,
    TEST_LOGIN_TAG,
    TEST_REFUSED,
    PbxConfig,
    PbxRecord,
    PbxRegistryError,
    password_context,
    webhook_secret_context,
)
from callvault.keys import Keyring
from callvault.ops._json import JsonResult
from callvault.pbx import (
    ApiVersion,
    ErrorKind,
    LoginFailed,
    LoginLockedOut,
    PbxClient,
    PbxError,
    PbxTlsError,
    PSeriesClient,
    TlsOptions,
)
from callvault.times import iso_moment


@dataclass(frozen=True, slots=True)
class PbxView(JsonResult):
    """What `pbx show`, `pbx list --json` and the web API say of a PBX: never its password,
    its webhook secret nor the secret path of its reports."""

    name: str
    kind: str  # s-series, cloud or p-series
    url: str
    username: str  # the API user, or a P-Series PBX's Client ID
    api_version: str  # the S-Series API version; "openapi" for a P-Series PBX
    tls: str  # "verified", "pinned", "ca-file", "insecure" or "plain http"
    ca_file: str | None
    pin_sha256: str | None
    tls_min_version: str
    timezone: str | None
    max_downloads: int
    events_allow: list[str]
    report_url: str | None  # HOST:PORT its reports go to; None: the node that logged in
    tcp_report_port: int | None  # S-Series v2 reporting over TCP: the port on the PBX
    # Whether a webhook secret is kept (P-Series: its signed webhooks are taken), never it.
    webhook_secret: bool
    serial: str
    # The archive's PBX given by `serve --pbx ...` (its login comes from the flags at each
    # start), rather than registered with its sealed password.
    given_by_flags: bool
    last_test: dict[str, Any]
    created_at: datetime
    updated_at: datetime


# What `test_pbx` keeps beside its result to pause after a refused login: not for people.
_TEST_BOOKKEEPING = (TEST_LOGIN_TAG, TEST_REFUSED)


# What a P-Series PBX's API version is shown as (`api_label`): it speaks the OpenAPI.
OPENAPI = "openapi"


def api_label(config: PbxConfig) -> str:
    """The API a PBX speaks, as shown: its S-Series API version, or "openapi" (P-Series:
    the version field of the registry means nothing there)."""
    return OPENAPI if config.kind == "p-series" else config.api_version


def pbx_view(record: PbxRecord) -> PbxView:
    config = record.config
    if config.url.startswith("http://"):
        tls = "plain http"
    elif config.insecure:
        tls = "insecure"
    elif config.pin_sha256:
        tls = "pinned"
    elif config.ca_file:
        tls = "ca-file"
    else:
        tls = "verified"
    return PbxView(
        name=record.name,
        kind=config.kind,
        url=config.url,
        username=config.username,
        api_version=api_label(config),
        tls=tls,
        ca_file=config.ca_file,
        pin_sha256=config.pin_sha256,
        tls_min_version=config.tls_min_version,
        timezone=config.timezone,
        max_downloads=config.max_downloads,
        events_allow=list(config.events_allow),
        report_url=config.report_url,
        tcp_report_port=config.tcp_report_port,
        webhook_secret=record.has_webhook_secret,
        serial=record.serial,
        given_by_flags=record.given_by_flags,
        last_test={k: v for k, v in record.detail.items() if k not in _TEST_BOOKKEEPING},
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def _described(config: PbxConfig) -> str:
    """The audit log's words for a PBX's settings (no secret among them)."""
    trust = (
        "insecure"
        if config.insecure
        else "pin"
        if config.pin_sha256
        else "ca-file"
        if config.ca_file
        else "verified"
    )
    return (
        f"kind={config.kind} url={config.url} user={config.username} api={api_label(config)} "
        f"tls={trust} tz={config.timezone or '(default)'} max_downloads={config.max_downloads}"
    )


# What a P-Series PBX's entry keeps as its (meaningless) API version: the field's default.
_DEFAULT_API_VERSION = next(f.default for f in fields(PbxConfig) if f.name == "api_version")

NO_API_VERSION = (
    "--api-version: a P-Series PBX speaks the OpenAPI, which has no S-Series API version: "
    "leave --api-version out"
)


def _check_kind_change(before: PbxConfig, changes: Mapping[str, Any], password: str | None) -> None:
    """PbxRegistryError (one line) for a change a PBX of its kind after it cannot take:
    an S-Series API version for a P-Series PBX, or a move between the P-Series and the
    S-Series API (s-series, cloud) without new credentials: a P-Series PBX logs in with
    its API application's Client ID and Secret, the others with an API user and password,
    so the old ones cannot be right."""
    kind = str(changes.get("kind") or before.kind)
    if kind == "p-series" and changes.get("api_version") not in (None, before.api_version):
        raise PbxRegistryError(NO_API_VERSION)
    if (kind == "p-series") == (before.kind == "p-series"):
        return
    if password is None or "username" not in changes:
        if kind == "p-series":
            needs, flags = (
                "its API application's Client ID and Secret",
                "--client-id and --secret-env",
            )
        else:
            needs, flags = "an API user and password", "--username and --password-env"
        raise PbxRegistryError(
            f"--kind {kind}: a {kind} PBX logs in with {needs}, not the {before.kind} PBX's: "
            f"give {flags} with it"
        )


def check_webhook_secret(secret: str, kind: str) -> str:
    """`secret` if it can be a P-Series PBX's webhook Secret (the PBX makes a 32-character
    one); PbxRegistryError (one line, never the secret) for a PBX of another kind, an
    empty one, or one with spaces or control characters. The messages name the secret, not
    the flag that gave it: they reach the web API too."""
    if kind != "p-series":
        raise PbxRegistryError(
            f"webhook secret: only a P-Series PBX signs webhooks; this one is {kind}"
        )
    if not secret:
        raise PbxRegistryError("webhook secret: it is empty")
    if len(secret) > 256 or not secret.isascii() or not secret.isprintable() or " " in secret:
        raise PbxRegistryError(
            "webhook secret: not one (copy the Secret the PBX shows for "
            "the webhook: 32 letters and digits)"
        )
    return secret


def _seal_webhook_secret(keyring: Keyring, name: str, secret: str) -> str:
    return keyring.seal(secret.encode(), webhook_secret_context(name))


def add_pbx(
    index: Index,
    keyring: Keyring,
    name: str,
    config: PbxConfig,
    password: str,
    *,
    webhook_secret: str | None = None,
    actor: str,
    remote_addr: str,
    now: datetime,
) -> PbxRecord:
    """Register a PBX with its password (and a P-Series PBX's `webhook_secret`, if given)
    sealed under the primary master key, and audit it. PbxRegistryError (one line) for a
    bad name or setting."""
    from callvault.archive import new_secret_path
    from callvault.index.pbxs import check_config, validate_name

    if not password:
        raise PbxRegistryError("the PBX's API password is empty")
    if config.kind == "p-series" and config.api_version != _DEFAULT_API_VERSION:
        raise PbxRegistryError(NO_API_VERSION)
    if webhook_secret is not None:
        validate_name(name)
        check_webhook_secret(webhook_secret, check_config(config).kind)
    record = index.pbxs.add(
        name,
        config,
        password_sealed=keyring.seal(password.encode(), password_context(name)),
        events_path=new_secret_path(),
        now=now,
    )
    described = _described(record.config)
    if webhook_secret is not None:
        record = index.pbxs.set_webhook_secret(
            name, _seal_webhook_secret(keyring, name, webhook_secret), now=now
        )
        described += " webhook=signed"
    index.audit.record(actor, audit.PBX_ADD, name, described, remote_addr)
    return record


@dataclass(frozen=True, slots=True)
class PbxEdit:
    """A PBX after `edit_pbx`, and the names of the settings that changed."""

    record: PbxRecord
    changed: list[str]


def edit_pbx(
    index: Index,
    name: str,
    changes: Mapping[str, Any],
    *,
    password: str | None = None,
    webhook_secret: str | None = None,
    drop_webhook_secret: bool = False,
    keyring: Keyring | None = None,
    actor: str,
    remote_addr: str,
    now: datetime,
) -> PbxEdit:
    """Change a PBX's settings (the fields of `PbxConfig` in `changes`) and, given
    `password` and a `keyring`, its password; given `webhook_secret` (P-Series only), its
    webhook secret, or none with `drop_webhook_secret`; audited with what changed."""
    from callvault.index.pbxs import CONFIG_FIELDS

    if webhook_secret is not None and drop_webhook_secret:
        raise PbxRegistryError("give a new webhook secret or drop it, not both")
    sealed = None
    if (password is not None or webhook_secret is not None) and keyring is None:
        raise TypeError("a new password or webhook secret needs the keyring to seal it")
    if password is not None:
        assert keyring is not None
        if not password:
            raise PbxRegistryError("the PBX's API password is empty")
        sealed = keyring.seal(password.encode(), password_context(name))
    before = index.pbxs.require(name)
    _check_kind_change(before.config, changes, password)
    if webhook_secret is not None:  # checked before anything changes
        check_webhook_secret(webhook_secret, str(changes.get("kind") or before.config.kind))
    record = index.pbxs.update(name, changes, password_sealed=sealed, now=now)
    if webhook_secret is not None:
        assert keyring is not None
        record = index.pbxs.set_webhook_secret(
            name, _seal_webhook_secret(keyring, name, webhook_secret), now=now
        )
    elif drop_webhook_secret and record.has_webhook_secret:
        record = index.pbxs.set_webhook_secret(name, None, now=now)
    changed = [
        field
        for field in CONFIG_FIELDS
        if getattr(before.config, field) != getattr(record.config, field)
    ] + (["password"] if password is not None else [])
    if webhook_secret is not None or before.has_webhook_secret != record.has_webhook_secret:
        changed.append("webhook_secret")
    index.audit.record(
        actor,
        audit.PBX_EDIT,
        name,
        f"changed {', '.join(changed) or 'nothing'}; now {_described(record.config)}",
        remote_addr,
    )
    return PbxEdit(record, changed)


def remove_pbx(index: Index, name: str, *, actor: str, remote_addr: str) -> PbxRecord:
    """Take a PBX off the registry (PbxInUse while calls of it are archived); audited."""
    record = index.pbxs.remove(name)
    index.audit.record(actor, audit.PBX_REMOVE, name, _described(record.config), remote_addr)
    return record


def require_kept_password(record: PbxRecord) -> None:
    """MasterKeyError (one line) if the registry keeps no password for the PBX: the one
    given by `serve`'s flags, whose password comes with them at each start."""
    from callvault.keys import MasterKeyError

    if record.given_by_flags:
        raise MasterKeyError(
            f"PBX {record.name}'s password is not kept: it is given at each start by "
            "serve's flags (--pbx, --username, --password-env); to keep it sealed instead, "
            f"set it with `callvault pbx edit {record.name} --url URL --password-env VAR`"
        )


def open_password(record: PbxRecord, keyring: Keyring) -> str:
    """The PBX's API password; MasterKeyError (one line) if the keys loaded cannot open it,
    or if the registry has none (`require_kept_password`)."""
    require_kept_password(record)
    return keyring.open(record.password_sealed, password_context(record.name)).decode()


def tls_options(config: PbxConfig) -> TlsOptions:
    """How the client trusts this PBX's certificate."""
    return TlsOptions(
        ca_file=Path(config.ca_file) if config.ca_file else None,
        pin_sha256=config.pin_sha256,
        insecure=config.insecure,
        minimum_version=config.tls_min_version,
    )


def pbx_client(
    record: PbxRecord, keyring: Keyring, **client_kwargs: Any
) -> PbxClient | PSeriesClient:
    """A client for the registered PBX, of its kind; `client_kwargs` go to `PbxClient`
    or `PSeriesClient` (the keywords the two share)."""
    config = record.config
    if config.kind == "p-series":
        return PSeriesClient(
            config.url,
            config.username,
            open_password(record, keyring),
            tls=tls_options(config),
            **client_kwargs,
        )
    return PbxClient(
        config.url,
        config.username,
        open_password(record, keyring),
        api_version=ApiVersion(config.api_version),
        tls=tls_options(config),
        **client_kwargs,
    )


@dataclass(frozen=True, slots=True)
class PbxTest(JsonResult):
    """What `pbx test` found: whether the login worked and what the PBX said."""

    name: str
    ok: bool
    tested_at: datetime
    seconds: float
    kind: str  # s-series, cloud or p-series
    api_version: str  # as `api_label` says
    # How new calls come: v2 "HTTP" or "TCP", as the PBX is set up; "WebSocket" for a
    # P-Series PBX; None when the PBX did not say (v1: HTTP only).
    report_transport: str | None
    calls_last_day: int | None  # calls in the PBX's call history over the last 24 hours
    serial: str  # from its reports; "" until one arrived
    # Why it is not ok: the PBX's error, or (`WRONG_KIND`) that it logged in but answers
    # like another kind than registered (a Yeastar Cloud PBX as s-series, or the reverse).
    error: str | None
    error_kind: str | None  # the error's `ErrorKind` value, or WRONG_KIND


# After a refused login, how long `test_pbx` will not try the same password again: five
# refusals in a row lock this host out of the PBX for ten minutes.
REFUSED_LOGIN_PAUSE = timedelta(minutes=10)


class RefusedRecently(PbxRegistryError):
    """`test_pbx` will not log in: the same password was refused moments ago. `test` is
    the result to show for it (not ok, `error_kind` `REFUSED_RECENTLY`; not kept)."""

    def __init__(self, message: str, test: PbxTest) -> None:
        super().__init__(message)
        self.test = test


# `PbxTest.error_kind` of a test not made: the same login was refused moments ago.
REFUSED_RECENTLY = "refused-recently"


def _login_fix(record: PbxRecord) -> str:
    """What to run to give a PBX the right login, in its kind's terms."""
    if record.config.kind == "p-series":
        return (
            "Client ID or Client Secret with "
            f"`callvault pbx edit {record.name} --client-id ID --secret-env VAR`"
        )
    return (
        "user or password with "
        f"`callvault pbx edit {record.name} --username NAME --password-env VAR`"
    )


# `PbxTest.error_kind` of a PBX that logged in but speaks like another kind than registered.
WRONG_KIND = "wrong-kind"

_KIND_WORDS = {"s-series": "an S-Series PBX", "cloud": "a Yeastar Cloud PBX"}


def _answers_like(client: PbxClient) -> str:
    """The kind a PBX of the S-Series API answers like, once logged in: "cloud" when its
    login gave a refresh token (the Yeastar Cloud PBX's does), else "s-series"."""
    return "cloud" if client.has_refresh_token else "s-series"


def _kind_fix(record: PbxRecord, answers_like: str) -> str:
    """One line for a PBX registered as one kind that answers like the other, with the
    command that registers it right."""
    why = "gave a refresh token" if answers_like == "cloud" else "gave no refresh token"
    return (
        f"logged in, but the PBX answers like {_KIND_WORDS[answers_like]} (its login {why}), "
        f"not like {_KIND_WORDS.get(record.config.kind, record.config.kind)} as registered: "
        f"register it as {answers_like} with "
        f"`callvault pbx edit {record.name} --kind {answers_like}`"
    )


def _refuse_if_refused_recently(record: PbxRecord, now: datetime) -> None:
    """RefusedRecently if this login (URL, user and password as registered now) was
    refused less than `REFUSED_LOGIN_PAUSE` ago: by the last `pbx test`, or by `serve`
    (its session's health, when the refusal came after the PBX's entry last changed)."""
    refused_at: datetime | None = None
    who, why = "", ""
    tested = record.test_refusal
    if tested is not None:
        refused_at, why = tested.at, tested.error  # the fix is said once, below
    health = record.session or {}
    if refused_at is None and health.get("reason") == ErrorKind.LOGIN_REFUSED.value:
        served = iso_moment(health.get("updated_at"))
        if served is not None and served > record.updated_at:
            refused_at, who = served, "serve's login: "
            why = str(health.get("error") or "refused")
    if refused_at is None or now - refused_at >= REFUSED_LOGIN_PAUSE:
        return
    again = refused_at + REFUSED_LOGIN_PAUSE
    what = "Client Secret" if record.config.kind == "p-series" else "password"
    message = (
        f"PBX {record.name} refused this {what} at {refused_at:%H:%M:%S} UTC "
        f"({who}{why}); not trying it again before {again:%H:%M:%S} UTC, "
        f"as five refusals lock this host out: set the right {_login_fix(record)}"
    )
    raise RefusedRecently(message, _result(record, now, error=message, error_kind=REFUSED_RECENTLY))


def _result(
    record: PbxRecord,
    now: datetime,
    *,
    seconds: float = 0.0,
    transport: str | None = None,
    calls: int | None = None,
    error: str | None,
    error_kind: str | None,
) -> PbxTest:
    """What a test of `record` at `now` found (ok when there is no `error`)."""
    return PbxTest(
        name=record.name,
        ok=error is None,
        tested_at=now.astimezone(UTC),
        seconds=seconds,
        kind=record.config.kind,
        api_version=api_label(record.config),
        report_transport=transport,
        calls_last_day=calls,
        serial=record.serial,
        error=error,
        error_kind=error_kind,
    )


async def test_pbx(index: Index, record: PbxRecord, keyring: Keyring, *, now: datetime) -> PbxTest:
    """Log in to the PBX once (no retry: a wrong password must not count towards the
    PBX's lockout twice), read a day of its call history, log out; keep and return what
    was found. Asks for no reports, so a running `serve` keeps receiving them. A PBX of
    the S-Series API that logs in but answers like the other kind than registered (a
    Yeastar Cloud PBX's login gives a refresh token, an S-Series PBX's does not) is not ok:
    the error says so, with the `pbx edit` that registers it right.

    RefusedRecently if the PBX refused this same login (URL, user and password) less than
    ten minutes ago, to a test or to `serve`: testing again and again would lock this host
    out of the PBX."""
    _refuse_if_refused_recently(record, now)
    started = time.monotonic()
    transport: str | None = None
    answers_like: str | None = None
    calls: int | None = None
    error: str | None = None
    kind: str | None = None
    refused = False
    tz = ZoneInfo(record.config.timezone or "UTC")
    try:
        async with pbx_client(record, keyring, max_attempts=1) as client:
            await client.login()
            if isinstance(client, PbxClient):
                transport = client.report_transport
                answers_like = _answers_like(client)
            else:
                transport = "WebSocket"
            found = await client.export_cdr_range(now - timedelta(days=1), now, tz)
            calls = len(found)
            await client.logout()
    except PbxError as exc:
        error, kind = str(exc), exc.kind.value
        refused = isinstance(exc, LoginFailed | LoginLockedOut)
        if isinstance(exc, LoginFailed):
            error += f"{TEST_FIX}{_login_fix(record)}"
        elif isinstance(exc, PbxTlsError):  # its words name the options, not the command
            error += (
                f"; trust its certificate with `callvault pbx edit {record.name} "
                "--pin-sha256 HEX` (or --ca-file FILE)"
            )
    if error is None and answers_like is not None and answers_like != record.config.kind:
        error, kind = _kind_fix(record, answers_like), WRONG_KIND
    result = _result(
        record,
        now,
        seconds=round(time.monotonic() - started, 3),
        transport=transport,
        calls=calls,
        error=error,
        error_kind=kind,
    )
    index.pbxs.record_test(
        record.name,
        {**result.to_json(), TEST_LOGIN_TAG: record.login_tag, TEST_REFUSED: refused},
        now=now,
    )
    return result
