"""The events receiver: the HTTP endpoint the PBX pushes its reports to.

Routes, in the order a request meets them:

* source address not in the allow-list -> 403 (nothing read, nothing stored);
* any path but the secret one           -> 404;
* not POST                              -> 405;
* body over `max_body` bytes            -> 413;
* body not complete within `body_timeout_s` -> 408 (the headers have a limit of their own,
  see callvault.serving: an idle or half-sent connection is never held open for long);
* not a valid report / a bad field      -> 400 with the reason (`validate_cdr`: what the
  index would refuse, e.g. a start in year 9999 or a duration of centuries, is refused
  here, with one log line);
* NewCdr the index refuses anyway        -> 400 (InvalidCallDetail from `commit`: never 503,
  which would have the PBX send it again and again);
* NewCdr  -> recorded in the index (group commit), THEN 200; 503 if the index fails;
* BootUp  -> the session is told to log in again, 200;
* anything else -> logged, 200 (the PBX re-sends until it gets 200).

The S-Series PBX does not sign its reports, hence the secret path (handed to the PBX in
the login's `url`) and the source allow-list. The secret path is never logged.

A P-Series PBX's receiver (`webhook=True`) takes its **webhooks** instead (Integrations >
API > Webhook Event Push), at the same secret path and from the same allow-list:

* not POST or GET                       -> 405;
* no webhook secret kept for the PBX    -> 401 (nothing read further);
* `X-Signature` missing or not Base64(HMAC-SHA256(secret, raw body)) -> 401, checked in
  constant time over the raw bytes BEFORE anything parses them; one log line;
* a GET carries the event as its body, or (empty body) as the query parameter ``body``,
  signed the same way;
* not a P-Series event                  -> 400;
* 30012 (NewCdr) -> checked and committed as a report above (the same answers), THEN 200;
* any other event type -> 200, ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, tzinfo
from typing import TYPE_CHECKING, Any

from callvault.index import InvalidCallDetail, call_detail_problem
from callvault.pbx import (
    BootUpEvent,
    CallDetail,
    Event,
    NewCdrEvent,
    PbxError,
    parse_event,
    parse_pseries_event,
    verify_webhook_signature,
)
from callvault.times import pbx_time_problem

if TYPE_CHECKING:
    from callvault.index import RecordResult

log = logging.getLogger("callvault.archive")

DEFAULT_MAX_BODY = 64 * 1024
# A report is a few hundred bytes: a body still not complete after this long is not a PBX
# sending slowly but a connection holding the receiver open (headers have their own limit,
# see callvault.serving).
DEFAULT_BODY_TIMEOUT_S = 10.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAX_VERDICTS = 1024


def new_secret_path() -> str:
    """A fresh unguessable path segment for the receiver (URL-safe characters only)."""
    return "callvault-events-" + secrets.token_urlsafe(24)


class SourceAllowList:
    """The addresses the PBX may post from: single IPs or networks (CIDR)."""

    def __init__(self, entries: Iterable[str]) -> None:
        networks: list[IpNetwork] = []
        for entry in entries:
            text = entry.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ValueError(f"not an IP address or network: {text!r}") from exc
        if not networks:
            raise ValueError("the events source allow-list is empty")
        self.networks: tuple[IpNetwork, ...] = tuple(networks)
        # The PBX posts from one or two addresses: remember the verdicts (bounded).
        self._verdicts: dict[str, bool] = {}

    def allows(self, host: str | None) -> bool:
        if not host:
            return False
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = self._check(host)
            if len(self._verdicts) >= _MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        return verdict

    def _check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return f"SourceAllowList({self})"

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.networks) or "none"


def resolve_addresses(host: str) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def validate_cdr(cdr: CallDetail, tz: tzinfo) -> str | None:
    """Why a NewCdr cannot be stored as it is, or None when it can.

    The receiver's own rules (no control characters in the callid or the recording name:
    they would forge log lines; `timestart` exactly in the PBX's form), then the index's
    door, `call_detail_problem` (identifiers that fit, times in range in the PBX's zone
    `tz`, believable durations): a report refused here gets 400 and is never retried.
    """
    if cdr.callid and _CONTROL.search(cdr.callid):
        return "the callid has control characters"
    if cdr.recording is not None and _CONTROL.search(cdr.recording):
        return "the recording name has control characters"
    if cdr.timestart:
        if cdr.timestart != cdr.timestart.strip():
            return "timestart is not 'YYYY-MM-DD hh:mm:ss'"
        problem = pbx_time_problem(cdr.timestart, tz)
        if problem is not None:
            return problem
    return call_detail_problem(cdr, tz)


ASGIApp = Callable[
    [
        dict[str, Any],
        Callable[[], Awaitable[dict[str, Any]]],
        Callable[[dict[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _answer_bytes(status: int, message: str) -> bytes:
    answer = _ANSWERS.get((status, message))
    if answer is None:
        body = {"status": "Success" if status == 200 else "Failed", "message": message}
        answer = json.dumps(body).encode()
    return answer


# The answers sent again and again, encoded once.
_ANSWERS: dict[tuple[int, str], bytes] = {}
_ANSWERS.update(
    {key: _answer_bytes(*key) for key in ((200, "stored"), (200, "noted"), (200, "ignored"))}
)


def create_receiver_app(
    *,
    secret_path: str,
    allowed: SourceAllowList,
    commit: Callable[[CallDetail], Awaitable[RecordResult]],
    on_bootup: Callable[[Event], None] | None = None,
    on_other: Callable[[Event], None] | None = None,
    on_answer: Callable[[int], None] | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    tz: tzinfo = UTC,
    webhook: bool = False,
    webhook_secret: str | None = None,
) -> ASGIApp:
    """Build the receiver's ASGI app. `commit` returns once the record is durable; `tz` is
    the PBX's zone, in which its times are read and range-checked. `on_answer` is told the
    HTTP status of every answer (the archiver's metrics count them).

    `webhook`: the receiver of a P-Series PBX, which takes its signed webhooks (see the
    module docstring), each checked with `webhook_secret` (None: every one is refused).

    A bare ASGI callable rather than a Starlette app: it is the hot path (>= 1000 reports
    a second on two cores) and has a single route, so the router, request and response
    objects are left out; uvicorn serves it like any other ASGI app.
    """
    secret = secret_path.strip("/").encode()
    too_large = f"the report is larger than {max_body} bytes"

    async def app(
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return
        try:
            status, message = await handle(scope, receive)
        except _Refused as refused:
            status, message = refused.status, refused.message
        if on_answer is not None:
            with contextlib.suppress(Exception):  # counting never fails a report
                on_answer(status)
        body = _answer_bytes(status, message)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def read_body(
        headers: list[tuple[bytes, bytes]], receive: Callable[[], Awaitable[dict[str, Any]]]
    ) -> bytes:
        for name, value in headers:
            if name == b"content-length" and (not value.isdigit() or int(value) > max_body):
                raise _Refused(413, too_large)
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + body_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _Refused(408, "the report's body did not arrive in time") from None
            if message["type"] == "http.disconnect":
                raise _Refused(400, "the PBX closed the connection mid-report")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_body:
                raise _Refused(413, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def handle(
        scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]]
    ) -> tuple[int, str]:
        client = scope.get("client")
        source = client[0] if client else None
        if source is None:  # the server could not tell who sent it (gone already)
            log.warning("event refused: its sender's address is unknown (it hung up early)")
            return 403, "this address may not post events"
        if not allowed.allows(source):
            log.warning("event refused: source %s is not allowed to post events", source)
            return 403, "this address may not post events"
        path = scope.get("raw_path") or scope["path"].encode()
        if not hmac.compare_digest(path.split(b"?", 1)[0].strip(b"/"), secret):
            log.warning("event refused from %s: wrong path", source)
            return 404, "not found"
        if webhook:
            return await handle_webhook(scope, receive, source)
        if scope["method"] != "POST":
            return 405, "events are POSTed"
        body = await read_body(scope["headers"], receive)
        try:
            event = parse_event(body)
        except (PbxError, ValueError) as exc:
            log.warning("event refused from %s: %s", source, exc)
            return 400, f"not a valid report: {exc}"
        if isinstance(event, NewCdrEvent):
            return await store(event.cdr, source)
        if isinstance(event, BootUpEvent):
            log.info("the PBX reports it restarted (BootUp): logging in again")
            if on_bootup is not None:
                on_bootup(event)
            return 200, "noted"
        log.debug("event %s ignored", event.name)
        if on_other is not None:
            on_other(event)
        return 200, "ignored"

    async def store(cdr: CallDetail, source: str) -> tuple[int, str]:
        """Check a NewCdr and commit it: 200 once durable, else why not."""
        problem = validate_cdr(cdr, tz)
        if problem is not None:
            log.warning(
                "NewCdr for call %s refused from %s: %s",
                _one_line(cdr.callid, 80),
                source,
                _one_line(problem),
            )
            return 400, problem
        try:
            await commit(cdr)
        except InvalidCallDetail as exc:
            # The index refuses the record itself (a field it cannot store): sending it
            # again would fail the same way, so this is the PBX's error, not ours.
            reason = _one_line(exc)
            log.warning("NewCdr from %s refused by the index: %s", source, reason)
            return 400, f"the index refuses this report: {reason}"
        except Exception as exc:
            log.error("NewCdr for call %s not stored: %s", _one_line(cdr.callid), _one_line(exc))
            return 503, "the index could not store the report; send it again"
        return 200, "stored"

    async def handle_webhook(
        scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], source: str
    ) -> tuple[int, str]:
        """A P-Series PBX's webhook: its signature checked over the raw bytes, then (only
        then) parsed; a NewCdr stored, anything else ignored."""
        method = scope["method"]
        if method not in ("POST", "GET"):
            return 405, "webhooks are POSTed (or sent by GET)"
        if webhook_secret is None:
            log.warning(
                "webhook refused from %s: no webhook secret is kept for this PBX (callvault "
                "pbx edit NAME --webhook-secret-env VAR)",
                source,
            )
            return 401, "no webhook secret is set for this PBX"
        body = await read_body(scope["headers"], receive)
        if method == "GET" and not body:
            body = query_body(scope.get("query_string") or b"")
        signature = next(
            (value for name, value in scope["headers"] if name == b"x-signature"), None
        )
        if signature is None:
            log.warning("webhook refused from %s: it has no X-Signature", source)
            return 401, "no X-Signature: not a signed webhook"
        if not verify_webhook_signature(
            webhook_secret, body, signature.decode("latin-1", "replace")
        ):
            log.warning("webhook refused from %s: its X-Signature is wrong", source)
            return 401, "wrong X-Signature: not signed with this PBX's webhook secret"
        try:
            event = parse_pseries_event(body)
        except (PbxError, ValueError) as exc:
            log.warning("webhook refused from %s: %s", source, _one_line(exc))
            return 400, f"not a valid event: {_one_line(exc)}"
        if isinstance(event, NewCdrEvent):
            return await store(event.cdr, source)
        log.debug("webhook event %s ignored", event.name)
        if on_other is not None:
            on_other(event)
        return 200, "ignored"

    def query_body(query: bytes) -> bytes:
        """The event a GET webhook carries as its query parameter ``body`` (b"" if none)."""
        if len(query) > 3 * max_body:  # percent-encoding at most triples it
            raise _Refused(413, too_large)
        try:
            pairs = urllib.parse.parse_qsl(
                query.decode("ascii"), keep_blank_values=True, errors="strict"
            )
        except (UnicodeDecodeError, ValueError):
            raise _Refused(400, "the query string is not URL-encoded UTF-8") from None
        found = next((value for name, value in pairs if name == "body"), "")
        body = found.encode()
        if len(body) > max_body:
            raise _Refused(413, too_large)
        return body

    return app


def _one_line(value: object, limit: int = 200) -> str:
    """`value` as text for a log line: no control characters (no forged lines), bounded."""
    text = _CONTROL.sub("?", str(value))
    return text if len(text) <= limit else text[:limit] + "..."


def allow_list_for(pbx_host: str, configured: Sequence[str] | None) -> SourceAllowList:
    """The configured allow-list, or by default every address the PBX's host resolves to."""
    if configured:
        return SourceAllowList(configured)
    return SourceAllowList(resolve_addresses(pbx_host))
