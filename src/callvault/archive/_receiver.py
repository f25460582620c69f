"""The events receiver: the HTTP endpoint the PBX pushes its reports to.

Routes, in the order a request meets them:

* source address not in the allow-list -> 403 (nothing read, nothing stored);
* any path but the secret one           -> 404;
* not POST                              -> 405;
* body over `max_body` bytes            -> 413;
* not a valid report / a bad field      -> 400 with the reason;
* NewCdr  -> recorded in the index (group commit), THEN 200;
* BootUp  -> the session is told to log in again, 200;
* anything else -> logged, 200 (the PBX re-sends until it gets 200).

The PBX does not sign its reports, hence the secret path (handed to the PBX in the
login's `url`) and the source allow-list. The secret path is never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from callvault.pbx import BootUpEvent, NewCdrEvent, PbxError, parse_event
from callvault.pbx._types import CallDetail, Event

if TYPE_CHECKING:
    from callvault.index import RecordResult

log = logging.getLogger("callvault.archive")

SECRET_SETTING = "events_secret_path"  # noqa: S105 - a settings key, not a secret
DEFAULT_MAX_BODY = 64 * 1024
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
_TIMESTART = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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

    def allows(self, host: str | None) -> bool:
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return f"SourceAllowList({', '.join(str(n) for n in self.networks)})"


def resolve_addresses(host: str) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def validate_cdr(cdr: CallDetail) -> str | None:
    """Why a NewCdr cannot be stored as it is, or None when it can."""
    if not cdr.callid.strip():
        return "the report has no callid"
    if len(cdr.callid) > 64 or _CONTROL.search(cdr.callid):
        return "the callid is too long or has control characters"
    if cdr.timestart and not _TIMESTART.match(cdr.timestart):
        return "timestart is not 'YYYY-MM-DD hh:mm:ss'"
    if cdr.recording is not None:
        if len(cdr.recording) > 255:
            return "the recording name is longer than 255 characters"
        if _CONTROL.search(cdr.recording):
            return "the recording name has control characters"
    if cdr.timestart:
        try:
            datetime.strptime(cdr.timestart, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return "timestart is not a valid date and time"
    return None


def create_receiver_app(
    *,
    secret_path: str,
    allowed: SourceAllowList,
    commit: Callable[[CallDetail], Awaitable[RecordResult]],
    on_bootup: Callable[[Event], None] | None = None,
    on_other: Callable[[Event], None] | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> Starlette:
    """Build the receiver's ASGI app. `commit` returns once the record is durable."""
    secret = secret_path.strip("/").encode()

    def answer(status: int, message: str) -> Response:
        body = {"status": "Success" if status == 200 else "Failed", "message": message}
        return JSONResponse(body, status_code=status, headers={"Connection": "close"})

    async def receive_event(request: Request) -> Response:
        source = request.client.host if request.client else None
        if not allowed.allows(source):
            log.warning("event refused: source %s is not allowed to post events", source)
            return answer(403, "this address may not post events")
        if not hmac.compare_digest(request.url.path.strip("/").encode(), secret):
            log.warning("event refused from %s: wrong path", source)
            return answer(404, "not found")
        if request.method != "POST":
            return answer(405, "events are POSTed")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            return answer(413, f"the report is larger than {max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    return answer(413, f"the report is larger than {max_body} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            return answer(400, "the PBX closed the connection mid-report")
        body = b"".join(chunks)
        try:
            event = parse_event(body)
        except (PbxError, ValueError) as exc:
            log.warning("event refused from %s: %s", source, exc)
            return answer(400, f"not a valid report: {exc}")
        if isinstance(event, NewCdrEvent):
            problem = validate_cdr(event.cdr)
            if problem is not None:
                log.warning("NewCdr refused from %s: %s", source, problem)
                return answer(400, problem)
            try:
                await commit(event.cdr)
            except Exception as exc:
                log.error("NewCdr for call %s not stored: %s", event.cdr.callid, exc)
                return answer(503, "the index could not store the report; send it again")
            return answer(200, "stored")
        if isinstance(event, BootUpEvent):
            log.info("the PBX reports it restarted (BootUp): logging in again")
            if on_bootup is not None:
                on_bootup(event)
            return answer(200, "noted")
        log.debug("event %s ignored", event.name)
        if on_other is not None:
            on_other(event)
        return answer(200, "ignored")

    return Starlette(routes=[Route("/{rest:path}", receive_event, methods=_METHODS)])


def allow_list_for(pbx_host: str, configured: Sequence[str] | None) -> SourceAllowList:
    """The configured allow-list, or by default every address the PBX's host resolves to."""
    if configured:
        return SourceAllowList(configured)
    return SourceAllowList(resolve_addresses(pbx_host))
