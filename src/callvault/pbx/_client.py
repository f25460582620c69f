"""The asynchronous S-Series API client.

One `PbxClient` holds one API session (one token) with one PBX. The rules it keeps (spec
section 9): the password is sent as its MD5; a token error (20004/20005/20006) causes one new
login and one repeat of the call; a wrong password (20003) or a lockout (20002) is raised at
once and remembered, so no sequence of calls can add up to the five failed logins that lock
the client's IP out; a download random is fetched immediately before its GET and never
reused; every response is answered with its own TCP connection (the PBX closes it anyway).

The session is guarded by a `SessionGate`: every call that uses the token holds it shared
for its critical section (a download from its ``get_random`` until its GET's headers have
arrived), so downloads of one client start concurrently; a login, re-login or logout holds
it exclusive, so it never falls between a random and its use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import httpx

from callvault.pbx._base import ApiClient, http_client
from callvault.pbx._cdr import parse_cdr_csv
from callvault.pbx._download import (
    HttpxBody,
    ResponseBody,
    SocketBody,
    looks_like_html,
    receive_recording,
)
from callvault.pbx._errors import (
    CdrError,
    ErrorKind,
    LoginFailed,
    LoginLockedOut,
    PbxApiError,
    PbxBusy,
    PbxError,
    PbxProtocolError,
    PbxTransportError,
    RandomInvalid,
    RecordingNotFound,
    RequestRejected,
    TokenError,
    UnsafeRecordingName,
    error_for_errno,
)
from callvault.pbx._gate import SessionGate
from callvault.pbx._mapping import origin_of, transport_error
from callvault.pbx._tls import TlsOptions, speaks_tls
from callvault.pbx._types import ApiVersion, CallDetail, DownloadResult, StreamTransform
from callvault.pbx._urls import check_pbx_url, strip_query, url_for_humans
from callvault.times import windows

log = logging.getLogger("callvault.pbx")

T = TypeVar("T")

LOCKOUT_SECONDS = 600.0
REFRESH_AFTER_S = 15 * 60.0
"""How old a token with a refresh token (the Yeastar Cloud PBX's login answers one) may
get before it is refreshed: the Cloud PBX ends a token 30 minutes after it was issued
unless it is refreshed (``token/refresh``), whatever the traffic. Checked before every
request, and so at every heartbeat (every 10 minutes in `serve`)."""
MAX_JSON_ERROR_BYTES = 64 * 1024
MIN_WAV_BYTES = 44  # a RIFF/WAVE header alone
CDR_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
NO_EVENTS_PORT = "0"  # v1 requires a report port; 0 is what clients send to ask for none

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes received so far, Content-Length or None) while a download streams;
always on the event loop's thread, at least once per MiB, last with the final size."""


def password_md5(password: str) -> str:
    """What the login sends instead of the password: its MD5, 32 lowercase hex digits."""
    return hashlib.md5(password.encode("utf-8")).hexdigest()


def check_recording_name(name: str, *, what: str = "recording name") -> str:
    """Refuse a name that cannot safely be a file name in a directory.

    Recording names come from the PBX and are untrusted: no path separators, no control
    characters (NUL included), not "." or "..", not empty, valid text, at most 255 bytes as
    UTF-8. Returns the name unchanged; raises `UnsafeRecordingName` (permanent: the same
    name can never be downloaded; also a ValueError).
    """
    if not isinstance(name, str) or not name:
        raise UnsafeRecordingName(f"{what} is empty")
    if name in (".", ".."):
        raise UnsafeRecordingName(f"{what} {name!r} is not a file name")
    for bad, words in (("/", "a '/'"), ("\\", "a '\\'"), ("\x00", "a NUL character")):
        if bad in name:
            raise UnsafeRecordingName(
                f"{what} {name!r} contains {words}; refusing to use it as a file name"
            )
    if _CONTROL.search(name):
        raise UnsafeRecordingName(
            f"{what} {name!r} contains a control character; refusing to use it as a file name"
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafeRecordingName(f"{what} {name!r} is not valid text") from None
    if size > 255:
        raise UnsafeRecordingName(f"{what} is longer than 255 bytes")
    return name


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _RedactQueries(logging.Filter):
    """Strip query strings from httpx's own log lines: its INFO line names the full URL,
    token and random included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(arg) for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = strip_query(record.msg)
        return True


def _redact(value: object) -> object:
    if isinstance(value, httpx.URL):
        return value.copy_with(query=None) if value.query else value
    if isinstance(value, str):
        return strip_query(value)
    return value


_REDACTION = _RedactQueries()


# A logger's filters do not apply to its children's records, so each logger that may
# format a request is named (httpcore logs from its sub-modules only).
_HTTP_LOGGERS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)


def _install_log_redaction() -> None:
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACTION not in logger.filters:
            logger.addFilter(_REDACTION)


class _TokenRejected(Exception):
    """Internal: a call was refused with a token error; `generation` is the session it used."""

    def __init__(self, generation: int, error: TokenError) -> None:
        super().__init__(str(error))
        self.generation = generation
        self.error = error


class PbxClient(ApiClient):
    """An API session with one Yeastar S-Series PBX.

    Use as ``async with PbxClient(...) as client:``; it logs in on the first call that needs
    a token and logs out on exit. `transport` replaces the network (httpx.MockTransport in
    tests). `events_*` ask the PBX to push reports to this host (without them the login
    sends port "0": no reports; a v2 PBX would otherwise push to port 8260); `events_ip` is
    the heartbeat's ``ipaddr`` (default: `local_address`, else the local address of the
    route to the PBX); `local_address` is the address every connection to the PBX leaves
    from (a node of several on one host: the PBX sends reports to, and accepts randoms
    from, the address that logged in); `guard`, called before every request but a logout,
    returns why the client may not talk to the PBX now (SessionWithdrawn) or None;
    `report_format` is the login ``version`` (by
    default the well-formed JSON format of the API version when events are asked for;
    v1.0.1 has none and sends the legacy format).
    After a wrong password (20003), or a login refused for any other reason than the
    network, no login is sent for `login_failure_pause` seconds, whoever asks: calls fail
    at once instead. `sleep` and `clock` (monotonic seconds) are injectable for tests.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        api_version: ApiVersion | str = ApiVersion.V1_1_0,
        tls: TlsOptions | None = None,
        events_port: int | None = None,
        events_url: str | None = None,
        events_urltag: bool = False,
        report_format: str | None = None,
        allowedip: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        events_ip: str | None = None,
        local_address: str | None = None,
        guard: Callable[[], str | None] | None = None,
        login_failure_pause: float = 600.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._base = _parse_base_url(base_url)
        self._base_str = str(self._base).rstrip("/")
        self.username = username
        self._password_md5 = password_md5(password)
        self.api_version = ApiVersion(api_version)
        self.tls = tls if tls is not None else TlsOptions()
        if events_port is not None and not 0 < events_port < 65536:
            raise ValueError(f"events port {events_port} is not a TCP port")
        if events_urltag and self.api_version is ApiVersion.V1_0_1:
            raise ValueError(
                "an absolute events URL (urltag) needs API v1.1.0 or later; "
                "v1.0.1 only takes a path"
            )
        self.events_port = events_port
        self.events_url = events_url
        self.events_urltag = events_urltag
        if report_format is None and events_port is not None:
            report_format = self.api_version.report_format
        self.report_format = report_format
        self.allowedip = allowedip.strip() if allowedip and allowedip.strip() else None
        self.local_address = local_address.strip() if local_address else None
        self.guard = guard
        self.events_ip = events_ip or self.local_address
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self._clock = clock if clock is not None else time.monotonic

        # Without an injected transport, a recording's body is read on a blocking socket in
        # a worker thread (SocketBody): the asyncio TLS stack costs an await per 16 KiB record.
        self._transport = transport
        self._timeout = timeout
        self._ssl_context, self._http = http_client(
            self._base,
            self.tls,
            transport=transport,
            timeout=timeout,
            local_address=self.local_address,
            user_agent="callvault",
        )
        _install_log_redaction()
        self._gate = SessionGate()
        self._token: str | None = None
        # The Cloud PBX's login also answers a refresh token (S-Series PBXs do not): the
        # token is then renewed with it before it is REFRESH_AFTER_S old (`_token_at`).
        self._refresh_token: str | None = None
        self._token_at = 0.0
        self.refresh_count = 0
        self._generation = 0
        self._auth_failure: tuple[float, PbxError] | None = None
        self.login_failure_pause = login_failure_pause
        self._locked_until: float | None = None
        self.last_success_at: float | None = None
        self.login_count = 0
        # How the PBX delivers reports, as its last login said (v2: "HTTP" or "TCP").
        self.report_transport: str | None = None
        self._speaks_tls: bool | None = None  # whether an http:// URL names a TLS port

    # ----------------------------------------------------------------- basics

    def __repr__(self) -> str:
        return (
            f"PbxClient(base_url={self._base_str!r}, username={self.username!r}, "
            f"api_version={self.api_version.value!r}, logged_in={self.logged_in})"
        )

    @property
    def logged_in(self) -> bool:
        return self._token is not None

    @property
    def has_refresh_token(self) -> bool:
        """Whether the last login (or refresh) answered a refresh token, as the Yeastar Cloud
        PBX's does and an S-Series PBX's does not."""
        return self._refresh_token is not None

    async def aclose(self) -> None:
        """Log out (errors ignored) and close the connections."""
        if self._token is not None:
            try:
                await self.logout()
            except (PbxError, httpx.HTTPError, OSError) as exc:
                log.debug("logout on close failed: %s", exc)
        await self._http.aclose()

    async def close_connections(self) -> None:
        """Close the connections without logging out: for an owner that may no longer talk
        to the PBX (the token is forgotten, the PBX lets it expire)."""
        self._token = self._refresh_token = None
        await self._http.aclose()

    def _url(self, endpoint: str, query: dict[str, str] | None = None) -> httpx.URL:
        url = f"{self._base_str}/api/{self.api_version.value}/{endpoint}"
        if query:
            url += "?" + urlencode(query, quote_via=quote, safe="")
        return httpx.URL(url)

    # ----------------------------------------------------------- one exchange

    def _transport_error(self, exc: Exception, context: str) -> PbxError:
        return transport_error(exc, context=context, origin=origin_of(self._base), tls=self.tls)

    async def _post(
        self, endpoint: str, body: dict[str, str] | None, token: str | None, context: str
    ) -> dict[str, Any]:
        """POST one API request; return the JSON of a Success answer or raise its error."""
        guarded = endpoint != "logout"
        if guarded:
            self._check_guard(context)
        url = self._url(endpoint, {"token": token} if token is not None else None)
        content = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        try:
            response = await self._http.post(
                url,
                content=content,
                headers={"Content-Type": "application/json; charset=utf-8"},
                extensions=self._guarded(context) if guarded else None,
            )
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
                await self._hint_at_https(context)
            raise self._transport_error(exc, context) from None
        if response.status_code == 400:
            await self._hint_at_https(context)
        return self._api_answer(response.status_code, response.headers, response.content, context)

    async def _hint_at_https(self, context: str) -> None:
        """Raise a one-line hint if the URL says http:// but the port speaks TLS (which
        drops a plain request, or answers it 400); checked once per client."""
        if self._base.scheme != "http":
            return
        if self._speaks_tls is None:
            port = self._base.port or 80
            self._speaks_tls = await asyncio.to_thread(
                speaks_tls, self._base.host, port, min(self._timeout, 5.0)
            )
        if self._speaks_tls:
            raise PbxProtocolError(
                f"{context}: the PBX answered with TLS: use https://{origin_of(self._base)}"
            )

    def _api_answer(
        self, status_code: int, headers: httpx.Headers, content: bytes, context: str
    ) -> dict[str, Any]:
        stripped = content.lstrip()
        if stripped.startswith(b"{"):
            try:
                document = json.loads(stripped.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                document = None
            if isinstance(document, dict):
                status = str(document.get("status", ""))
                if status == "Success":
                    self.last_success_at = time.time()
                    return document
                errno = document.get("errno")
                if errno is not None and str(errno).strip():
                    raise error_for_errno(str(errno).strip(), context)
                raise PbxProtocolError(
                    f"{context}: the PBX answered status {status[:40]!r} without an errno"
                )
        if 300 <= status_code < 400 and headers.get("location"):
            target = strip_query(headers["location"])
            raise PbxProtocolError(
                f"{context}: the PBX redirects to {target}; use that address as the PBX URL"
            )
        if status_code >= 500 or _looks_like_html(headers, stripped):
            hint = ""
            if status_code == 404:
                hint = (
                    f" (no S-Series API at /api/{self.api_version.value}: check that the "
                    "API is enabled on the PBX, and its kind: a P-Series PBX speaks the "
                    "OpenAPI, --kind p-series)"
                )
            raise PbxTransportError(
                f"{context}: the PBX answered HTTP {status_code} "
                f"{'with an HTML page ' if _looks_like_html(headers, stripped) else ''}"
                f"instead of an API response{hint}"
            )
        raise PbxProtocolError(
            f"{context}: the PBX answered HTTP {status_code} with something that is not an "
            "API response"
        )

    # ---------------------------------------------------------------- session

    async def _login_exclusive(self) -> None:
        """Log in; the caller holds the gate exclusive."""
        now = self._clock()
        self._refuse_while_paused(
            now, "not trying again for", "five failed logins would lock this IP out"
        )
        if self._locked_until is not None and now < self._locked_until:
            remaining = int(self._locked_until - now) + 1
            raise LoginLockedOut(
                f"login: the PBX locked this IP out after five failed logins; not trying again "
                f"for {remaining} s, errno 20002",
                errno="20002",
            )
        body: dict[str, str] = {"username": self.username, "password": self._password_md5}
        if self.events_port is not None:
            body["port"] = str(self.events_port)
            if self.events_url is not None:
                body["url"] = self.events_url
            if self.api_version is not ApiVersion.V1_0_1:
                body["urltag"] = "1" if self.events_urltag else "0"
        else:
            # Required in v1; 0 asks for no reports. v2 makes it optional but then pushes to
            # port 8260 (where `callvault serve` may be listening), so it is sent there too.
            body["port"] = NO_EVENTS_PORT
        if self.report_format is not None:
            body["version"] = self.report_format
        self._token = self._refresh_token = None
        self.login_count += 1
        try:
            document = await self._post("login", body, None, "login")
        except LoginLockedOut:
            self._locked_until = self._clock() + LOCKOUT_SECONDS
            log.error("login to %s refused: this IP is locked out for ten minutes", self._base_str)
            raise
        except LoginFailed as exc:
            self._auth_failure = (self._clock(), exc)
            log.error(
                "login to %s as %r refused: wrong username or password",
                self._base_str,
                self.username,
            )
            raise
        except PbxBusy:
            raise  # the PBX's API service is struggling: retried like a transport failure
        except (PbxApiError, PbxProtocolError) as exc:
            # Refused for another reason (a blank or wrong parameter, an answer that is not
            # the API): trying again at once cannot help, and the PBX may count it as a
            # failed login. Remembered like a wrong password, and a refused login whatever
            # its class (not a failure of the call that needed the login).
            exc.kind = ErrorKind.LOGIN_REFUSED
            self._auth_failure = (self._clock(), exc)
            log.error("login to %s refused: %s", self._base_str, exc)
            raise
        token = document.get("token")
        if not isinstance(token, str) or not token.strip():
            raise PbxProtocolError("login: the PBX answered Success without a token")
        self._take_tokens(token, document.get("refreshtoken"))
        transport = document.get("transport")
        self.report_transport = transport.strip().upper() if isinstance(transport, str) else None
        self._generation += 1
        self._locked_until = None
        self._auth_failure = None
        log.info(
            "logged in to %s as %r (API %s)", self._base_str, self.username, self.api_version.value
        )

    def _take_tokens(self, token: str, refresh: object) -> None:
        """A new token (and the refresh token that came with it, if any) from now on."""
        self._token = token.strip()
        self._refresh_token = (
            refresh.strip() if isinstance(refresh, str) and refresh.strip() else None
        )
        self._token_at = self._clock()

    def _refresh_due(self) -> bool:
        return self._refresh_token is not None and self._clock() - self._token_at >= REFRESH_AFTER_S

    async def _refresh_exclusive(self) -> None:
        """Renew the token with the refresh token (Cloud PBX); the caller holds the gate
        exclusive. Both rotate: the one used is spent. A refusal (spent, expired, or a PBX
        that does not know the request) logs in instead; a transport failure keeps the
        refresh token for the next try and raises."""
        refresh, self._refresh_token = self._refresh_token, None
        assert refresh is not None
        try:
            document = await self._post(
                "token/refresh", {"refreshtoken": refresh}, None, "token refresh"
            )
        except (PbxApiError, PbxProtocolError) as exc:
            log.info("token refresh refused by %s (%s); logging in again", self._base_str, exc)
            await self._login_exclusive()
            return
        except BaseException:
            self._refresh_token = refresh
            raise
        token = document.get("token")
        if not isinstance(token, str) or not token.strip():
            log.warning(
                "token refresh: %s answered without a token; logging in again", self._base_str
            )
            await self._login_exclusive()
            return
        self._take_tokens(token, document.get("refreshtoken"))
        self._generation += 1
        self.refresh_count += 1
        log.info("token of %s refreshed", self._base_str)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[tuple[str, int]]:
        """Hold the gate shared with a logged-in session; yields (token, generation).

        Without a token (or with one due for its refresh), the gate is left, taken
        exclusive to log in or refresh (unless another call did so meanwhile), and taken
        shared again: a shared holder never logs in itself.
        """
        while True:
            async with self._gate.shared():
                if self._token is not None and not self._refresh_due():
                    yield self._token, self._generation
                    return
            async with self._gate.exclusive():
                if self._token is None:
                    await self._login_exclusive()
                elif self._refresh_due():
                    await self._refresh_exclusive()

    async def _relogin(self, generation: int) -> None:
        """Log in again unless another call already replaced the rejected session."""
        async with self._gate.exclusive():
            if self._generation == generation or self._token is None:
                log.info("token rejected by %s; logging in again", self._base_str)
                await self._login_exclusive()

    async def _authed(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run an operation; on a token error log in again once and repeat it once."""
        relogged = False
        while True:
            try:
                return await operation()
            except _TokenRejected as rejected:
                if relogged:
                    raise rejected.error from None
                relogged = True
                await self._relogin(rejected.generation)

    async def _authed_post(
        self, endpoint: str, body: dict[str, str] | None, context: str
    ) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            async with self._session() as (token, generation):
                try:
                    return await self._post(endpoint, body, token, context)
                except TokenError as exc:
                    raise _TokenRejected(generation, exc) from None

        return await self._authed(once)

    async def login(self) -> None:
        """Log in now (a fresh token), instead of lazily on the first call."""
        async with self._gate.exclusive():
            await self._login_exclusive()

    async def heartbeat(self) -> None:
        """Keep the token (and event delivery) alive for another 30 minutes."""
        body: dict[str, str] = {}
        ip = self.events_ip or await self._local_ip()
        if ip:
            body["ipaddr"] = ip
        if self.events_port is not None:
            body["port"] = str(self.events_port)
            if self.events_url is not None:
                body["url"] = self.events_url
                if self.api_version is not ApiVersion.V1_0_1:  # v1.0.1 has no URL-type flag
                    flag = "1" if self.events_urltag else "0"
                    body["urltag"] = flag
                    if not self.api_version.is_v2:
                        body["urlflag"] = flag  # the v1.1.0 page spells it so
        else:
            body["port"] = NO_EVENTS_PORT  # as at login: no reports
        if self.report_format is not None and self.api_version.is_v2:
            body["version"] = self.report_format
        await self._authed_post("heartbeat", body, "heartbeat")
        log.debug("heartbeat to %s ok", self._base_str)

    async def logout(self) -> None:
        """End the session. The token is forgotten even if the PBX does not answer."""
        async with self._gate.exclusive():
            token, self._token = self._token, None
            self._refresh_token = None
            self._generation += 1
        if token is not None:
            with contextlib.suppress(TokenError):  # already gone: logged out either way
                await self._post("logout", None, token, "logout")

    async def run_keepalive(self, interval: float = 600.0) -> None:
        """Heartbeat every `interval` seconds; run it as a task and cancel it to stop.

        Failures are logged and tried again at the next tick; a token error logs in again
        (once per tick). A refused login (wrong password, lockout, any other refusal) ends
        the loop by raising it: logging in again every tick with a wrong password would
        lock this IP out of the PBX after five ticks. The caller decides what comes next.
        """
        while True:
            await self._sleep(interval)
            try:
                await self.heartbeat()
            except (LoginFailed, LoginLockedOut) as exc:
                log.error("keepalive stopped: %s", exc)
                raise
            except PbxError as exc:
                if self._auth_failure is not None:  # a login was refused for another reason
                    log.error("keepalive stopped: %s", exc)
                    raise
                log.warning("keepalive: heartbeat failed: %s", exc)

    async def _local_ip(self) -> str | None:
        """The address this host uses towards the PBX (the heartbeat's ``ipaddr``)."""
        host = self._base.host
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            address = host
        except ValueError:
            try:
                infos = await asyncio.to_thread(
                    socket.getaddrinfo, host, None, type=socket.SOCK_DGRAM
                )
            except OSError:
                return None
            if not infos:
                return None
            family, address = infos[0][0], str(infos[0][4][0])
        try:
            # A UDP "connect" sends nothing; it only picks the route and the local address.
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((address, 9))
                return str(probe.getsockname()[0])
        except OSError:
            return None

    # --------------------------------------------------------------- download

    async def download_recording(
        self,
        name: str,
        dest_dir: Path,
        *,
        filename: str | None = None,
        progress: ProgressCallback | None = None,
        transform: Callable[[], StreamTransform] | None = None,
        hash_stored: bool = True,
    ) -> DownloadResult:
        """Download one recording into ``dest_dir/(filename or name)``, verified and durable.

        With `transform`, each attempt's body is written through a new transform from it
        (e.g. encrypted as it arrives); the result's size and SHA-256 are the body's, and
        its `stored_sha256` that of the file written, unless `hash_stored` is False (a
        second hash over every byte, for a storage that has no use for it).

        Every attempt asks for a fresh random and uses it at once; the body streams to a
        temporary file in ``dest_dir`` (constant memory), is checked (JSON error, RIFF/WAVE,
        Content-Length) and renamed into place after fsync, with the permissions of any new
        file (0o666 less the umask). Nothing is left behind on failure or cancellation.

        Unless a transport was injected, the GET and the body run on a blocking socket in
        worker threads (see `callvault.pbx._download`): a download runs at network speed
        and takes three threads while it lasts (four past 4 MiB).
        """
        check_recording_name(name)
        target_name = check_recording_name(filename, what="file name") if filename else name
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / target_name
        context = f"recording {name}"

        async def once() -> DownloadResult:
            return await self._download_once(
                name, target, context, progress, transform, hash_stored
            )

        try:
            return await self._retrying(once, context)
        except RandomInvalid as exc:
            if exc.errno == "20012":
                # 2017 firmware answers 20012 for "file does not exist"; a fresh random every
                # time did not help, so believe it.
                raise RecordingNotFound(
                    f"{context}: the PBX answered errno 20012 to {self.max_attempts} fresh "
                    "randoms (on older firmware: recording not found on the PBX)",
                    errno="20012",
                ) from None
            raise

    async def _download_once(
        self,
        name: str,
        target: Path,
        context: str,
        progress: ProgressCallback | None,
        transform: Callable[[], StreamTransform] | None = None,
        hash_stored: bool = True,
    ) -> DownloadResult:
        body = {"recording": name}
        if self.allowedip is not None:
            body["allowedip"] = self.allowedip
        # The critical section: no login can come between a random and the request that uses
        # it (other downloads may: each uses its own random). It ends when the GET's headers
        # have arrived.
        async with self._session() as (token, generation):
            try:
                answer = await self._post("recording/get_random", body, token, context)
            except TokenError as exc:
                raise _TokenRejected(generation, exc) from None
            secret = answer.get("random")
            if not isinstance(secret, str) or not secret.strip():
                raise PbxProtocolError(f"{context}: get_random answered without a random")
            url = self._url(
                "recording/download",
                {"recording": name, "random": secret.strip(), "token": token},
            )
            del secret
            response = await self._send_download(url, context)
        try:
            return await self._receive_recording(
                response, name, target, context, progress, transform, hash_stored
            )
        except TokenError as exc:
            raise _TokenRejected(generation, exc) from None
        finally:
            await response.aclose()

    async def _send_download(self, url: httpx.URL, context: str) -> ResponseBody:
        """Send the download GET; return once its response headers have arrived."""
        if self._transport is None:
            headers = httpx.Headers(self._http.headers)  # Connection: close, User-Agent, Accept
            headers["Accept-Encoding"] = "identity"
            return await SocketBody.open(
                url,
                ssl_context=self._ssl_context,
                tls=self.tls,
                socket_timeout=self._timeout,
                headers=dict(headers.items()),
                context=context,
                local_address=self.local_address,
                guard=self.guard,
            )
        request = self._http.build_request("GET", url, headers={"Accept-Encoding": "identity"})
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, context) from None
        return HttpxBody(response, lambda exc: self._transport_error(exc, context))

    async def _receive_recording(
        self,
        response: ResponseBody,
        name: str,
        target: Path,
        context: str,
        progress: ProgressCallback | None,
        transform: Callable[[], StreamTransform] | None = None,
        hash_stored: bool = True,
    ) -> DownloadResult:
        """The checks of a download, whichever pump reads it (shared with the P-Series
        client: `callvault.pbx._download.receive_recording`); see download_recording."""
        result = await receive_recording(
            response,
            name,
            target,
            context,
            progress,
            transform,
            hash_stored,
            api_answer=self._api_answer,
        )
        self.last_success_at = time.time()
        log.info("%s: saved %d bytes", context, result.size)
        return result

    # -------------------------------------------------------------------- CDR

    async def export_cdr(
        self, start: datetime, end: datetime, *, extensions: str = "all"
    ) -> list[CallDetail]:
        """The CDR rows of calls between `start` and `end` (PBX local wall-clock time).

        Keep ranges to a day or less: old firmware times out on large exports. An empty
        range (errno 20021) gives an empty list.
        """
        if not self.api_version.has_cdr_export:
            # Checked here, not left to the PBX's errno 10003 ("unsupported API request"),
            # which would not say what to do about it.
            raise RequestRejected(
                f"the CDR export needs API v1.1.0 or later; this client uses API "
                f"{self.api_version.value}",
                errno="10003",
            )
        if end < start:
            raise ValueError("the CDR range ends before it starts")
        starttime = start.strftime(CDR_TIME_FORMAT)
        endtime = end.strftime(CDR_TIME_FORMAT)
        field = self.api_version.cdr_extensions_field
        context = f"CDR export {starttime} to {endtime}"
        body = {field: extensions, "starttime": starttime, "endtime": endtime}
        if self.allowedip is not None:
            body["allowedip"] = self.allowedip

        async def once() -> list[CallDetail]:
            async with self._session() as (token, generation):
                try:
                    answer = await self._post("cdr/get_random", body, token, context)
                except TokenError as exc:
                    raise _TokenRejected(generation, exc) from None
                secret = answer.get("random")
                if not isinstance(secret, str) or not secret.strip():
                    raise PbxProtocolError(f"{context}: cdr/get_random answered without a random")
                query = {
                    field: extensions,
                    "starttime": starttime,
                    "endtime": endtime,
                    "token": token,
                    "random": secret.strip(),
                }
                request = self._http.build_request("GET", self._url("cdr/download", query))
                del secret, query
                try:
                    response = await self._http.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise self._transport_error(exc, context) from None
            try:
                content = await response.aread()
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, context) from None
            finally:
                await response.aclose()
            stripped = content.lstrip(b"\xef\xbb\xbf \t\r\n")
            if not stripped and response.status_code < 400:
                # An empty range is errno 20021 or a header row: nothing at all is a failure.
                raise PbxTransportError(f"{context}: the PBX sent an empty CDR export")
            if (
                stripped.startswith(b"{")
                or response.status_code >= 400
                or _looks_like_html(response.headers, stripped)
            ):
                try:
                    self._api_answer(response.status_code, response.headers, stripped, context)
                except TokenError as exc:
                    raise _TokenRejected(generation, exc) from None
                raise PbxProtocolError(f"{context}: the PBX answered Success instead of a CSV")
            try:
                rows = parse_cdr_csv(content.decode("utf-8", errors="replace"))
            except PbxError as exc:
                exc.message = f"{context}: {exc.message}"
                raise
            self.last_success_at = time.time()
            return rows

        try:
            return await self._retrying(once, context)
        except CdrError as exc:
            if exc.errno == "20021":
                return []
            raise

    async def export_cdr_range(
        self, start: datetime, end: datetime, tz: tzinfo, *, extensions: str = "all"
    ) -> list[CallDetail]:
        """The CDR rows of calls that started in [start, end) (aware datetimes), each once.

        The PBX is asked in its own local time (`tz`: the zone it writes its times in), one
        day per request (old firmware times out on larger exports); the export's end is
        inclusive to the second, so each request ends one second before the next begins.
        """
        rows: dict[str, CallDetail] = {}
        for window_start, window_end in windows(start, end):
            local_start = window_start.astimezone(tz).replace(tzinfo=None)
            local_end = (window_end - timedelta(seconds=1)).astimezone(tz).replace(tzinfo=None)
            for row in await self.export_cdr(
                local_start, max(local_start, local_end), extensions=extensions
            ):
                rows.setdefault(row.callid, row)
        return list(rows.values())


_looks_like_html = looks_like_html


def _parse_base_url(base_url: str) -> httpx.URL:
    try:
        return httpx.URL(check_pbx_url(base_url))
    except httpx.InvalidURL as exc:  # what urllib lets through and httpx does not
        raise ValueError(f"PBX URL {url_for_humans(base_url)!r} is not a URL ({exc})") from None
