"""The asynchronous Yeastar P-Series OpenAPI client (``/openapi/v1.0``).

`PSeriesClient` offers what the archiver uses of `PbxClient` (login, heartbeat, logout,
`download_recording`, `export_cdr_range`, `last_success_at`) plus `events`, so the
archiver need not know which kind of PBX it talks to. The rules it keeps (reference
``yeastar-p-series-api.md`` section 8.1):

- every request sends ``User-Agent: OpenAPI``; the token travels only as the query
  parameter ``access_token``; a request succeeded when its JSON ``errcode`` is the integer
  0, whatever the HTTP status. Errcodes become the exceptions of `callvault.pbx._errors`
  (`error_for_errcode`), the errcode kept as text in `.errno`.
- tokens are a budget (8 live ones per API app; or each new one kills the others): they
  live in a `TokenStore` shared per (base URL, client ID), a cached one is reused, an
  access token near its end is refreshed with ``refresh_token`` (falling back to
  ``get_token`` when that is refused), never fetched per request. 10004 (token expired)
  renews the token once and repeats the call once. A refused ``get_token`` (-1 with
  ``invalid_param_list``: wrong client ID or secret; 70004: this IP is blocked; anything
  but the network) is remembered and not sent again for `login_failure_pause` seconds: five
  failures block the IP. 60002 on ``get_token`` (token budget full) is not a login failure:
  ``get_token`` is not sent again for `token_budget_pause` seconds.
- 10005 / 70087 (app permission, API IP allow-list) are configuration errors: raised at
  once, never retried within the call.
- transport failures, HTML pages and 5xx answers, bodies that are not the audio, 70082 and
  -2 are retried with exponential backoff, `max_attempts` times in all.

Downloads: ``recording/download?file=<name>`` answers a server-relative
``download_resource_url`` (``/api/download/...`` or ``/api/downloadattachment/...``), which is
fetched at once with the same live token; the body gets the checks of the S-Series
download (`callvault.pbx._download.receive_recording`, plus MP3 sniffing when the URL or
the name says .mp3). With the PBX's mp3 download format only one download may run at a
time: once the client has seen an mp3 URL or name, or a 70082, its downloads take turns
(one asyncio lock per client), and 70082 is retried later. In the asynchronous download
mode (errcode 2 PROCESSING) the URL arrives in event 30033: the client then keeps a
WebSocket subscribed to 30033 (its own, or the `events` stream a caller runs), asks again
and waits for the 30033 of that file, up to `processing_wait` seconds.

Secrets (the client secret, tokens, download URLs) never appear in logs, messages or reprs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlencode

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from callvault.pbx._base import ApiClient, http_client
from callvault.pbx._client import _REDACTION, _install_log_redaction, check_recording_name
from callvault.pbx._download import (
    AudioFormat,
    DownloadProgress,
    HttpxBody,
    ResponseBody,
    SocketBody,
    audio_format_of,
    looks_like_html,
    receive_recording,
)
from callvault.pbx._errors import (
    DownloadProcessing,
    ErrorKind,
    EventParseError,
    PbxApiError,
    PbxBusy,
    PbxError,
    PbxProtocolError,
    PbxTransportError,
    RecordingIdMismatch,
    RecordingNotFound,
    SessionWithdrawn,
    TokenBudgetFull,
    TokenError,
    error_for_errcode,
)
from callvault.pbx._gate import SessionGate
from callvault.pbx._mapping import origin_of, transport_error
from callvault.pbx._pseries_events import (
    EVENT_FORMAT,
    RECORDING_DOWNLOADED,
    EventsResumed,
    parse_pseries_event,
    pseries_call_detail,
)
from callvault.pbx._pseries_tokens import TokenSet, TokenStore, shared_memory_store
from callvault.pbx._tls import TlsOptions
from callvault.pbx._types import CallDetail, DownloadResult, Event, StreamTransform
from callvault.pbx._urls import check_pbx_url, strip_query, url_for_humans

log = logging.getLogger("callvault.pbx")
_ws_log = logging.getLogger("callvault.pbx.websocket")

T = TypeVar("T")

API_PATH = "/openapi/v1.0"
USER_AGENT = "OpenAPI"
DOWNLOAD_PREFIXES = ("/api/download/", "/api/downloadattachment/")
CDR_PAGE_SIZE = 1000  # cdr/list|search default to 10,000 rows: ask for less
RECORDING_PAGE_SIZE = 100  # recording/list|search: page size limit undocumented
MAX_PAGES = 10_000
TOKEN_MIN_LIFE_S = 60.0  # a token with less left is renewed before it is used
DEFAULT_ACCESS_TTL_S = 1800
DEFAULT_REFRESH_TTL_S = 86400
MAX_EVENT_FRAME = 1024 * 1024
CDR_TIME = "%Y-%m-%d %H:%M:%S"
STABLE_CONNECTION_S = 60.0  # an event connection that lasted this long resets the backoff

_OPENAPI_SUFFIX = re.compile(r"/openapi(?:/v\d+(?:\.\d+)*)?/?$", re.IGNORECASE)


def _parse_base_url(base_url: str) -> httpx.URL:
    """The PBX's base URL; a pasted ``/openapi`` or ``/openapi/v1.0`` suffix is cut."""
    text = base_url.strip()
    head, sep, tail = text.partition("?")
    text = _OPENAPI_SUFFIX.sub("", head) + sep + tail
    try:
        return httpx.URL(check_pbx_url(text))
    except httpx.InvalidURL as exc:
        raise ValueError(f"PBX URL {url_for_humans(base_url)!r} is not a URL ({exc})") from None


def _errcode(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


class _TokenRejected(Exception):
    """Internal: a call was refused with a token error; `generation` is the session it used."""

    def __init__(self, generation: int, token: str, error: TokenError) -> None:
        super().__init__(str(error))
        self.generation = generation
        self.token = token
        self.error = error


def _check_file_of_id(answer: dict[str, Any], name: str, recording_id: int, context: str) -> None:
    """The ``recording/download?id=`` answer's ``file`` must be `name`: the file written
    is named after `name`, never after a recording it is not."""
    file = answer.get("file")
    if not isinstance(file, str) or not file.strip():
        raise PbxProtocolError(
            f"{context}: the PBX answered without the file name of recording id "
            f"{recording_id}; not downloading it as {name!r}"
        )
    if file.strip() != name:
        raise RecordingIdMismatch(
            f"{context}: the PBX says recording id {recording_id} is {file.strip()[:255]!r}, "
            f"not {name!r}; nothing downloaded"
        )


# -- the PBX's Date and Time Display Format ------------------------------------------------

_DISPLAY_TOKENS = re.compile(r"YYYY|MM|DD|HH|hh|mm|ss|A")
_STRFTIME = {
    "YYYY": "%Y",
    "MM": "%m",
    "DD": "%d",
    "HH": "%H",
    "hh": "%I",
    "mm": "%M",
    "ss": "%S",
    "A": "%p",
}
_CANDIDATE_DATES = (
    "MM/DD/YYYY",
    "DD/MM/YYYY",
    "YYYY/MM/DD",
    "YYYY-MM-DD",
    "DD-MM-YYYY",
    "MM-DD-YYYY",
    "DD.MM.YYYY",
)
_CANDIDATE_TIMES = ("HH:mm:ss", "hh:mm:ss A")
CANDIDATE_DISPLAY_FORMATS = tuple(f"{d} {t}" for d in _CANDIDATE_DATES for t in _CANDIDATE_TIMES)


def display_pattern(display_format: str) -> str:
    """A display format in the PBX's notation (``MM/DD/YYYY HH:mm:ss``) as a strftime
    pattern; ValueError for text without any of its fields."""
    pattern = _DISPLAY_TOKENS.sub(lambda m: _STRFTIME[m.group(0)], display_format.strip())
    if pattern == display_format.strip() or "%Y" not in pattern:
        raise ValueError(
            f"display format {display_format!r} is not in the PBX's notation "
            "(e.g. 'MM/DD/YYYY HH:mm:ss' or 'DD/MM/YYYY hh:mm:ss A')"
        )
    return pattern


CdrFilter = tuple[Literal["unix"], None] | tuple[Literal["display"], str]


class PSeriesClient(ApiClient):
    """An OpenAPI session with one Yeastar P-Series PBX (Software, Appliance or Cloud).

    Use as ``async with PSeriesClient(...) as client:``; it gets (or reuses) a token on the
    first call that needs one and revokes it on exit. The keyword arguments mean what they
    mean for `PbxClient`: `tls` (CA file, pin, insecure; the WebSocket trusts the same),
    `transport` (an httpx transport instead of the network, for API calls and downloads),
    `timeout`, `max_attempts`, `backoff_base`/`backoff_max` (retries of transient failures
    within a call), `local_address` (the address connections leave from), `guard` (called
    before every request but ``del_token``; returns why the client may not talk to the PBX
    now, raised as SessionWithdrawn), `login_failure_pause`. Beyond them: `token_store`
    (where tokens are kept; default the process's store for this base URL and client ID),
    `token_budget_pause` (how long no ``get_token`` is sent after a 60002),
    `refresh_before` (seconds before its expiry that `heartbeat` refreshes the access
    token), `display_format` (the PBX's Date and Time Display Format for CDR filters, in
    its notation; default: learned, see `export_cdr_range`), `processing_wait` (how long a
    download in asynchronous mode waits for its 30033), `ws_heartbeat` (seconds between
    WebSocket heartbeats, at most 30). `sleep` and `clock` (wall-clock Unix seconds, the
    PBX's view of them: token expiry instants are stored and shared) are injectable for
    tests.
    """

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        tls: TlsOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        local_address: str | None = None,
        guard: Callable[[], str | None] | None = None,
        token_store: TokenStore | None = None,
        login_failure_pause: float = 600.0,
        token_budget_pause: float = 300.0,
        refresh_before: float = 300.0,
        display_format: str | None = None,
        processing_wait: float = 120.0,
        ws_heartbeat: float = 25.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not client_id or not client_id.strip():
            raise ValueError("the P-Series API client ID is empty")
        if not client_secret:
            raise ValueError("the P-Series API client secret is empty")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 < ws_heartbeat <= 30:
            raise ValueError("ws_heartbeat must be more than 0 and at most 30 seconds")
        self._base = _parse_base_url(base_url)
        self._base_str = str(self._base).rstrip("/")
        self.client_id = client_id.strip()
        self._secret = client_secret
        self.tls = tls if tls is not None else TlsOptions()
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.local_address = local_address.strip() if local_address else None
        self.guard = guard
        self.token_store: TokenStore = (
            token_store
            if token_store is not None
            else shared_memory_store(self._base_str, self.client_id)
        )
        self.login_failure_pause = login_failure_pause
        self.token_budget_pause = token_budget_pause
        self.refresh_before = refresh_before
        self._display_pattern = display_pattern(display_format) if display_format else None
        self.processing_wait = processing_wait
        self.ws_heartbeat = ws_heartbeat
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self._clock = clock if clock is not None else time.time

        self._transport = transport
        self._ssl_context, self._http = http_client(
            self._base,
            self.tls,
            transport=transport,
            timeout=timeout,
            local_address=self.local_address,
            user_agent=USER_AGENT,
        )
        _install_log_redaction()
        if _REDACTION not in _ws_log.filters:
            _ws_log.addFilter(_REDACTION)

        self._gate = SessionGate()
        self._tokens: TokenSet | None = None
        self._generation = 0
        self._auth_failure: tuple[float, PbxError] | None = None
        self._budget_full_until: float | None = None
        self._serial_downloads = False
        self._download_turn = asyncio.Lock()
        self._cdr_filter: CdrFilter | None = None
        # Asynchronous downloads: file name -> futures of its download_resource_url (or
        # the 30033's failure), and the WebSocket that delivers the 30033s.
        self._completions: dict[str, list[asyncio.Future[str]]] = {}
        self._subscribed_30033 = 0  # how many open event streams receive 30033 now
        self._completion_ready = asyncio.Event()
        self._completion_task: asyncio.Task[None] | None = None
        self._sockets: set[ClientConnection] = set()  # the open event connections
        self._closed = False  # closed by its owner: event streams end, none reconnects
        self.last_success_at: float | None = None
        self.serial: str | None = None  # the PBX's serial number, once an event told it
        self.get_token_count = 0
        self.refresh_count = 0

    # ----------------------------------------------------------------- basics

    def __repr__(self) -> str:
        return (
            f"PSeriesClient(base_url={self._base_str!r}, client_id={self.client_id!r}, "
            f"logged_in={self.logged_in})"
        )

    @property
    def logged_in(self) -> bool:
        return self._tokens is not None

    async def aclose(self) -> None:
        """Revoke the token (errors ignored) and close the connections; event streams
        end."""
        await self._close_event_streams()
        if self._tokens is not None:
            try:
                await self.logout()
            except (PbxError, httpx.HTTPError, OSError) as exc:
                log.debug("del_token on close failed: %s", exc)
        await self._http.aclose()

    async def close_connections(self) -> None:
        """Close the connections without revoking the token (it stays in the token store,
        for whoever may still use it; the PBX lets it expire)."""
        self._tokens = None
        await self._close_event_streams()
        await self._http.aclose()

    async def _close_event_streams(self) -> None:
        self._closed = True
        # The sockets first: a stream waiting on one ends at once, whatever happens to the
        # cancellation below.
        for connection in list(self._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=2)
        await self._stop_completion_listener()

    def _api_url(self, endpoint: str, query: dict[str, str] | None, token: str | None) -> httpx.URL:
        params = dict(query or {})
        if token is not None:
            params["access_token"] = token
        url = f"{self._base_str}{API_PATH}/{endpoint}"
        if params:
            url += "?" + urlencode(params, quote_via=quote, safe="")
        return httpx.URL(url)

    def _transport_error(self, exc: Exception, context: str) -> PbxError:
        return transport_error(exc, context=context, origin=origin_of(self._base), tls=self.tls)

    # ----------------------------------------------------------- one exchange

    async def _request(
        self,
        method: Literal["GET", "POST"],
        endpoint: str,
        *,
        context: str,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        call: str = "",
    ) -> dict[str, Any]:
        """One API request; the JSON of an errcode-0 answer, or the mapped error."""
        guarded = endpoint != "del_token"
        if guarded:
            self._check_guard(context)
        url = self._api_url(endpoint, query, token)
        extensions = self._guarded(context) if guarded else None
        try:
            if method == "POST":
                content = json.dumps(body or {}, separators=(",", ":")).encode()
                response = await self._http.post(
                    url,
                    content=content,
                    headers={"Content-Type": "application/json"},
                    extensions=extensions,
                )
            else:
                response = await self._http.get(url, extensions=extensions)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, context) from None
        return self._answer(response.status_code, response.headers, response.content, context, call)

    def _answer(
        self,
        status_code: int,
        headers: httpx.Headers,
        content: bytes,
        context: str,
        call: str = "",
    ) -> dict[str, Any]:
        """Read an answer: errcode 0 is success whatever the HTTP status."""
        stripped = content.lstrip()
        if stripped.startswith(b"{"):
            try:
                document = json.loads(stripped.decode("utf-8", errors="replace"))
            except (json.JSONDecodeError, RecursionError):
                document = None
            if isinstance(document, dict):
                if "errcode" not in document:
                    raise PbxProtocolError(f"{context}: the PBX answered JSON without an errcode")
                code = _errcode(document["errcode"])
                if code is None:
                    raise PbxProtocolError(f"{context}: the PBX answered a non-numeric errcode")
                if code == 0:
                    self.last_success_at = time.time()
                    return document
                invalid = document.get("invalid_param_list")
                fields = tuple(
                    str(item.get("field", ""))
                    for item in (invalid if isinstance(invalid, list) else [])
                    if isinstance(item, dict)
                )
                raise error_for_errcode(
                    code, document.get("errmsg", ""), context, call=call, fields=fields
                )
        if 300 <= status_code < 400 and headers.get("location"):
            target = strip_query(headers["location"])
            raise PbxProtocolError(
                f"{context}: the PBX redirects to {target}; use that address as the PBX URL"
            )
        html = looks_like_html(headers, stripped)
        if status_code >= 500 or html:
            hint = ""
            if status_code == 404:
                hint = (
                    f" (no P-Series OpenAPI at {API_PATH}: check that the API is enabled on "
                    "the PBX, and its kind: an S-Series or Cloud PBX speaks the S-Series "
                    "API, --kind s-series or cloud)"
                )
            raise PbxTransportError(
                f"{context}: the PBX answered HTTP {status_code} "
                f"{'with an HTML page ' if html else ''}instead of an API response{hint}"
            )
        raise PbxProtocolError(
            f"{context}: the PBX answered HTTP {status_code} with something that is not an "
            "API response"
        )

    # ---------------------------------------------------------------- tokens

    def _load_store(self) -> TokenSet | None:
        try:
            return self.token_store.load()
        except Exception as exc:  # a store is the caller's code: it must not stop the client
            log.warning("cannot read the token store (%s); going on without it", type(exc).__name__)
            return None

    def _save_store(self, tokens: TokenSet | None) -> None:
        try:
            self.token_store.save(tokens)
        except Exception as exc:
            log.warning("cannot write the token store (%s)", type(exc).__name__)

    def _adopt(self, tokens: TokenSet) -> None:
        if self._tokens is None or self._tokens.access_token != tokens.access_token:
            self._generation += 1
        self._tokens = tokens

    def _token_set(self, document: dict[str, Any], context: str) -> TokenSet:
        access = document.get("access_token")
        refresh = document.get("refresh_token")
        if not isinstance(access, str) or not access.strip():
            raise PbxProtocolError(f"{context}: the PBX answered success without an access token")
        if not isinstance(refresh, str):
            refresh = ""
        now = self._clock()
        access_ttl = _errcode(document.get("access_token_expire_time"))
        refresh_ttl = _errcode(document.get("refresh_token_expire_time"))
        return TokenSet(
            access_token=access.strip(),
            refresh_token=refresh.strip(),
            access_expires_at=now + (access_ttl if access_ttl else DEFAULT_ACCESS_TTL_S),
            refresh_expires_at=now + (refresh_ttl if refresh_ttl else DEFAULT_REFRESH_TTL_S),
        )

    async def _get_token_exclusive(self) -> None:
        """``get_token``; the caller holds the gate exclusive."""
        now = self._clock()
        self._refuse_while_paused(
            now, "not asking again for", "five failed authentications would block this IP"
        )
        if self._budget_full_until is not None and now < self._budget_full_until:
            remaining = int(self._budget_full_until - now) + 1
            raise TokenBudgetFull(
                "get_token: the API app's token budget was full (errcode 60002, not a login "
                f"failure); not asking again for {remaining} s",
                errno="60002",
            )
        self.get_token_count += 1
        body = {"username": self.client_id, "password": self._secret}
        try:
            document = await self._request(
                "POST", "get_token", body=body, context="get_token", call="get_token"
            )
        except TokenBudgetFull as exc:
            self._budget_full_until = self._clock() + self.token_budget_pause
            exc.message += f"; not asking again for {int(self.token_budget_pause)} s"
            log.error("%s: %s", self._base_str, exc)
            raise
        except PbxBusy:
            raise  # the PBX is struggling: retried like a transport failure
        except (PbxApiError, PbxProtocolError) as exc:
            # Refused (wrong ID or secret, blocked IP, allow-list, an answer that is not the
            # API): asking again at once cannot help, and five failures block this IP.
            exc.kind = ErrorKind.LOGIN_REFUSED
            self._auth_failure = (self._clock(), exc)
            log.error("get_token from %s refused: %s", self._base_str, exc)
            raise
        tokens = self._token_set(document, "get_token")
        self._adopt(tokens)
        self._save_store(tokens)
        self._auth_failure = None
        self._budget_full_until = None
        log.info("new access token from %s", self._base_str)

    async def _refresh_exclusive(self, tokens: TokenSet) -> bool:
        """``refresh_token``; False when the PBX refused it (the caller then asks for a new
        token). Transport failures are raised: a ``get_token`` would fail the same way."""
        self.refresh_count += 1
        try:
            document = await self._request(
                "POST",
                "refresh_token",
                body={"refresh_token": tokens.refresh_token},
                context="refresh_token",
                call="refresh_token",
            )
            fresh = self._token_set(document, "refresh_token")
        except PbxBusy:
            raise
        except (PbxApiError, PbxProtocolError) as exc:
            log.info(
                "refresh_token refused by %s (%s); asking for a new token", self._base_str, exc
            )
            return False
        self._adopt(fresh)
        self._save_store(fresh)
        log.info("access token refreshed by %s", self._base_str)
        return True

    async def _renew_exclusive(self, rejected: str | None = None, *, margin: float = 0.0) -> None:
        """Make a token live for at least ``max(TOKEN_MIN_LIFE_S, margin)`` seconds: the
        store's (another client's) when it is, else a refresh, else ``get_token``."""
        need = max(TOKEN_MIN_LIFE_S, margin)
        now = self._clock()
        stored = self._load_store()
        if (
            stored is not None
            and stored.access_token != rejected
            and stored.access_left(now) > need
        ):
            self._adopt(stored)
            return
        candidates = [t for t in (stored, self._tokens) if t is not None and t.refresh_token]
        candidates = [t for t in candidates if t.refresh_left(now) > TOKEN_MIN_LIFE_S]
        if candidates:
            newest = max(candidates, key=lambda t: t.refresh_expires_at)
            if await self._refresh_exclusive(newest):
                return
        await self._get_token_exclusive()

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[tuple[str, int]]:
        """Hold the gate shared with a live token; yields (token, generation)."""
        while True:
            async with self._gate.shared():
                tokens = self._tokens
                if tokens is not None and tokens.access_left(self._clock()) > TOKEN_MIN_LIFE_S:
                    yield tokens.access_token, self._generation
                    return
            async with self._gate.exclusive():
                tokens = self._tokens
                if tokens is None or tokens.access_left(self._clock()) <= TOKEN_MIN_LIFE_S:
                    await self._renew_exclusive()

    async def _retoken(self, rejected: _TokenRejected) -> None:
        """Renew the token unless another call already replaced the rejected one."""
        async with self._gate.exclusive():
            if self._generation == rejected.generation or self._tokens is None:
                log.info("access token rejected by %s (%s); renewing it", self._base_str, rejected)
                self._tokens = None
                await self._renew_exclusive(rejected.token)

    async def _authed(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run an operation; on a token error renew the token once and repeat it once."""
        renewed = False
        while True:
            try:
                return await operation()
            except _TokenRejected as rejected:
                if renewed:
                    raise rejected.error from None
                renewed = True
                await self._retoken(rejected)

    async def _authed_get(
        self,
        endpoint: str,
        query: dict[str, str],
        context: str,
        call: str = "",
        *,
        retry: bool = True,
    ) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            async with self._session() as (token, generation):
                try:
                    return await self._request(
                        "GET", endpoint, query=query, token=token, context=context, call=call
                    )
                except TokenError as exc:
                    raise _TokenRejected(generation, token, exc) from None

        if not retry:
            return await self._authed(once)
        return await self._retrying(once, context)

    # --------------------------------------------------------------- session

    async def login(self) -> None:
        """Have a live token: this client's, the token store's (another client's, an earlier
        run's), a refreshed one, or, only when none of those works, a new one."""
        async with self._gate.exclusive():
            tokens = self._tokens
            if tokens is None or tokens.access_left(self._clock()) <= TOKEN_MIN_LIFE_S:
                await self._renew_exclusive()

    async def heartbeat(self) -> None:
        """Keep the session alive: refresh the access token when it has less than
        `refresh_before` seconds left (or take the store's fresher one; a refused refresh
        falls back to ``get_token``); else make a cheap authenticated call
        (``recording/list``, one row) to confirm the PBX answers."""
        async with self._gate.exclusive():
            tokens = self._tokens
            if tokens is None or tokens.access_left(self._clock()) <= self.refresh_before:
                await self._renew_exclusive(margin=self.refresh_before)
                return
        # One try (a token error: renewed once): the caller's schedule decides what next.
        await self._authed_get(
            "recording/list", {"page": "1", "page_size": "1"}, "heartbeat", retry=False
        )
        log.debug("heartbeat to %s ok", self._base_str)

    async def logout(self) -> None:
        """Revoke the token (``del_token``). It is forgotten, here and in the token store,
        even if the PBX does not answer."""
        async with self._gate.exclusive():
            tokens, self._tokens = self._tokens, None
            self._generation += 1
            if tokens is not None:
                stored = self._load_store()
                if stored is not None and stored.access_token == tokens.access_token:
                    self._save_store(None)
        if tokens is not None:
            with contextlib.suppress(TokenError):  # already gone: revoked either way
                await self._request(
                    "GET", "del_token", token=tokens.access_token, context="del_token"
                )

    # -------------------------------------------------------------- download

    async def download_recording(
        self,
        name: str,
        dest_dir: Path,
        *,
        filename: str | None = None,
        recording_id: int | None = None,
        progress: DownloadProgress | None = None,
        transform: Callable[[], StreamTransform] | None = None,
        hash_stored: bool = True,
    ) -> DownloadResult:
        """Download one recording (by its name, as 30012 or ``recording/list`` gave it)
        into ``dest_dir/(filename or name)``, verified and durable; see `PbxClient`.

        Each attempt asks ``recording/download`` for a fresh URL and fetches it at once with
        the live token. The body must be RIFF/WAVE (a .wav URL or name) or MP3 (a .mp3
        one), as long as announced; it is hashed, fsynced and renamed into place.
        60001 raises RecordingNotFound.

        With `recording_id` (the ``id`` of ``recording/list``), the PBX is asked for that
        recording (``recording/download?id=``) instead of the file `name`; `name` (and
        `filename`) still name the file written, checked as ever, and `name` must be the
        file the PBX says the id is: otherwise `RecordingIdMismatch`, and nothing is
        written. An id the PBX does not know is RecordingNotFound, as a name is.
        """
        check_recording_name(name)
        target_name = check_recording_name(filename, what="file name") if filename else name
        if recording_id is not None and (
            isinstance(recording_id, bool) or not isinstance(recording_id, int) or recording_id < 0
        ):
            raise ValueError(f"recording id {recording_id!r} is not a recording id")
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / target_name
        context = (
            f"recording {name}" if recording_id is None else f"recording {name} (id {recording_id})"
        )

        async def once() -> DownloadResult:
            return await self._download_once(
                name, target, context, progress, transform, hash_stored, recording_id
            )

        return await self._retrying(once, context)

    async def _download_once(
        self,
        name: str,
        target: Path,
        context: str,
        progress: DownloadProgress | None,
        transform: Callable[[], StreamTransform] | None,
        hash_stored: bool,
        recording_id: int | None = None,
    ) -> DownloadResult:
        serial = self._serial_downloads or audio_format_of(name) == "mp3"
        turn: contextlib.AbstractAsyncContextManager[Any] = (
            self._download_turn if serial else contextlib.nullcontext()
        )
        async with turn:
            path = await self._resource_path(name, context, recording_id)
            expect: AudioFormat | None = audio_format_of(path) or audio_format_of(name)
            if expect == "mp3":
                self._serial_downloads = True
            async with self._session() as (token, generation):
                url = httpx.URL(f"{self._base_str}{path}?access_token={quote(token, safe='')}")
                response = await self._send_download(url, context)
            try:
                result = await receive_recording(
                    response,
                    name,
                    target,
                    context,
                    progress,
                    transform,
                    hash_stored,
                    api_answer=self._download_answer,
                    expect=expect,
                )
            except TokenError as exc:
                raise _TokenRejected(generation, token, exc) from None
            except PbxBusy as exc:
                if exc.errno == "70082":
                    self._serial_downloads = True
                raise
            finally:
                await response.aclose()
        self.last_success_at = time.time()
        log.info("%s: saved %d bytes", context, result.size)
        return result

    def _download_answer(
        self, status_code: int, headers: httpx.Headers, content: bytes, context: str
    ) -> object:
        return self._answer(status_code, headers, content, context, "download")

    async def _resource_path(self, name: str, context: str, recording_id: int | None = None) -> str:
        """Ask ``recording/download`` for the file's URL path (waiting for its 30033 in the
        asynchronous mode); by `recording_id`, the answer must name the file `name`."""
        answer = await self._ask_download(name, context, recording_id)
        if answer is None:
            # errcode 2: asynchronous mode. Make sure a 30033 can reach us, ask again (the
            # first answer's 30033 may have come before anyone listened) and wait for it.
            await self._ensure_completion_listener(context)
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._completions.setdefault(name, []).append(future)
            try:
                answer = await self._ask_download(name, context, recording_id)
                if answer is None:
                    try:
                        path = await asyncio.wait_for(
                            asyncio.shield(future), timeout=self.processing_wait
                        )
                    except TimeoutError:
                        raise DownloadProcessing(
                            f"{context}: the PBX is still preparing the file after "
                            f"{self.processing_wait:.0f} s (no event 30033 came)",
                            errno="2",
                        ) from None
                    # The 30033 came for `name` (the event names the file): by an id,
                    # the id's file is `name`; a mismatching one never completes.
                    return self._checked_path(path, context)
            finally:
                waiting = self._completions.get(name, [])
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    self._completions.pop(name, None)
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: raised above, or not needed any more
        if recording_id is not None:
            _check_file_of_id(answer, name, recording_id, context)
        return self._checked_path(answer.get("download_resource_url"), context)

    async def _ask_download(
        self, name: str, context: str, recording_id: int | None = None
    ) -> dict[str, Any] | None:
        """One ``recording/download`` (by ``id=`` when `recording_id` is given, else by
        ``file=``); None for errcode 2 (asynchronous mode)."""
        query = {"file": name} if recording_id is None else {"id": str(recording_id)}
        async with self._session() as (token, generation):
            try:
                return await self._request(
                    "GET",
                    "recording/download",
                    query=query,
                    token=token,
                    context=context,
                    call="download",
                )
            except TokenError as exc:
                raise _TokenRejected(generation, token, exc) from None
            except DownloadProcessing:
                return None
            except PbxBusy as exc:
                if exc.errno == "70082":
                    self._serial_downloads = True  # mp3 format: one download at a time
                raise

    def _checked_path(self, value: Any, context: str) -> str:
        """A ``download_resource_url`` as a safe server-relative path on this PBX."""
        if not isinstance(value, str) or not value.strip():
            raise PbxProtocolError(f"{context}: the PBX answered without a download_resource_url")
        path = value.strip()
        if not path.startswith("/") and path.startswith("api/"):
            path = "/" + path  # one copy of the docs joins with a slash of its own
        if (
            not path.startswith(DOWNLOAD_PREFIXES)
            or any(ch in path for ch in "?#\\")
            or "/../" in path + "/"
            or "//" in path
            or not path.isascii()
            or any(ch.isspace() or not ch.isprintable() for ch in path)
        ):
            raise PbxProtocolError(
                f"{context}: the PBX answered a download URL that is not under "
                f"{' or '.join(DOWNLOAD_PREFIXES)}"
            )
        return path

    async def _send_download(self, url: httpx.URL, context: str) -> ResponseBody:
        """Send the file GET; return once its response headers have arrived."""
        if self._transport is None:
            headers = httpx.Headers(self._http.headers)  # Connection: close, User-Agent
            headers["Accept-Encoding"] = "identity"
            return await SocketBody.open(
                url,
                ssl_context=self._ssl_context,
                tls=self.tls,
                socket_timeout=self.timeout,
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

    # ------------------------------------------------- asynchronous downloads

    def _complete(self, event: Event) -> None:
        """Hand a 30033 to the downloads waiting for its file."""
        fields = event.fields
        file = str(fields.get("file") or "").strip()
        waiting = self._completions.get(file, [])
        if not waiting:
            return
        result = str(fields.get("result") or "").strip().lower()
        url = fields.get("download_resource_url")
        error: PbxError | None = None
        if result != "success" or not isinstance(url, str) or not url.strip():
            detail = str(fields.get("error") or "").strip()[:80]
            context = f"recording {file}"
            if "NOT FOUND" in detail.upper():
                error = RecordingNotFound(
                    f"{context}: recording not found on the PBX (event 30033: {detail})",
                    errno="60001",
                )
            else:
                error = PbxBusy(
                    f"{context}: the PBX could not prepare the file (event 30033: "
                    f"{detail or result or 'no URL'})"
                )
        for future in waiting:
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    assert isinstance(url, str)
                    future.set_result(url)

    async def _ensure_completion_listener(self, context: str) -> None:
        if self._subscribed_30033 > 0:
            return
        if self._completion_task is None or self._completion_task.done():
            self._completion_ready.clear()
            self._completion_task = asyncio.create_task(
                self._listen_for_completions(), name="callvault-pseries-30033"
            )
            self._completion_task.add_done_callback(_retrieve)
        waiter = asyncio.ensure_future(self._completion_ready.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, self._completion_task},
                timeout=self.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
        if self._completion_task in done:
            task = self._completion_task
            failure = None if task.cancelled() else task.exception()
            if isinstance(failure, PbxError):
                raise failure
            raise PbxTransportError(f"{context}: cannot subscribe to event 30033")
        if not self._completion_ready.is_set():
            raise PbxTransportError(f"{context}: subscribing to event 30033 timed out")

    async def _listen_for_completions(self) -> None:
        async for _ in self.events((RECORDING_DOWNLOADED,)):
            pass  # events() hands each 30033 to the waiting downloads itself

    async def _stop_completion_listener(self) -> None:
        task, self._completion_task = self._completion_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -------------------------------------------------------------------- events

    async def events(self, topics: Iterable[int] = (30011, 30012, 30033)) -> AsyncIterator[Event]:
        """The PBX's events, over its WebSocket, for as long as the caller iterates.

        Subscribes to `topics`, sends ``heartbeat`` every `ws_heartbeat` seconds, and when
        the connection is lost connects again (with backoff, and a renewed token if the PBX
        refused the old one), subscribing again; after every reconnection it first yields
        an `EventsResumed` whose `since` is when the connection was lost: events of the gap
        are not delivered, reconcile them from the call history. 30012 comes as a
        `NewCdrEvent`; frames that are not events are logged and skipped. Raises what cannot
        get better by waiting: a refused ``get_token``, a permission (10005) or allow-list
        (70087) refusal of the subscription.
        """
        topic_list = sorted({int(topic) for topic in topics})
        if not topic_list:
            raise ValueError("subscribe to at least one event topic")
        failures = 0  # consecutive failed or short-lived connections: the backoff
        lost_at: float | None = None  # when the last working connection was lost
        connected_once = False
        while not self._closed:
            try:
                async with self._session() as (token, generation):
                    pass
                connection = await self._ws_open(token)
            except _TokenRejected as rejected:
                # The upgrade was refused: renew the token (once per attempt, with backoff
                # after the first, so a PBX refusing every token is not asked in a loop).
                failures += 1
                if failures > 1:
                    await self._sleep(self._ws_backoff(failures))
                await self._retoken(rejected)
                continue
            except PbxError as exc:
                if (
                    not exc.transient
                    or exc.kind is ErrorKind.LOGIN_REFUSED
                    or isinstance(exc, SessionWithdrawn)
                ):
                    raise
                failures += 1
                delay = self._ws_backoff(failures)
                log.warning("event stream from %s: %s; again in %.1f s", self._base_str, exc, delay)
                await self._sleep(delay)
                continue
            opened = time.monotonic()
            self._sockets.add(connection)
            try:
                if self._closed:
                    return
                try:
                    await self._ws_subscribe(connection, topic_list, token, generation)
                except _TokenRejected as rejected:
                    failures += 1
                    if failures > 1:
                        await self._sleep(self._ws_backoff(failures))
                    await self._retoken(rejected)
                    continue
                connected_once = True
                receives_30033 = RECORDING_DOWNLOADED in topic_list
                if receives_30033:
                    self._subscribed_30033 += 1
                    self._completion_ready.set()
                try:
                    if lost_at is not None:
                        since, lost_at = lost_at, None
                        yield EventsResumed(
                            name="EventsResumed",
                            sn=self.serial or "",
                            fields={"since": since},
                            format=EVENT_FORMAT,
                            since=since,
                        )
                    async for event in self._ws_events(connection):
                        yield event
                finally:
                    if receives_30033:
                        self._subscribed_30033 -= 1
                        if self._subscribed_30033 == 0:
                            self._completion_ready.clear()
            except (websockets.ConnectionClosed, OSError, TimeoutError) as exc:
                if self._closed:
                    return
                reason = type(exc).__name__
                if isinstance(exc, websockets.ConnectionClosed) and exc.rcvd is not None:
                    reason = f"close code {exc.rcvd.code}"
                if connected_once and lost_at is None:
                    lost_at = self._clock()
                if time.monotonic() - opened >= STABLE_CONNECTION_S:
                    failures = 0  # it had worked for a while: not a flapping PBX
                failures += 1
                delay = self._ws_backoff(failures)
                log.warning(
                    "event stream from %s lost (%s); connecting again in %.1f s",
                    self._base_str,
                    reason,
                    delay,
                )
                await self._sleep(delay)
            finally:
                self._sockets.discard(connection)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), timeout=2)

    def _ws_backoff(self, failures: int) -> float:
        delay = min(max(self.backoff_max, 30.0), self.backoff_base * 2.0 ** (failures - 1))
        return delay * random.uniform(0.5, 1.0)

    def _ws_url(self, token: str) -> str:
        scheme = "wss" if self._base.scheme == "https" else "ws"
        host = self._base.host
        netloc = f"[{host}]" if ":" in host else host
        if self._base.port is not None:
            netloc += f":{self._base.port}"
        path = self._base.path.rstrip("/")
        return f"{scheme}://{netloc}{path}{API_PATH}/subscribe?access_token={quote(token, safe='')}"

    async def _ws_open(self, token: str) -> ClientConnection:
        context = "event subscription"
        self._check_guard(context)
        extra: dict[str, Any] = {}
        if self.local_address is not None:
            extra["local_addr"] = (self.local_address, 0)
        try:
            return await ws_connect(
                self._ws_url(token),
                ssl=self._ssl_context,
                user_agent_header=USER_AGENT,
                proxy=None,
                compression=None,
                open_timeout=self.timeout,
                ping_interval=None,  # the PBX's keepalive is the text heartbeat
                close_timeout=5,
                max_size=MAX_EVENT_FRAME,
                logger=_ws_log,
                **extra,
            )
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                # The PBX refuses the upgrade without a valid token (or from an address it
                # does not allow): renewing the token once tells which.
                raise _TokenRejected(
                    self._generation,
                    token,
                    TokenError(
                        f"{context}: the PBX refused the WebSocket (HTTP {status})",
                        errno="10004",
                    ),
                ) from None
            if status >= 500:
                raise PbxTransportError(
                    f"{context}: the PBX answered HTTP {status} to the WebSocket upgrade"
                ) from None
            raise PbxProtocolError(
                f"{context}: the PBX answered HTTP {status} to the WebSocket upgrade"
            ) from None
        except websockets.InvalidHandshake as exc:
            raise PbxProtocolError(
                f"{context}: the WebSocket handshake failed ({type(exc).__name__})"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise self._transport_error(exc, context) from None

    async def _ws_subscribe(
        self, connection: ClientConnection, topics: Sequence[int], token: str, generation: int
    ) -> None:
        context = "event subscription"
        # Asked again on the open connection, as for every request (`_guarded`): a node
        # paused during the upgrade whose lease ran out meanwhile subscribes to nothing.
        self._check_guard(context)
        await connection.send(json.dumps({"topic_list": list(topics)}, separators=(",", ":")))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                frame = await connection.recv()
            text = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
            if text.strip().lower() == "heartbeat response":
                continue
            try:
                document = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                document = None
            if isinstance(document, dict) and "errcode" in document:
                try:
                    self._answer(200, httpx.Headers(), text.encode(), context)
                except TokenError as exc:
                    raise _TokenRejected(generation, token, exc) from None
                log.info("subscribed to events %s of %s", list(topics), self._base_str)
                return
            log.debug("event stream: frame before the subscription answer skipped")

    async def _ws_events(self, connection: ClientConnection) -> AsyncIterator[Event]:
        """Events from one connection until it closes; heartbeats sent in between."""
        last_sent = time.monotonic()
        while not self._closed:
            left = last_sent + self.ws_heartbeat - time.monotonic()
            if left <= 0:
                await connection.send("heartbeat")
                last_sent = time.monotonic()
                continue
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the frame does, and the stream would go on.
                async with asyncio.timeout(left):
                    frame = await connection.recv()
            except TimeoutError:
                continue  # time for a heartbeat
            text = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
            if text.strip().lower() == "heartbeat response":
                continue
            try:
                event = parse_pseries_event(text)
            except EventParseError as exc:
                log.warning("event stream from %s: frame skipped: %s", self._base_str, exc)
                continue
            self.last_success_at = time.time()
            if event.sn:
                self.serial = event.sn
            if event.name == str(RECORDING_DOWNLOADED):
                self._complete(event)
            yield event

    # ------------------------------------------------------------------- CDR

    async def export_cdr_range(
        self, start: datetime, end: datetime, tz: tzinfo, *, extensions: str = "all"
    ) -> list[CallDetail]:
        """The calls that started in [start, end) (aware datetimes), each once.

        Read from ``cdr/search`` in pages of `CDR_PAGE_SIZE`. Its time filters take Unix
        seconds on newer firmware and only the PBX's display format on older firmware (a
        wrong format matches nothing, silently); the client learns which once, from the
        newest ``cdr/list`` rows (their ``time`` and ``timestamp``): a search for the newest
        call by Unix seconds; if that finds nothing, the display format that writes that
        call's ``timestamp`` as its ``time`` (in `tz`, the PBX's zone), checked by searching
        for it. `display_format` given to the client skips this. The query is widened (one
        second, or an hour each side with display-format filters) and the rows are kept by
        their ``timestamp``. Recording names come from the rows' ``record_file``, or, on
        firmware without it, from ``recording/search`` (Unix seconds), joined by ``uid``.
        `extensions` ("all" or numbers separated by commas) keeps calls from or to them.
        `timestart` is local time in `tz`.
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("the CDR range needs aware datetimes")
        if end < start:
            raise ValueError("the CDR range ends before it starts")
        wanted = _extension_set(extensions)
        low, high = start.timestamp(), end.timestamp()
        if low == high:
            return []
        mode = await self._cdr_filter_mode(tz)
        if mode is None:
            return []  # the PBX has no CDR at all
        rows = await self._cdr_rows(mode, low, high, tz)
        kept: list[tuple[float, dict[str, Any]]] = []
        for row in rows:
            moment = self._row_time(row, mode, tz)
            if moment is not None and low <= moment < high:
                kept.append((moment, row))
        names: dict[str, str] = {}
        if any("record_file" not in row for _, row in kept):
            names = await self._recording_names(low, high)
        details: dict[str, CallDetail] = {}
        for ts, row in sorted(kept, key=lambda item: item[0]):
            if "record_file" not in row:
                row = {**row, "record_file": names.get(str(row.get("uid", "")).strip(), "")}
            detail = pseries_call_detail(
                row,
                sn=self.serial or "",
                timestart=datetime.fromtimestamp(ts, tz).strftime(CDR_TIME),
            )
            if not detail.callid:
                continue
            if wanted is not None and not ({detail.callfrom, detail.callto} & wanted):
                continue
            details.setdefault(detail.callid, detail)
        return list(details.values())

    def _row_time(self, row: dict[str, Any], mode: CdrFilter, tz: tzinfo) -> float | None:
        stamp = _errcode(row.get("timestamp"))
        if stamp is not None:
            return float(stamp)
        pattern = mode[1] if mode[0] == "display" else self._display_pattern
        text = str(row.get("time") or "").strip()
        if pattern is None or not text:
            return None
        try:
            return datetime.strptime(text, pattern).replace(tzinfo=tz).timestamp()
        except ValueError:
            return None

    def _filter_value(self, mode: CdrFilter, moment: float, tz: tzinfo) -> str:
        if mode[0] == "unix":
            return str(int(moment))
        return datetime.fromtimestamp(moment, tz).strftime(mode[1])

    async def _cdr_rows(
        self, mode: CdrFilter, low: float, high: float, tz: tzinfo
    ) -> list[dict[str, Any]]:
        margin = 1.0 if mode[0] == "unix" else 3600.0  # local times: DST folds
        query = {
            "start_time": self._filter_value(mode, math.floor(low) - margin, tz),
            "end_time": self._filter_value(mode, math.ceil(high) + margin, tz),
        }
        return await self._pages("cdr/search", query, CDR_PAGE_SIZE, "CDR search")

    async def _pages(
        self, endpoint: str, query: dict[str, str], page_size: int, context: str
    ) -> list[dict[str, Any]]:
        """Every row of a paged list, each once (by ``id``), pages of `page_size`."""
        rows: dict[str, dict[str, Any]] = {}
        for page in range(1, MAX_PAGES + 1):
            answer = await self._authed_get(
                endpoint,
                {**query, "page": str(page), "page_size": str(page_size)},
                f"{context} page {page}",
            )
            data = answer.get("data")
            if data is None:
                data = []
            if not isinstance(data, list):
                raise PbxProtocolError(f"{context}: the PBX answered data that is not a list")
            for row in data:
                if isinstance(row, dict):
                    key = str(row.get("id", "")) or json.dumps(row, sort_keys=True, default=str)
                    rows.setdefault(key, row)
            total = _errcode(answer.get("total_number"))
            if not data:
                break
            if total is not None:
                if len(rows) >= total:  # a PBX may cap the page size below what we ask
                    break
            elif len(data) < page_size:
                break
        return list(rows.values())

    async def _recording_names(self, low: float, high: float) -> dict[str, str]:
        """uid -> recording file name of recordings around [low, high)."""
        query = {"start_time": str(math.floor(low) - 60), "end_time": str(math.ceil(high) + 60)}
        names: dict[str, str] = {}
        for row in await self._pages(
            "recording/search", query, RECORDING_PAGE_SIZE, "recording search"
        ):
            uid = str(row.get("uid") or "").strip()
            file = str(row.get("file") or "").strip()
            if uid and file:
                names.setdefault(uid, file)
        return names

    async def _cdr_filter_mode(self, tz: tzinfo) -> CdrFilter | None:
        """How ``cdr/search`` takes times on this PBX (learned once); None: no CDR at all."""
        if self._cdr_filter is not None:
            return self._cdr_filter
        if self._display_pattern is not None:
            self._cdr_filter = ("display", self._display_pattern)
            return self._cdr_filter
        answer = await self._authed_get(
            "cdr/list",
            {"page": "1", "page_size": "20", "sort_by": "id", "order_by": "desc"},
            "CDR list",
        )
        data = answer.get("data")
        rows = [row for row in (data if isinstance(data, list) else []) if isinstance(row, dict)]
        rows = [row for row in rows if _errcode(row.get("timestamp")) is not None]
        if not rows:
            return None
        stamp = float(_errcode(rows[0]["timestamp"]) or 0)
        unix: CdrFilter = ("unix", None)
        if await self._finds(unix, stamp, tz):
            self._cdr_filter = unix
            log.info("%s takes Unix seconds in CDR filters", self._base_str)
            return unix
        for candidate in _display_candidates(rows, tz):
            mode: CdrFilter = ("display", display_pattern(candidate))
            if await self._finds(mode, stamp, tz):
                self._cdr_filter = mode
                log.info("%s writes times as %s", self._base_str, candidate)
                return mode
        raise PbxProtocolError(
            "CDR search: cannot tell which time format the PBX's CDR filters take (neither "
            "Unix seconds nor a known display format finds its newest call); pass the PBX's "
            "Date and Time Display Format (display_format)"
        )

    async def _finds(self, mode: CdrFilter, stamp: float, tz: tzinfo) -> bool:
        query = {
            "start_time": self._filter_value(mode, stamp - 1, tz),
            "end_time": self._filter_value(mode, stamp + 1, tz),
            "page": "1",
            "page_size": "1",
        }
        answer = await self._authed_get("cdr/search", query, "CDR search (time format probe)")
        data = answer.get("data")
        total = _errcode(answer.get("total_number"))
        return bool(data) or bool(total)


def _display_candidates(rows: list[dict[str, Any]], tz: tzinfo) -> list[str]:
    """The display formats that write each row's ``timestamp`` as its ``time``."""
    matching: list[str] = []
    for candidate in CANDIDATE_DISPLAY_FORMATS:
        pattern = display_pattern(candidate)
        fits = True
        for row in rows:
            text = " ".join(str(row.get("time") or "").split()).upper()
            stamp = _errcode(row.get("timestamp"))
            if not text or stamp is None:
                continue
            if datetime.fromtimestamp(stamp, tz).strftime(pattern).upper() != text:
                fits = False
                break
        if fits:
            matching.append(candidate)
    return matching


def _retrieve(task: asyncio.Task[None]) -> None:
    """Retrieve a finished listener's exception (it is raised to the download waiting for
    it, if any), so that asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _extension_set(extensions: str) -> set[str] | None:
    text = extensions.strip()
    if not text or text.lower() == "all":
        return None
    numbers = {part.strip() for part in text.split(",") if part.strip()}
    if not numbers:
        raise ValueError(f"extensions {extensions!r} names no extension")
    return numbers
